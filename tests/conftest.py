"""Shared fixtures: one smoke build of the whole book per pytest session, used by the build and
browser tests; a local HTTP server over the built HTML; one uninterrupted run of the queue's tiny chapter,
the reference of the queue and lease tests.

`make test` runs pytest on every core where there are 4 or more (pytest-xdist, `-n auto --dist loadgroup`). The tests that share one of
these session fixtures live in the modules of one group (SHARED_FIXTURE_GROUPS), and the scheduler below sends a
whole group to one worker, so each fixture is still computed once while the other tests run beside it. A test
that uses a shared fixture from a module outside its group fails at setup, before a second book build."""
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


@pytest.fixture(scope="session")
def built_book(tmp_path_factory):
    """Build the whole book at profile smoke with a fresh, empty results store (real training).

    Set KDBOOK_TEST_BUILD_DIR to a build dir of an earlier run (with `results/` inside) to reuse it
    while developing the tests; CI never sets it."""
    reuse = os.environ.get("KDBOOK_TEST_BUILD_DIR")
    if reuse:
        base = Path(reuse)
        return SimpleNamespace(base=base, build=base / "build", html=base / "build" / "html",
                               results=base / "results", stdout="(reused)", wall_s=0.0)
    base = tmp_path_factory.mktemp("book")
    results, build = base / "results", base / "build"
    results.mkdir()
    cmd = [sys.executable, str(REPO / "tools" / "build_book.py"), "--profile", "smoke",
           "--results", str(results), "--build-dir", str(build), "--timeout", "300"]  # no smoke cell needs a minute; a
    # rare papermill hang after a widget cell (retried once by the build) then costs 5 minutes, not 10
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.time() - t0
    print(proc.stdout)
    assert proc.returncode == 0, f"book build failed ({wall:.0f} s):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return SimpleNamespace(base=base, build=build, html=build / "html", results=results, stdout=proc.stdout,
                           wall_s=wall)


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
