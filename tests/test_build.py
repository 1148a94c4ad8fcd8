"""End-to-end: the whole book at profile smoke (tools/build_book.py), then a re-run served from the store."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, toc_notebooks

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
    assert chapter, "no chapter computed anything through the results store in the smoke build"
    records = {p: p.stat().st_mtime_ns for p in built_book.results.rglob("*.json")}
    assert records, "the fresh results store is still empty after the build"
    cmd = [sys.executable, str(REPO / "tools" / "build_book.py"), "--profile", "smoke", "--only", chapter,
           "--results", str(built_book.results), "--build-dir", str(tmp_path / "rerun"), "--no-html"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = _store_lines(tmp_path / "rerun" / "src" / (chapter.removesuffix(".ipynb") + ".ipynb"))
    assert lines and all(l.startswith("store: reused") for l in lines), lines
    after = {p: p.stat().st_mtime_ns for p in built_book.results.rglob("*.json")}
    assert after == records, "re-running the chapter rewrote or added records"
