"""End-to-end: the whole book at profile smoke (tools/build_book.py), then a re-run served from the store."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, toc_notebooks
from test_queue import without_times

sys.path.insert(0, str(REPO / "tools"))
import owed as owed_tool  # noqa: E402
from build_book import THREAD_VARS  # noqa: E402

pytestmark = pytest.mark.build
CDN = re.compile(r"cdn\.jsdelivr\.net|cdnjs\.cloudflare\.com|unpkg\.com|googleapis\.com|gstatic\.com|"
                 r"cdn\.mathjax\.org|code\.jquery\.com|bootstrapcdn\.com|cdn\.plot\.ly|requirejs\.org")


def _pages(built_book):
    return {e: built_book.html / (e.removesuffix(".ipynb").removesuffix(".md") + ".html") for e in toc_notebooks()}


def test_a_page_per_chapter(built_book):
    missing = [str(p) for p in _pages(built_book).values() if not p.is_file()]
    assert not missing, f"no HTML page for {missing}"
    assert (built_book.html / "index.html").is_file()


# A directive in rendered code: a pygments comment span or a line of a <pre> block starting with `#|`.
# (Prose may still mention `#| export` as inline code: that renders as <span class="pre">.)
DIRECTIVE_IN_CODE = re.compile(r'(?:<span class="c1?">|<pre>|\n)[ \t]*#\|')


def test_no_nbdev_directives_in_pages(built_book):
    for page in _pages(built_book).values():
        text = page.read_text()
        hits = [text[m.start():m.end() + 30] for m in DIRECTIVE_IN_CODE.finditer(text)]
        assert not hits, f"{page.name} shows nbdev directives: {hits[:3]}"


def test_directive_detector_can_fail():
    assert DIRECTIVE_IN_CODE.search('<div class="highlight"><pre><span></span><span class="c1">#| hide</span>')
    assert DIRECTIVE_IN_CODE.search("<pre>x = 1\n#| export\n")
    assert not DIRECTIVE_IN_CODE.search('<code><span class="pre">#|</span> <span class="pre">export</span></code>')


def _nb(*cells):
    import nbformat
    nb = nbformat.v4.new_notebook()
    for source, tags in cells:
        c = nbformat.v4.new_code_cell(source)
        if tags:
            c.metadata["tags"] = list(tags)
        nb.cells.append(c)
    return nb


def test_long_code_cells_are_folded_and_short_ones_and_the_parameters_stay_open():
    from build_book import FOLD_LINES, postprocess
    long = "#| export\n" + "\n".join(f"x{i} = {i}" for i in range(FOLD_LINES + 1))
    short = "#| export\n" + "\n".join(f"y{i} = {i}" for i in range(FOLD_LINES))
    plain = "\n".join(f"z{i} = {i}" for i in range(FOLD_LINES + 5))
    hidden = "#| export\n#| echo: false\n" + "\n".join(f"w{i} = {i}" for i in range(FOLD_LINES + 5))
    params = "\n".join(f"p{i} = {i}  # a parameter" for i in range(FOLD_LINES + 5))
    nb = _nb((long, ()), (short, ()), (plain, ()), (hidden, ()), (params, ("parameters",)))
    postprocess(nb)
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    assert tags == [["hide-input"], [], ["hide-input"], ["remove-input"], ["parameters"]], tags
    assert not nb.cells[0].source.startswith("#|")


def test_the_parameters_cell_is_shown_once_with_the_values_the_chapter_ran_with():
    from build_book import postprocess
    params = ('profile = "smoke"  # smoke | quick | paper\nseed = 0  # first seed\nname = "a # b"  # a name\n'
              'tau = 4.0  # τ, softmax temperature')
    nb = _nb((params, ("parameters",)), ('# Parameters\nprofile = "quick"\nname = "c"\ntau = 0.5\n',
                                         ("injected-parameters",)), ("print(profile)", ()))
    postprocess(nb)
    assert len(nb.cells) == 2, "the injected-parameters cell is still in the page"
    assert nb.cells[0].source == ('profile = "quick"  # smoke | quick | paper\nseed = 0  # first seed\n'
                                  'name = "c"  # a name\ntau = 0.5  # τ, softmax temperature')
    # a name the parameters cell does not assign: both cells stay, nothing is lost
    nb = _nb((params, ("parameters",)), ("# Parameters\nother = 1\n", ("injected-parameters",)))
    postprocess(nb)
    assert len(nb.cells) == 2 and nb.cells[0].source == params


def test_no_cdn_address_in_any_page(built_book):
    pages = list(built_book.html.rglob("*.html"))
    assert pages
    for page in pages:
        hits = sorted(set(CDN.findall(page.read_text())))
        assert not hits, f"{page.relative_to(built_book.html)} refers to {hits}"


def test_vendored_assets_present(built_book):
    static = built_book.html / "_static" / "vendor"
    for rel in ("mathjax/tex-mml-chtml.js", "requirejs/require.js", "html-manager/embed-amd.js", "require-config.js"):
        assert (static / rel).is_file(), rel


def test_preliminaries_has_figures_and_colab_button(built_book):
    page = built_book.html / "chapters" / "10_preliminaries.html"
    html = page.read_text()
    figures = re.findall(r'<img[^>]+src="(\.\./_images/[^"]+)"', html)
    assert figures, "no figure (<img> from _images/) in the Preliminaries page"
    for src in figures:
        assert (page.parent / src).resolve().is_file(), src
    assert "colab.research.google.com/github/kdbook/kdbook/blob/main/chapters/10_preliminaries.ipynb" in html


def test_every_chapter_has_colab_button(built_book):
    for entry, page in _pages(built_book).items():
        if entry.endswith(".md") or not (REPO / (entry.removesuffix(".ipynb") + ".ipynb")).exists():
            continue
        stem = entry.removesuffix(".ipynb")
        assert f"colab.research.google.com/github/kdbook/kdbook/blob/main/{stem}.ipynb" in page.read_text(), entry


def test_hidden_colab_cell_removed(built_book):
    for page in _pages(built_book).values():
        assert "google.colab" not in page.read_text(), f"{page.name} shows the hidden Colab cell"


def _store_lines(nb_path: Path) -> list[str]:
    nb = json.loads(nb_path.read_text())
    lines = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            text = out.get("text", "")
            text = text if isinstance(text, str) else "".join(text)
            lines += [l for l in text.splitlines() if l.startswith("store: ")]
    return lines


def test_rerun_is_served_from_the_store(built_book, tmp_path):
    """A chapter that computed results in the full build computes nothing when re-run on the same store."""
    staged = built_book.build / "src"
    chapter = next((e for e in toc_notebooks() if (staged / (e.removesuffix(".ipynb") + ".ipynb")).is_file()
                    and any(l.startswith("store: computed") for l in
                            _store_lines(staged / (e.removesuffix(".ipynb") + ".ipynb")))), None)
    # the store's own progress lines may be silenced: then the Preliminaries, which train their LeNet-5 through it
    chapter = chapter or next(e for e in toc_notebooks() if "10_preliminaries" in e)
    records = {p: p.stat().st_mtime_ns for p in built_book.results.rglob("*.json")}
    assert records, "the fresh results store is still empty after the build"
    cmd = [sys.executable, str(REPO / "tools" / "build_book.py"), "--profile", "smoke", "--only", chapter,
           "--results", str(built_book.results), "--build-dir", str(tmp_path / "rerun"), "--no-html"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"records recomputed: none (every stored number was read from {built_book.results.resolve()})" \
        in proc.stdout, proc.stdout[-3000:]
    lines = _store_lines(tmp_path / "rerun" / "src" / (chapter.removesuffix(".ipynb") + ".ipynb"))
    assert all(l.startswith("store: reused") for l in lines), lines
    after = {p: p.stat().st_mtime_ns for p in built_book.results.rglob("*.json")}
    assert after == records, "re-running the chapter rewrote or added records"


# ---------- strictness: tiny fake books built with --no-html (no full build needed) ----------
def _fake_book(root: Path, body: str, params: str = 'profile = "smoke"\nresults_dir = "../results"\nseed = 0\n'
               'rate = 0.5\nverbose = False\nname = "x"') -> Path:
    "A one-chapter book whose chapter has a `parameters` cell and then `body`."
    import nbformat
    (root / "chapters").mkdir(parents=True)
    (root / "results").mkdir()
    (root / "_config.yml").write_text("title: fake\n")
    (root / "_toc.yml").write_text("format: jb-book\nroot: chapters/c\n")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "kdbook", "display_name": "kdbook", "language": "python"}
    p = nbformat.v4.new_code_cell(params)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell("import os, sys, time"), nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, root / "chapters" / "c.ipynb")
    return root


def _build(root: Path, *args, timeout=300):
    cmd = [sys.executable, str(REPO / "tools" / "build_book.py"), "--root", str(root), "--build-dir",
           str(root / "_build"), "--profile", "smoke", "--no-html", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args,words", [
    (["-p", "sed", "3"], "no chapter built here has a parameter 'sed' (did you mean seed?); the parameters of c are: "
                         "name, profile, rate, results_dir, seed, verbose"),
    (["-p", "seed", "abc"], "c's parameter seed (default 0) expects an integer"),
    (["-p", "rate", "nan"], "expects a finite number"),
    (["-p", "verbose", "no"], "expects True or False"),
    (["-p", "profile", "fast"], "unknown profile; use one of smoke, quick, paper"),
])
def test_a_bad_parameter_fails_before_anything_runs(tmp_path, args, words):
    root = _fake_book(tmp_path / "book", 'open("../results/ran", "w").write("yes")')
    proc = _build(root, *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert words in proc.stderr and "nothing was executed" in proc.stderr, proc.stderr
    assert not (root / "results" / "ran").exists() and not (root / "_build" / "logs").exists()


@pytest.mark.parametrize("name,value,words", [("n_examples", "-5", "n_examples must be an integer "
                                                ">= 2, got -5; CKA compares examples pairwise"), ("n_classes", "1", "n_classes must be an integer >= 2, got 1")])
def test_a_value_a_chapter_cannot_take_is_named_in_the_error(tmp_path, name, value, words):
    cmd = [sys.executable, str(REPO / "tools" / "build_book.py"), "--only", "11_metrics", "--profile", "smoke",
           "--results", str(tmp_path / "store"), "--build-dir", str(tmp_path / "b"), "--no-html", "-p", name, value]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "not retried" in proc.stderr, proc.stdout + proc.stderr
    assert f"ValueError: {words}" in proc.stderr and "AssertionError" not in proc.stderr, proc.stderr


def test_a_python_exception_is_not_retried_and_names_the_cell(tmp_path):
    root = _fake_book(tmp_path / "book", 'raise ValueError("deterministic")')
    proc = _build(root)
    assert proc.returncode == 1
    assert "not retried" in proc.stderr and "Python exception in cell 2" in proc.stderr, proc.stderr
    assert "ValueError: deterministic" in proc.stderr
    assert (root / "_build" / "logs" / "c.log").read_text().count("attempt ") == 1


def test_kernel_death_is_reported_as_such_and_retried_once(tmp_path):
    root = _fake_book(tmp_path / "book", "os._exit(1)")
    proc = _build(root)
    assert proc.returncode == 1
    assert "failed twice" in proc.stderr and "kernel died" in proc.stderr and "cell 2" in proc.stderr, proc.stderr


def test_a_cell_time_out_is_reported_as_such(tmp_path):
    root = _fake_book(tmp_path / "book", "time.sleep(60)")
    proc = _build(root, "--timeout", "3")
    assert proc.returncode == 1
    assert "cell time-out: cell 2" in proc.stderr and "--timeout 3 s" in proc.stderr, proc.stderr


def test_thread_count_is_fixed_whatever_jobs_and_records_are_listed(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the build's own setting wins over the caller's
    root = _fake_book(tmp_path / "book", 'import torch\nopen("../results/threads.txt", "w").write('
                      'f"{torch.get_num_threads()} {os.environ[\'OMP_NUM_THREADS\']}")')
    seen = []
    for jobs in ("1", "2"):
        proc = _build(root, "--jobs", jobs)
        assert proc.returncode == 0, proc.stderr
        seen.append((root / "results" / "threads.txt").read_text())
    assert seen == ["1 1", "1 1"]
    assert "1 thread(s) per chapter" in proc.stdout
    assert "records recomputed: 0 new, 1 rewritten" in proc.stdout and "rewritten: threads.txt" in proc.stdout


def test_a_failed_build_does_not_leave_old_html_looking_current(tmp_path):
    root = _fake_book(tmp_path / "book", 'raise RuntimeError("boom")')
    old = root / "_build" / "html"
    old.mkdir(parents=True)
    (old / "index.html").write_text("<p>old</p>")
    cmd = [sys.executable, str(REPO / "tools" / "build_book.py"), "--root", str(root), "--build-dir",
           str(root / "_build"), "--profile", "smoke"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert not old.exists(), "the previous HTML is still where the book is served from"
    assert (root / "_build" / "html.stale" / "STALE.txt").exists() and "html.stale" in proc.stderr


def test_a_real_chapter_without_its_tests_stores_the_same_records(built_book, tmp_path):
    "10_preliminaries at smoke, only the cells a slice executes, gives the records of the full book build's run."
    stem = "10_preliminaries"
    plan = owed_tool.read_plan(REPO)
    names = plan["chapters"][stem]["stores"]
    full = {p.relative_to(built_book.results).as_posix(): json.loads(p.read_text())
            for n in names for p in sorted((built_book.results / n).glob("*.json"))}
    assert full, f"the smoke build stored no record of {names}"
    kept, dropped = owed_tool.strip_tests(REPO / "chapters" / f"{stem}.ipynb", tmp_path / f"{stem}.ipynb")
    assert dropped > 0, "nothing was left out: the comparison would prove nothing"
    results = tmp_path / "results"
    res = subprocess.run([sys.executable, "-m", "papermill", str(tmp_path / f"{stem}.ipynb"), str(tmp_path / "out.ipynb"),
                          "-k", "kdbook", "--cwd", str(REPO / "chapters"), "-p", "profile", "smoke",
                          "-p", "results_dir", str(results)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, **{v: "1" for v in THREAD_VARS},  # as the build (its --threads 1)
                              "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    assert res.returncode == 0, res.stderr[-3000:]
    mine = {p.relative_to(results).as_posix(): json.loads(p.read_text())
            for n in names for p in sorted((results / n).glob("*.json"))}
    assert sorted(mine) == sorted(full)
    for rel in full:
        assert without_times(mine[rel]) == without_times(full[rel]), f"{rel} differs from the full run's"
