"""A GPU lease, simulated on CPU: the cells a slice executes, what travels, archives cut at any instant, import checks.

The queue runs the tiny chapter of test_queue.py (a LeNet-5 teacher and student through the real engine and store)
in temporary clones; the import checks use archives written by the queue's own exporter from hand-made stores.
"""
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from test_queue import REPO, STEM, make_clone, owed, records, tree, without_times

sys.path.insert(0, str(REPO / "tools"))
import lease as lease_tool  # noqa: E402
import owed as owed_tool  # noqa: E402
from kdbook.engine import save_train_state as save_checkpoint  # noqa: E402
from kdbook.store import Store, record_checksum  # noqa: E402


# --- which cells a slice executes -------------------------------------------------------------------------------

def nb(*cells):
    "A notebook from (source, tags) pairs."
    return {"cells": [{"cell_type": "code", "source": src, "metadata": {"tags": list(tags)}, "outputs": []}
                      for src, tags in cells]}


def test_computing_cells_keeps_experiments_and_what_they_read():
    book = nb(
        ("#| default_exp losses", ()),  # 0: nothing reads it
        ('profile = "smoke"', ("parameters",)),  # 1
        ("#| export\ndef kd(z, tau):\n    return z / tau", ()),  # 2: export
        ("from fastcore.test import test_eq\n_z = kd(1.0, 2.0)\ntest_eq(_z, 0.5)", ()),  # 3: a test cell
        ("n_train = {'smoke': 10}[profile]\ncfg = dict(lr=0.1)", ()),  # 4: read by the experiment
        ("cfg['lr'] = 0.2", ()),  # 5: mutates what the experiment reads
        ("def helper(cfg):\n    return cfg\n_cfg = helper(3)", ()),  # 6: binds cfg only as an argument
        ("!echo hi\n%time x = 1\nhelper2 = 3", ()),  # 7: IPython syntax; nothing reads helper2
        ("#| slow\nfor n_train in range(n_train):\n    pass\nres = kd(n_train, cfg['lr'])", ()),  # 8
        ("#| slow\nimport math\nprint(math.pi, res)", ()),  # 9
        ("test_eq(res > 0, True)", ()),  # 10: a test after the experiment
    )
    assert owed_tool.computing_cells(book) == [1, 2, 4, 5, 8, 9]
    binds, reads, _ = owed_tool.cell_names("x = x + 1\ny += 1\nfor z in w: print(z)\nstore.v = 1\nf = lambda a: a + g")
    assert binds == {"x", "y", "z", "store", "f"} and reads == {"x", "y", "w", "store", "g"}


def test_every_chapter_still_runs_what_its_experiments_need():
    "In every chapter's filtered copy, each name a kept cell reads is bound by a kept cell (or is a builtin)."
    for path in sorted((REPO / "chapters").glob("*.ipynb")):
        book = json.loads(path.read_text())
        kept = owed_tool.computing_cells(book)
        src = {i: "".join(book["cells"][i]["source"]) for i in kept}
        bound = set().union(*(owed_tool.cell_names(s)[0] for s in src.values()))
        star = any(owed_tool.cell_names(s)[2] for s in src.values())
        for i, s in src.items():
            missing = owed_tool.cell_names(s)[1] - bound
            assert star or not missing, f"{path.name} cell {i} reads {sorted(missing)}, bound by no kept cell"
        slow = [i for i, c in enumerate(book["cells"]) if "#| slow" in "".join(c["source"])]
        assert set(slow) <= set(kept)


# --- what travels -----------------------------------------------------------------------------------------------

def wheel_bytes() -> tuple[int, str]:
    "Bytes of the bundled wheels: .bundle/whl when `make lease` built it, else the installed files deflated as a wheel."
    whl = REPO / ".bundle" / "whl"
    if whl.is_dir() and any(whl.glob("*.whl")):
        return sum(p.stat().st_size for p in whl.glob("*.whl")), str(whl)
    from importlib.metadata import distribution
    total = 0
    for name in lease_tool.WHEELS:
        dist = distribution(name)
        for f in dist.files or []:
            p = Path(dist.locate_file(f))
            if p.is_file() and "__pycache__" not in p.parts:
                total += len(zlib.compress(p.read_bytes(), 6)) + 100  # deflated, plus the zip entry
    return total, "the installed packages, deflated"


def test_what_travels_with_a_lease_fits():
    datasets = Path(os.environ.get("KDBOOK_DATASETS") or REPO.parent / "shared" / "datasets")
    if not all((datasets / d).is_dir() for d in lease_tool.DATASETS):
        pytest.skip(f"no offline datasets {lease_tool.DATASETS} in {datasets}")
    tree_b = lease_tool.size_of(lease_tool.travelling_files(REPO))
    data_b = lease_tool.size_of(datasets / d for d in lease_tool.DATASETS)
    wheels_b, how = wheel_bytes()
    total = tree_b + data_b + wheels_b
    assert wheels_b > 1_000_000 and data_b > 20_000_000 and tree_b > 1_000_000  # the measurement measured something
    assert total <= lease_tool.LIMIT_MIB * 2**20, (
        f"{total / 2**20:.1f} MiB would travel (tree {tree_b / 2**20:.1f}, datasets {data_b / 2**20:.1f}, wheels "
        f"{wheels_b / 2**20:.1f} from {how}): over {lease_tool.LIMIT_MIB} MiB")
    # the vendored JS travels compressed: the uncompressed copy is git-ignored
    assert not [p for p in lease_tool.travelling_files(REPO) if "book/static/vendor/" in p.as_posix()
                and p.name != "README.md"]


def test_the_wheels_left_out_are_not_needed(tmp_path):
    "papermill + ipykernel + kdbook run a notebook with debugpy, jedi, parso, widgetsnbextension, execnb unimportable."
    hide = tmp_path / "hide"
    for name in lease_tool.LEFT_OUT:
        (hide / name).mkdir(parents=True)
        (hide / name / "__init__.py").write_text(f"raise ImportError('{name} is not bundled for a lease')\n")
    book = nb(('profile = "smoke"', ("parameters",)),
              ("import kdbook.store, kdbook.viz, kdbook.train, IPython\nopen('ran', 'w').write(profile)", ()))
    src = tmp_path / "nb.ipynb"
    src.write_text(json.dumps({**book, "metadata": {"kernelspec": {"name": "kdbook", "language": "python",
                                                                   "display_name": "kdbook"}},
                               "nbformat": 4, "nbformat_minor": 5}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hide), str(REPO)])}
    res = subprocess.run([sys.executable, "-m", "papermill", str(src), str(tmp_path / "out.ipynb"), "-k", "kdbook",
                          "--cwd", str(tmp_path), "-p", "profile", "quick"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "ran").read_text() == "quick"


# --- the lease simulation: SIGKILL midway, import, resume -------------------------------------------------------

def kill_tree(proc):
    "SIGKILL a process and every descendant (their own sessions included), as the machine's limit does."
    pids = [proc.pid] + owed_tool._children(proc.pid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def wait_for(out: Path, pred, proc, timeout=240):
    t_end = time.time() + timeout
    while time.time() < t_end:
        try:
            manifest = json.loads((out / "manifest.json").read_text())
            if pred(manifest):
                return manifest
        except (OSError, json.JSONDecodeError):
            pass
        assert proc.poll() is None, f"the slice ended before the condition: {proc.stdout.read()[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"condition not reached in {timeout} s")


@pytest.fixture(scope="module")
def killed(tmp_path_factory, tiny_reference):
    "A slice SIGKILLed midway; its OUT imported into a fresh clone, resumed; beside the uninterrupted reference."
    tmp = tmp_path_factory.mktemp("lease")
    ref = tiny_reference
    first = make_clone(tmp / "first")
    out = tmp / "out"
    proc = subprocess.Popen([sys.executable, str(first / "tools" / "owed.py"), "run", "--budget-min", "9", "--out",
                             str(out), "--chapters", STEM, "--export-every-s", "2", "--root", str(first)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "KDBOOK_TEST_EPOCH_SLEEP": "1"})
    student_ckpt = lambda m: any(f.startswith("data/checkpoints/partial/tiny-student-") for f in m["files"])
    manifest = wait_for(out, student_ckpt, proc)
    kill_tree(proc)
    left = sorted(p.name for p in out.iterdir())
    fresh = make_clone(tmp / "fresh")
    imported = owed(fresh, "import", str(out))
    resumed = owed(fresh, "run", "--budget-min", "10", "--out", str(tmp / "out2"), "--chapters", STEM)
    return dict(tmp=tmp, ref=ref, first=first, fresh=fresh, out=out, manifest=manifest, left=left,
                imported=imported, resumed=resumed)


def test_a_killed_lease_returns_every_finished_record_and_its_latest_checkpoint(killed):
    out, first = killed["out"], killed["first"]
    left = killed["left"]
    assert len(left) <= 8 and "manifest.json" in left and not [n for n in left if n.endswith(".tmp")], left
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["final"] is False and manifest["chapters"][0]["status"] == "running"
    files = manifest["files"]
    (t_rec,) = [f for f in files if f.startswith("results/tiny-teacher/")]
    assert any(f.startswith("results/weights/tiny-teacher/") for f in files)
    assert not any(f.startswith("data/checkpoints/partial/tiny-teacher-") for f in files), "finished: not exported"
    # nothing committed is exported: only what the slice made
    assert all(f.startswith(("results/tiny-", "results/weights/tiny-", "data/checkpoints/partial/tiny-")) for f in files)
    assert set(manifest["ledger"]) >= {"lease_min", "training_min", "setup_min", "probe_min", "export_min",
                                       "finished", "partial", "owed"}
    assert manifest["ledger"]["partial"] == [STEM] and manifest["ledger"]["training_min"] > 0


def test_the_killed_lease_resumes_to_the_uninterrupted_record(killed):
    fresh, ref = killed["fresh"], killed["ref"]
    assert "cut before its slice ended" in killed["imported"].stdout
    assert json.loads((killed["tmp"] / "out2" / "manifest.json").read_text())["chapters"][0]["status"] == "done"
    for name in ("tiny-teacher", "tiny-student"):
        (mine,), (theirs,) = records(fresh, name), records(ref, name)
        assert without_times(mine) == without_times(theirs), f"{name}: the resumed lease differs from the full run"
    # the reference ran every cell (its test cell too), the lease only what computes: the same records
    assert (killed["ref"] / "test-cell-ran").exists() and not (killed["first"] / "test-cell-ran").exists()


def test_stopping_the_queue_stops_the_kernel_and_exports(tmp_path, sig=signal.SIGTERM, rc=143):
    "SIGTERM to the queue (Ctrl-C takes the same path: KeyboardInterrupt instead of Stopped, exit 130)."
    clone = make_clone(tmp_path / "clone")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(clone / "tools" / "owed.py"), "run", "--budget-min", "9", "--out",
                             str(out), "--chapters", STEM, "--export-every-s", "2", "--grace-s", "5",
                             "--root", str(clone)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "KDBOOK_TEST_EPOCH_SLEEP": "2"})
    wait_for(out, lambda m: any(f.startswith("data/checkpoints/partial/tiny-teacher-") for f in m["files"]), proc)
    kids = owed_tool._children(proc.pid)
    proc.send_signal(sig)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == rc, stdout[-3000:]
    assert not [p for p in kids if owed_tool._alive(p)], "a chapter process outlived the queue"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["final"] is True and manifest["chapters"][0]["status"] == "partial"
    assert manifest["chapters"][0]["cause"] == "interrupted"
    assert any(f.startswith("data/checkpoints/partial/tiny-teacher-") for f in manifest["files"])
    after = tree(clone), tree(clone, "data")
    time.sleep(3)
    assert (tree(clone), tree(clone, "data")) == after, "nothing writes records or checkpoints after the queue stopped"


# --- import checks, on archives written by the queue's exporter ----------------------------------------------------

def store_root(tmp: Path, name="root") -> Path:
    root = tmp / name
    (root / "results").mkdir(parents=True)
    return root


def archive(tmp: Path, root: Path, chapters=(), dirty=False, out_name="out") -> Path:
    "An archive of every file under root/results and root/data/checkpoints/partial, as a slice exports it."
    out = tmp / out_name
    out.mkdir()
    log = tmp / "log.txt"
    log.write_text("")
    exp = owed_tool.Exporter(root, out, {}, log)
    exp.baseline, exp.baseline_from = {}, "test"
    exp({"format": 2, "git_rev": "test", "dirty": dirty, "final": True, "chapters": list(chapters), "ledger": {}})
    return out


def teacher(root: Path, profile="quick", value=1.0):
    store = Store(root / "results", verbose=False, profile=profile)
    rec, _ = store.run_model("tiny-teacher", {"v": value}, 0, lambda: torch.nn.Linear(2, 2),
                             lambda m: {"acc": value})
    return rec


def repo_root(tmp: Path) -> Path:
    "What an import reads of a repository (profiles.yml with the tiny chapter, _toc.yml, results/), no git."
    root = tmp
    (root / "results").mkdir(parents=True)
    shutil.copy(REPO / "_toc.yml", root / "_toc.yml")
    plan = (REPO / "profiles.yml").read_text().rstrip("\n")
    (root / "profiles.yml").write_text(plan + f"\n  {STEM}: {{published: smoke, target: quick, stores: [tiny-teacher, tiny-student]}}\n")
    return root


def imp(root: Path, arc: Path, check=False):
    "`owed.py import` in this process (no interpreter start-up): returncode, stdout, stderr."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = owed_tool.main(["import", str(arc), "--root", str(root)])
    res = SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())
    assert not check or rc == 0, res.stderr
    return res


def test_import_keeps_the_furthest_checkpoint(tmp_path):
    src = store_root(tmp_path, "src")
    ckpt = src / "data" / "checkpoints" / "partial" / "tiny-student-0123456789abcdef.pt"
    save_checkpoint(ckpt, {"epoch": 2, "models": []})
    arc = archive(tmp_path, src)
    dest = repo_root(tmp_path / "dest")
    mine = dest / "data" / "checkpoints" / "partial" / ckpt.name
    save_checkpoint(mine, {"epoch": 5, "models": []})
    before = mine.read_bytes()
    res = imp(dest, arc, check=True)
    assert mine.read_bytes() == before and "kept the local checkpoint (epoch 5" in res.stdout
    save_checkpoint(mine, {"epoch": 1, "models": []})
    imp(dest, arc, check=True)
    assert mine.read_bytes() == ckpt.read_bytes(), "a further checkpoint replaces an earlier one"


@pytest.mark.parametrize("bad", ["not_a_record", "bad_checkpoint", "weights_missing", "local_damaged"])
def test_import_refuses(tmp_path, bad):
    src = store_root(tmp_path, "src")
    rec = teacher(src)
    dest = repo_root(tmp_path / "dest")
    if bad == "not_a_record":
        (src / "results" / "notes.txt").write_text("hello")
        msg = "results/notes.txt: not a record"
    elif bad == "bad_checkpoint":
        p = src / "data" / "checkpoints" / "partial" / "tiny-student-0123456789abcdef.pt"
        p.parent.mkdir(parents=True)
        p.write_bytes(b"not a checkpoint")
        msg = "not a valid resumable checkpoint"
    elif bad == "weights_missing":
        (src / "results" / "weights" / "tiny-teacher" / f"{rec['key']}.safetensors").unlink()
        msg = "in neither the archive nor this repository"
    else:
        mine = dest / "results" / "tiny-teacher" / f"{rec['key']}.json"
        mine.parent.mkdir(parents=True)
        mine.write_text(json.dumps({**rec, "result": {**rec["result"], "acc": 2.0}}))  # checksum now wrong
        msg = "the local copy is damaged"
    arc = archive(tmp_path, src)
    before = tree(dest), tree(dest, "data")
    res = imp(dest, arc)
    assert res.returncode == 2 and msg in res.stderr, res.stderr
    assert (tree(dest), tree(dest, "data")) == before, "nothing may be written"


def test_publication_needs_records_at_that_profile(tmp_path):
    dest = repo_root(tmp_path / "dest")
    plan = (dest / "profiles.yml").read_text()
    entry = lambda stem: {"chapter": stem, "profile": "quick", "target": "quick", "status": "done", "seconds": 1}
    # a chapter that stores nothing of its own (61_train_agreement) is never published by an import
    src = store_root(tmp_path, "src")
    teacher(src, profile="quick")
    res = imp(dest, archive(tmp_path, src, [entry("61_train_agreement"), entry(STEM)], out_name="a1"), check=True)
    assert "61_train_agreement is not published at quick" in res.stdout
    assert f"published: {STEM} at quick" in res.stdout  # tiny-teacher is one of its stores, computed at quick
    assert "61_train_agreement: {published: smoke" in (dest / "profiles.yml").read_text()
    # records computed at smoke do not publish a chapter at quick
    dest2 = repo_root(tmp_path / "dest2")
    src2 = store_root(tmp_path, "src2")
    teacher(src2, profile="smoke")
    res = imp(dest2, archive(tmp_path, src2, [entry(STEM)], out_name="a2"), check=True)
    assert f"{STEM} is not published at quick" in res.stdout and "computed at smoke" in res.stdout
    assert (dest2 / "profiles.yml").read_text().count("published: quick") == plan.count("published: quick")


def test_a_dirty_archive_is_flagged_loudly(tmp_path):
    src = store_root(tmp_path, "src")
    teacher(src)
    dest = repo_root(tmp_path / "dest")
    res = imp(dest, archive(tmp_path, src, dirty=True), check=True)
    assert "WARNING" in res.stderr and "DIRTY" in res.stderr


def test_an_archive_cut_between_two_exports_imports_the_earlier_one(tmp_path):
    src = store_root(tmp_path, "src")
    teacher(src, value=1.0)
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "log").write_text("")
    exp = owed_tool.Exporter(src, out, {}, tmp_path / "log")
    exp.baseline, exp.baseline_from = {}, "test"
    m = {"format": 2, "git_rev": "test", "dirty": False, "final": False, "chapters": [], "ledger": {}}
    exp(m)
    first = json.loads((out / "manifest.json").read_text())
    teacher(src, value=2.0)
    # the next export, cut after writing its parts but before its manifest: the earlier archive is intact
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    exp(m)
    second = json.loads((out / "manifest.json").read_text())
    assert {p["name"] for p in first["parts"]}.isdisjoint({p["name"] for p in second["parts"]})
    for p in second["parts"]:
        shutil.copy(out / p["name"], cut / p["name"])
    assert len(list(out.iterdir())) <= 8 and not (out / first["parts"][0]["name"]).exists()
    for arc, n in ((cut, 2), (out, 4)):
        dest = repo_root(tmp_path / f"dest-{arc.name}")
        res = imp(dest, arc, check=True)
        assert f"{n} files written" in res.stdout, res.stdout


def test_an_archive_over_the_part_limit_names_the_fix(tmp_path, monkeypatch):
    src = store_root(tmp_path, "src")
    big = src / "data" / "checkpoints" / "partial" / "gan-sngan-0123456789abcdef.pt"
    big.parent.mkdir(parents=True)
    big.write_bytes(os.urandom(200_000))
    monkeypatch.setattr(owed_tool, "PART_BYTES", 20_000)
    with pytest.raises(owed_tool.OwedError, match="import and commit the archives of earlier slices") as err:
        archive(tmp_path, src)
    assert "gan-sngan-0123456789abcdef.pt (0.2 MB)" in str(err.value)


def test_an_import_on_a_full_disk_writes_nothing(tmp_path, monkeypatch):
    src = store_root(tmp_path, "src")
    teacher(src)
    arc = archive(tmp_path, src)
    dest = repo_root(tmp_path / "dest")
    before = tree(dest)
    real = shutil.disk_usage
    monkeypatch.setattr(owed_tool.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=1000) if Path(p) == dest else real(p))
    with pytest.raises(owed_tool.OwedError, match="nothing was imported"):
        owed_tool.import_archive(dest, arc)
    assert tree(dest) == before and not list(dest.rglob("*.import.tmp"))


def test_the_queue_checks_the_disk_before_running(tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(owed_tool.shutil, "disk_usage", lambda p: real(p)._replace(free=10 * 2**20))
    with pytest.raises(owed_tool.OwedError, match="only 10 MiB free"):
        owed_tool.check_out(tmp_path / "out")


def test_a_second_benchmark_record_is_kept_beside_the_first(tmp_path):
    src = store_root(tmp_path, "src")
    (src / "results" / "benchmarks").mkdir()
    (src / "results" / "benchmarks" / "cuda-h200.json").write_text('{"format": 2, "rows": [1]}')
    dest = repo_root(tmp_path / "dest")
    (dest / "results" / "benchmarks").mkdir()
    (dest / "results" / "benchmarks" / "cuda-h200.json").write_text('{"format": 2, "rows": [0]}')
    arc = archive(tmp_path, src)
    res = imp(dest, arc, check=True)
    beside = [p.name for p in (dest / "results" / "benchmarks").glob("cuda-h200-*.json")]
    assert len(beside) == 1 and "this one goes to" in res.stdout
    assert json.loads((dest / "results" / "benchmarks" / "cuda-h200.json").read_text())["rows"] == [0]
    assert "0 files written" in imp(dest, arc, check=True).stdout  # imported once
