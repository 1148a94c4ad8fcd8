#!/usr/bin/env python
"""The hidden Colab cell every chapter notebook carries (second cell, after `#| default_exp`).

On Colab it clones the repository (so the committed results store `results/` and the relative
paths `../results`, `../data` work exactly as in the book build), installs kdbook from the clone
(not editable: an editable install needs a kernel restart before `import kdbook` sees it), moves
into `chapters/`, and makes the chapter run at the profile the book publishes it at (profiles.yml),
so that Colab reads the stored results instead of recomputing smoke ones. Everywhere else it does
nothing. `#| hide` keeps it out of the docs and the tag `remove-cell` keeps it out of the book.

The repository address lives in one place, `repository.url` in `_config.yml`: the cell is generated
from it, and Jupyter Book builds the Colab launch links from it.

    python tools/colab_cell.py 10_preliminaries   # print the cell of that chapter
    python tools/colab_cell.py --check            # exit 1 if a chapter's cell is missing or stale
    python tools/colab_cell.py --write            # rewrite every chapter's Colab cell (that cell only)
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TAGS = ["remove-cell"]
CLONE = "/content/kdbook"  # where the cell clones the repository on Colab


def repository_url(root: Path = REPO) -> str:
    "The repository address of the book: `repository.url` in `_config.yml` (the one place it is written)."
    import yaml
    url = (yaml.safe_load((Path(root) / "_config.yml").read_text()).get("repository") or {}).get("url")
    if not url or not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url):
        raise ValueError(f"{root}/_config.yml: repository.url must be https://github.com/OWNER/NAME, got {url!r}")
    return url


def colab_source(url: str,  # repository address, from `repository_url`
                 stem: str,  # the chapter's file name without .ipynb, e.g. "10_preliminaries"
                ) -> str:
    "The Colab cell of one chapter: identical in every chapter but for the chapter's name."
    return f'''#| hide
# On Colab: fetch the book (code + stored results), install kdbook, and run this chapter at the profile the
# book publishes it at (profiles.yml), so it reads the stored results. Elsewhere nothing happens.
import sys
if "google.colab" in sys.modules:
    !git clone -q --depth 1 {url} {CLONE}
    %pip install -q {CLONE}
    %cd {CLONE}/chapters
    sys.path.insert(0, "{CLONE}/tools")
    from colab_cell import follow_published_profile
    follow_published_profile(get_ipython(), "{CLONE}", "{stem}")'''


def published_profile(root, stem: str) -> str:
    "The profile profiles.yml publishes chapter `stem` at (its `default` when the chapter is not named)."
    import yaml
    path = Path(root) / "profiles.yml"
    spec = yaml.safe_load(path.read_text()) if path.exists() else {}
    entry = (spec.get("chapters") or {}).get(stem, spec.get("default", "smoke"))
    # an entry is a profile, or {published: ..., target: ..., stores: [...]} (see tools/owed.py)
    return entry["published"] if isinstance(entry, dict) else entry


def follow_published_profile(ip,  # the IPython shell (get_ipython())
                             root,  # the repository clone holding profiles.yml
                             stem: str,  # the chapter's name
                             committed_default: str = "smoke",  # the value every parameters cell is committed with
                            ) -> str:
    """After the parameters cell runs (the first cell assigning `profile`), set `profile` to the published one.

    Only a `profile` still at the committed default is changed: a reader who edits the parameters cell
    first keeps their choice, and re-running the parameters cell later (the hook is gone by then)
    goes back to what the cell says. Papermill never runs this (it is not Colab), so its injected
    parameters are untouched."""
    want = published_profile(root, stem)

    def hook(result):
        src = getattr(getattr(result, "info", None), "raw_cell", "") or ""
        if not re.search(r"^profile\s*=", src, re.M):
            return
        ip.events.unregister("post_run_cell", hook)
        if ip.user_ns.get("profile") == committed_default and want != committed_default:
            ip.user_ns["profile"] = want
            print(f'Colab: profile = "{want}", the profile the book publishes this chapter at, so the stored '
                  f'results are read instead of recomputed. Re-run the parameters cell to use what it says.')

    if want != committed_default:
        ip.events.register("post_run_cell", hook)
    return want


def is_colab_cell(cell) -> bool:
    """A hidden cell (`#| hide` and tag remove-cell) that installs kdbook when on Colab."""
    src = cell.get("source", "")
    src = src if isinstance(src, str) else "".join(src)
    return (cell.get("cell_type") == "code" and "google.colab" in src and "kdbook" in src
            and "#| hide" in src and "remove-cell" in cell.get("metadata", {}).get("tags", []))


def _source(cell) -> str:
    src = cell.get("source", "")
    return src if isinstance(src, str) else "".join(src)


def check(paths, root: Path = REPO) -> list[str]:
    "The chapters whose Colab cell is missing, or differs from `colab_source` for the address in _config.yml."
    url, bad = repository_url(root), []
    for p in paths:
        cells = json.loads(Path(p).read_text())["cells"]
        found = [c for c in cells[:3] if is_colab_cell(c)]
        if not found or _source(found[0]) != colab_source(url, Path(p).stem):
            bad.append(str(p))
    return bad


def write(paths, root: Path = REPO) -> list[str]:
    "Rewrite the Colab cell of each notebook (only that cell; ids and everything else are kept)."
    url, changed = repository_url(root), []
    for p in paths:
        text = Path(p).read_text()
        nb = json.loads(text)
        cell = next((c for c in nb["cells"][:3] if is_colab_cell(c)), None)
        if cell is None:
            raise ValueError(f"{p}: no Colab cell among the first three cells to rewrite")
        want = colab_source(url, Path(p).stem)
        if _source(cell) != want:
            cell["source"] = want.splitlines(keepends=True)
            Path(p).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
            changed.append(str(p))
    return changed


if __name__ == "__main__":
    chapters = sorted((REPO / "chapters").glob("*.ipynb"))
    if "--check" in sys.argv:
        bad = check(chapters)
        for b in bad:
            print(f"{b}: Colab cell missing or stale; run python tools/colab_cell.py --write")
        sys.exit(1 if bad else 0)
    if "--write" in sys.argv:
        for p in write(chapters):
            print(f"rewrote the Colab cell of {p}")
        sys.exit(0)
    print(colab_source(repository_url(), sys.argv[1] if len(sys.argv) > 1 else "CHAPTER"))
