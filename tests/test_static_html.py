"""Every file of the built book (.html, .js, .css) is checked statically: no script, style, image, font or
frame is loaded from a non-local address, so the book works offline and tells no third party who reads it; and
no page shows the project's own operations (how and where runs were made, the store's progress lines) to a
reader."""
from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

# scheme-ful or protocol-relative addresses of another host (127.0.0.1 / localhost are the reader's own)
OUTSIDE = r"(?:(?:https?|ftp|wss?):)?//(?!(?:127\.0\.0\.1|localhost)[:/])[A-Za-z0-9.-]+\.[A-Za-z]{2,}[^\s\"'()<>]*"
CSS_URL = re.compile(r"""(?:url\(\s*["']?|@import\s+["'])(""" + OUTSIDE + ")", re.I)
# in scripts: an address of a loadable resource (by extension) or of a known CDN, inside a string literal
RESOURCE = r"\.(?:m?js|css|woff2?|ttf|otf|eot|png|jpe?g|gif|svg|webp|ico)(?:[?#][^\s\"'`]*)?"
CDN_HOST = r"(?:cdn\.|cdnjs\.|unpkg\.com|jsdelivr|googleapis\.com|gstatic\.com|mathjax|jquery\.com|bootstrapcdn|plot\.ly)"
JS_URL = re.compile(r"""["'`](""" + OUTSIDE + ")[\"'`]")
# attributes through which a page loads something (not <a href>, which only links)
LOADING = {("script", "src"), ("img", "src"), ("img", "srcset"), ("source", "src"), ("source", "srcset"),
           ("iframe", "src"), ("embed", "src"), ("object", "data"), ("video", "src"), ("video", "poster"),
           ("audio", "src"), ("track", "src"), ("input", "src"), ("image", "href"), ("use", "href")}
LINK_RELS = {"stylesheet", "preload", "modulepreload", "prefetch", "icon", "shortcut", "apple-touch-icon",
             "manifest", "preconnect", "dns-prefetch"}
OUTSIDE_RE = re.compile("^" + OUTSIDE, re.I)
# Addresses inside vendored libraries that no page of the book reaches, each with what would use it. Any other
# address (or one of these in another file) fails the test; the browser test checks that no page load uses them.
DORMANT = {
    ("_static/vendor/html-manager/", "https://cdn.jsdelivr.net/npm/"):
        "requirejs fallback for third-party widget modules; the book embeds no third-party widget",
    ("_static/vendor/html-manager/", "https://fonts.googleapis.com/css?family=Roboto+Mono"):
        "inside a CSS comment (commented out upstream)",
    ("_static/vendor/mathjax/", "https://cdn.jsdelivr.net/npm/speech-rule-engine@"):
        "MathJax's speech rule engine: loaded only if a reader turns on speech in MathJax's accessibility menu",
    ("_static/vendor/mathjax/", "https://cdn.jsdelivr.net/npm/sre-mathmaps-ie@"): "as above (speech, old IE)",
    ("_static/vendor/mathjax/", "https://cdn.jsdelivr.net/npm/wicked-good-xpath@"): "as above (speech, old IE)",
    ("_static/vendor/mathjax/", "https://www.mathjax.org"): "the link in MathJax's About dialog (not a load)",
}


def dormant(rel: str, url: str) -> bool:
    "Whether `url` in the built file `rel` is one of the DORMANT vendored fallbacks."
    return any(rel.startswith(folder) and url.startswith(prefix) for folder, prefix in DORMANT)


def js_outside(text: str) -> list[str]:
    "Addresses in a script that it could load: resources by extension or any address on a CDN host."
    return [u for u in JS_URL.findall(text) if re.search(RESOURCE + "$", u.split("#")[0], re.I)
            or re.search(CDN_HOST, u, re.I)]


class _Scan(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.found, self._in = [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for name, value in attrs:
            if not value:
                continue
            values = [v.strip().split()[0] for v in value.split(",") if v.strip()] if name.endswith("srcset") else [value]
            loads = (tag, name) in LOADING or (tag == "link" and name == "href" and
                                               LINK_RELS & set((a.get("rel") or "").lower().split()))
            if loads or name in ("xlink:href",):
                self.found += [f"<{tag} {name}={v}>" for v in values if OUTSIDE_RE.match(v.strip())]
            if name == "style":
                self.found += CSS_URL.findall(value)
        self._in = tag if tag in ("script", "style") else None

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        if self._in == "script":
            self.found += js_outside(data)
        elif self._in == "style":
            self.found += CSS_URL.findall(data)


def outside_references(text: str, kind: str) -> list[str]:
    "Non-local addresses a file of `kind` (html, js, css) would load."
    if kind == "css":
        return CSS_URL.findall(text)
    if kind == "js":
        return js_outside(text)
    scan = _Scan()
    scan.feed(text)
    return scan.found


def test_the_scanner_finds_each_kind_of_outside_load():
    bad_html = """<html><head><script src="https://cdn.example.org/x.js"></script>
      <link rel="stylesheet" href="//fonts.googleapis.com/css?family=X"><link rel="icon" href="http://icons.example.com/f.ico">
      <style>@font-face { src: url("https://fonts.gstatic.com/s/x.woff2") }</style></head>
      <body><img src="https://images.example.com/p.png"><img srcset="a.png 1x, https://x.example.com/b.png 2x">
      <div style="background: url(https://bg.example.com/i.jpg)"></div>
      <script>var THEBE_JS_URL = "https://unpkg.com/thebe@0.8.2/lib/index.js"</script></body></html>"""
    found = outside_references(bad_html, "html")
    assert len(found) == 8, found
    assert outside_references("@import 'https://x.example.com/a.css'; a{b:url(//cdn.example.com/f.woff)}", "css")
    assert outside_references('import("https://esm.sh/react.mjs"); s.src = "//cdn.jsdelivr.net/npm/a"', "js")
    ok_html = """<a href="https://arxiv.org/abs/2106.05945">paper</a><script src="_static/x.js"></script>
      <img src="data:image/png;base64,AAAA"><link rel="canonical" href="https://kdbook.example.org/">
      <script>var s = "see https://github.com/x/y for details"; fetch("http://127.0.0.1:8000/a.js")</script>
      <img src="http://localhost:8000/a.png">"""
    assert outside_references(ok_html, "html") == []
    assert dormant("_static/vendor/mathjax/a11y/sre.js", "https://cdn.jsdelivr.net/npm/speech-rule-engine@4")
    assert not dormant("_static/kdbook.js", "https://cdn.jsdelivr.net/npm/speech-rule-engine@4")


@pytest.mark.build
def test_no_page_script_style_image_or_font_comes_from_outside(built_book):
    files = [p for p in built_book.html.rglob("*") if p.suffix in (".html", ".js", ".css") and p.is_file()]
    assert sum(p.suffix == ".html" for p in files) >= 10, "too few pages: is this the whole book?"
    problems = {}
    for p in files:
        rel = p.relative_to(built_book.html).as_posix()
        found = [u for u in outside_references(p.read_text(errors="replace"), p.suffix[1:]) if not dormant(rel, u)]
        if found:
            problems[rel] = sorted(set(found))[:5]
    assert not problems, f"files that load from outside the book: {problems}"


# ---------- what a reader should never be shown: the project's operations, not the book's content ----------
# Checked on what a page shows outside its code cells' source (prose, captions, tables, cell outputs): code may
# legitimately name a `slice`; an output line or a sentence about "the borrowed machine" may not.
OPERATIONS = {
    "a store progress line (store: reused/computed <name> <key>)": r"\bstore: (?:reused|computed)\b",
    "a git-metadata note": r"\bgit[- ]metadata\b|\bno git (?:revision|checkout|repository)\b",
    "a borrowed or leased machine": r"\bborrowed (?:machine|gpu|device)s?\b|\blease[sd]?\b",
    "a device slice": r"\bMIG\b|\b(?:gpu|device|h100|h200|a100) slices?\b|\bslices? of (?:an? |the )?"
                      r"(?:gpu|h100|h200|a100|device|machine)\b",
    "legacy records": r"\blegacy\b",
    "internal files or issue numbers": r"\bFACTS\.md\b|\bshared/|\bissue #\d+|\bhelpers? (?:quick-a|lib|appendix|reader)\b",
}
OPERATIONS_RE = {what: re.compile(p, re.I) for what, p in OPERATIONS.items()}


class _ReaderText(HTMLParser):
    "The text a page shows, without scripts, styles, and the source of code cells (their outputs are kept)."
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.text, self._skip = [], []  # _skip: depth counters of the elements being skipped

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            return
        if self._skip:
            self._skip[-1] += 1
            return
        classes = set((dict(attrs).get("class") or "").split())
        if tag in ("script", "style", "head") or "cell_input" in classes:
            self._skip.append(1)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if self._skip:
            self._skip[-1] -= 1
            if self._skip[-1] == 0:
                self._skip.pop()

    def handle_data(self, data):
        if not self._skip:
            self.text.append(data)


def operations_text(page_html: str) -> list[str]:
    "`what: …context…` for each piece of project-operations text a reader would see on the page."
    scan = _ReaderText()
    scan.feed(page_html)
    text = " ".join(" ".join(scan.text).split())
    return [f"{what}: …{text[max(0, m.start() - 60):m.end() + 60]}…"
            for what, rx in OPERATIONS_RE.items() for m in rx.finditer(text)]


def test_the_operations_scanner_finds_such_text_and_ignores_code():
    bad = """<html><head><title>x</title></head><body><p>Computed on a borrowed machine.</p>
      <div class="cell_output"><pre>store: reused 10-preliminaries 3fa2b1c9</pre></div>
      <p>revision note: the copy had no git metadata</p><p>on a MIG slice of an H100</p>
      <p>3 legacy records</p><p>see FACTS.md</p></body></html>"""
    found = operations_text(bad)
    assert len({f.split(":")[0] for f in found}) == 6, found
    ok = """<html><body><div class="cell tag_hide-input"><div class="cell_input"><div class="highlight"><pre>
      x = images[slice(0, 8)]  # batches are slices; store: reused is the store's log line</pre></div></div>
      <div class="cell_output"><pre>agreement 0.98</pre></div></div><p>The teacher is computed on one H100.</p>
      <script>var legacy = 1</script></body></html>"""
    assert operations_text(ok) == [], operations_text(ok)


@pytest.mark.build
def test_no_page_shows_project_operations(built_book):
    """No page of the book (chapters of every part, the preface, the index) tells the reader how the project ran
    its machines or its store: no store progress lines, git-metadata notes, borrowed machines, slices, legacy
    records, internal files."""
    pages = sorted(p for p in built_book.html.rglob("*.html")
                   if not any(part.startswith("_") for part in p.relative_to(built_book.html).parts[:-1]))
    assert pages, "no pages were built"
    problems = {}
    for p in pages:
        found = operations_text(p.read_text(errors="replace"))
        if found:
            problems[p.relative_to(built_book.html).as_posix()] = found[:5]
    assert not problems, "pages showing project-operations text:\n" + "\n".join(
        f"{rel}:\n  " + "\n  ".join(found) for rel, found in problems.items())


class _Figures(HTMLParser):
    """Content images of a page and whether each sits in a named figure; the figures' ids; the #fig- links."""

    VOID = {"img", "br", "hr", "meta", "link", "input", "source", "area", "base", "col", "embed", "param", "track",
            "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.loose, self.figures, self.links = [], [], [], set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a" and (a.get("href") or "").startswith("#fig-"):
            self.links.add(a["href"][1:])
        if tag == "figure" and a.get("id") and "kdbook-thumbnails" not in (a.get("class") or ""):
            self.figures.append(a["id"])
        if tag == "img":
            named = any(t == "figure" and at.get("id") for t, at in self.stack)
            in_main = any(t == "main" for t, _ in self.stack)
            if in_main and not named and "logo" not in (a.get("alt") or "").lower():
                self.loose.append(a.get("src") or a.get("alt") or "?")
        elif tag not in self.VOID:
            self.stack.append((tag, a))

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break


def figure_problems(page_html: str) -> list[str]:
    "Why a page's figures are not all named and referenced: images outside a named figure, figures never referenced."
    p = _Figures()
    p.feed(page_html)
    return ([f"image outside a named figure: {src[:80]}" for src in p.loose]
            + [f"figure {fid!r} is never referenced ({{numref}})" for fid in p.figures if fid not in p.links])


def test_the_figure_scanner_finds_loose_and_unreferenced_figures():
    ok = ('<main><p>As <a href="#fig-a">Fig. 1</a> shows</p><figure class="align-default" id="fig-a">'
          '<img alt="x" src="../_images/a.png"><figcaption>A.</figcaption></figure>'
          '<img alt="Colab logo" src="logo_colab.png"></main>')
    assert figure_problems(ok) == []
    loose = '<main><div class="cell_output"><img alt="x" src="../_images/b.png"></div></main>'
    assert figure_problems(loose) == ["image outside a named figure: ../_images/b.png"]
    unref = '<main><figure id="fig-c"><img src="c.png"></figure></main>'
    assert figure_problems(unref) == ["figure 'fig-c' is never referenced ({numref})"]


@pytest.mark.build
def test_every_figure_is_named_and_referenced(built_book):
    """Every figure of a chapter is a named MyST figure (glue:figure with :name:) and its page refers to it, so a
    caption (profile, device, trials) always sits under it and the text can point at it."""
    pages = sorted((built_book.html / "chapters").glob("*.html"))
    assert pages, "no chapter pages were built"
    problems = {p.name: found for p in pages if (found := figure_problems(p.read_text(errors="replace")))}
    assert not problems, "figures that are not named and referenced:\n" + "\n".join(
        f"{name}:\n  " + "\n  ".join(found) for name, found in problems.items())
