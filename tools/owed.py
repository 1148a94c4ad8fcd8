#!/usr/bin/env python
"""The owed GPU work of the book, in time-boxed slices that add up (`make gpu`, `make gpu-import`).

    python tools/owed.py run --budget-min 8 --out DIR [--chapters a,b] [--profile P] [--kernel kdbook]
                             [--export-every-s 60] [--grace-s 20] [--all-cells]
    python tools/owed.py import ARCHIVE          # a folder written by `run`, or one of its .tar.gz
    python tools/owed.py execute CHAPTER --profile P   # one chapter, no deadline (the sweep's job)

`run` checks first that the kernel exists and that --out is an empty, writable folder with room, then
executes, in _toc.yml order, every chapter whose `target` profile in profiles.yml is not its `published`
one (or the chapters named), with papermill at the target profile (cwd chapters/, so `../results` is this
repository's store), its output streamed with a `[chapter]` prefix. Only the cells that compute run
(computing_cells: export, parameters and `#| slow` cells and what they read; not the test cells). The kernel
gets KDBOOK_DEADLINE (unix seconds): the budget less the final stop and export. At the deadline, or on Ctrl-C
/ SIGTERM to this process, the chapter's process groups get SIGTERM, a grace period for checkpoints, then
SIGKILL. After every chapter and every --export-every-s seconds, every file under results/ and
data/checkpoints/partial/ that differs from the committed store goes into --out (Exporter: a .tar.gz in at
most 6 parts of 16 MB under two alternating names, manifest.json written last, papermill.log), so a command
killed at any instant returns everything finished by the last export. The manifest holds the revision,
device, torch, chapters with their status and seconds, every file's sha256 and a `ledger` of the lease's
minutes (setup, probe, training, export) and what finished / is partial / is owed.

`import` verifies the manifest, every part's and every file's sha256, every record's own checksum, every
checkpoint, that every record's weights are in the archive or here, then merges all or nothing (disk space
checked first): identical files are kept, a different record (or weight file) under the same key is refused,
the further of two checkpoints is kept, and a chapter completed at its target whose records at that profile
are in the store gets `published: <target>` in profiles.yml. An archive from another code revision is
accepted with a warning (each record carries the revision that computed it), from a dirty tree loudly.
"""
from __future__ import annotations

import argparse
import errno
import functools
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


def _transient(path: Path) -> bool:
    "A file the store writes only while it works: a temp file before its rename, or a run's lock (store.lock_path)."
    return path.name.endswith((".tmp", ".lock"))
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
    _kdbook(root)  # puts the repository on sys.path
    from kdbook.costs import chapter_plan
    plan = chapter_plan(root)
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
    if not re.search(r"^\s*[!%]|\?\s*$", src, re.M):
        return src
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
        elif isinstance(node, ast.ExceptHandler) and node.name:
            local.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            declared.update(node.names)
    return local - declared, declared


@functools.lru_cache(maxsize=4096)
def cell_names(src: str) -> tuple[frozenset[str], frozenset[str], bool]:
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
        return frozenset(), frozenset(), False
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

        def visit_ExceptHandler(self, node):
            if node.type is not None:
                self.visit(node.type)
            if node.name and not self.scopes:
                binds.add(node.name)
                defined.add(node.name)
            for stmt in node.body:
                self.visit(stmt)

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
    return frozenset(binds), frozenset(reads - set(dir(builtins)) - _IPY_NAMES), star[0]


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

GRACE_S = 20.0  # after SIGTERM at the deadline: time for the kernel to write its checkpoints before SIGKILL


class Stopped(BaseException):
    "owed.py itself got SIGTERM: stop the chapter's processes, export what finished, exit."


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


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
        return state[state.rindex(")") + 2] != "Z"  # a zombie has stopped
    except (OSError, ValueError, IndexError):
        return False


def stop_tree(proc: subprocess.Popen, grace_s: float = GRACE_S):
    """SIGTERM to the process groups of papermill and of its kernel, at most `grace_s` seconds for them to write
    their checkpoints and exit, then SIGKILL to whatever is left (no orphaned kernel writes records later)."""
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
        t_end = time.time() + (grace_s if sig == signal.SIGTERM else 10)
        while time.time() < t_end and (proc.poll() is None or any(_alive(p) for p in pids[1:])):
            time.sleep(0.1)


def check_kernel(kernel: str):
    "A clear error, before anything runs, when the Jupyter kernel `kernel` is not installed."
    try:
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    except ImportError:
        raise OwedError("jupyter_client is not installed: install the Jupyter wheels (see the README's GPU section)") from None
    try:
        KernelSpecManager().get_kernel_spec(kernel)
    except NoSuchKernel:
        have = ", ".join(sorted(KernelSpecManager().find_kernel_specs())) or "none"
        raise OwedError(f"no Jupyter kernel {kernel!r} here (installed: {have}); register it with "
                        f"`python3 -m ipykernel install --user --name {kernel}` or pass --kernel") from None


def _utc(stamp: str) -> float:
    t = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def experiment_seconds(executed: Path, t_end: float) -> float:
    "Seconds spent in the `#| slow` (experiment) cells of an executed notebook, the one still running included."
    try:
        nb = json.loads(executed.read_text())
    except (OSError, json.JSONDecodeError):
        return 0.0
    total = 0.0
    for c in nb.get("cells", []):
        src = "".join(c.get("source", []))
        pm = c.get("metadata", {}).get("papermill", {})
        if c.get("cell_type") != "code" or "slow" not in _directives(src):
            continue
        if pm.get("duration") is not None:
            total += float(pm["duration"])
        elif pm.get("start_time") and pm.get("status") == "running":
            total += max(t_end - _utc(pm["start_time"]), 0.0)
    return total


def failure_cause(executed: Path) -> str | None:
    "The error a chapter stopped on, from its executed notebook: 'cell N: ValueError: ...' (None when none)."
    try:
        nb = json.loads(executed.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    n = 0
    for c in nb.get("cells", []):
        if c.get("cell_type") != "code":
            continue
        n += 1
        for o in c.get("outputs", []):
            if o.get("output_type") == "error":
                first = "".join(c.get("source", [])).strip().splitlines()[:1]
                return f"code cell {n} ({first[0][:60] if first else 'empty'}): {o.get('ename')}: {o.get('evalue')}"
    return None


def execute(root: Path,  # the repository
            stem: str,  # the chapter
            profile: str,  # -p profile
            deadline: float | None,  # unix time to stop it at (None: no deadline)
            log,  # a text file: every output line, prefixed
            kernel: str = "kdbook",  # the Jupyter kernel
            out_dir: Path | None = None,  # where the executed notebook goes (default: a temporary folder)
            all_cells: bool = False,  # execute the test cells too (default: only what computes, see computing_cells)
            grace_s: float = GRACE_S,  # SIGTERM at the deadline, then this long before SIGKILL
            ) -> dict:
    """Run one chapter with papermill: {'status': 'done' | 'partial' | 'failed', 'seconds', 'rc', 'train_s', 'cause'}.

    The kernel gets `KDBOOK_DEADLINE` (unix seconds) in its environment: the library starts no run that cannot
    finish by then. At the deadline its process groups get SIGTERM, `grace_s` seconds, then SIGKILL. Ctrl-C or
    SIGTERM to this process stop them the same way (then the exception is raised again)."""
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="kdbook-owed-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    source = root / "chapters" / f"{stem}.ipynb"
    if not all_cells:
        kept, dropped = strip_tests(source, out_dir / f"{stem}.computing.ipynb")
        source = out_dir / f"{stem}.computing.ipynb"
        print(f"owed: {stem}: {kept} code cells compute, {dropped} test cells left out", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    if deadline is not None:
        env["KDBOOK_DEADLINE"] = f"{deadline:.3f}"
    executed = out_dir / f"{stem}.ipynb"
    cmd = [sys.executable, "-m", "papermill", str(source), str(executed),
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
        rc = proc.wait(timeout=None if deadline is None else max(deadline - time.time(), 0.0))
        status = "done" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        print(f"owed: {stem}: deadline reached: SIGTERM, {grace_s:.0f} s for checkpoints, then SIGKILL", flush=True)
        stop_tree(proc, grace_s)
        rc, status = None, "partial"
    except BaseException:
        stop_tree(proc, grace_s)
        reader.join(timeout=5)
        raise
    reader.join(timeout=10)
    t_end = time.time()
    cause = failure_cause(executed) if status == "failed" else None
    if status == "failed" and cause is not None and ": TrainingStopped: " in cause:
        # the engine saw the deadline coming (KDBOOK_DEADLINE) and stopped with its checkpoint: unfinished, not failed
        print(f"owed: {stem}: stopped before the deadline, its checkpoint kept ({cause})", flush=True)
        status, cause = "partial", "stopped at the deadline (checkpoint kept)"
    if status == "failed":
        print(f"owed: {stem} failed: {cause or f'papermill exited {rc} (see the log above)'}", flush=True)
    return {"status": status, "seconds": t_end - t0, "rc": rc, "train_s": experiment_seconds(executed, t_end),
            "cause": cause}


# --- export: every finished file reaches OUT soon after it is written ---------------------------------------------

MAX_PARTS = MAX_FILES - 2  # beside manifest.json and papermill.log
RETURN_BYTES = 60 * 2**20  # what comes back of OUT in all (64 MiB), with a margin
MIN_FREE = 256 * 2**20  # free disk space asked for under OUT before running


def git_blob(data: bytes) -> str:
    "The git blob id of `data` (what `git hash-object` prints)."
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def committed(root: Path) -> tuple[dict[str, str] | None, str]:
    """(path -> git blob id of every committed file under results/ and data/checkpoints/partial/, where from).

    From `.bundle/baseline.json` (written by `make lease` for the commit it names) when KDBOOK_GIT_REV names that
    commit (a copied working tree has no or stale git metadata), else from git's HEAD; (None, why) when neither."""
    base = root / ".bundle" / "baseline.json"
    rev = os.environ.get("KDBOOK_GIT_REV", "").strip()
    if base.exists():
        try:
            data = json.loads(base.read_text())
            if rev and data.get("git_rev") == rev:
                return dict(data["files"]), f"{base.relative_to(root)} ({rev[:12]})"
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    try:
        res = subprocess.run(["git", "ls-tree", "-r", "HEAD", "--", *TRACKED], cwd=root, capture_output=True,
                             text=True, timeout=60)
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if res.returncode == 0 and (not rev or head.stdout.strip() == rev):
            files = {}
            for line in res.stdout.splitlines():
                meta, _, path = line.partition("\t")
                files[path] = meta.split()[2]
            return files, "git HEAD"
    except (OSError, subprocess.SubprocessError):
        pass
    return None, "neither git metadata nor .bundle/baseline.json for KDBOOK_GIT_REV"


class Exporter:
    """Writes, atomically, what differs from the committed store into OUT: at most 6 parts of <= 16 MB of a
    tar.gz, manifest.json (last: the archive is what it names) and papermill.log; callable at any time.

    Parts alternate between two names (owed-a…, owed-b…): the parts the current manifest names are never
    rewritten, so a command killed at any instant leaves a manifest whose parts are all there. The previous
    generation is deleted once the new manifest is in place (first, when both would not come back together)."""

    def __init__(self, root: Path, out: Path, before: dict, log_path: Path):
        self.root, self.out, self.before, self.log_path = root, out, before, log_path
        self.lock = threading.Lock()
        self.slot, self.seconds, self.count = None, 0.0, 0
        self.baseline, self.baseline_from = committed(root)
        if self.baseline is None:
            print(f"owed: warning: {self.baseline_from}: exporting what changed since this slice started", flush=True)

    def changed(self) -> dict[str, bytes]:
        "relative path -> content of every file to export now."
        out = {}
        for top in TRACKED:
            base = self.root / top
            if not base.exists():
                continue
            for p in sorted(base.rglob("*")):
                if not p.is_file() or _transient(p):
                    continue
                rel = p.relative_to(self.root).as_posix()
                try:
                    data = p.read_bytes()
                except OSError:
                    continue  # replaced (atomically) while we read: the next export takes it
                if self.baseline is not None:
                    if self.baseline.get(rel) == git_blob(data):
                        continue
                elif self.before.get(rel) == hashlib.sha256(data).hexdigest():
                    continue
                if _finished(self.root, rel):
                    continue
                out[rel] = data
        return out

    def __call__(self, manifest: dict) -> list[Path]:
        with self.lock:
            t0 = time.time()
            try:
                return self._export(manifest)
            finally:
                self.seconds += time.time() - t0

    def _export(self, manifest: dict) -> list[Path]:
        files = self.changed()
        shas = {p: hashlib.sha256(d).hexdigest() for p, d in files.items()}
        manifest = dict(manifest, files=shas, replaced={p: self.before[p] for p in files if p in self.before},
                        baseline=self.baseline_from)
        manifest["ledger"] = dict(manifest.get("ledger", {}), export_min=round((self.seconds + 0.0) / 60, 3))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=3) as tar:
            for rel, data in [("manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())] + sorted(files.items()):
                info = tarfile.TarInfo(rel)
                info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
                tar.addfile(info, io.BytesIO(data))
        blob = buf.getvalue()
        n_parts = max(1, -(-len(blob) // PART_BYTES))
        if n_parts > MAX_PARTS or len(blob) > RETURN_BYTES:
            big = sorted(files, key=lambda p: -len(files[p]))[:3]
            raise OwedError(
                f"the files to export are {len(blob) / 1e6:.1f} MB compressed: more than {MAX_PARTS} parts of 16 MB "
                f"(what comes back of OUT). The largest: {', '.join(f'{p} ({len(files[p]) / 1e6:.1f} MB)' for p in big)}. "
                "Everything that differs from the committed store is exported: import and commit the archives of "
                "earlier slices first (then they no longer count), and run the chapter with the large files alone "
                "(CHAPTERS=...) or shrink what it writes")
        slot = "b" if self.slot == "a" else "a"
        for p in self.out.glob(f"owed-{slot}.*"):  # two generations old: named by no manifest
            p.unlink()
        previous = sorted(self.out.glob("owed-*"))
        if len(previous) + n_parts + 2 > MAX_FILES or sum(p.stat().st_size for p in previous) + len(blob) > RETURN_BYTES:
            (self.out / "manifest.json").unlink(missing_ok=True)  # both generations would not come back together
            for p in previous:
                p.unlink()
            previous = []
        parts = []
        for i in range(n_parts):
            name = f"owed-{slot}.tar.gz" if n_parts == 1 else f"owed-{slot}.tar.gz.part{i:02d}"
            chunk = blob[i * PART_BYTES:(i + 1) * PART_BYTES]
            with open(self.out / name, "wb") as f:
                f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            parts.append({"name": name, "sha256": hashlib.sha256(chunk).hexdigest(), "bytes": len(chunk)})
        _atomic_text(self.out / "manifest.json", json.dumps(dict(manifest, parts=parts), indent=1, sort_keys=True) + "\n")
        for p in previous:
            p.unlink(missing_ok=True)
        self.slot, self.count = slot, self.count + 1
        log = self.log_path.read_bytes() if self.log_path.exists() else b""
        _atomic_bytes(self.out / "papermill.log", log[-2_000_000:])
        return [self.out / p["name"] for p in parts] + [self.out / "manifest.json", self.out / "papermill.log"]


def _atomic_bytes(path: Path, data: bytes):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_text(path: Path, text: str):
    _atomic_bytes(path, text.encode())


def snapshot(root: Path) -> dict[str, str]:
    "relative path -> sha256 of every file under results/ and data/checkpoints/partial/."
    out = {}
    for top in TRACKED:
        base = root / top
        if base.exists():
            for p in sorted(base.rglob("*")):
                if p.is_file() and not _transient(p):
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


def check_out(out: Path):
    "Before anything runs: OUT is a folder (created), empty, writable, on a disk with room for the archive."
    if out.exists() and not out.is_dir():
        raise OwedError(f"--out {out} is an existing file: give a folder (it is created when missing)")
    if out.is_dir() and any(out.iterdir()):
        raise OwedError(f"--out {out} is not empty (an earlier slice's archive?): import it with "
                        f"`make gpu-import ARCHIVE={out}`, then empty the folder, or give another one")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as err:
        raise OwedError(f"--out {out} is not writable ({err.strerror}): give a folder you can write") from None
    free = shutil.disk_usage(out).free
    if free < MIN_FREE:
        raise OwedError(f"--out {out}: only {free / 2**20:.0f} MiB free on its disk, {MIN_FREE / 2**20:.0f} MiB needed "
                        "for the archive: free some space or give a folder on another disk")


def run_slice(root: Path, budget_s: float, out: Path, chapters: list[str] | None = None, profile: str | None = None,
              kernel: str = "kdbook", export_every_s: float = 60.0, grace_s: float = GRACE_S,
              all_cells: bool = False) -> dict:
    """Run the owed chapters within `budget_s` seconds (stop, grace and export included), exporting what they
    made into `out` after every chapter and every `export_every_s` seconds; the last manifest."""
    if not budget_s > 0:
        raise OwedError(f"the budget must be > 0 minutes, got {budget_s / 60:g}")
    if not export_every_s > 0:
        raise OwedError(f"--export-every-s must be > 0, got {export_every_s:g}")
    if not 0 <= grace_s <= 300:
        raise OwedError(f"--grace-s must be between 0 and 300 seconds, got {grace_s:g}")
    reserve = grace_s + 15.0  # the last stop and export
    if budget_s <= reserve + 10:
        raise OwedError(f"a budget of {budget_s:.0f} s leaves no time to work: {reserve:.0f} s are kept for the last "
                        f"stop ({grace_s:g} s grace) and export; give more than {(reserve + 10) / 60:.1f} minutes")
    todo = select(root, chapters, profile)
    check_kernel(kernel)
    check_out(out)
    store = _kdbook(root)
    plan = read_plan(root)
    rev, dirty = store.git_revision(root)
    if os.environ.get("KDBOOK_GIT_REV") and os.environ.get("KDBOOK_GIT_DIRTY") in ("0", "1"):
        dirty = os.environ["KDBOOK_GIT_DIRTY"] == "1"
    t_start = time.time()
    deadline = t_start + budget_s - reserve
    work = Path(tempfile.mkdtemp(prefix="kdbook-owed-"))
    log_path = work / "papermill.log"
    log_path.touch()
    before = snapshot(root)
    exporter = Exporter(root, out, before, log_path)
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    device = store.device_name()
    entries = [{"chapter": s, "profile": p, "target": plan["chapters"].get(s, {}).get("target", plan["default"]),
                "status": "not started", "seconds": 0.0, "train_s": 0.0, "rc": None, "cause": None} for s, p in todo]
    current = {"i": None, "t0": None}
    env_min = lambda name: round(float(os.environ.get(name, 0) or 0) / 60, 3)

    def manifest_now() -> dict:
        now = time.time()
        rows = [dict(e) for e in entries]
        if current["i"] is not None:  # its experiment cells so far, from the notebook papermill keeps saving
            rows[current["i"]].update(status="running", seconds=now - current["t0"], train_s=experiment_seconds(
                work / "executed" / f"{rows[current['i']]['chapter']}.ipynb", now))
        by = lambda *states: [e["chapter"] for e in rows if e["status"] in states]
        train = sum(e["train_s"] for e in rows)
        ledger = {"lease_min": round(float(os.environ.get("KDBOOK_LEASE_MIN", budget_s / 60)), 3),
                  "slice_min": round(budget_s / 60, 3), "elapsed_min": round((now - t_start) / 60, 3),
                  "setup_min": env_min("KDBOOK_LEASE_SETUP_S"), "probe_min": env_min("KDBOOK_LEASE_PROBE_S"),
                  "training_min": round(train / 60, 3),
                  "chapter_overhead_min": round((sum(e["seconds"] for e in rows) - train) / 60, 3),
                  "finished": by("done"), "partial": by("partial", "running"), "failed": by("failed"),
                  "owed": by("partial", "running", "failed", "not started")}
        return {"format": 2, "git_rev": rev, "dirty": dirty, "torch": torch_version, "device": device,
                "created": datetime.now(timezone.utc).isoformat(), "budget_s": budget_s, "deadline": deadline,
                "elapsed_s": now - t_start, "final": False, "chapters": rows, "ledger": ledger}

    def export(final=False):
        m = manifest_now()
        m["final"] = final
        try:
            return exporter(m)
        except OwedError as err:
            if final:
                raise
            print(f"owed: export skipped: {err}", flush=True)
        except OSError as err:
            if final:
                raise OwedError(f"could not write the archive into {out}: {err}") from None
            print(f"owed: export failed ({err}); the previous one stays", flush=True)

    print(f"owed: {len(todo)} chapter(s) to run within {budget_s / 60:.1f} min (work stops at the deadline, "
          f"{reserve:.0f} s before the end, for the export): "
          + (", ".join(f"{s} at {p}" for s, p in todo) or "nothing is owed"), flush=True)
    stop = threading.Event()

    def ticker():
        last = time.time()
        while not stop.wait(min(export_every_s, 60.0)):
            if time.time() - last >= export_every_s - 0.5:
                export()
                last = time.time()
            used = time.time() - t_start
            print(f"owed: {used / 60:.1f} of {budget_s / 60:.1f} min used; running "
                  f"{todo[current['i']][0] if current['i'] is not None else '-'}", flush=True)

    def on_term(signum, frame):
        raise Stopped(signum)

    main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, on_term) if main_thread else None
    interrupted = None
    export()  # an (empty) archive exists from the start
    tick = threading.Thread(target=ticker, daemon=True)
    tick.start()
    try:
        with open(log_path, "a") as log:
            for i, (stem, prof) in enumerate(todo):
                if deadline - time.time() <= 1:
                    continue
                current.update(i=i, t0=time.time())
                print(f"owed: {stem} at {prof}: {time.time() - t_start:.0f} s of {budget_s:.0f} s used", flush=True)
                try:
                    res = execute(root, stem, prof, deadline, log, kernel, work / "executed", all_cells, grace_s)
                except (KeyboardInterrupt, Stopped) as err:
                    entries[i].update(status="partial", seconds=time.time() - current["t0"], cause="interrupted",
                                      train_s=experiment_seconds(work / "executed" / f"{stem}.ipynb", time.time()))
                    current["i"] = None
                    interrupted = err
                    break
                entries[i].update(res)
                current["i"] = None
                export()
    finally:
        stop.set()
        if main_thread:
            signal.signal(signal.SIGTERM, old_term)
    written = export(final=True)
    manifest = json.loads((out / "manifest.json").read_text())
    print_table(manifest["chapters"], set(manifest["files"]), plan, device)
    led = manifest["ledger"]
    print(f"owed: ledger: {led['elapsed_min']:.2f} of {led['slice_min']:.2f} min; training {led['training_min']:.2f}, "
          f"chapter start-up and other cells {led['chapter_overhead_min']:.2f}, export {led['export_min']:.2f}", flush=True)
    print(f"owed: wrote {len(written)} files to {out}: {', '.join(p.name for p in written)}", flush=True)
    if interrupted is not None:
        print("owed: interrupted: the running chapter was stopped and what finished was exported", flush=True)
        raise interrupted
    return manifest


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

_HEX16 = r"[0-9a-f]{16}"


def kind_of(rel: str, reserved=("weights", "partial", "benchmarks")) -> str | None:
    "'record', 'weights', 'benchmark' or 'checkpoint' for a path an archive may hold; None for anything else."
    if re.fullmatch(rf"results/([^/]+)/{_HEX16}\.json", rel) and rel.split("/")[1] not in reserved:
        return "record"
    if re.fullmatch(rf"results/weights/[^/]+/{_HEX16}\.safetensors", rel):
        return "weights"
    if re.fullmatch(r"results/benchmarks/[\w.-]+\.json", rel):
        return "benchmark"
    if re.fullmatch(rf"data/checkpoints/partial/[^/]+-{_HEX16}\.pt", rel):
        return "checkpoint"
    return None


def _read_archive(archive: Path, staging: Path) -> dict:
    "Verify and unpack an archive (a folder written by run_slice, or its .tar.gz) into `staging`; its manifest."
    if archive.is_dir():
        mpath = archive / "manifest.json"
        if not mpath.exists():
            raise OwedError(f"{archive}: no manifest.json: not a folder written by `make gpu` (or it was cut before "
                            "its first export)")
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
    try:
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                name = m.name
                if not (m.isfile() or m.isdir()) or name.startswith("/") or ".." in Path(name).parts \
                        or not (name == "manifest.json" or name.startswith(("results/", "data/checkpoints/partial/"))):
                    raise OwedError(f"{archive}: unexpected entry {name!r} (only results/, data/checkpoints/partial/ "
                                    "and manifest.json belong in an archive); refused")
            need, free = sum(m.size for m in members), shutil.disk_usage(staging).free
            if need + MIN_FREE // 4 > free:
                raise OwedError(f"{archive}: unpacking needs {need / 2**20:.0f} MiB in {staging}, {free / 2**20:.0f} MiB "
                                "are free; nothing was imported: free space (or set TMPDIR to a larger disk)")
            tar.extractall(staging, members=members, filter="data")
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise OwedError(f"{archive}: no space left in {staging} to unpack it; nothing was imported: free space "
                            "(or set TMPDIR to a larger disk)") from None
        raise OwedError(f"{archive}: corrupt or truncated archive ({type(err).__name__}: {err}); copy it again") from None
    except (tarfile.TarError, EOFError, ValueError) as err:
        raise OwedError(f"{archive}: corrupt or truncated archive ({type(err).__name__}: {err}); copy it again") from None
    mpath = staging / "manifest.json"
    if not mpath.exists():
        raise OwedError(f"{archive}: the archive holds no manifest.json: not written by `make gpu`")
    manifest = json.loads(mpath.read_text())
    if outer is not None and {k: v for k, v in outer.items() if k != "parts"} != manifest:
        raise OwedError(f"{archive}: manifest.json does not match the manifest inside the archive; copy it again")
    return manifest


def checkpoint_epoch(path: Path) -> int:
    "The epoch a resumable checkpoint (kdbook.engine.save_train_state) has reached; ValueError when it is not one."
    import torch
    try:
        wrapper = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot be read ({type(err).__name__})") from None
    if not isinstance(wrapper, dict) or wrapper.get("format") != "kdbook-checkpoint-2" or "payload" not in wrapper:
        raise ValueError("not a kdbook checkpoint (format kdbook-checkpoint-2)")
    payload = wrapper["payload"].numpy().tobytes()
    if hashlib.sha256(payload).hexdigest() != wrapper.get("sha256"):
        raise ValueError("fails its sha256 check")
    state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not isinstance(state.get("epoch"), int):
        raise ValueError("names no epoch")
    return state["epoch"]


def _record_problem(path: Path, store, name: str, key: str) -> str | None:
    try:
        return store.Store._problem(json.loads(path.read_text()), name, key)
    except (OSError, json.JSONDecodeError) as err:
        return f"not JSON ({err})"


def _verify(staging: Path, root: Path, manifest: dict, store) -> tuple[list, list]:
    "Check every file against the manifest, records and weights; (files to write, files kept as they are)."
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
    records, epochs = {}, {}
    for rel in sorted(files):
        kind = kind_of(rel, store.RESERVED_NAMES)
        if kind is None:
            raise OwedError(f"{rel}: not a record, stored weights, benchmark record or resumable checkpoint; only those "
                            "belong in an archive: refused (nothing was imported)")
        if kind in ("record", "benchmark"):
            try:
                record = json.loads((staging / rel).read_text())
            except json.JSONDecodeError as err:
                raise OwedError(f"{rel}: not JSON ({err}); refused") from None
            if kind == "benchmark":
                if not isinstance(record, dict):
                    raise OwedError(f"{rel}: a benchmark record must be a JSON object; refused")
                continue
            name, key = rel.split("/")[1], rel.split("/")[2][:-5]
            problem = store.Store._problem(record, name, key)
            if problem:
                raise OwedError(f"{rel}: invalid record ({problem}); refused")
            records[(name, key)] = record
        elif kind == "checkpoint":
            try:
                epochs[rel] = checkpoint_epoch(staging / rel)
            except ValueError as err:
                raise OwedError(f"{rel}: not a valid resumable checkpoint ({err}); refused (nothing was imported)") from None
    for (name, key), record in records.items():  # every record's weights: in the archive or already here
        sha = (record.get("result") or {}).get("weights", {}) if isinstance(record.get("result"), dict) else {}
        sha = sha.get("sha256") if isinstance(sha, dict) else None
        if sha is None:
            continue
        rel = f"results/weights/{name}/{key}.safetensors"
        if files.get(rel) != sha and not ((root / rel).exists() and sha256_file(root / rel) == sha):
            raise OwedError(f"results/{name}/{key}.json names weights {rel} (sha256 {sha[:12]}…) that are in neither "
                            "the archive nor this repository: refused (an incomplete archive; copy it again)")
    for rel in files:
        if kind_of(rel, store.RESERVED_NAMES) == "weights":
            name, key = rel.split("/")[2], rel.split("/")[3][: -len(".safetensors")]
            record = records.get((name, key))
            local = root / "results" / name / f"{key}.json"
            if record is None and local.exists():
                if _record_problem(local, store, name, key):
                    raise OwedError(f"{rel}: the local copy of its record {local.relative_to(root)} is damaged "
                                    f"({_record_problem(local, store, name, key)}): delete it and import again")
                record = json.loads(local.read_text())
            sha = (record or {}).get("result", {}).get("weights", {}).get("sha256")
            if sha != files[rel]:
                raise OwedError(f"{rel}: no record names these weights (sha256 {files[rel][:12]}…); refused")
    write, kept = [], []
    for rel in sorted(files):
        dest = root / rel
        if not dest.exists():
            write.append(rel)
            continue
        mine = sha256_file(dest)
        if mine == files[rel]:
            kept.append(rel)
            continue
        kind = kind_of(rel, store.RESERVED_NAMES)
        if kind == "checkpoint":  # the furthest checkpoint of an unfinished run wins
            try:
                local_epoch = checkpoint_epoch(dest)
            except ValueError as err:
                print(f"import: {rel}: the local checkpoint is damaged ({err}): replaced", flush=True)
                write.append(rel)
                continue
            if epochs[rel] > local_epoch:
                write.append(rel)
            else:
                print(f"import: {rel}: kept the local checkpoint (epoch {local_epoch}; the archive's is at epoch "
                      f"{epochs[rel]})", flush=True)
                kept.append(rel)
            continue
        if manifest.get("replaced", {}).get(rel) == mine:
            print(f"import: {rel}: replaced by the version the slice recomputed from this very file "
                  "(stale, corrupt, or its weights were missing)", flush=True)
            write.append(rel)
            continue
        if kind == "benchmark":  # another measurement on a device of the same name: kept beside the first
            new = f"{rel[:-len('.json')]}-{files[rel][:12]}.json"
            if (root / new).exists() and sha256_file(root / new) == files[rel]:
                kept.append(rel)
                continue
            (staging / rel).rename(staging / new)
            print(f"import: {rel} exists with another measurement: this one goes to {new}", flush=True)
            write.append(new)
            continue
        if kind == "record":
            name, key = rel.split("/")[1], rel.split("/")[2][:-5]
            problem = _record_problem(dest, store, name, key)
            if problem:
                raise OwedError(f"{rel}: the local copy is damaged ({problem}); nothing was imported: delete "
                                f"{dest} and import again")
        if kind == "weights":
            name, key = rel.split("/")[2], rel.split("/")[3][: -len(".safetensors")]
            local = root / "results" / name / f"{key}.json"
            try:
                named = json.loads(local.read_text())["result"]["weights"]["sha256"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError):
                named = None
            if named is not None and named != mine:
                raise OwedError(f"{rel}: the local copy is damaged (its sha256 is not the one its record names); "
                                f"nothing was imported: delete {dest} and import again")
        what = "a different record" if rel.endswith(".json") else "a different file"
        raise OwedError(f"{rel}: the archive holds {what} under the same key than this repository; nothing was "
                        "imported. Compare the two (each record names its revision, device and time) and delete "
                        "the one you do not want before importing again")
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


def publishable(root: Path, stores: list, profile: str, archived: list) -> str | None:
    "Why a chapter with these store names cannot be published at `profile` (None: it can)."
    if not stores:
        return ("it stores no records of its own (no `stores` in profiles.yml), so nothing shows it ran at "
                f"{profile}: set `published: {profile}` by hand once the chapters it reads are published at {profile}")
    other = sorted({r["meta"].get("profile") for r in archived
                    if r.get("name") in stores and r["meta"].get("profile") != profile}, key=str)
    if other:
        return f"the archive's records of {', '.join(stores)} were computed at {', '.join(map(str, other))}, not {profile}"
    for name in stores:
        for p in (root / "results" / name).glob("*.json"):
            try:
                if json.loads(p.read_text()).get("meta", {}).get("profile") == profile:
                    return None
            except (OSError, json.JSONDecodeError):
                pass
    return f"the store holds no record of {', '.join(stores)} at {profile}"


def _commit(root: Path, staging: Path, write: list):
    "Copy the staged files into place all or nothing: space checked, every file written beside its destination first."
    need = sum((staging / rel).stat().st_size for rel in write)
    free = shutil.disk_usage(root).free
    if need + 16 * 2**20 > free:
        raise OwedError(f"the import writes {need / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free on the disk of "
                        f"{root}; nothing was imported: free some space and import again")
    staged = []
    try:
        for rel in write:
            dest = root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".import.tmp")
            staged.append((tmp, dest))
            with open(staging / rel, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
                dst.flush()
                os.fsync(dst.fileno())
    except OSError as err:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise OwedError(f"writing the import failed ({err.strerror}: {err.filename}); nothing was imported") from None
    for tmp, dest in staged:
        os.replace(tmp, dest)


def import_archive(root: Path, archive: Path) -> dict:
    "Merge an archive into the repository at `root`, all or nothing; a summary."
    store = _kdbook(root)
    with tempfile.TemporaryDirectory(prefix="kdbook-import-") as tmp:
        staging = Path(tmp)
        manifest = _read_archive(archive, staging)
        rev, _ = store.git_revision(root)
        if manifest.get("dirty"):
            print(f"\n!!! WARNING: {archive} was computed from a DIRTY tree (uncommitted changes on top of "
                  f"{str(manifest.get('git_rev'))[:12]}): its records name a revision whose code is not exactly the "
                  "code that ran. Import only if you know what the changes were. !!!\n", file=sys.stderr, flush=True)
        if manifest.get("git_rev") != rev:
            warnings.warn(f"{archive}: computed at revision {str(manifest.get('git_rev'))[:12]}, this checkout is at "
                          f"{rev[:12]}; accepted: every record names the revision that computed it", stacklevel=2)
        if not manifest.get("final", True):
            print(f"import: {archive} was cut before its slice ended (its last export ran at "
                  f"{manifest.get('elapsed_s', 0) / 60:.1f} min): importing what had finished by then", flush=True)
        write, kept = _verify(staging, root, manifest, store)
        archived = [json.loads((staging / rel).read_text()) for rel in manifest["files"]
                    if kind_of(rel, store.RESERVED_NAMES) == "record"]
        _commit(root, staging, write)
    plan = read_plan(root)
    published = []
    for e in manifest.get("chapters", []):
        spec = plan["chapters"].get(e["chapter"])
        if e["status"] == "done" and spec is not None and e["profile"] == spec["target"] != spec["published"]:
            why = publishable(root, spec["stores"], e["profile"], archived)
            if why:
                print(f"import: {e['chapter']} is not published at {e['profile']}: {why}", flush=True)
                continue
            set_published(root, e["chapter"], e["profile"])
            published.append(f"{e['chapter']} at {e['profile']}")
    print(f"import: {len(write)} files written, {len(kept)} kept as they are; "
          f"published: {', '.join(published) or 'no chapter completed at its target'}", flush=True)
    led = manifest.get("ledger")
    if led:
        print(f"import: lease ledger: {json.dumps(led, sort_keys=True)}", flush=True)
    return {"written": write, "kept": kept, "published": published}


# --- command line ---------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the owed chapters within a budget, export what they made")
    r.add_argument("--budget-min", type=float, required=True, help="minutes for the whole slice (export included)")
    r.add_argument("--out", required=True, help="an empty folder for the archive, manifest.json and papermill.log")
    r.add_argument("--chapters", default="", help="comma-separated chapter stems (default: every owed chapter)")
    r.add_argument("--profile", default=None, help="run at this profile instead of each chapter's target")
    r.add_argument("--kernel", default="kdbook")
    r.add_argument("--export-every-s", type=float, default=60.0, help="export what finished this often (and after "
                   "every chapter)")
    r.add_argument("--grace-s", type=float, default=GRACE_S, help="SIGTERM at the deadline, this long, then SIGKILL")
    i = sub.add_parser("import", help="merge an archive written by `run`")
    i.add_argument("archive")
    e = sub.add_parser("execute", help="run one chapter with papermill, no deadline (a sweep job)")
    e.add_argument("chapter")
    e.add_argument("--profile", required=True)
    e.add_argument("--kernel", default="kdbook")
    for p in (r, e):
        p.add_argument("--all-cells", action="store_true", help="execute the test cells too")
    for p in (r, i, e):
        p.add_argument("--root", default=str(REPO), help="the repository (default: this one)")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    try:
        if args.cmd == "run":
            chapters = [c.strip() for c in args.chapters.split(",") if c.strip()] or None
            try:
                manifest = run_slice(root, args.budget_min * 60, Path(args.out).resolve(), chapters, args.profile,
                                     args.kernel, args.export_every_s, args.grace_s, args.all_cells)
            except KeyboardInterrupt:
                return 130
            except Stopped:
                return 143
            failed = [c["chapter"] for c in manifest["chapters"] if c["status"] == "failed"]
            if failed:
                print(f"error: failed: {', '.join(failed)} (causes above and in papermill.log)", file=sys.stderr)
                return 1
        elif args.cmd == "import":
            import_archive(root, Path(args.archive).resolve())
        else:
            (stem, prof), = select(root, [args.chapter], args.profile)
            check_kernel(args.kernel)
            with open(Path(tempfile.mkdtemp(prefix="kdbook-sweep-")) / "papermill.log", "w") as log:
                res = execute(root, stem, prof, None, log, args.kernel, all_cells=args.all_cells)
            print(f"sweep: {stem} at {prof}: {res['status']} in {res['seconds']:.0f} s", flush=True)
            if res["status"] != "done":
                print(f"error: {stem} at {prof} failed: {res['cause'] or 'see the log above'}", file=sys.stderr, flush=True)
                return 1
    except OwedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
