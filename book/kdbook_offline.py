"""Local Sphinx extension: keep the built book free of CDN addresses (it must work offline).

- sphinx-thebe (always loaded by Jupyter Book 1.x) writes `THEBE_JS_URL = "https://unpkg.com/..."`
  into every page although the book has no thebe button; the URL is blanked.
- After the build, every HTML page is scanned; any CDN address left is a warning, and the book
  is built in strict mode (-W), so the build fails.
"""
from __future__ import annotations

import re
from pathlib import Path

from sphinx.util import logging

logger = logging.getLogger(__name__)
CDN = re.compile(r"(?:https?:)?//(?:cdn\.jsdelivr\.net|cdnjs\.cloudflare\.com|unpkg\.com|[a-z.]*googleapis\.com|"
                 r"[a-z.]*gstatic\.com|cdn\.mathjax\.org|code\.jquery\.com|[a-z.]*bootstrapcdn\.com)[^\"' )]*")


def _blank_thebe(app, pagename, templatename, context, doctree):
    for asset in context.get("script_files", []):
        body = getattr(asset, "attributes", {}).get("body", "")
        if body and "THEBE_JS_URL" in body:
            asset.attributes["body"] = CDN.sub("", body)


def _scan(app, exception):
    if exception is not None or app.builder.format != "html":
        return
    for page in sorted(Path(app.outdir).rglob("*.html")):
        for url in sorted(set(CDN.findall(page.read_text(errors="replace")))):
            logger.warning("CDN address %s in %s: vendor it under book/static/vendor/", url,
                           page.relative_to(app.outdir))


def setup(app):
    app.connect("html-page-context", _blank_thebe, priority=900)
    app.connect("build-finished", _scan)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
