"""Shared fixtures: one smoke build of the whole book per pytest session, used by the build and
browser tests; a local HTTP server over the built HTML; one uninterrupted run of the queue's tiny chapter,
the reference of the queue and lease tests.

`make test` runs pytest on every core where there are 4 or more (pytest-xdist, `-n auto --dist loadgroup`). The tests that share one of
these session fixtures live in the modules of one group (SHARED_FIXTURE_GROUPS), and the scheduler below sends a
whole group to one worker, so each fixture is still computed once while the other tests run beside it. A test
that uses a shared fixture from a module outside its group fails at setup, before a second book build.

In one process (CI on 2 cores), the smoke book build starts in the background as soon as the tests are collected,
at a lower CPU priority (nice), and the tests that read the built book run last: the build fills the core the other
tests leave idle (they wait on kernels, subprocesses and sleeps), instead of running alone for ~3 minutes."""
from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))


def toc_notebooks() -> list[str]:
    """The toc's entries (book order), as written in _toc.yml."""
    from build_book import toc_files
    return toc_files(yaml.safe_load((REPO / "_toc.yml").read_text()))


# Session fixtures worth computing once, and the test modules allowed to use them (one group, one worker).
SHARED_FIXTURE_GROUPS = {
    "book": ({"built_book", "served_book"}, {"test_build.py", "test_browser.py", "test_static_html.py"}),
    "tiny-reference": ({"tiny_reference"}, {"test_queue.py", "test_lease.py"}),
}


def shared_group(nodeid: str) -> str | None:
    """The group whose modules hold this test (None: a test any worker may run on its own)."""
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return next((g for g, (_, modules) in SHARED_FIXTURE_GROUPS.items() if module in modules), None)


def pytest_runtest_setup(item):
    for group, (fixtures, modules) in SHARED_FIXTURE_GROUPS.items():
        used = fixtures & set(getattr(item, "fixturenames", ()))
        if used and shared_group(item.nodeid) != group:
            pytest.fail(f"{item.nodeid} uses {', '.join(sorted(used))}, but its module is not in the {group!r} group "
                        f"({', '.join(sorted(modules))}): under xdist it would compute that fixture a second time. "
                        "Move the test into one of those modules or add its module to SHARED_FIXTURE_GROUPS in "
                        "tests/conftest.py", pytrace=False)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under `--dist loadgroup`: xdist's scope scheduler, with a scope per shared-fixture group and one per
    other test (xdist's own xdist_group marks no longer reach the scheduler under pytest 9.2)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return shared_group(nodeid) or nodeid

    return SharedFixtureScheduling(config, log)


BOOK_FIXTURES = SHARED_FIXTURE_GROUPS["book"][0]


def _book_build_cmd(base: Path) -> list[str]:
    """The smoke build of the whole book into base/build, with a fresh, empty results store in base/results."""
    return [sys.executable, str(REPO / "tools" / "build_book.py"), "--profile", "smoke",
            "--results", str(base / "results"), "--build-dir", str(base / "build"), "--timeout", "300"]
    # --timeout: no smoke cell needs a minute; a rare papermill hang after a widget cell (retried once by the
    # build) then costs 5 minutes, not 10


class BookBuild:
    """One run of _book_build_cmd as a subprocess (stdout to base/build.log); wait() gives what built_book returns."""

    def __init__(self, base: Path, nice: int = 0):
        (base / "results").mkdir(parents=True)
        self.base, self.t0 = base, time.time()
        self.log = open(base / "build.log", "w")
        self.proc = subprocess.Popen((["nice", "-n", str(nice)] if nice else []) + _book_build_cmd(base), cwd=REPO,
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True)

    def wait(self) -> SimpleNamespace:
        rc = self.proc.wait()
        wall = time.time() - self.t0
        self.log.close()
        out = (self.base / "build.log").read_text()
        print(out)
        assert rc == 0, f"book build failed ({wall:.0f} s):\n{out[-8000:]}"
        build = self.base / "build"
        return SimpleNamespace(base=self.base, build=build, html=build / "html", results=self.base / "results",
                               stdout=out, wall_s=wall)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


_BACKGROUND_BUILD = pytest.StashKey[BookBuild]()


def _uses_book(item) -> bool:
    return bool(BOOK_FIXTURES & set(getattr(item, "fixturenames", ())))


def pytest_collection_modifyitems(session, config, items):
    """In one process: the tests that read the built book go last, and the build starts now, in the background."""
    if config.option.collectonly or hasattr(config, "workerinput") or config.getoption("numprocesses", default=None):
        return  # under xdist the book group has a worker of its own: built_book builds when first asked
    items.sort(key=_uses_book)  # stable: every other test keeps its order
    if any(_uses_book(item) for item in items) and not os.environ.get("KDBOOK_TEST_BUILD_DIR"):
        config.stash[_BACKGROUND_BUILD] = BookBuild(config._tmp_path_factory.mktemp("book"), nice=10)


def pytest_unconfigure(config):
    build = config.stash.get(_BACKGROUND_BUILD, None)
    if build is not None:
        build.stop()  # a run stopped early (-x, Ctrl-C) leaves no build behind


@pytest.fixture(scope="session")
def built_book(request, tmp_path_factory):
    """The whole book built at profile smoke with a fresh, empty results store (real training): the background
    build started at collection when there is one, else a build now.

    Set KDBOOK_TEST_BUILD_DIR to a build dir of an earlier run (with `results/` inside) to reuse it
    while developing the tests; CI never sets it."""
    reuse = os.environ.get("KDBOOK_TEST_BUILD_DIR")
    if reuse:
        base = Path(reuse)
        return SimpleNamespace(base=base, build=base / "build", html=base / "build" / "html",
                               results=base / "results", stdout="(reused)", wall_s=0.0)
    build = request.config.stash.get(_BACKGROUND_BUILD, None) or BookBuild(tmp_path_factory.mktemp("book"))
    return build.wait()


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory):
    """A clone where test_queue.py's tiny chapter ran uninterrupted, every cell (its test cell too): the records
    every interrupted slice of test_queue.py and test_lease.py must reach (computed once per session)."""
    from test_queue import STEM, make_clone, owed
    tmp = tmp_path_factory.mktemp("tiny-reference")
    ref = make_clone(tmp / "ref")
    owed(ref, "run", "--budget-min", "10", "--out", str(tmp / "ref-out"), "--chapters", STEM, "--all-cells")
    return ref


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def served_book(built_book):
    """http://127.0.0.1:<port> serving the built HTML (a thread of this process)."""
    handler = functools.partial(_QuietHandler, directory=str(built_book.html))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
