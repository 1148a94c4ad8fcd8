"""The owed-work queue (tools/owed.py: make gpu / gpu-import) and the submitit sweep (tools/sweep.py), at smoke on CPU.

A tiny chapter (a LeNet-5 teacher and a student on 64 synthetic images, through the store with stored
weights and resumable checkpoints) is added to temporary clones of this repository; the committed
results/ are never touched. The slice is interrupted by its budget, exported, imported into a fresh
clone and resumed there to the same records as an uninterrupted run.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
STEM = "z_tiny"

PARAMS = '''profile = "smoke"  # smoke | quick | paper
results_dir = "../results"
data_dir = "../data"
seed = 0
'''
BODY = '''#| slow
import os, time
import torch
from kdbook.data import ImageSet
from kdbook.store import Store
from kdbook.train import TrainConfig, distill, fit, make_model

if os.environ.get("KDBOOK_TEST_FAIL"):
    raise ValueError("tiny: asked to fail")
store = Store(results_dir, checkpoints_dir=f"{data_dir}/checkpoints", verbose=False, profile=profile)
g = torch.Generator().manual_seed(0)
data = ImageSet(torch.randint(0, 256, (64, 1, 28, 28), generator=g, dtype=torch.uint8), torch.arange(64) % 10,
                [str(i) for i in range(10)], "toy", "toy")
cfg = TrainConfig(epochs={"smoke": 2, "quick": 6, "paper": 6}[profile], batch_size=16, optimizer="adam", lr=1e-3,
                  device="cpu", progress=False, checkpoint_every=1)
nap = lambda epoch, history: time.sleep(float(os.environ.get("KDBOOK_TEST_EPOCH_SLEEP", "0")))  # slow epochs: test only
t_params = {"cfg": cfg.to_dict()}
t_resume = store.resume_path("tiny-teacher", t_params, seed)
t_rec, teacher = store.run_model("tiny-teacher", t_params, seed, lambda: make_model("lenet5", seed),
                                 lambda m: fit(m, data, data, cfg, seed, checkpoint=t_resume, callback=nap))
s_params = {"teacher": t_rec["key"], "cfg": cfg.to_dict()}
s_resume = store.resume_path("tiny-student", s_params, seed)
s_rec = store.run("tiny-student", s_params, lambda: distill(make_model("lenet5", seed + 1), teacher, data, data, cfg, seed,
                                                            checkpoint=s_resume, callback=nap), seed, depends=[t_rec])
print(store.summary())
'''


# an nbdev test cell: a slice leaves it out (it would leave this marker file beside the chapters)
TEST_CELL = '''_rec = store.load("tiny-student", s_params, seed)
assert _rec is not None
open("../test-cell-ran", "w").write("yes")
'''


def make_clone(dest: Path) -> Path:
    "A git clone of this repository with the tiny chapter added (toc + profiles.yml: published smoke, target quick)."
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    for sub in ("tools", "kdbook"):  # the code under test is this working tree's, committed or not
        shutil.copytree(REPO / sub, dest / sub, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(PARAMS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# Tiny"), params, nbformat.v4.new_code_cell(BODY),
                nbformat.v4.new_code_cell(TEST_CELL)]
    nb.metadata["kernelspec"] = {"name": "kdbook", "display_name": "kdbook", "language": "python"}
    nbformat.write(nb, dest / "chapters" / f"{STEM}.ipynb")
    toc = (dest / "_toc.yml").read_text().rstrip("\n") + f"\n      - file: chapters/{STEM}\n"
    (dest / "_toc.yml").write_text(toc)
    prof = (dest / "profiles.yml").read_text().rstrip("\n")
    (dest / "profiles.yml").write_text(prof + f"\n  {STEM}: {{published: smoke, target: quick, stores: [tiny-teacher, tiny-student]}}\n")
    return dest


def owed(root: Path, *args, env=None, check=True):
    cmd = [sys.executable, str(root / "tools" / "owed.py"), *args, "--root", str(root)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def tree(root: Path, top="results") -> dict:
    base = root / top
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(base.rglob("*")) if p.is_file()} if base.exists() else {}


def records(root: Path, name: str) -> list:
    return [json.loads(p.read_text()) for p in sorted((root / "results" / name).glob("*.json"))]


def without_times(obj):
    "A record's content without what differs between two identical computations (timings, creation, checksum)."
    if isinstance(obj, dict):
        return {k: without_times(v) for k, v in obj.items() if k not in ("wall_time_s", "created", "checksum", "meta")}
    if isinstance(obj, list):
        return [without_times(v) for v in obj]
    return obj


@pytest.fixture(scope="module")
def slices(tmp_path_factory, tiny_reference):
    "A slice stopped by its budget, exported, imported into a fresh clone, resumed; beside the uninterrupted reference."
    tmp = tmp_path_factory.mktemp("queue")
    ref = tiny_reference
    first = make_clone(tmp / "first")
    stopped = owed(first, "run", "--budget-min", "1", "--out", str(tmp / "out1"), "--chapters", STEM,
                   "--export-every-s", "5", "--grace-s", "5", env={"KDBOOK_TEST_EPOCH_SLEEP": "4"})
    fresh = make_clone(tmp / "fresh")
    imported = owed(fresh, "import", str(tmp / "out1"))
    resumed = owed(fresh, "run", "--budget-min", "10", "--out", str(tmp / "out2"), "--chapters", STEM)
    return dict(tmp=tmp, ref=ref, first=first, fresh=fresh, stopped=stopped, imported=imported, resumed=resumed)


def test_slice_stopped_by_budget_exports_its_checkpoint(slices):
    out = slices["tmp"] / "out1"
    manifest = json.loads((out / "manifest.json").read_text())
    (entry,) = manifest["chapters"]
    assert entry["chapter"] == STEM and entry["profile"] == "quick" and entry["status"] == "partial", slices["stopped"].stdout
    assert entry["seconds"] <= 60  # stopped at the deadline, export included in the budget
    partial = [f for f in manifest["files"] if f.startswith("data/checkpoints/partial/")]
    assert partial, f"a stopped run must leave its resumable checkpoint: {manifest['files']}"
    assert len(list(out.iterdir())) <= 8 and all(p.stat().st_size <= 16_000_000 for p in out.iterdir())
    assert {"git_rev", "dirty", "torch", "device", "files", "parts", "ledger"} <= set(manifest)
    led = manifest["ledger"]
    assert led["partial"] == [STEM] and led["owed"] == [STEM] and led["finished"] == []
    assert 0 < led["training_min"] <= led["elapsed_min"] <= led["slice_min"] == 1.0
    assert not (slices["first"] / "test-cell-ran").exists(), "a slice must leave the test cells out"
    assert "partial" in slices["stopped"].stdout and "owed 1" in slices["stopped"].stdout
    assert not any(p.name.endswith(".tmp") for p in (slices["first"] / "results").rglob("*"))


def test_import_then_resume_gives_the_uninterrupted_record(slices):
    fresh, ref = slices["fresh"], slices["ref"]
    assert "published: no chapter" in slices["imported"].stdout  # partial: not published
    manifest = json.loads((slices["tmp"] / "out2" / "manifest.json").read_text())
    assert manifest["chapters"][0]["status"] == "done"
    for name in ("tiny-teacher", "tiny-student"):
        (mine,), (theirs,) = records(fresh, name), records(ref, name)
        assert mine["key"] == theirs["key"]
        assert without_times(mine) == without_times(theirs), f"{name}: the resumed run differs from the uninterrupted one"
    (t,) = records(fresh, "tiny-teacher")
    assert t["result"]["weights"]["sha256"] == records(ref, "tiny-teacher")[0]["result"]["weights"]["sha256"]
    assert not [f for f in manifest["files"] if f.startswith("data/checkpoints/partial/")], \
        "the checkpoints of finished runs are not exported"
    # importing the completed slice publishes the chapter at its target
    # every slice's archive is imported, in order (the first may already have finished the teacher)
    target = make_clone(slices["tmp"] / "target")
    owed(target, "import", str(slices["tmp"] / "out1"))
    res = owed(target, "import", str(slices["tmp"] / "out2"))
    assert f"published: {STEM} at quick" in res.stdout
    assert f"{STEM}: {{published: quick, target: quick" in (target / "profiles.yml").read_text()
    assert tree(target) == tree(fresh)
    again = owed(target, "import", str(slices["tmp"] / "out2"))  # identical records are kept
    assert "0 files written" in again.stdout and tree(target) == tree(fresh)
    # the uninterrupted reference ran the test cell (--all-cells), the slices did not
    assert (slices["ref"] / "test-cell-ran").exists() and not (fresh / "test-cell-ran").exists()


def test_import_refuses_a_conflicting_record(slices):
    target = make_clone(slices["tmp"] / "conflict")
    (rec,) = records(slices["fresh"], "tiny-student")
    rec["result"]["train_loss"][-1] += 1.0  # another valid record under the same key
    from kdbook.store import record_checksum
    rec["checksum"] = record_checksum(rec)
    path = target / "results" / "tiny-student" / f"{rec['key']}.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(rec))
    before = tree(target), (target / "profiles.yml").read_text()
    res = owed(target, "import", str(slices["tmp"] / "out2"), check=False)
    assert res.returncode == 2 and "different record under the same key" in res.stderr
    assert (tree(target), (target / "profiles.yml").read_text()) == before, "nothing may be written"


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest", "tarball_truncated", "missing"])
def test_import_refuses_a_corrupt_archive(slices, damage, tmp_path):
    target = make_clone(tmp_path / "clone")
    archive = tmp_path / "archive"
    shutil.copytree(slices["tmp"] / "out2", archive)
    part = archive / json.loads((archive / "manifest.json").read_text())["parts"][0]["name"]
    if damage == "truncate":
        part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    elif damage == "flip":
        data = bytearray(part.read_bytes())
        data[len(data) // 2] ^= 0xFF
        part.write_bytes(bytes(data))
    elif damage == "no_manifest":
        (archive / "manifest.json").unlink()
    elif damage == "tarball_truncated":
        archive = tmp_path / "cut.tar.gz"
        archive.write_bytes(part.read_bytes()[:200])
    elif damage == "missing":
        archive = tmp_path / "nowhere"
    before = tree(target)
    res = owed(target, "import", str(archive), check=False)
    assert res.returncode == 2 and res.stderr.startswith("error: "), res.stderr
    assert tree(target) == before


def test_import_refuses_entries_outside_the_store(tmp_path):
    target = make_clone(tmp_path / "clone")
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        (tmp_path / "x").write_text("{}")
        tar.add(tmp_path / "x", arcname="manifest.json")
        tar.add(tmp_path / "x", arcname="../evil.json")
    res = owed(target, "import", str(bad), check=False)
    assert res.returncode == 2 and "unexpected entry" in res.stderr


def test_bad_queue_input(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "manifest.json").write_text("{}")
    run = ["run", "--budget-min", "1", "--chapters", "a3_training", "--out"]
    for args, msg in [(["run", "--budget-min", "0", "--out", str(tmp_path / "o")], "budget must be > 0"),
                      (["run", "--budget-min", "-1", "--out", str(tmp_path / "o")], "budget must be > 0"),
                      (["run", "--budget-min", "1", "--out", str(tmp_path / "o"), "--chapters", "nope"], "unknown chapter"),
                      (["run", "--budget-min", "1", "--out", str(tmp_path / "o"), "--profile", "fast"], "unknown profile"),
                      ([*run, str(tmp_path / "o"), "--kernel", "nosuch"], "no Jupyter kernel 'nosuch'"),
                      ([*run, str(tmp_path / "file")], "is an existing file"),
                      ([*run, str(tmp_path / "full")], "is not empty"),
                      ([*run, str(tmp_path / "file" / "sub")], "not writable")]:
        res = owed(REPO, *args, check=False)
        assert res.returncode == 2 and msg in res.stderr, (args, res.stderr)
    assert not (tmp_path / "o").exists()


def test_sweep_local_at_smoke_and_no_slurm(tmp_path):
    clone = make_clone(tmp_path / "clone")
    cmd = [sys.executable, str(clone / "tools" / "sweep.py"), "--executor", "local", "--profile", "smoke",
           "--chapters", STEM, "--root", str(clone), "--folder", str(tmp_path / "sweep")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"sweep: {STEM} at smoke: done" in res.stdout
    (t,) = records(clone, "tiny-teacher")
    assert t["meta"]["profile"] == "smoke" and len(records(clone, "tiny-student")) == 1
    if shutil.which("sinfo") is None:
        res = subprocess.run([*cmd[:3], "slurm", *cmd[4:]], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and "no SLURM" in res.stderr
    for extra, msg in [(["--folder", str(clone / "Makefile")], "is an existing file"),
                       (["--timeout-min", "0"], "--timeout-min must be a positive number")]:
        res = subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and msg in res.stderr, res.stderr
    # a failed job: the sweep names the chapter's own error, not only where its log is
    res = subprocess.run([*cmd[:-1], str(tmp_path / "sweep2")], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "KDBOOK_TEST_FAIL": "1"})
    assert res.returncode == 1 and "ValueError: tiny: asked to fail" in res.stdout, res.stdout + res.stderr


def test_a_failed_chapter_exits_nonzero_with_its_cause(tmp_path):
    clone = make_clone(tmp_path / "clone")
    res = owed(clone, "run", "--budget-min", "5", "--out", str(tmp_path / "out"), "--chapters", STEM, check=False,
               env={"KDBOOK_TEST_FAIL": "1"})
    assert res.returncode == 1 and f"failed: {STEM}" in res.stderr, res.stdout[-2000:] + res.stderr
    assert "ValueError: tiny: asked to fail" in res.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["chapters"][0]["status"] == "failed" and manifest["ledger"]["failed"] == [STEM]


def test_make_targets_report_bad_input():
    for args, msg in [(["gpu", "BUDGET_MIN=0"], "budget must be > 0"), (["gpu", "CHAPTERS=nope"], "unknown chapter"),
                      (["gpu-import"], "give ARCHIVE="), (["gpu-import", "ARCHIVE=/nonexistent"], "no such archive"),
                      (["lease", "BUDGET_MIN=12"], "BUDGET_MIN must be in (0, 9.5]")]:
        res = subprocess.run(["make", "-s", "-C", str(REPO), *args], capture_output=True, text=True, timeout=120)
        assert res.returncode != 0 and msg in res.stderr, (args, res.stderr)


def test_profiles_published_and_target(tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    from build_book import BuildError, chapter_profiles
    from owed import OwedError, select
    (tmp_path / "profiles.yml").write_text("default: smoke\nchapters:\n  a: quick\n"
                                           "  b: {published: smoke, target: paper, stores: [x]}\n")
    of = chapter_profiles(tmp_path, None)
    assert (of("a"), of("b"), of("c")) == ("quick", "smoke", "smoke")
    for bad in ("{published: smoke, target: fast}", "{target: quick}", "{published: smoke, extra: 1}"):
        (tmp_path / "profiles.yml").write_text(f"chapters:\n  b: {bad}\n")
        with pytest.raises(BuildError, match="b: "):
            chapter_profiles(tmp_path, None)
    # the owed chapters of this repository: target not yet published, in book order
    owed_now = select(REPO, None, None)
    plan = yaml_load(REPO / "profiles.yml")["chapters"]
    assert all(isinstance(plan[s], dict) and plan[s]["target"] == p != plan[s]["published"] for s, p in owed_now)
    with pytest.raises(OwedError, match="unknown chapter"):
        select(REPO, ["a3_trainin"], None)


def yaml_load(path):
    import yaml
    return yaml.safe_load(Path(path).read_text())
