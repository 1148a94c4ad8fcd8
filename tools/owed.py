#!/usr/bin/env python
"""The owed GPU work of the book, in time-boxed slices that add up (`make gpu`, `make gpu-import`).

    python tools/owed.py run --budget-min 8 --out DIR [--chapters a,b] [--profile P] [--kernel kdbook]
    python tools/owed.py import ARCHIVE          # a folder written by `run`, or its .tar.gz
    python tools/owed.py execute CHAPTER --profile P   # one chapter, no deadline (the sweep's job)

`run` executes, in _toc.yml order, every chapter whose `target` profile in profiles.yml is not its
`published` one (or the chapters named), with papermill at the target profile (kernel `kdbook`, cwd
chapters/, so `../results` is this repository's store), its output streamed with a `[chapter]`
prefix. Each chapter gets the budget that is left as its timeout; at the deadline its kernel's
process groups get SIGTERM, then SIGKILL. Records and checkpoints are written atomically, so a stopped
chapter leaves its resumable checkpoints (Store.resume_path) and nothing half-written. Then every file
under results/ and data/checkpoints/partial/ that is new or changed since the start (sha256 snapshot)
goes into a .tar.gz (split into parts of at most 16 MB) in --out, beside manifest.json (revision,
device, torch, chapters done / partial / failed / not started with their seconds, the sha256 of every
archived file and of every part) and papermill.log. At most 8 files are written.

`import` verifies the manifest, every part's and every file's sha256, every record's own checksum and
every stored weight file against its record, then merges all or nothing: identical files are kept, a
different record (or weight file) under the same key is refused, partial checkpoints go to
data/checkpoints/partial/, and a chapter completed at its target gets `published: <target>` in
profiles.yml. An archive from another code revision is accepted with a warning: each record carries
the revision that computed it.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROFILES = ("smoke", "quick", "paper")
TRACKED = ("results", "data/checkpoints/partial")  # what a slice brings back
PART_BYTES = 16 * 1000 * 1000  # at most 16 MB per file written to --out
MAX_FILES = 8  # parts + manifest.json + papermill.log
ARCHIVE = "owed.tar.gz"


class OwedError(RuntimeError):
    "A clear error about the queue's input; nothing under results/ was changed."


def _kdbook(root: Path):
    "The kdbook package of the repository at `root` (its store code reads and writes the records)."
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import kdbook.store as store
    return store


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- what is owed ---------------------------------------------------------------------------------------------

def toc_stems(root: Path) -> list[str]:
    "The notebook chapters of _toc.yml, in book order."
    import yaml
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    files = []

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for key in ("parts", "chapters", "sections"):
                for child in node.get(key) or []:
                    walk(child)

    walk(toc)
    return [Path(f).stem for f in files if (root / f"{f}.ipynb").exists()]


def read_plan(root: Path) -> dict:
    "profiles.yml, validated: {'default', 'chapters': {stem: {published, target, stores}}}."
    plan = _kdbook(root).chapter_plan(root)
    for stem, spec in plan["chapters"].items():
        for field in ("published", "target"):
            if spec[field] not in PROFILES:
                raise OwedError(f"profiles.yml: {stem}: {field}: unknown profile {spec[field]!r}; use one of {PROFILES}")
    return plan


def select(root: Path,  # the repository
           chapters: list[str] | None,  # chapters named on the command line (None: every owed one)
           profile: str | None,  # run at this profile instead of each chapter's target
           ) -> list[tuple[str, str]]:
    "(chapter, profile) pairs to run, in book order: the named chapters, or those whose target is not published."
    stems, plan = toc_stems(root), read_plan(root)
    if profile is not None and profile not in PROFILES:
        raise OwedError(f"unknown profile {profile!r}; use one of {', '.join(PROFILES)}")
    spec = {s: plan["chapters"].get(s, {"published": plan["default"], "target": plan["default"]}) for s in stems}
    if chapters:
        unknown = [c for c in chapters if c not in spec]
        if unknown:
            raise OwedError(f"unknown chapter(s) {', '.join(unknown)}: the notebook chapters are {', '.join(stems)}")
        chosen = [s for s in stems if s in chapters]
    else:
        chosen = [s for s in stems if (profile or spec[s]["target"]) != spec[s]["published"]]
    return [(s, profile or spec[s]["target"]) for s in chosen]


# --- which cells a slice executes ----------------------------------------------------------------------------

_DIRECTIVE = re.compile(r"^\s*#\|\s*([\w-]+)", re.M)
_IPY_NAMES = {"get_ipython", "display", "In", "Out", "exit", "quit"}


def _directives(src: str) -> set[str]:
    return set(_DIRECTIVE.findall(src))


def _python(src: str) -> str:
    "A cell's source as plain Python (IPython's `!cmd`, `%magic` and `%%cell` syntax transformed or dropped)."
    try:
        from IPython.core.inputtransformer2 import TransformerManager
        return TransformerManager().transform_cell(src)
    except Exception:  # no IPython here: drop the lines Python cannot parse
        return "\n".join("pass" if line.lstrip().startswith(("!", "%")) else line for line in src.splitlines())


def _locals(fn) -> tuple[set[str], set[str]]:
    "(local names, names declared global) of a function or lambda: its arguments and every name bound in its body."
    import ast
    a = fn.args
    local = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs} | {x.arg for x in (a.vararg, a.kwarg) if x}
    declared = set()
    for node in ast.walk(fn) if not isinstance(fn, ast.Lambda) else ():
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            local.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node is not fn:
            local.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            local.update(x.asname or x.name.split(".")[0] for x in node.names)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            declared.update(node.names)
    return local - declared, declared


def cell_names(src: str) -> tuple[set[str], set[str], bool]:
    """(global names a cell binds or mutates, global names it reads, whether it has a `from x import *`).

    Scopes are respected (a function's arguments and locals are not globals) and so is the order within the cell
    (a name the cell assigns before it reads it is not read from an earlier cell); otherwise it over-approximates:
    a global whose attribute or item is assigned (`store.verbose = False`) counts as bound and read, and a global
    loaded in a function body counts as read where the function is defined."""
    import ast
    import builtins
    try:
        tree = ast.parse(_python(src))
    except SyntaxError:
        return set(), set(), False
    binds, reads, star, defined = set(), set(), [False], set()

    class Visit(ast.NodeVisitor):
        def __init__(self):
            self.scopes = []

        def local(self, name):
            return any(name in sc for sc in self.scopes)

        def visit_Name(self, node):
            if isinstance(node.ctx, ast.Load):
                if not self.local(node.id) and node.id not in defined:
                    reads.add(node.id)
            elif not self.scopes:
                binds.add(node.id)
                defined.add(node.id)

        def visit_Assign(self, node):  # the value is evaluated before the targets are bound
            self.visit(node.value)
            for t in node.targets:
                self.visit(t)

        def visit_AnnAssign(self, node):
            if node.value is not None:
                self.visit(node.value)
            self.visit(node.annotation)
            self.visit(node.target)

        def visit_NamedExpr(self, node):
            self.visit(node.value)
            self.visit(node.target)

        def visit_AugAssign(self, node):  # x += 1 reads x
            self.visit(node.value)
            if isinstance(node.target, ast.Name):
                if not self.local(node.target.id):
                    if node.target.id not in defined:
                        reads.add(node.target.id)
                    if not self.scopes:
                        binds.add(node.target.id)
            else:
                self.visit(node.target)

        def visit_For(self, node):
            self.visit(node.iter)
            self.visit(node.target)
            for stmt in node.body + node.orelse:
                self.visit(stmt)

        visit_AsyncFor = visit_For

        def _mutation(self, node):
            if not isinstance(node.ctx, ast.Load):
                root = node.value
                while isinstance(root, (ast.Attribute, ast.Subscript)):
                    root = root.value
                if isinstance(root, ast.Name) and not self.local(root.id):
                    binds.add(root.id)
                    if root.id not in defined:
                        reads.add(root.id)
            self.generic_visit(node)

        visit_Attribute = visit_Subscript = _mutation

        def _function(self, node):
            for d in getattr(node, "decorator_list", []):
                self.visit(d)
            for d in node.args.defaults + [x for x in node.args.kw_defaults if x is not None]:
                self.visit(d)
            if not self.scopes and not isinstance(node, ast.Lambda):
                binds.add(node.name)
                defined.add(node.name)
            local, declared = _locals(node)
            binds.update(declared)
            self.scopes.append(local)
            for stmt in (node.body if isinstance(node.body, list) else [node.body]):
                self.visit(stmt)
            self.scopes.pop()

        visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

        def visit_ClassDef(self, node):
            for d in node.decorator_list + node.bases + [k.value for k in node.keywords]:
                self.visit(d)
            if not self.scopes:
                binds.add(node.name)
                defined.add(node.name)
            self.scopes.append({n.id for stmt in node.body for n in ast.walk(stmt)
                                if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)})
            for stmt in node.body:
                self.visit(stmt)
            self.scopes.pop()

        def _comprehension(self, node):
            targets = {n.id for g in node.generators for n in ast.walk(g.target) if isinstance(n, ast.Name)}
            self.visit(node.generators[0].iter)  # evaluated in the enclosing scope
            self.scopes.append(targets)
            for i, g in enumerate(node.generators):
                if i:
                    self.visit(g.iter)
                for cond in g.ifs:
                    self.visit(cond)
            for part in ("elt", "key", "value"):
                if getattr(node, part, None) is not None:
                    self.visit(getattr(node, part))
            self.scopes.pop()

        visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _comprehension

        def _import(self, node):
            for a in node.names:
                if a.name == "*":
                    star[0] = True
                elif not self.scopes:
                    name = a.asname or (a.name.split(".")[0] if isinstance(node, ast.Import) else a.name)
                    binds.add(name)
                    defined.add(name)

        visit_Import = visit_ImportFrom = _import

    Visit().visit(tree)
    return binds, reads - set(dir(builtins)) - _IPY_NAMES, star[0]


def computing_cells(nb: dict) -> list[int]:
    """Indices of the code cells a slice executes: export cells, the `parameters` cell, `#| slow` cells (the
    experiments) and, to a fixed point, every cell that binds a name one of those reads. The rest (nbdev's test
    cells: `_`-prefixed names, `test_*` calls) is left out."""
    code = [(i, c) for i, c in enumerate(nb["cells"]) if c.get("cell_type") == "code"]
    src = {i: "".join(c["source"]) if isinstance(c["source"], list) else c["source"] for i, c in code}
    names = {i: cell_names(src[i]) for i, _ in code}
    kept = {i for i, c in code
            if "parameters" in (c.get("metadata", {}).get("tags") or [])
            or _directives(src[i]) & {"export", "exporti", "exports", "slow"}}
    every_bind = set().union(*(names[i][0] for i, _ in code)) if code else set()
    needed = set().union(*(names[i][1] for i in kept)) if kept else set()
    changed = True
    while changed:
        changed = False
        unresolved = needed - every_bind
        for i, _ in code:
            binds, reads, star = names[i]
            if i not in kept and (binds & needed or (star and unresolved)):
                kept.add(i)
                needed |= reads
                changed = True
    return sorted(kept)


def strip_tests(src: Path, dst: Path) -> tuple[int, int]:
    "Write `src` without the code cells a slice need not execute (see computing_cells) to `dst`; (kept, dropped)."
    nb = json.loads(src.read_text())
    keep = set(computing_cells(nb))
    n_code = sum(c.get("cell_type") == "code" for c in nb["cells"])
    nb["cells"] = [c for i, c in enumerate(nb["cells"]) if c.get("cell_type") != "code" or i in keep]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return len(keep), n_code - len(keep)


# --- executing a chapter against a deadline -------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    "Every descendant of `pid` (from /proc), the kernel included although it runs in a session of its own."
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parents.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_tree(proc: subprocess.Popen, grace_s: float = 10.0):
    "SIGTERM to the process groups of papermill and of its kernel, then SIGKILL to whatever is left."
    pids = [proc.pid] + _children(proc.pid)
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    groups.discard(os.getpgid(0))  # never our own group
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for g in groups:
            try:
                os.killpg(g, sig)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        if sig == signal.SIGTERM:
            t_end = time.time() + grace_s
            while time.time() < t_end and any(Path(f"/proc/{p}").exists() for p in pids[1:]):
                time.sleep(0.2)


def execute(root: Path,  # the repository
            stem: str,  # the chapter
            profile: str,  # -p profile
            timeout_s: float | None,  # stop it after this many seconds (None: no deadline)
            log,  # a text file: every output line, prefixed
            kernel: str = "kdbook",  # the Jupyter kernel
            out_dir: Path | None = None,  # where the executed notebook goes (default: a temporary folder)
            ) -> tuple[str, float, int | None]:
    "Run one chapter with papermill: (status 'done' | 'partial' | 'failed', seconds, return code)."
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="kdbook-owed-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    cmd = [sys.executable, "-m", "papermill", str(root / "chapters" / f"{stem}.ipynb"), str(out_dir / f"{stem}.ipynb"),
           "-k", kernel, "--cwd", str(root / "chapters"), "--log-output", "--no-progress-bar", "-p", "profile", profile]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, errors="replace")

    def pump():
        for line in proc.stdout:
            text = f"[{stem}] {line.rstrip()}"
            print(text, flush=True)
            log.write(text + "\n")
            log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout_s)
        status = "done" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        stop_tree(proc)
        rc, status = None, "partial"
    except KeyboardInterrupt:
        stop_tree(proc)
        raise
    reader.join(timeout=10)
    return status, time.time() - t0, rc


# --- the slice: run, then export ------------------------------------------------------------------------------

def snapshot(root: Path) -> dict[str, str]:
    "relative path -> sha256 of every file under results/ and data/checkpoints/partial/."
    out = {}
    for top in TRACKED:
        base = root / top
        if base.exists():
            for p in sorted(base.rglob("*")):
                if p.is_file() and not p.name.endswith(".tmp"):
                    out[p.relative_to(root).as_posix()] = sha256_file(p)
    return out


def _chapter_of(path: str, plan: dict) -> str | None:
    parts = path.split("/")
    name = parts[2] if parts[:2] == ["results", "weights"] and len(parts) > 2 else parts[1] if parts[0] == "results" else \
        parts[-1].rsplit("-", 1)[0]
    return next((s for s, spec in plan["chapters"].items() if name in spec["stores"]), None)


def _finished(root: Path, rel: str) -> bool:
    "A partial checkpoint <name>-<key>.pt whose run has its record now: nothing to resume, not exported."
    if not rel.startswith("data/checkpoints/partial/"):
        return False
    name, _, key = Path(rel).stem.rpartition("-")
    return bool(name) and (root / "results" / name / f"{key}.json").exists()


def export(root: Path, out: Path, before: dict, manifest: dict, log_path: Path) -> list[Path]:
    "Write the new or changed files (tar.gz in parts), manifest.json and papermill.log into `out`."
    after = snapshot(root)
    changed = {p: h for p, h in after.items() if before.get(p) != h and not _finished(root, p)}
    # files the slice rewrote (a stale or corrupt record recomputed): import may replace exactly that version
    manifest = dict(manifest, files=changed, replaced={p: before[p] for p in changed if p in before})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = json.dumps(manifest, indent=1, sort_keys=True).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
        tar.addfile(info, io.BytesIO(data))
        for rel in sorted(changed):
            tar.add(root / rel, arcname=rel, recursive=False)
    blob = buf.getvalue()
    n_parts = max(1, -(-len(blob) // PART_BYTES))
    if n_parts > MAX_FILES - 2:
        raise OwedError(f"the archive is {len(blob) / 1e6:.1f} MB: more than {MAX_FILES - 2} parts of 16 MB; "
                        "run a shorter slice (smaller BUDGET_MIN)")
    out.mkdir(parents=True, exist_ok=True)
    written, parts = [], []
    for i in range(n_parts):
        name = ARCHIVE if n_parts == 1 else f"{ARCHIVE}.part{i:02d}"
        chunk = blob[i * PART_BYTES:(i + 1) * PART_BYTES]
        (out / name).write_bytes(chunk)
        parts.append({"name": name, "sha256": hashlib.sha256(chunk).hexdigest(), "bytes": len(chunk)})
        written.append(out / name)
    (out / "manifest.json").write_text(json.dumps(dict(manifest, parts=parts), indent=1, sort_keys=True) + "\n")
    shutil.copyfile(log_path, out / "papermill.log")
    return written + [out / "manifest.json", out / "papermill.log"]


def run_slice(root: Path, budget_s: float, out: Path, chapters: list[str] | None = None, profile: str | None = None,
              kernel: str = "kdbook") -> dict:
    "Run the owed chapters within `budget_s` seconds and export what they made into `out`; the manifest."
    if not budget_s > 0:
        raise OwedError(f"the budget must be > 0 minutes, got {budget_s / 60:g}")
    todo = select(root, chapters, profile)
    store = _kdbook(root)
    plan = read_plan(root)
    rev, dirty = store.git_revision(root)
    before = snapshot(root)
    t_start = time.time()
    work = Path(tempfile.mkdtemp(prefix="kdbook-owed-"))
    log_path = work / "papermill.log"
    entries = []
    print(f"owed: {len(todo)} chapter(s) to run within {budget_s / 60:.1f} min: "
          + (", ".join(f"{s} at {p}" for s, p in todo) or "nothing is owed"), flush=True)
    current, stop = {"chapter": None}, threading.Event()

    def heartbeat(every_s: float = 60.0):
        while not stop.wait(every_s):
            used = time.time() - t_start
            print(f"owed: {used / 60:.1f} of {budget_s / 60:.1f} min used, deadline in {max(budget_s - used, 0) / 60:.1f} min; "
                  f"running {current['chapter']} ({len(entries)} of {len(todo)} chapters finished)", flush=True)

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    try:
        with open(log_path, "w") as log:
            for stem, prof in todo:
                left = budget_s - (time.time() - t_start)
                target = plan["chapters"].get(stem, {}).get("target", plan["default"])
                entry = {"chapter": stem, "profile": prof, "target": target, "status": "not started", "seconds": 0.0,
                         "rc": None}
                if left > 1:
                    current["chapter"] = stem
                    print(f"owed: {stem} at {prof}: {time.time() - t_start:.0f} s of {budget_s:.0f} s used", flush=True)
                    entry["status"], entry["seconds"], entry["rc"] = execute(root, stem, prof, left, log, kernel,
                                                                             work / "executed")
                entries.append(entry)
    finally:
        stop.set()
    device = store.device_name()
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    manifest = {"format": 1, "git_rev": rev, "dirty": dirty, "torch": torch_version, "device": device,
                "created": datetime.now(timezone.utc).isoformat(), "budget_s": budget_s,
                "elapsed_s": time.time() - t_start, "chapters": entries}
    written = export(root, out, before, manifest, log_path)
    changed = {p for p, h in snapshot(root).items() if before.get(p) != h}
    print_table(entries, changed, plan, device)
    print(f"owed: wrote {len(written)} files to {out}: {', '.join(p.name for p in written)}", flush=True)
    return json.loads((out / "manifest.json").read_text())


def print_table(entries: list, changed: set, plan: dict, device: str):
    unit = "GPU-min" if device.startswith("cuda") else "min (no GPU)"
    print(f"\n{'chapter':<20} {'profile':<8} {'status':<12} {'new records':>11} {'partial ckpts':>13} {unit:>12}")
    for e in entries:
        recs = sum(1 for p in changed if p.endswith(".json") and p.startswith("results/") and _chapter_of(p, plan) == e["chapter"])
        ckpts = sum(1 for p in changed if p.startswith("data/checkpoints/partial/") and _chapter_of(p, plan) == e["chapter"])
        print(f"{e['chapter']:<20} {e['profile']:<8} {e['status']:<12} {recs:>11} {ckpts:>13} {e['seconds'] / 60:>12.2f}")
    done = sum(e["status"] == "done" for e in entries)
    print(f"done {done}, partial {sum(e['status'] == 'partial' for e in entries)}, "
          f"failed {sum(e['status'] == 'failed' for e in entries)}, owed {len(entries) - done}; "
          f"{sum(e['seconds'] for e in entries) / 60:.2f} {unit} used\n", flush=True)


# --- import -----------------------------------------------------------------------------------------------------

def _read_archive(archive: Path, staging: Path) -> dict:
    "Verify and unpack an archive (a folder written by run_slice, or its .tar.gz) into `staging`; its manifest."
    if archive.is_dir():
        mpath = archive / "manifest.json"
        if not mpath.exists():
            raise OwedError(f"{archive}: no manifest.json: not a folder written by `make gpu`")
        try:
            outer = json.loads(mpath.read_text())
            parts = outer["parts"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise OwedError(f"{mpath}: unreadable manifest ({err}); copy the folder again") from None
        blob = bytearray()
        for part in parts:
            p = archive / part["name"]
            if not p.exists():
                raise OwedError(f"{archive}: part {part['name']} is missing; copy every file of the folder")
            data = p.read_bytes()
            if hashlib.sha256(data).hexdigest() != part["sha256"]:
                raise OwedError(f"{p}: sha256 differs from the manifest (corrupt or truncated); copy it again")
            blob += data
        tar_bytes = bytes(blob)
    elif archive.is_file():
        tar_bytes, outer = archive.read_bytes(), None
    else:
        raise OwedError(f"{archive}: no such archive (give the folder written by `make gpu OUT=...` or its .tar.gz)")
    allowed = ("results/", "data/checkpoints/partial/")
    try:
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                name = m.name
                if not (m.isfile() or m.isdir()) or name.startswith("/") or ".." in Path(name).parts \
                        or not (name == "manifest.json" or name.startswith(allowed)):
                    raise OwedError(f"{archive}: unexpected entry {name!r} (only results/, data/checkpoints/partial/ "
                                    "and manifest.json belong in an archive); refused")
            tar.extractall(staging, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        raise OwedError(f"{archive}: corrupt or truncated archive ({type(err).__name__}: {err}); copy it again") from None
    mpath = staging / "manifest.json"
    if not mpath.exists():
        raise OwedError(f"{archive}: the archive holds no manifest.json: not written by `make gpu`")
    manifest = json.loads(mpath.read_text())
    if outer is not None and {k: v for k, v in outer.items() if k != "parts"} != manifest:
        raise OwedError(f"{archive}: manifest.json does not match the manifest inside the archive; copy it again")
    return manifest


def _verify(staging: Path, root: Path, manifest: dict, store) -> tuple[list, list]:
    "Check every file against the manifest, records and weights; (files to write, identical files kept)."
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise OwedError("the manifest lists no files; not written by `make gpu`")
    present = {p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()} - {"manifest.json"}
    if present != set(files):
        raise OwedError(f"the archive's files differ from its manifest (extra: {sorted(present - set(files))[:3]}, "
                        f"missing: {sorted(set(files) - present)[:3]}); copy it again")
    for rel, sha in files.items():
        if sha256_file(staging / rel) != sha:
            raise OwedError(f"{rel}: sha256 differs from the manifest (corrupt); copy the archive again")
    records = {}
    for rel in files:
        parts = rel.split("/")
        if parts[0] == "results" and len(parts) == 3 and parts[2].endswith(".json") and parts[1] not in store.RESERVED_NAMES \
                and re.fullmatch(r"[0-9a-f]{16}\.json", parts[2]):
            try:
                record = json.loads((staging / rel).read_text())
            except json.JSONDecodeError as err:
                raise OwedError(f"{rel}: not JSON ({err}); refused") from None
            problem = store.Store._problem(record, parts[1], parts[2][:-5])
            if problem:
                raise OwedError(f"{rel}: invalid record ({problem}); refused")
            records[(parts[1], parts[2][:-5])] = record
    for rel in files:
        parts = rel.split("/")
        if parts[:2] == ["results", "weights"] and rel.endswith(".safetensors"):
            name, key = parts[2], parts[3][: -len(".safetensors")]
            record = records.get((name, key))
            if record is None and (root / "results" / name / f"{key}.json").exists():
                record = json.loads((root / "results" / name / f"{key}.json").read_text())
            sha = (record or {}).get("result", {}).get("weights", {}).get("sha256")
            if sha != files[rel]:
                raise OwedError(f"{rel}: no record names these weights (sha256 {files[rel][:12]}…); refused")
    write, kept = [], []
    for rel in sorted(files):
        dest = root / rel
        if dest.exists():
            mine = sha256_file(dest)
            if mine == files[rel]:
                kept.append(rel)
                continue
            if rel.startswith("data/checkpoints/partial/"):  # a later checkpoint of an unfinished run
                write.append(rel)
                continue
            if manifest.get("replaced", {}).get(rel) == mine:
                print(f"import: {rel}: replaced by the version the slice recomputed from this very file "
                      "(stale, corrupt, or its weights were missing)", flush=True)
                write.append(rel)
                continue
            what = "a different record" if rel.endswith(".json") else "a different file"
            raise OwedError(f"{rel}: the archive holds {what} under the same key than this repository; nothing was "
                            "imported. Compare the two (each record names its revision, device and time) and delete "
                            "the one you do not want before importing again")
        write.append(rel)
    return write, kept


def set_published(root: Path, stem: str, profile: str):
    "Set `published: <profile>` for `stem` in profiles.yml, keeping its other lines and comments."
    path = root / "profiles.yml"
    text = path.read_text()
    line = re.compile(rf"^(  {re.escape(stem)}:\s*)(.*)$", re.M)
    m = line.search(text)
    if m is None:
        text = text.rstrip("\n") + f"\n  {stem}: {{published: {profile}, target: {profile}}}\n"
    elif m.group(2).lstrip().startswith("{"):
        text = text[:m.start(2)] + re.sub(r"published:\s*\w+", f"published: {profile}", m.group(2), count=1) + text[m.end(2):]
    else:
        text = text[:m.start(2)] + re.sub(r"^\w+", profile, m.group(2), count=1) + text[m.end(2):]
    store = _kdbook(root)
    store.atomic_write_bytes(path, text.encode())


def import_archive(root: Path, archive: Path) -> dict:
    "Merge an archive into the repository at `root`, all or nothing; a summary."
    store = _kdbook(root)
    with tempfile.TemporaryDirectory(prefix="kdbook-import-") as tmp:
        staging = Path(tmp)
        manifest = _read_archive(archive, staging)
        rev, _ = store.git_revision(root)
        if manifest.get("git_rev") != rev:
            warnings.warn(f"{archive}: computed at revision {str(manifest.get('git_rev'))[:12]}, this checkout is at "
                          f"{rev[:12]}; accepted: every record names the revision that computed it", stacklevel=2)
        write, kept = _verify(staging, root, manifest, store)
        for rel in write:
            store.atomic_write_bytes(root / rel, (staging / rel).read_bytes())
    plan = read_plan(root)
    published = []
    for e in manifest.get("chapters", []):
        spec = plan["chapters"].get(e["chapter"])
        if e["status"] == "done" and spec is not None and e["profile"] == spec["target"] != spec["published"]:
            set_published(root, e["chapter"], e["profile"])
            published.append(f"{e['chapter']} at {e['profile']}")
    print(f"import: {len(write)} files written, {len(kept)} identical kept; "
          f"published: {', '.join(published) or 'no chapter completed at its target'}", flush=True)
    return {"written": write, "kept": kept, "published": published}


# --- command line ---------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the owed chapters within a budget, export what they made")
    r.add_argument("--budget-min", type=float, required=True, help="minutes for the whole slice")
    r.add_argument("--out", required=True, help="folder for the archive, manifest.json and papermill.log")
    r.add_argument("--chapters", default="", help="comma-separated chapter stems (default: every owed chapter)")
    r.add_argument("--profile", default=None, help="run at this profile instead of each chapter's target")
    r.add_argument("--kernel", default="kdbook")
    i = sub.add_parser("import", help="merge an archive written by `run`")
    i.add_argument("archive")
    e = sub.add_parser("execute", help="run one chapter with papermill, no deadline (a sweep job)")
    e.add_argument("chapter")
    e.add_argument("--profile", required=True)
    e.add_argument("--kernel", default="kdbook")
    for p in (r, i, e):
        p.add_argument("--root", default=str(REPO), help="the repository (default: this one)")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    try:
        if args.cmd == "run":
            chapters = [c.strip() for c in args.chapters.split(",") if c.strip()] or None
            run_slice(root, args.budget_min * 60, Path(args.out).resolve(), chapters, args.profile, args.kernel)
        elif args.cmd == "import":
            import_archive(root, Path(args.archive).resolve())
        else:
            (stem, prof), = select(root, [args.chapter], args.profile)
            with open(Path(tempfile.mkdtemp(prefix="kdbook-sweep-")) / "papermill.log", "w") as log:
                status, seconds, rc = execute(root, stem, prof, None, log, args.kernel)
            print(f"sweep: {stem} at {prof}: {status} in {seconds:.0f} s", flush=True)
            if status != "done":
                return 1
    except OwedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
