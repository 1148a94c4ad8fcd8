#!/usr/bin/env python
"""How the chapters and the package read, measured: the style figures the book holds itself to.

    python tools/style_metrics.py [--json]

Per chapter notebook (committed, clean):
  - exported cells: how many, their mean and longest length in lines, top-level definitions per exported cell;
  - prose words per code token *visible in the rendered page*: words of the markdown cells over the Python
    tokens of the code cells whose input the book shows (cells removed by `#| hide` or the `remove-cell` tag,
    and inputs hidden by `#| echo: false` or the `hide-input` / `remove-input` tags, do not count; folded inputs
    count, since a reader can open them);
over the package `kdbook/` (generated code):
  - `raise` and `assert` statements per 1,000 non-blank lines.

The targets printed beside the figures are the ones the book aims at (nbdev/fastcore cells of 5-16 lines and
about one definition each; d2l and QuantEcon pages of 2-5 prose words per code token; 5-17 `raise`/`assert` per
1,000 lines in nbdev, d2l, fastcore, airbench and nanoGPT). The script measures; it fails nothing.
"""
from __future__ import annotations

import argparse
import ast
import io
import json
import re
import sys
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLAIM_PREFIXES = tuple("1234567")  # chapters of the paper's sections 3-7 (10_..., 21_..., 42_..., 51_..., 70_...)
TARGETS = {"mean_exported_lines": 20, "prose_per_token": 1.0, "raise_assert_per_kloc": 20}
_WORD = re.compile(r"[^\W\d_][\w'’-]*", re.UNICODE)
_SKIP_TOKENS = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                tokenize.ENDMARKER, tokenize.ENCODING}


def directives(source: str) -> dict:
    "nbdev `#| key value` lines at the top of a cell, as {key: value}."
    out = {}
    for line in source.splitlines():
        m = re.match(r"^#\|\s*([\w-]+)\s*:?\s*(.*)$", line)
        if not m:
            break
        out[m.group(1)] = m.group(2).strip()
    return out


def code_only(source: str) -> str:
    "The cell's Python without its directive lines and IPython magics/shell lines (which tokenize can't read)."
    return "\n".join(l for l in source.splitlines() if not l.lstrip().startswith(("#|", "%", "!")))


def code_tokens(source: str) -> int:
    "Python tokens of a cell (names, operators, literals), comments and layout excluded."
    try:
        toks = tokenize.generate_tokens(io.StringIO(code_only(source)).readline)
        return sum(1 for t in toks if t.type not in _SKIP_TOKENS)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return len(code_only(source).split())


def definitions(source: str) -> int:
    "Top-level functions, classes and constant assignments of an exported cell."
    try:
        tree = ast.parse(code_only(source))
    except SyntaxError:
        return 0
    n = 0
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            n += 1
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            n += sum(1 for t in targets if isinstance(t, ast.Name) and t.id.isupper())
    return n


# A fenced block: ```info ... ``` (or ~~~). MyST directives whose body is text ({glue:figure}, {figure}, {note},
# {admonition}, ...) keep their body's words (a figure's caption is prose); code, math and raw blocks count none.
_FENCE = re.compile(r"^(`{3,}|~{3,})[ \t]*(.*?)[ \t]*\n(.*?)^\1[ \t]*$", re.M | re.S)
_NOT_PROSE_DIRECTIVES = ("{code", "{math", "{raw", "{literalinclude", "{eval-rst", "{glue:math")


def prose_words(markdown: str) -> int:
    "Words of a markdown cell: inline code, roles (`{numref}`...``), math, HTML tags, link targets and code fences excluded."
    def fence(m: re.Match) -> str:
        info = m.group(2)
        if not info.startswith("{") or info.startswith(_NOT_PROSE_DIRECTIVES):
            return " "
        return "\n".join(l for l in m.group(3).splitlines() if not re.match(r"^\s*:[\w-]+:", l))
    text = _FENCE.sub(fence, markdown)
    text = re.sub(r"\{[\w:-]+\}`[^`]*`|`[^`\n]*`|\$\$.*?\$\$|\$[^$\n]*\$|<[^>]+>|\]\([^)]*\)", " ", text, flags=re.S)
    return len(_WORD.findall(text))


def input_visible(cell: dict) -> bool:
    "Does the rendered book show this code cell's input?"
    d = directives("".join(cell["source"]))
    tags = set(cell.get("metadata", {}).get("tags", []))
    if "hide" in d or "remove-cell" in tags or "remove-input" in tags or "hide-input" in tags:
        return False
    if d.get("echo", "").lower() == "false":
        return False
    return True


def chapter_metrics(path: Path) -> dict:
    nb = json.loads(path.read_text())
    exported, defs, tokens, words = [], [], 0, 0
    for cell in nb["cells"]:
        src = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            words += prose_words(src)
            continue
        if cell["cell_type"] != "code":
            continue
        d = directives(src)
        if "export" in d or "exports" in d:
            exported.append(len([l for l in code_only(src).splitlines() if l.strip()]))
            defs.append(definitions(src))
        if input_visible(cell):
            tokens += code_tokens(src)
    return {"chapter": path.stem, "exported_cells": len(exported),
            "mean_exported_lines": round(sum(exported) / len(exported), 1) if exported else 0.0,
            "max_exported_lines": max(exported, default=0),
            "definitions_per_exported_cell": round(sum(defs) / len(defs), 2) if defs else 0.0,
            "prose_words": words, "visible_code_tokens": tokens,
            "prose_per_token": round(words / tokens, 2) if tokens else float("inf"),
            "claim_chapter": path.stem.startswith(CLAIM_PREFIXES)}


def package_metrics(pkg: Path) -> dict:
    lines = statements = 0
    for f in sorted(pkg.rglob("*.py")):
        if f.name == "_modidx.py":
            continue
        text = f.read_text()
        lines += sum(1 for l in text.splitlines() if l.strip())
        for node in ast.walk(ast.parse(text)):
            statements += isinstance(node, (ast.Raise, ast.Assert))
    return {"lines": lines, "raise_assert": statements,
            "raise_assert_per_kloc": round(1000 * statements / lines, 1) if lines else 0.0}


def measure(root: Path = REPO) -> dict:
    chapters = [chapter_metrics(p) for p in sorted((root / "chapters").glob("*.ipynb"))]
    return {"chapters": chapters, "package": package_metrics(root / "kdbook"), "targets": TARGETS}


def report(m: dict) -> str:
    t = m["targets"]
    head = f"{'chapter':<22} {'exp.cells':>9} {'mean/max lines':>15} {'defs/cell':>9} {'prose/token':>11}"
    rows = [head, "-" * len(head)]
    for c in m["chapters"]:
        ok_len = "ok" if c["mean_exported_lines"] <= t["mean_exported_lines"] else "over"
        ratio = c["prose_per_token"]
        ok_ratio = ("ok" if ratio >= t["prose_per_token"] else "under") if c["claim_chapter"] else "(appendix)"
        rows.append(f"{c['chapter']:<22} {c['exported_cells']:>9} "
                    f"{c['mean_exported_lines']:>7}/{c['max_exported_lines']:<4}{ok_len:>4} "
                    f"{c['definitions_per_exported_cell']:>9} {ratio:>6} {ok_ratio}")
    p = m["package"]
    rows.append("")
    rows.append(f"kdbook/: {p['raise_assert']} raise/assert in {p['lines']} lines = {p['raise_assert_per_kloc']} "
                f"per 1,000 lines (target <= {t['raise_assert_per_kloc']})")
    rows.append(f"targets: mean exported cell <= {t['mean_exported_lines']} lines in every chapter; "
                f">= {t['prose_per_token']} prose word per visible code token in the claim chapters (§3-§7)")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    m = measure()
    print(json.dumps(m, indent=1) if args.json else report(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
