#!/usr/bin/env python
"""The hidden Colab cell every chapter notebook carries (second cell, after `#| default_exp`).

On Colab it clones the repository (so the committed results store `results/` and the relative
paths `../results`, `../data` work exactly as in the book build), installs kdbook from the clone
(not editable: an editable install needs a kernel restart before `import kdbook` sees it), and
moves into `chapters/`. Everywhere else it does nothing. `#| hide` keeps it out of the docs and
the tag `remove-cell` keeps it out of the book.

    python tools/colab_cell.py            # print the cell
    python tools/colab_cell.py --check    # exit 1 if a chapter lacks a hidden Colab cell
"""
from __future__ import annotations

import sys
from pathlib import Path

SOURCE = '''#| hide
# On Colab: fetch the book (code + stored results) and install kdbook; elsewhere nothing happens.
import sys
if "google.colab" in sys.modules:
    !git clone -q --depth 1 https://github.com/kdbook/kdbook /content/kdbook
    %pip install -q /content/kdbook
    %cd /content/kdbook/chapters'''
TAGS = ["remove-cell"]


def is_colab_cell(cell) -> bool:
    """A hidden cell (`#| hide` and tag remove-cell) that installs kdbook when on Colab."""
    src = cell.get("source", "")
    src = src if isinstance(src, str) else "".join(src)
    return (cell.get("cell_type") == "code" and "google.colab" in src and "kdbook" in src
            and "#| hide" in src and "remove-cell" in cell.get("metadata", {}).get("tags", []))


def check(paths) -> list[str]:
    import nbformat
    bad = []
    for p in paths:
        nb = nbformat.read(p, as_version=4)
        if not any(is_colab_cell(c) for c in nb.cells[:3]):
            bad.append(str(p))
    return bad


if __name__ == "__main__":
    if "--check" in sys.argv:
        root = Path(__file__).resolve().parents[1]
        bad = check(sorted((root / "chapters").glob("*.ipynb")))
        for b in bad:
            print(f"{b}: no hidden Colab install cell among the first three cells; copy tools/colab_cell.py SOURCE")
        sys.exit(1 if bad else 0)
    print(SOURCE)
