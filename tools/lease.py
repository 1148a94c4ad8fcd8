#!/usr/bin/env python
"""`make lease`: prepare here (CPU) what a GPU lease needs, and print the one device call that runs it.

    python tools/lease.py [--budget-min 9] [--chapters a,b] [--profile quick] [--probe "COMMAND"]
                          [--datasets CIFAR100-JPEG,MNIST] [--check-only]

A lease is a machine with torch but no network and no Jupyter stack that receives a copy of this working
tree (tracked files and untracked files git does not ignore) plus the git-ignored paths named in the call's
`carry` list, runs ONE command of at most 10 minutes, and returns what the command left in `$OUT` (at most 8
files). This prepares the git-ignored `.bundle/`:

    .bundle/datasets/<NAME>/...   copies of the offline datasets the owed chapters read (from KDBOOK_DATASETS)
    .bundle/whl/*.whl             the Jupyter wheels papermill needs, for CPython 3.12 / x86_64, pinned to the
                                  versions of this environment, without what a headless run never imports
                                  (debugpy, jedi/parso, widgetsnbextension, jupyterlab_widgets, execnb)
    .bundle/baseline.json         the git blob ids of the committed results/ (what the lease must NOT export)
    .bundle/lease.json            revision, dirty flag, sizes, the command

checks that everything that travels fits (56 MiB, under the 64 MiB the machine takes), and prints the device
call: `bash tools/lease.sh BUDGET_MIN REV DIRTY [owed.py run options]` with `carry: [".bundle", ...]`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT_MIB = 56  # what may travel; the machine takes 64 MiB (the rest: partial checkpoints, margin)
DATASETS = ("CIFAR100-JPEG", "MNIST")
# What papermill + ipykernel + the kdbook package import on a machine that has torch, numpy, matplotlib, pyyaml,
# requests, click, attrs, psutil, pygments, jinja2, python-dateutil and aiohttp (the device image).
WHEELS = ("papermill", "nbclient", "nbformat", "jupyter_client", "jupyter_core", "ipykernel", "ipython",
          "ipython_pygments_lexers", "comm", "matplotlib-inline", "pyzmq", "tornado", "traitlets", "pexpect",
          "ptyprocess", "prompt_toolkit", "wcwidth", "stack_data", "asttokens", "executing", "pure_eval",
          "fastjsonschema", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py", "platformdirs",
          "tenacity", "entrypoints", "ipywidgets", "fastcore")
LEFT_OUT = ("debugpy", "jedi", "parso", "widgetsnbextension", "jupyterlab_widgets", "execnb")  # optional imports


class LeaseError(RuntimeError):
    "A clear error about preparing a lease."


def git(*args, root: Path = REPO) -> str:
    res = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise LeaseError(f"git {' '.join(args)} failed: {res.stderr.strip()} (a lease is prepared from a git checkout)")
    return res.stdout


def travelling_files(root: Path = REPO) -> list[Path]:
    "The files a device call sends without `carry`: tracked ones that exist, and untracked ones git does not ignore."
    names = git("ls-files", "-z", "--cached", "--others", "--exclude-standard", root=root).split("\0")
    return [root / n for n in dict.fromkeys(names) if n and (root / n).is_file()]


def size_of(paths) -> int:
    total = 0
    for p in paths:
        p = Path(p)
        if p.is_file():
            total += p.stat().st_size
        elif p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return total


def travel_size(root: Path = REPO, carry=(".bundle",)) -> dict:
    "Bytes that travel with a lease: {'tree': ..., '<carried path>': ..., 'total': ...}."
    out = {"tree": size_of(travelling_files(root))}
    for c in carry:
        out[c] = size_of([root / c])
    out["total"] = sum(out.values())
    return out


def copy_datasets(root: Path, names, source: Path) -> list[str]:
    dest = root / ".bundle" / "datasets"
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        src = source / name
        if not src.is_dir():
            have = ", ".join(sorted(p.name for p in source.iterdir() if p.is_dir())) if source.is_dir() else "nothing"
            raise LeaseError(f"no dataset {name} in {source} (it holds: {have}); set KDBOOK_DATASETS to the folder "
                             "with the offline copies")
        if size_of([dest / name]) != size_of([src]):
            shutil.rmtree(dest / name, ignore_errors=True)
            shutil.copytree(src, dest / name)
    for extra in sorted(p.name for p in dest.iterdir() if p.name not in names):  # not asked for: it would travel
        shutil.rmtree(dest / extra)
    return list(names)


def pinned(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"{name}=={version(name)}"
    except PackageNotFoundError:
        return name


def download_wheels(root: Path) -> Path:
    "The wheels for CPython 3.12 / x86_64 into .bundle/whl (once: delete the folder to fetch them again)."
    whl = root / ".bundle" / "whl"
    if whl.is_dir() and any(whl.glob("*.whl")):
        return whl
    tmp = root / ".bundle" / "whl.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none",
           "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_27_x86_64",
           "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "--platform", "manylinux1_x86_64",
           "--platform", "any", "-d", str(tmp), *[pinned(w) for w in WHEELS]]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise LeaseError(f"pip download of the Jupyter wheels failed (no package index reachable?):\n{res.stderr[-2000:]}")
    tmp.rename(whl)
    return whl


def baseline(root: Path, rev: str) -> dict:
    "The git blob ids of the committed results/ (owed.py exports only what differs from them)."
    files = {}
    for line in git("ls-tree", "-r", rev, "--", "results", "data/checkpoints/partial", root=root).splitlines():
        meta, _, path = line.partition("\t")
        files[path] = meta.split()[2]
    return {"git_rev": rev, "files": files}


def device_call(budget_min: float, rev: str, dirty: bool, owed_args: list[str], probe: str | None,
                carry: list[str]) -> dict:
    import shlex
    parts = ["bash", "tools/lease.sh", f"{budget_min:g}", rev, "1" if dirty else "0"]
    if probe:
        parts += ["--probe", probe]
    cmd = " ".join(shlex.quote(p) for p in parts + owed_args)
    return {"command": cmd, "carry": carry, "timeout_s": int(min(600, budget_min * 60 + 30))}


def prepare(root: Path, budget_min: float, chapters: str, profile: str | None, probe: str | None, datasets,
            source: Path, check_only: bool = False) -> dict:
    if not 0 < budget_min <= 9.5:
        raise LeaseError(f"BUDGET_MIN must be in (0, 9.5] (one device command runs at most 10 minutes), got {budget_min:g}")
    rev = git("rev-parse", "HEAD", root=root).strip()
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", root=root).strip())
    if dirty:
        print("\n!!! WARNING: the working tree has uncommitted changes: the lease runs THEM, but its records will name "
              f"{rev[:12]} (marked dirty in the archive's manifest). Commit first for an honest record. !!!\n",
              file=sys.stderr, flush=True)
    if not check_only:
        copy_datasets(root, datasets, source)
        download_wheels(root)
        base = root / ".bundle" / "baseline.json"
        base.write_text(json.dumps(baseline(root, rev), indent=1, sort_keys=True) + "\n")
    carry = [".bundle"]
    if (root / "data" / "checkpoints" / "partial").is_dir() and any((root / "data" / "checkpoints" / "partial").iterdir()):
        carry.append("data/checkpoints/partial")  # unfinished runs resume there
    sizes = travel_size(root, carry)
    owed_args = []
    if chapters:
        owed_args += ["--chapters", chapters]
    if profile:
        owed_args += ["--profile", profile]
    call = device_call(budget_min, rev, dirty, owed_args, probe, carry)
    info = {"git_rev": rev, "dirty": dirty, "sizes": sizes, "limit_mib": LIMIT_MIB, "datasets": list(datasets),
            "wheels_left_out": list(LEFT_OUT), **call}
    if not check_only:
        (root / ".bundle" / "lease.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    mib = {k: v / 2**20 for k, v in sizes.items()}
    print("what travels: " + ", ".join(f"{k} {v:.1f} MiB" for k, v in mib.items()), flush=True)
    if sizes["total"] > LIMIT_MIB * 2**20:
        raise LeaseError(f"{mib['total']:.1f} MiB would travel, more than {LIMIT_MIB} MiB (the machine takes 64): "
                         "commit fewer large files, import and delete old partial checkpoints, or bundle fewer "
                         "datasets (DATASETS=...)")
    print("\nThe device call (one command; what it leaves in $OUT comes back, at most 8 files):\n"
          f"  command:   {call['command']}\n  carry:     {json.dumps(carry)}\n  timeout_s: {call['timeout_s']}\n"
          "Then here: make gpu-import ARCHIVE=<the folder the files came back to>", flush=True)
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-min", type=float, default=9.0, help="minutes of the device command (at most 9.5)")
    ap.add_argument("--chapters", default="", help="comma-separated chapters (default: every owed one)")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--probe", default=None, help="a command run first on the device (at most 2 minutes), "
                    "e.g. 'python3 benchmarks/distill_throughput.py --device cuda --num-workers 8'")
    ap.add_argument("--datasets", default=",".join(DATASETS), help="offline datasets to bundle")
    ap.add_argument("--check-only", action="store_true", help="build nothing: only measure what would travel")
    ap.add_argument("--root", default=str(REPO))
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    source = Path(os.environ.get("KDBOOK_DATASETS") or root.parent / "shared" / "datasets")
    try:
        prepare(root, args.budget_min, args.chapters, args.profile, args.probe,
                [d.strip() for d in args.datasets.split(",") if d.strip()], source, args.check_only)
    except LeaseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
