"""Headless Chromium over the built book: every chapter page's figures (decoded, and every panel wide enough to
read), and the τ slider (Preliminaries) and the λ slider (§6.2) moving in the static HTML, offline."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
PAGE = "/chapters/10_preliminaries.html"
# the pages with a precomputed-view slider (kdbook.viz.slider_stack) and what it sweeps
SLIDER_PAGES = {"tau": PAGE, "lam": "/chapters/62_optimization.html"}
VISIBLE_STACK_IMAGES = """() => Array.from(document.querySelectorAll('.kdbook-stack img'))
    .filter(i => i.offsetParent !== null && i.getBoundingClientRect().width > 0).map(i => i.src)"""
IMAGES = "() => Array.from(document.images).map(i => ({src: i.src, complete: i.complete, w: i.naturalWidth}))"


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def _open(browser, url, block_outside=False):
    page = browser.new_page()
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    if block_outside:
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("http://127.0.0.1")
                   else route.abort())
    page.goto(url, wait_until="networkidle")
    page.wait_for_selector(".kdbook-slider .noUi-handle", timeout=30_000)
    return page, requests


def _move_slider(page):
    before = page.evaluate(VISIBLE_STACK_IMAGES)
    handle = page.locator(".kdbook-slider .noUi-handle").first
    handle.focus()
    handle.press("ArrowRight")
    page.wait_for_function(f"before => ({VISIBLE_STACK_IMAGES})().join() !== before.join()", arg=before,
                           timeout=10_000)
    return before, page.evaluate(VISIBLE_STACK_IMAGES)


def test_preliminaries_page_figures_slider_and_no_outside_request(browser, served_book, tmp_path):
    page, requests = _open(browser, served_book + PAGE)
    images = page.evaluate(IMAGES)
    figures = [i for i in images if "/_images/" in i["src"]]
    assert figures, "the Preliminaries page shows no figure"
    broken = [i["src"] for i in images if not (i["complete"] and i["w"] > 0)]
    assert not broken, f"images not decoded: {broken}"
    before, after = _move_slider(page)
    assert len(before) == 1 and len(after) == 1, (before, after)
    assert before != after, "moving the τ slider did not change the displayed view"
    shot = tmp_path / "preliminaries.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    outside = _outside(requests, served_book)
    assert not outside, f"requests outside the book: {outside}"
    page.close()


@pytest.mark.parametrize("swept", sorted(SLIDER_PAGES))
def test_slider_works_with_the_network_blocked(browser, served_book, swept):
    page, requests = _open(browser, served_book + SLIDER_PAGES[swept], block_outside=True)
    before, after = _move_slider(page)
    assert before != after
    assert all(u.startswith((served_book, "data:", "blob:", "about:")) for u in requests)
    page.close()


def _outside(requests, served_book):
    "The requested URLs that are not the book's own pages, files or inline data."
    return [u for u in requests if not u.startswith((served_book + "/", "data:", "blob:", "about:"))]


def _pages(built_book, chapters_only=True):
    html = built_book.html
    found = (html / "chapters").glob("*.html") if chapters_only else (
        p for p in html.rglob("*.html") if not any(part.startswith("_") for part in p.relative_to(html).parts[:-1]))
    return sorted(p.relative_to(html).as_posix() for p in found)


VISIT_AT_ONCE = 6  # pages loading side by side (measured here: 58 s for the whole book against 67 s one at a time)


@pytest.fixture(scope="module")
def visited(browser, served_book, built_book):
    """Every page of the built book opened ONCE (a desktop window, 1280 px; requests outside the book aborted and
    listed), with what the checks below read from it: the outside requests of every page, and for chapter pages
    their images, the panel widths of their figures and their visible text outside code and math. Pages load
    VISIT_AT_ONCE at a time, each in its own tab."""
    chapters = set(_pages(built_book))
    pages = _pages(built_book, chapters_only=False)
    out = {}
    for i in range(0, len(pages), VISIT_AT_ONCE):
        opened = [(rel, *_start_visit(browser, served_book, rel)) for rel in pages[i:i + VISIT_AT_ONCE]]
        for rel, page, requests in opened:
            out[rel] = _read_visit(page, requests, served_book, rel in chapters, "/" + rel in SLIDER_PAGES.values())
    return out


def _start_visit(browser, served_book, rel):
    "A new tab navigating to the book's page rel (not waiting for the load), outside requests aborted; (tab, its requests so far)."
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(served_book) else route.abort())
    page.goto(f"{served_book}/{rel}", wait_until="commit")
    return page, requests


def _read_visit(page, requests, served_book, chapter, slider):
    "Wait for the tab to load, read what the checks need, close it."
    page.wait_for_load_state("networkidle")
    report = {"outside": sorted(set(_outside(requests, served_book)))}
    if chapter:
        if slider:
            page.wait_for_selector(".kdbook-slider .noUi-handle", timeout=30_000)
        report["images"] = page.evaluate(IMAGES)
        report["panels"] = page.evaluate(PANEL_WIDTHS)
        # wait until MathJax has typeset the page (it replaces $...$ with mjx-container elements)
        page.evaluate("() => window.MathJax && MathJax.startup && MathJax.startup.promise ? "
                      "MathJax.startup.promise.then(() => true) : true")
        report["text"] = page.evaluate(HIDE_CODE_AND_MATH)  # last: it hides code and math on the page
    page.close()
    return report


def test_every_chapter_page_shows_its_figures(visited):
    """Every executed chapter page loads, and every image on it decodes; pages with sliders render them."""
    pages = [rel for rel, r in visited.items() if "images" in r]
    assert len(pages) >= 10, pages
    for rel in pages:
        broken = [i["src"] for i in visited[rel]["images"] if not (i["complete"] and i["w"] > 0)]
        assert not broken, f"{rel}: images not decoded: {broken}"


# The panels of every figure, measured on the page: in each image, the row of pixels with the most long dark
# horizontal runs is the row of the axes' bottom spines, and each run is one panel's width in the PNG; scaled by
# the image's rendered / natural width, that is the panel's width on the page. (Dashed reference lines, legend
# frames and colour bars are far shorter than a run; images a stack or a fold hides have no width and are skipped,
# and so are figures of the class kdbook-thumbnails: grids of small images with no axes or labels.)
MIN_PANEL_PX = 250
PANEL_WIDTHS = r"""() => Array.from(document.querySelectorAll('main img')).map(img => {
    const rect = img.getBoundingClientRect();
    if (!img.complete || !img.naturalWidth || rect.width === 0) return null;
    if (img.closest('.kdbook-thumbnails')) return null;  // a grid of image thumbnails, no axes to read
    const W = img.naturalWidth, H = img.naturalHeight;
    const canvas = document.createElement('canvas');
    canvas.width = W; canvas.height = H;
    const ctx = canvas.getContext('2d');
    ctx.drawImage(img, 0, 0);
    const d = ctx.getImageData(0, 0, W, H).data;
    const minRun = Math.max(40, Math.round(0.08 * W));
    let best = [];
    for (let y = 0; y < H; y++) {
        const runs = [];
        let start = -1;
        for (let x = 0; x <= W; x++) {
            const k = (y * W + x) * 4;
            const dark = x < W && d[k + 3] > 200 && d[k] < 70 && d[k + 1] < 70 && d[k + 2] < 70;
            if (dark && start < 0) start = x;
            if (!dark && start >= 0) { if (x - start >= minRun) runs.push(x - start); start = -1; }
        }
        if (runs.length > best.length) best = runs;
    }
    const scale = rect.width / W;
    return {src: img.src.slice(0, 80), rendered: Math.round(rect.width), natural: W,
            panels: best.map(r => Math.round(r * scale))};
}).filter(x => x)"""


def test_the_panel_measure_finds_narrow_panels(browser, tmp_path):
    """The measure itself: a PNG of four panels in a row shown 600 px wide has panels under 250 px; the same
    figure as a 2 × 2 grid shown at its natural size does not."""
    import base64
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kdbook.viz import figure_to_png, panel_grid

    def png(fig):
        for ax in fig.axes:
            ax.plot([0, 1], [0, 1])
        return base64.b64encode(figure_to_png(fig, dpi=100)).decode()

    row, _ = plt.subplots(1, 4, figsize=(16, 3))
    grid, _ = panel_grid(4)
    (tmp_path / "p.html").write_text(f'<main><img style="width:600px" src="data:image/png;base64,{png(row)}">'
                                     f'<img src="data:image/png;base64,{png(grid)}"></main>')
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto((tmp_path / "p.html").as_uri())
    page.wait_for_function("() => Array.from(document.images).every(i => i.complete)")
    row_m, grid_m = page.evaluate(PANEL_WIDTHS)
    page.close()
    assert len(row_m["panels"]) == 4 and max(row_m["panels"]) < MIN_PANEL_PX, row_m
    assert len(grid_m["panels"]) == 2 and min(grid_m["panels"]) >= MIN_PANEL_PX, grid_m


def test_every_figure_panel_is_wide_enough_on_the_page(visited):
    """No panel of any figure of any chapter is shown under MIN_PANEL_PX wide (a desktop window, 1280 px): a
    wider figure is shrunk to the text column, and its labels with it."""
    assert any("panels" in r for r in visited.values()), "no chapter pages were built"
    narrow = [f"{rel}: {len(fig['panels'])} panel(s) of {fig['panels']} px (image {fig['natural']} px shown at "
              f"{fig['rendered']} px): {fig['src']}"
              for rel, r in visited.items() for fig in r.get("panels", [])
              if fig["panels"] and min(fig["panels"]) < MIN_PANEL_PX]
    assert not narrow, (f"figures with panels under {MIN_PANEL_PX} px on the page (use kdbook.viz.panel_grid: at most "
                        "two panels a row):\n" + "\n".join(narrow))


# Markup that should never reach a reader: a `$` that MathJax did not typeset, an escaped underscore, a pipe
# table printed as text. Code (pre, code) and typeset math are hidden before the page's text is read.
RAW_MARKUP = {"raw $ (math not typeset)": r"\$", "raw \\_ (escaped markup)": r"\\_",
              "raw pipe table (|---|)": r"\|\s*:?-{3,}:?\s*\|"}
HIDE_CODE_AND_MATH = r"""() => {
    const style = document.createElement('style');
    style.textContent = 'pre, code, .highlight, mjx-container, .MathJax, script, style, .cell_input ' +
                        '{ display: none !important; }';
    document.head.appendChild(style);
    const main = document.querySelector('main') || document.body;
    // text inside typeset math (\text{...} becomes mtext): markup escaped there shows as typed, e.g. sigma\_frac
    const mtext = Array.from(main.querySelectorAll('mjx-container mtext')).map(e => e.textContent).join('\n');
    return main.innerText + '\n' + mtext;
}"""


def test_no_raw_markup_in_any_page_text(visited):
    """No page shows raw LaTeX dollars, `\\_`, or a `|---|` pipe table in its visible text (outside code)."""
    import re
    assert any("text" in r for r in visited.values()), "no chapter pages were built"
    found = []
    for rel, r in visited.items():
        text = r.get("text", "")
        for what, pattern in RAW_MARKUP.items():
            for m in re.finditer(pattern, text):
                found.append(f"{rel}: {what}: …{text[max(0, m.start() - 60):m.end() + 60]!r}…")
    assert not found, "raw markup in rendered pages:\n" + "\n".join(found[:30])


def test_no_page_of_the_book_requests_anything_from_outside(visited):
    """Every page of the built book (chapters, API reference, index, search...) is opened; every request it makes,
    scripts, styles, images and fonts included, must go to the book's own server (outside ones are aborted
    and listed)."""
    assert len(visited) >= 10, sorted(visited)
    outside = {rel: r["outside"] for rel, r in visited.items() if r["outside"]}
    assert not outside, f"pages requesting addresses outside the book: {outside}"
