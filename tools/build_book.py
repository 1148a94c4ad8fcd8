#!/usr/bin/env python
"""Build the book: execute every chapter with papermill, post-process, then `jupyter-book build`.

    python tools/build_book.py [--profile smoke] [-p NAME VALUE ...] [--only CHAPTER]
                               [--results DIR] [--build-dir DIR] [--timeout S] [--root DIR] [--jobs N]

Steps
1. Read `_toc.yml` (book order). Every `.ipynb` chapter is executed by papermill with the
   `kdbook` kernel, cwd = `chapters/` of the book root (so `../results` and `../data` resolve
   to the repository's results store and data cache), `-p profile <profile>`, any `-p name value`
   overrides, and `-p results_dir DIR` when `--results` is given. Before anything runs, every
   `-p NAME VALUE` is checked against the `parameters` cell of the chapters it goes to (a
   misspelt name, or a value of the wrong type, fails the build naming the real parameters),
   and every profile must be one of smoke, quick, paper.
   A chapter whose cell raises a Python exception fails at once (it would fail again); a kernel
   death or a cell time-out (which may be papermill's rare hang) is retried once; either way
   the failure is reported as what it was, with the chapter and the cell.
   Every chapter runs with the same fixed thread count (`--threads`, default 1: OMP, MKL and
   OpenBLAS threads, hence torch's), whatever `--jobs`, so that a record computed by
   `--only X` and by a whole build is the same number. Chapters are independent, so `--jobs`
   of them (default 2) run side by side.
2. Executed copies go to a staging tree `<build-dir>/src/` together with `_config.yml`,
   `_toc.yml`, the markdown chapters and `book/` (vendored JS, static files).
3. Post-processing of the executed copies (nbdev directives are comments to Jupyter Book):
   - every `#|` directive line is removed from code cells;
   - `#| hide` / `#| include: false` -> tag `remove-cell`;
   - `#| echo: false` / `#| hide_input` -> tag `remove-input` (the output stays, the code is
     not in the page at all; `hide-input` tags written by authors keep their fold-out button);
   - `#| output: false` / `#| hide_output` -> tag `remove-output`;
   - `#| export`, `#| exports`, `#| exporti` keep the code in the page (it is the book's content), but any
     code cell longer than FOLD_LINES lines (the parameters cell excepted) is folded behind a "show code"
     toggle (tag `hide-input`), so that a chapter's results begin within a few screens; its output stays
     visible (a chapter folds a shorter cell with the tag `hide-input` itself);
   - the parameters cell is shown once, with the values the chapter really ran with: papermill's
     injected-parameters cell is merged into it (each overridden value replaces the default on its line,
     the comment kept) and removed;
   - a code cell left empty after stripping (e.g. only `#| default_exp`) is removed;
   - markdown outputs that begin with `---` (nbdev `show_doc`) are dropped: docutils rejects a
     transition at the start of a document fragment.
4. `jupyter-book build` of the staging tree, notebooks not re-executed (`execute_notebooks: off`),
   strict: `-W -n --keep-going`. HTML lands in `<build-dir>/html` (default `_build/html`). The
   previous HTML is moved to `<build-dir>/html.stale` (with a STALE.txt) when the build starts and
   deleted only when the new HTML is in place, so a failed build never leaves old pages looking current.
5. The summary names the results store the build read and computed into (`--results DIR`, or `results/`)
   and lists the records it wrote there (new or rewritten files), i.e. what it recomputed rather than read;
   with `--results`, a record written into `results/` anyway is reported as a chapter ignoring `results_dir`.

`--only CHAPTER` (e.g. `10_preliminaries` or `chapters/10_preliminaries.ipynb`) executes and
builds just that chapter (the staged toc keeps the root page and that chapter); that build is not
strict, since links to the chapters it leaves out cannot resolve.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import nbformat
import yaml

REPO = Path(__file__).resolve().parents[1]
DIRECTIVE = re.compile(r"^\s*#\|\s?(.*)$")
# directive (normalised: lower case, no spaces) -> cell tag
TAG_FOR = {
    "hide": "remove-cell",
    "include:false": "remove-cell",
    "echo:false": "remove-input",
    "hide_input": "remove-input",
    "output:false": "remove-output",
    "hide_output": "remove-output",
}


FOLD_LINES = 15  # a code cell longer than this is folded behind a toggle in the page
PROFILES = ("smoke", "quick", "paper")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
UNKNOWN = object()  # a parameter whose default is not a literal


class BuildError(RuntimeError):
    pass


def chapter_profiles(root: Path, profile: str | None):
    """chapter stem -> profile: `profile` for all when given, else the `published` profile of `profiles.yml`.

    profiles.yml names, per chapter, the profile the published book renders it at (`published`) and the one
    it is being computed toward (`target`, see tools/owed.py); the plain form `chapter: profile` means
    both. A chapter moves from smoke to quick once its quick results are committed to results/, so that
    `make book` reads them instead of training again. Chapters not listed use `default` (smoke)."""
    if profile is not None:
        return lambda stem: profile
    path = root / "profiles.yml"
    spec = (yaml.safe_load(path.read_text()) if path.exists() else None) or {}
    default = spec.get("default", "smoke")
    published = {}
    for name, value in (spec.get("chapters") or {}).items():
        if isinstance(value, dict):
            unknown = set(value) - {"published", "target", "stores", "plan"}
            if unknown or "published" not in value:
                raise BuildError(f"{path}: {name}: expected {{published: PROFILE, target: PROFILE, stores: [...], plan: MODULE:FUNCTION}}, "
                                 f"got {value!r}")
            for field in ("published", "target"):
                if field in value and value[field] not in PROFILES:
                    raise BuildError(f"{path}: {name}: {field}: unknown profile {value[field]!r}; "
                                     f"use one of {', '.join(PROFILES)}")
            value = value["published"]
        published[name] = value
    for name, value in [("default", default), *published.items()]:
        if value not in PROFILES:
            raise BuildError(f"{path}: {name}: unknown profile {value!r}; use one of {', '.join(PROFILES)}")
    return lambda stem: published.get(stem, default)


def toc_files(toc: dict) -> list[str]:
    """Every `file` of a Jupyter Book 1.x toc (root first), in book order."""
    files = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node and node is not toc:
                files.append(node["file"])
            for key in ("parts", "chapters", "sections"):
                for child in node.get(key, []) or []:
                    walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(toc)
    return files


def resolve(root: Path, entry: str) -> Path:
    """The file a toc entry names (entries may omit the extension)."""
    path = root / entry
    if path.suffix in (".ipynb", ".md"):
        return path
    for ext in (".ipynb", ".md"):
        if path.with_suffix(ext).exists():
            return path.with_suffix(ext)
    raise BuildError(f"_toc.yml names {entry!r} but neither {entry}.ipynb nor {entry}.md exists under {root}")


def reduce_toc(toc: dict, keep: str) -> dict:
    """A toc with only the root page and the chapter `keep` (for --only)."""
    if toc["root"] == keep:
        return {"format": toc.get("format", "jb-book"), "root": keep}
    return {"format": toc.get("format", "jb-book"), "root": toc["root"], "chapters": [{"file": keep}]}


def directives(source: str) -> tuple[list[str], str]:
    """Split a code cell into its nbdev directives (normalised) and the code without them."""
    found, kept = [], []
    for line in source.splitlines():
        m = DIRECTIVE.match(line)
        if m:
            found.append(re.sub(r"\s+", "", m.group(1)).lower())
        else:
            kept.append(line)
    return found, "\n".join(kept).strip("\n")


def merge_parameters(nb) -> None:
    """Show the parameters cell once, with the values the chapter ran with (in place): every assignment of
    papermill's injected-parameters cell replaces the default on its line of the `parameters` cell (the line's
    comment kept), and the injected cell is removed. A name the parameters cell does not assign on one line
    (or an injected cell that is not plain assignments) leaves both cells as they are."""
    injected = [c for c in nb.cells if c.cell_type == "code" and "injected-parameters" in c.metadata.get("tags", [])]
    params = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    if len(injected) != 1 or len(params) != 1:
        return
    try:
        given = {}
        for node in ast.parse(injected[0].source).body:
            if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
                return
            given[node.targets[0].id] = ast.get_source_segment(injected[0].source, node.value)
        lines = params[0].source.splitlines()
        masked = "\n".join("" if l.lstrip().startswith(("%", "!")) else l for l in lines)
        where = {}
        for node in ast.parse(masked).body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if len(targets) == 1 and isinstance(targets[0], ast.Name) and node.value.lineno == node.value.end_lineno:
                    where[targets[0].id] = (node.value.lineno - 1, node.value.col_offset, node.value.end_col_offset)
    except SyntaxError:
        return
    if not set(given) <= set(where):
        return
    for name, text in given.items():
        row, start, end = where[name]
        line = lines[row].encode()  # ast offsets count UTF-8 bytes
        lines[row] = (line[:start] + text.encode() + line[end:]).decode()
    params[0].source = "\n".join(lines)
    nb.cells = [c for c in nb.cells if c is not injected[0]]


def postprocess(nb) -> None:
    """Turn nbdev directives into Jupyter Book tags, fold long code cells, merge the injected parameters
    into the parameters cell, and drop outputs docutils cannot take (in place)."""
    merge_parameters(nb)
    cells = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            found, code = directives(cell.source)
            tags = list(cell.metadata.get("tags", []))
            for d in found:
                tag = TAG_FOR.get(d)
                if tag and tag not in tags:
                    tags.append(tag)
            if (len(code.splitlines()) > FOLD_LINES and "parameters" not in tags
                    and not {"remove-cell", "remove-input", "hide-cell", "hide-input"} & set(tags)):
                tags.append("hide-input")
            cell.source = code
            outputs = []
            for out in cell.get("outputs", []):
                md = out.get("data", {}).get("text/markdown") if out.get("output_type") in ("display_data", "execute_result") else None
                if md is not None:
                    text = md if isinstance(md, str) else "".join(md)
                    if text.lstrip().startswith("---"):
                        continue
                outputs.append(out)
            cell.outputs = outputs
            if tags:
                cell.metadata["tags"] = tags
            if not code.strip() and not outputs:
                continue
        cells.append(cell)
    nb.cells = cells


def chapter_parameters(nb_path: Path) -> dict:
    """name -> default value of a chapter's parameters: the top-level assignments of its `parameters`-tagged
    cell (UNKNOWN where the default is not a literal)."""
    nb = nbformat.read(nb_path, as_version=4)
    params = {}
    for cell in nb.cells:
        if cell.cell_type != "code" or "parameters" not in cell.metadata.get("tags", []):
            continue
        code = "\n".join(l for l in cell.source.splitlines() if not l.lstrip().startswith(("%", "!", "#|")))
        for node in ast.parse(code).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) and node.value is not None else []
            for t in targets:
                if isinstance(t, ast.Name):
                    try:
                        params[t.id] = ast.literal_eval(node.value)
                    except ValueError:
                        params[t.id] = UNKNOWN
    return params


def _papermill_value(text: str):
    "The Python value papermill's CLI makes of `-p NAME TEXT`."
    from papermill.cli import _resolve_type
    return _resolve_type(text)


def _type_problem(default, value) -> str | None:
    "Why `value` cannot replace a parameter whose default is `default`, or None if it can."
    if default is UNKNOWN or default is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "expects True or False"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "expects an integer"
    if isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "expects a finite number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "expects text"
    return None


def check_parameters(chapters: dict, given: list[tuple[str, str]], profiles: dict) -> None:
    """BuildError unless every `-p NAME VALUE` names a parameter of a chapter it goes to, with a value of the
    default's type, and every chapter's profile is one of PROFILES. `chapters`: stem -> chapter_parameters;
    `profiles`: stem -> profile. Runs before any chapter executes, so nothing trains on a misspelt request."""
    problems = []
    for stem, prof in profiles.items():
        if prof not in PROFILES:
            problems.append(f"{stem}: unknown profile {prof!r}; use one of {', '.join(PROFILES)}")
    known = sorted({name for params in chapters.values() for name in params})
    for name, text in given:
        value = _papermill_value(text)
        having = {stem: params[name] for stem, params in chapters.items() if name in params}
        if not having:
            close = difflib.get_close_matches(name, known, n=3)
            where = (f"the parameters of {next(iter(chapters))} are: {', '.join(sorted(chapters[next(iter(chapters))]))}"
                     if len(chapters) == 1 else f"the chapters' parameters are: {', '.join(known)}")
            problems.append(f"-p {name} {text}: no chapter built here has a parameter {name!r}"
                            + (f" (did you mean {' or '.join(close)}?)" if close else "") + f"; {where}")
            continue
        if name == "profile" and value not in PROFILES:
            problems.append(f"-p profile {text}: unknown profile; use one of {', '.join(PROFILES)}")
            continue
        for stem, default in having.items():
            why = _type_problem(default, value)
            if why:
                problems.append(f"-p {name} {text}: {stem}'s parameter {name} (default {default!r}) {why}")
    if problems:
        raise BuildError("the build was asked for something the chapters do not take (nothing was executed):\n  "
                         + "\n  ".join(problems))


def chapter_cells(nb_path: Path) -> list | None:
    """The cells of an executed copy as the chapter has them (without the cells papermill adds: injected
    parameters, error banner), so that indices match the committed notebook; None when it cannot be read."""
    try:
        nb = nbformat.read(nb_path, as_version=4)
    except Exception:
        return None
    added = {"injected-parameters", "papermill-error-cell-tag"}
    return [c for c in nb.cells if not added & set(c.metadata.get("tags", []))]


def cell_label(i: int, cell) -> str:
    "`cell i (0-based, as in the chapter; starts `<its first code line>`)`."
    first = next((l for l in cell.source.splitlines() if l.strip() and not l.startswith("#|")), "")
    return f"cell {i} (0-based, as in the chapter; starts `{first[:80]}`)"


def cell_in_progress(nb_path: Path) -> str:
    """The cell papermill was executing when the kernel died or the cell timed out, read from the cell
    statuses papermill writes into the executed copy, as `cell i (starts ...)`."""
    cells = chapter_cells(nb_path)
    if cells is None:
        return "no executed notebook was written"
    status = [c.metadata.get("papermill", {}).get("status") for c in cells]
    # papermill marks the cell it was in `running` or `failed`, or (a dead kernel) `completed` before `pending` ones
    started = [i for i, st in enumerate(status) if st in ("running", "failed")] or \
              [i for i, st in enumerate(status) if st not in (None, "pending")][-1:]
    if not started:
        return "cell unknown"
    return cell_label(started[0], cells[started[0]])


def classify_failure(dst: Path, log_text: str, timeout: int) -> tuple[str, str]:
    """(kind, description) of a failed papermill run: kind `timeout` or `kernel` (worth one retry: the rare
    papermill hang shows as a time-out), `error` (a Python exception in a cell: deterministic, never retried),
    or `other`."""
    if "CellTimeoutError" in log_text or "timed out" in log_text:
        return "timeout", f"cell time-out: {cell_in_progress(dst)} ran longer than --timeout {timeout} s"
    if "DeadKernelError" in log_text or "Kernel died" in log_text or "kernel died" in log_text:
        return "kernel", f"kernel died (out of memory? a crash in native code?) in {cell_in_progress(dst)}"
    where = failing_cell(dst)
    if not where.startswith("no error cell"):
        return "error", f"Python exception in {where}"
    return "other", where


def failing_cell(nb_path: Path) -> str:
    """Describe the first cell with an error output in an executed notebook."""
    cells = chapter_cells(nb_path)
    if cells is None:
        return "no executed notebook was written"
    for i, cell in enumerate(cells):
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if out.get("output_type") == "error":
                return f"{cell_label(i, cell)}: {out.get('ename')}: {str(out.get('evalue'))[:300]}"
    return "no error cell found (timeout or kernel death?)"


def execute(src: Path, dst: Path, cwd: Path, params: list[tuple[str, str]], timeout: int, log,
            env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "papermill", str(src), str(dst), "-k", "kdbook", "--cwd", str(cwd),
           "--execution-timeout", str(timeout), "--no-progress-bar", "--log-output"]
    for name, value in params:
        cmd += ["-p", name, value]
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise BuildError(f"papermill exited with {proc.returncode}")


def run_chapter(src: Path, dst: Path, params: list[tuple[str, str]], timeout: int, log_path: Path,
                env: dict) -> tuple[bool, str]:
    """Execute one chapter, post-process the executed copy; (ok, one-line message). Only a kernel death or a
    cell time-out is retried (once); a Python exception in a cell is deterministic and fails at once."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        for attempt in (1, 2):
            start = log.tell()
            try:
                execute(src, dst, src.parent, params, timeout, log, env)
                break
            except BuildError as e:
                log.flush()
                with open(log_path, errors="replace") as f:
                    f.seek(start)
                    kind, what = classify_failure(dst, f.read(), timeout)
                log.write(f"attempt {attempt} failed: {e}; {what}\n")
                if kind in ("error", "other") or attempt == 2:
                    tries = "twice" if attempt == 2 else ("(not retried: it would fail again)" if kind == "error"
                                                          else "")
                    return False, (f"failed{' ' + tries if tries else ''} ({time.time() - t0:.1f} s): {what}\n  papermill log: {log_path}\n"
                                   f"  executed copy: {dst}")
    nb = nbformat.read(dst, as_version=4)
    postprocess(nb)
    nbformat.write(nb, dst)
    retried = " after one retry" if attempt == 2 else ""
    return True, f"ok{retried} ({time.time() - t0:.1f} s)"


def snapshot(results_dir: Path) -> dict:
    "relative path -> (size, mtime_ns) of every file in the results store (empty if there is none)."
    if not results_dir.is_dir():
        return {}
    return {p.relative_to(results_dir).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in results_dir.rglob("*") if p.is_file()}


def records_summary(results_dir: Path, before: dict) -> str:
    "Which records the build wrote (new, rewritten) in the results store: what it recomputed, not read."
    after = snapshot(results_dir)
    new = sorted(set(after) - set(before))
    rewritten = sorted(k for k in set(after) & set(before) if after[k] != before[k])
    if not new and not rewritten:
        return f"records recomputed: none (every stored number was read from {results_dir})"
    lines = [f"records recomputed: {len(new)} new, {len(rewritten)} rewritten in {results_dir}"]
    lines += [f"  new: {k}" for k in new[:50]] + [f"  rewritten: {k}" for k in rewritten[:50]]
    if len(new) > 50 or len(rewritten) > 50:
        lines.append("  (lists cut at 50)")
    return "\n".join(lines)


def unpack_vendor(book: Path) -> Path:
    """The vendored JS (MathJax, RequireJS, the widget manager) is committed compressed, as `book/vendor.tar.xz`
    (it need not travel uncompressed with every copy of the tree); unpack it into the git-ignored
    `book/static/vendor/` when that copy is missing or from another tarball, and check the files the pages load."""
    import hashlib
    import tarfile
    archive, dest = book / "vendor.tar.xz", book / "static" / "vendor"
    if archive.exists():
        stamp = dest / f".unpacked-{hashlib.sha256(archive.read_bytes()).hexdigest()[:16]}"
        if not stamp.exists():
            tmp = book / "static" / ".vendor-unpacking"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                with tarfile.open(archive, "r:xz") as tar:
                    tar.extractall(tmp, filter="data")
            except (tarfile.TarError, EOFError, OSError) as err:
                raise BuildError(f"{archive} cannot be unpacked ({err}): restore it with `git checkout -- {archive}`") from None
            dest.mkdir(parents=True, exist_ok=True)
            for old in dest.glob(".unpacked-*"):
                old.unlink()
            for entry in tmp.iterdir():
                target = dest / entry.name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
                entry.rename(target)
            tmp.rmdir()
            stamp.touch()
    missing = [f for f in ("mathjax/tex-mml-chtml.js", "requirejs/require.js", "html-manager/embed-amd.js",
                           "require-config.js") if not (dest / f).is_file()]
    if missing:
        raise BuildError(f"vendored JS missing in {dest}: {', '.join(missing)}; delete {dest} except README.md and "
                         f"build again (it is unpacked from {archive})")
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default=None, choices=PROFILES,
                    help="run every chapter at this profile (-p profile); default: each chapter at the profile "
                         "profiles.yml publishes it at (smoke where none is named)")
    ap.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="extra papermill parameter, repeatable")
    ap.add_argument("--only", help="execute and build only this chapter (name, stem or path)")
    ap.add_argument("--results", help="results store directory for every chapter (-p results_dir)")
    ap.add_argument("--build-dir", default=None, help="staging tree and HTML go here (default: <root>/_build)")
    ap.add_argument("--timeout", type=int, default=600, help="papermill --execution-timeout per cell, seconds")
    ap.add_argument("--root", default=str(REPO), help="book root holding _config.yml, _toc.yml, chapters/")
    ap.add_argument("--jobs", type=int, default=2, help="chapters executed side by side (default 2)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads of every chapter (OMP/MKL/OpenBLAS, hence torch), the same whatever --jobs, "
                         "so a record does not depend on how the build was started (default 1)")
    ap.add_argument("--no-html", action="store_true", help="execute and stage only; skip jupyter-book")
    args = ap.parse_args(argv)

    root = Path(args.root).resolve()
    build = Path(args.build_dir).resolve() if args.build_dir else root / "_build"
    staging, html = build / "src", build / "html"
    if "KDBOOK_DATASETS" not in os.environ and (root.parent / "shared" / "datasets").is_dir():
        os.environ["KDBOOK_DATASETS"] = str(root.parent / "shared" / "datasets")

    toc = yaml.safe_load((root / "_toc.yml").read_text())
    entries = toc_files(toc)
    if args.only:
        want = args.only.removesuffix(".ipynb").removesuffix(".md")
        match = [e for e in entries if e.removesuffix(".ipynb").removesuffix(".md") in (want, f"chapters/{want}")
                 or Path(e).stem == Path(want).stem]
        if not match:
            print(f"error: --only {args.only!r} is not in _toc.yml; entries: {entries}", file=sys.stderr)
            return 2
        toc = reduce_toc(toc, match[0])
        entries = toc_files(toc)

    if args.threads < 1:
        print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    try:
        if (root / "book").is_dir():
            unpack_vendor(root / "book")
        profile_of = chapter_profiles(root, args.profile)
        paths = [resolve(root, e) for e in entries]
        notebooks = [p for p in paths if p.suffix == ".ipynb"]
        check_parameters({p.stem: chapter_parameters(p) for p in notebooks}, [tuple(p) for p in args.parameter],
                         {p.stem: profile_of(p.stem) for p in notebooks})
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    params = []
    if args.results:
        params.append(("results_dir", str(Path(args.results).resolve())))
    params += [tuple(p) for p in args.parameter]
    results_dir = Path(args.results).resolve() if args.results else root / "results"
    records_before = snapshot(results_dir)
    # with --results, the repository's own store must stay untouched: a chapter that ignores results_dir shows here
    default_store = root / "results"
    default_before = snapshot(default_store) if results_dir != default_store.resolve() else None
    stale = build / "html.stale"
    if html.exists() and not args.no_html:  # never leave the previous pages looking like this build's
        if stale.exists():
            shutil.rmtree(stale)
        html.rename(stale)
        (stale / "STALE.txt").write_text("These pages are from an earlier build; a newer build started "
                                         f"{time.strftime('%Y-%m-%d %H:%M:%S')} and has not finished (or failed).\n")

    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for name in ("_config.yml",):
        shutil.copy2(root / name, staging / name)
    (staging / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False))
    if (root / "book").is_dir():
        shutil.copytree(root / "book", staging / "book", ignore=shutil.ignore_patterns("node_modules", "vendor.tar.xz"))
    logs = build / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    shown = args.profile or ", ".join(f"{p.stem}={profile_of(p.stem)}" for p in notebooks)
    print(f"kdbook build: {len(paths)} pages, {len(notebooks)} notebooks, profile {shown}, params {dict(params)}, "
          f"results store {results_dir}, {args.threads} thread(s) per chapter", flush=True)
    t_all = time.time()
    jobs = max(1, min(args.jobs, len(notebooks) or 1))
    # The same thread count for every chapter, however many run side by side: float sums are reduced in
    # thread-dependent order, so a record recomputed with 2 threads could differ from one computed with 1.
    env = dict(os.environ, **{var: str(args.threads) for var in THREAD_VARS})
    for src in paths:
        if src.suffix == ".md":
            dst = staging / src.relative_to(root)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    failures = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run_chapter, src, staging / src.relative_to(root),
                               [("profile", profile_of(src.stem))] + params, args.timeout,
                               logs / (src.stem + ".log"), env): src for src in notebooks}
        for n, fut in enumerate(as_completed(futures), 1):
            rel = futures[fut].relative_to(root)
            ok, message = fut.result()
            print(f"[{n}/{len(notebooks)}] {rel}: {message}", flush=True)
            if not ok:
                failures.append(f"error: chapter {rel} {message}")
    print(records_summary(results_dir, records_before), flush=True)
    if default_before is not None and snapshot(default_store) != default_before:
        print(f"warning: the build was pointed at {results_dir} but also wrote into {default_store}: a chapter "
              f"ignores its results_dir parameter\n" + records_summary(default_store, default_before), flush=True)
    if failures:
        print("\n".join(failures), file=sys.stderr)
        if stale.exists():
            print(f"the previous HTML was moved to {stale}: it is not this build's", file=sys.stderr)
        return 1
    n = len(notebooks)
    print(f"executed {n} notebooks in {time.time() - t_all:.1f} s", flush=True)
    if args.no_html:
        return 0

    t0 = time.time()
    if html.exists():
        shutil.rmtree(html)
    jb = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(jb) if jb.exists() else "jupyter-book", "build", str(staging), "--path-output", str(build / "jb"),
           "--builder", "html", "-n", "--keep-going"]
    if not args.only:  # a one-chapter build cannot resolve links to the chapters it leaves out
        cmd.insert(cmd.index("-n"), "-W")
    print("$ " + " ".join(cmd), flush=True)
    jb_log = logs / "jupyter-book.log"
    with open(jb_log, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    out = (build / "jb" / "_build" / "html")
    if proc.returncode != 0 or not out.is_dir():
        lines = jb_log.read_text(errors="replace").splitlines()
        problems = [l for l in lines if "WARNING" in l or "ERROR" in l or "Error" in l]
        print("\n".join(problems[:40] or lines[-40:]), file=sys.stderr)
        print(f"error: jupyter-book build failed (strict mode: warnings are errors); full log: {jb_log}",
              file=sys.stderr)
        if stale.exists():
            print(f"the previous HTML was moved to {stale}: it is not this build's", file=sys.stderr)
        return 1
    shutil.move(str(out), str(html))
    if stale.exists():
        shutil.rmtree(stale)
    print(f"jupyter-book build ok ({time.time() - t0:.1f} s); HTML in {html}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
