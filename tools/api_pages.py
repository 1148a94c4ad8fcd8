#!/usr/bin/env python
"""Write the book's API reference (`api/*.md`) from the code of `kdbook`: one page per module.

Each page holds the module's docstring, the chapter it is exported from, and for every public name (`__all__`)
the rendering of nbdev's `show_doc` (signature with the docments comments, docstring); classes also get their
public methods, constants their value. Nothing is written by hand: run this after changing the library and
commit the result (`tests/test_api_reference.py` fails when a page is stale or a public name is missing).

    python tools/api_pages.py           # rewrite api/ and the API entries of _toc.yml
    python tools/api_pages.py --check   # exit 1 if api/ or those entries differ from what the code gives
"""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The library, in the order a reader meets it; every other module of kdbook is a chapter's experiment module.
LIBRARY = ["losses", "metrics", "data", "augment", "models", "engine", "packing", "train", "store", "costs", "viz", "checks"]
INTRO = {
    "index": ("The library", "The modules every chapter builds on: losses and metrics (§3), data, augmentation, "
              "networks, training and distillation engines, the results store and the plotting helpers (appendix A)."),
    "experiments": ("The chapters' experiment modules", "The functions each experiment chapter exports: its runs, "
                    "tables and figures. They are importable like the library, but are shaped by their chapter."),
}


def module_names(root: Path = REPO) -> list[str]:
    "Every public module of kdbook, as a dotted name under kdbook: the library's and `experiments.<name>`."
    pkg = Path(root) / "kdbook"
    return sorted(".".join(p.relative_to(pkg).with_suffix("").parts) for p in pkg.rglob("*.py")
                  if not p.stem.startswith("_"))


def page_name(module: str) -> str:
    "The page of a module under api/: its last name (`experiments.synthetic` -> `synthetic`)."
    return module.rsplit(".", 1)[-1]


def modules(root: Path = REPO) -> tuple[list[str], list[str]]:
    "(library modules, experiment modules) of kdbook: kdbook/*.py and kdbook/experiments/*.py, private ones left out."
    import yaml
    found = module_names(root)
    order = re.findall(r"chapters/([\w.-]+)", yaml.safe_dump(yaml.safe_load((Path(root) / "_toc.yml").read_text())))
    book = lambda m: order.index(source_chapter(root, m)) if source_chapter(root, m) in order else len(order)
    return [m for m in LIBRARY if m in found], sorted((m for m in found if m not in LIBRARY), key=lambda m: (book(m), m))


def source_chapter(root: Path, name: str) -> str | None:
    "The chapter stem a generated module is exported from (its 'File to edit' header), or None."
    text = (Path(root) / "kdbook" / f"{name.replace('.', '/')}.py").read_text()
    m = re.search(r"File to edit: (?:\.\./)+chapters/([\w.-]+)\.ipynb", text)
    return m.group(1) if m else None


def _show(obj, name: str, level: int) -> str:
    from nbdev.showdoc import show_doc
    md = show_doc(obj, name=name, title_level=level)._repr_markdown_()
    md = re.sub(r" at 0x[0-9a-f]+", "", md)  # default values' memory addresses differ from run to run
    return re.sub(r"^---\s*\n", "", md.strip()).strip()  # no rule before a heading: it would open the page's sections


def _constant(name: str, value) -> str:
    text = re.sub(r" at 0x[0-9a-f]+", "", repr(value))  # memory addresses differ from run to run
    text = text if len(text) <= 300 else text[:297] + "..."
    try:  # a repr that is not Python (e.g. "<class ...>") is shown as plain text
        ast.parse(f"{name} = {text}")
        lang = "python"
    except SyntaxError:
        lang = "text"
    return f"## {name}\n\n```{lang}\n{name} = {text}\n```"


def module_page(root: Path, name: str) -> str:
    "The Markdown page of kdbook.<name>."
    mod = importlib.import_module(f"kdbook.{name}")
    doc = inspect.cleandoc(mod.__doc__ or "") or "(This module has no docstring.)"
    stem = source_chapter(root, name)
    parts = [f"# kdbook.{name}", doc]
    if stem:
        parts.append(f"Exported from the chapter [{stem}](../chapters/{stem}.ipynb).")
    for sym in getattr(mod, "__all__", []):
        obj = getattr(mod, sym)
        if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
            parts.append(_show(obj, sym, 2))
            if inspect.isclass(obj):
                for meth, f in vars(obj).items():
                    if not meth.startswith("_") and (inspect.isfunction(f) or isinstance(f, (staticmethod, classmethod))):
                        parts.append(_show(getattr(obj, meth), f"{sym}.{meth}", 3))
        else:
            parts.append(_constant(sym, obj))
    return "\n\n".join(parts) + "\n"


def index_page(root: Path, kind: str, names: list[str]) -> str:
    "The section page listing the modules of one kind with the first sentence of their docstrings."
    title, intro = INTRO[kind]
    rows = []
    for n in names:
        doc = inspect.cleandoc(importlib.import_module(f"kdbook.{n}").__doc__ or "").replace("\n", " ")
        first = re.split(r"(?<=[.!?])\s", doc, maxsplit=1)[0] if doc else "—"
        rows.append(f"| [kdbook.{n}]({page_name(n)}.md) | {first.replace('|', chr(92) + '|')} |")
    return f"# {title}\n\n{intro}\n\n| module | what it provides |\n|---|---|\n" + "\n".join(rows) + "\n"


def pages(root: Path = REPO) -> dict[str, str]:
    "{file name under api/: text} for the whole reference."
    root = Path(root)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    library, experiments = modules(root)
    out = {"index.md": index_page(root, "index", library), "experiments.md": index_page(root, "experiments", experiments)}
    for n in library + experiments:
        out[f"{page_name(n)}.md"] = module_page(root, n)
    return out


TOC_START = "      - file: api/index\n"


def toc_text(root: Path, toc: str) -> str:
    "_toc.yml with its API entries (api/index, the library, api/experiments, the experiment modules) regenerated."
    library, experiments = modules(root)
    block = (TOC_START + "        sections:\n" + "".join(f"          - file: api/{page_name(m)}\n" for m in library)
             + "      - file: api/experiments\n        sections:\n"
             + "".join(f"          - file: api/{page_name(m)}\n" for m in experiments))
    if TOC_START not in toc:
        raise ValueError("_toc.yml has no `      - file: api/index` entry: add it (with the usage page) in the last part")
    head, rest = toc.split(TOC_START, 1)
    lines = rest.splitlines(True)
    n = 0
    while n < len(lines) and re.match(r"\s+(sections:|- file: api/)", lines[n]):
        n += 1
    return head + block + "".join(lines[n:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check that api/ is current")
    ap.add_argument("--root", default=str(REPO))
    args = ap.parse_args(argv)
    root = Path(args.root)
    want = pages(root)
    folder = root / "api"
    have = {p.name: p.read_text() for p in folder.glob("*.md")} if folder.is_dir() else {}
    stale = sorted(n for n in set(want) | set(have) if want.get(n) != have.get(n))
    toc_path = root / "_toc.yml"
    toc = toc_text(root, toc_path.read_text())
    if toc != toc_path.read_text():
        stale.append("_toc.yml")
    if args.check:
        if stale:
            print(f"api/ is stale ({', '.join(stale)}): run python tools/api_pages.py", file=sys.stderr)
        return 1 if stale else 0
    toc_path.write_text(toc)
    folder.mkdir(exist_ok=True)
    for n in set(have) - set(want):
        (folder / n).unlink()
    for n, text in want.items():
        if have.get(n) != text:
            (folder / n).write_text(text)
    print(f"api/: {len(want)} pages, {len(stale)} written or removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
