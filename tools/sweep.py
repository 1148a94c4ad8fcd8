#!/usr/bin/env python
"""The owed chapters as a submitit sweep (`make sweep PROFILE=paper EXECUTOR=slurm|local`).

    python tools/sweep.py --executor local|slurm [--profile paper] [--chapters a,b] [--folder DIR]
                          [--timeout-min 4320] [--slurm-partition P] [--gpus 1]

One job per owed chapter (its `target` in profiles.yml is not its `published` one, or the --profile
asked for is not; or the chapters named): the job is `tools/owed.py execute CHAPTER --profile P`, the
same papermill execution as `make gpu` without a deadline. All jobs write the same results store;
records are written atomically, so jobs that finish together cannot corrupt it. Reused runs cost
nothing, so a sweep that is stopped and submitted again resumes. `local` runs the jobs on this machine
(submitit's LocalExecutor; one job at a time, so that chapters do not share one GPU); `slurm` needs a SLURM cluster (`sinfo` on the PATH).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from owed import REPO, OwedError, select  # noqa: E402


def executor_for(kind: str,  # "local" or "slurm"
                 folder: Path,  # submitit's logs and pickles
                 timeout_min: int,  # wall-clock limit of one job
                 partition: str | None = None,  # SLURM partition
                 gpus: int = 1,  # GPUs per SLURM job
                 ):
    "A submitit executor; a clear error for SLURM where there is none."
    import submitit
    if kind == "local":
        ex = submitit.LocalExecutor(folder=str(folder))
        ex.update_parameters(timeout_min=timeout_min)
        return ex
    if kind == "slurm":
        if shutil.which("sinfo") is None:
            raise OwedError("EXECUTOR=slurm: no SLURM on this machine (`sinfo` is not on the PATH); "
                            "use EXECUTOR=local, or run on a cluster's login node")
        ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
        ex.update_parameters(timeout_min=timeout_min, gpus_per_node=gpus, tasks_per_node=1, cpus_per_task=8,
                             **({"slurm_partition": partition} if partition else {}))
        return ex
    raise OwedError(f"unknown executor {kind!r}: use local or slurm")


def failure_cause(job, err: Exception) -> str:
    "Why a job failed, in one line: the chapter's own error as `owed.py execute` reported it, else the job's last words."
    texts = []
    for get in ("stderr", "stdout"):
        try:
            texts.append(getattr(job, get)() or "")
        except Exception:  # no log (the job never started)
            pass
    texts.append(str(err))
    for text in texts:
        for line in reversed(text.splitlines()):
            if line.startswith("error: "):
                return line[len("error: "):].strip()
    lines = [line.strip() for text in texts for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else repr(err)) + f" (logs in {getattr(job, 'paths', None) and job.paths.folder})"


def check_args(folder: Path, timeout_min: int):
    "Clear errors for a --folder that is a file and a --timeout-min that is not a positive number of minutes."
    if folder.exists() and not folder.is_dir():
        raise OwedError(f"--folder {folder} is an existing file: give a folder for submitit's logs (it is created)")
    if not timeout_min > 0:
        raise OwedError(f"--timeout-min must be a positive number of minutes (one job's wall-clock limit), got {timeout_min}")


def sweep(root: Path, kind: str, profile: str | None, chapters: list | None, folder: Path, timeout_min: int,
          partition: str | None = None, gpus: int = 1) -> list[tuple[str, str, str]]:
    "Submit one job per owed chapter and wait: [(chapter, profile, 'done' | 'failed: ...')]."
    import submitit
    check_args(folder, timeout_min)
    todo = select(root, chapters, profile)
    ex = executor_for(kind, folder, timeout_min, partition, gpus)
    jobs, results = [], []

    def wait(stem, prof, job):
        try:
            job.result()
            results.append((stem, prof, "done"))
        except Exception as err:  # a failed chapter does not stop the others
            results.append((stem, prof, f"failed: {failure_cause(job, err)}"))
        print(f"sweep: {stem} at {prof}: {results[-1][2]}", flush=True)

    for stem, prof in todo:
        cmd = [sys.executable, str(Path(__file__).resolve().parent / "owed.py"), "execute", stem, "--profile", prof,
               "--root", str(root)]
        job = ex.submit(submitit.helpers.CommandFunction(cmd, cwd=str(root)))
        print(f"sweep: submitted {stem} at {prof} as job {job.job_id}", flush=True)
        if kind == "local":
            wait(stem, prof, job)
        else:
            jobs.append((stem, prof, job))
    for stem, prof, job in jobs:
        wait(stem, prof, job)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--executor", required=True, help="local or slurm")
    ap.add_argument("--profile", default=None, help="run every chapter at this profile (default: each one's target)")
    ap.add_argument("--chapters", default="", help="comma-separated chapter stems (default: every owed chapter)")
    ap.add_argument("--folder", default=str(REPO / "_build" / "sweep"), help="submitit's logs")
    ap.add_argument("--timeout-min", type=int, default=72 * 60)
    ap.add_argument("--slurm-partition", default=None)
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--root", default=str(REPO))
    args = ap.parse_args(argv)
    try:
        results = sweep(Path(args.root).resolve(), args.executor, args.profile,
                        [c.strip() for c in args.chapters.split(",") if c.strip()] or None,
                        Path(args.folder).resolve(), args.timeout_min, args.slurm_partition, args.gpus)
    except OwedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not results:
        print("sweep: nothing is owed at that profile", flush=True)
    return 0 if all(r[2] == "done" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
