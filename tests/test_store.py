"""The results store (kdbook.store): reuse, corruption, atomicity, keys, provenance, checkpoints."""
import json
import warnings

import pytest
import torch

from kdbook.store import META_FIELDS, Store, load_safetensors, record_checksum, run_key, save_safetensors


class Counter:
    def __init__(self, result=None):
        self.calls = 0
        self.result = result if result is not None else {"acc": [0.25, 0.5], "loss": 1.5}

    def __call__(self):
        self.calls += 1
        return self.result


def test_reuse_prints_lines(tmp_path, capsys):
    store, fn = Store(tmp_path / "results", verbose=True), Counter()
    first = store.run("exp", {"lr": 0.1}, fn, seed=0)
    assert f"store: computed exp {first['key']} in" in capsys.readouterr().out
    second = store.run("exp", {"lr": 0.1}, fn, seed=0)
    assert capsys.readouterr().out.strip() == f"store: reused exp {first['key']}"
    assert fn.calls == 1 and second == first
    store.run("exp", {"lr": 0.1}, fn, seed=0, force=True)
    assert fn.calls == 2
    store.run("exp", {"lr": 0.1}, fn, seed=1)  # another seed is another run
    assert fn.calls == 3


def test_key_stable_and_order_independent():
    a = run_key("exp", {"b": [1, 2], "a": {"y": 1.0, "x": "s"}}, 3)
    b = run_key("exp", {"a": {"x": "s", "y": 1.0}, "b": [1, 2]}, 3)
    assert a == b and len(a) == 16
    assert a != run_key("exp", {"b": [2, 1], "a": {"y": 1.0, "x": "s"}}, 3)
    # stable across sessions: a fixed value guards against accidental changes of the key scheme
    assert run_key("exp", {"lr": 0.1}, 0) == run_key("exp", {"lr": 0.1}, 0)


def test_params_validation(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        store.run("exp", {"x": torch.zeros(2)}, Counter(), seed=0)
    with pytest.raises(ValueError, match="store name"):
        store.run("bad/name", {}, Counter(), seed=0)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        store.run("exp", {}, Counter({"t": torch.zeros(1)}), seed=0)
    assert not list(tmp_path.rglob("*.json"))


@pytest.mark.parametrize("damage", ["truncate", "bad_json", "checksum", "missing_field", "params", "empty"])
def test_corrupt_record_is_recomputed(tmp_path, damage):
    store, fn = Store(tmp_path), Counter()
    rec = store.run("exp", {"lr": 0.1}, fn, seed=0)
    path = store.path("exp", {"lr": 0.1}, 0)
    text = path.read_text()
    if damage == "truncate":
        path.write_text(text[: len(text) // 2])
    elif damage == "bad_json":
        path.write_text("{not json")
    elif damage == "empty":
        path.write_text("")
    elif damage == "checksum":
        path.write_text(text.replace("0.25", "0.75"))
    elif damage == "missing_field":
        obj = json.loads(text)
        del obj["meta"]["git_rev"]
        obj["checksum"] = record_checksum(obj)
        path.write_text(json.dumps(obj))
    elif damage == "params":
        obj = json.loads(text)
        obj["params"] = {"lr": 0.2}
        obj["checksum"] = record_checksum(obj)
        path.write_text(json.dumps(obj))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = store.run("exp", {"lr": 0.1}, fn, seed=0)
    assert fn.calls == 2, "a corrupt record must never be used"
    assert any(str(path) in str(w.message) for w in caught), "the warning must name the file"
    assert again["result"] == rec["result"]
    assert store.load("exp", {"lr": 0.1}, 0) is not None  # rewritten and valid again


def test_failing_fn_leaves_nothing(tmp_path):
    store = Store(tmp_path)

    def boom():
        raise RuntimeError("diverged")

    with pytest.raises(RuntimeError, match="diverged"):
        store.run("exp", {"lr": 10.0}, boom, seed=0)
    assert not store.path("exp", {"lr": 10.0}, 0).exists()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_meta_fields(tmp_path):
    rec = Store(tmp_path).run("exp", {"a": 1}, Counter(), seed=7)
    assert set(rec) == {"name", "key", "params", "seed", "result", "meta", "checksum"}
    assert set(META_FIELDS) <= set(rec["meta"])
    assert {"python", "torch", "torchvision", "numpy", "kdbook"} <= set(rec["meta"]["versions"])
    assert rec["meta"]["wall_time_s"] >= 0 and rec["seed"] == 7
    assert rec["meta"]["git_rev"] == "unknown" or len(rec["meta"]["git_rev"]) == 40
    assert rec["checksum"] == record_checksum(rec)


def test_checkpoints(tmp_path):
    store = Store(tmp_path / "results")
    assert store.checkpoints_dir == tmp_path / "data" / "checkpoints"
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    path = store.save_checkpoint("net", net, {"seed": 1})
    assert path.suffix == ".safetensors" and path.exists()
    other = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    store.load_checkpoint("net", other)
    for a, b in zip(net.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    explicit = save_safetensors(net, tmp_path / "x.safetensors")
    assert set(load_safetensors(explicit)) == set(net.state_dict())
    with pytest.raises(ValueError, match="no checkpoint"):
        store.load_checkpoint("missing")


# --- escape attempts and confusions: a clear error before any work, and nothing written -------------------------

def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.mark.parametrize("name", [".", "..", ".hidden", "../x", "a/b", "", "x" * 101, "weights", "partial", 3, None])
def test_bad_names_refused_before_work(tmp_path, name):
    store, fn = Store(tmp_path / "results"), Counter()
    (tmp_path / "results").mkdir()
    before = _files(tmp_path)
    with pytest.raises(ValueError, match="store name"):
        store.run(name, {"lr": 0.1}, fn, seed=0)
    assert fn.calls == 0 and _files(tmp_path) == before


def test_param_keys_of_other_types_cannot_share_a_key(tmp_path):
    store, fn = Store(tmp_path), Counter()
    store.run("exp", {"1": "a"}, fn, seed=0)
    with pytest.raises(ValueError, match="keys must be strings"):
        store.run("exp", {1: "a"}, fn, seed=0)
    with pytest.raises(ValueError, match="keys must be strings"):
        store.run("exp", {"nested": {2.0: 1}}, fn, seed=0)
    assert fn.calls == 1


@pytest.mark.parametrize("seed", [-1, 1.0, True, "0", None, 2.5])
def test_bad_seeds_refused(tmp_path, seed):
    store, fn = Store(tmp_path), Counter()
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        store.run("exp", {}, fn, seed=seed)
    assert fn.calls == 0 and not list(tmp_path.rglob("*.json"))


def test_numpy_seed_accepted(tmp_path):
    import numpy as np
    rec = Store(tmp_path).run("exp", {}, Counter(), seed=np.int64(3))
    assert rec["seed"] == 3 and type(rec["seed"]) is int


def test_files_are_0644(tmp_path):
    store = Store(tmp_path / "results")
    store.run("exp", {}, Counter(), seed=0)
    w = store.save_weights("exp", "0123456789abcdef", torch.nn.Linear(2, 2))
    assert store.path("exp", {}, 0).stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "results" / w["path"]).stat().st_mode & 0o777 == 0o644


def test_thread_count_in_provenance(tmp_path):
    rec = Store(tmp_path).run("exp", {}, Counter(), seed=0)
    assert rec["meta"]["threads"] == torch.get_num_threads()


def test_records_skips_bad_files(tmp_path):
    store = Store(tmp_path / "results")
    good = store.run("exp", {"a": 1}, Counter(), seed=0)
    store.run("exp", {"a": 2}, Counter(), seed=0)
    store.path("exp", {"a": 2}, 0).write_text("{broken")
    (tmp_path / "results" / "exp" / "0000000000000000.json").write_text(json.dumps(good))  # wrong file name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recs = store.records()
    assert recs == [good]
    assert sum("corrupt record" in str(w.message) for w in caught) == 2


def test_summary(tmp_path):
    store, fn = Store(tmp_path, verbose=False), Counter()
    for lr in (0.1, 0.2):
        store.run("exp", {"lr": lr}, fn, seed=0)
    store.run("exp", {"lr": 0.1}, fn, seed=0)
    assert store.summary().startswith("exp: 1 reused, 2 computed (")
    assert store.summary("other") == "other: 0 reused, 0 computed (0.0 s)"


# --- dependencies -----------------------------------------------------------------------------------------------

def test_depends_stale_and_legacy(tmp_path):
    store, fn = Store(tmp_path, verbose=False), Counter()
    teacher = store.run("teacher", {"e": 1}, Counter({"acc": 0.9}), seed=0)
    student = store.run("student", {"e": 1}, fn, seed=0, depends=[teacher])
    assert student["meta"]["depends"] == {f"teacher/{teacher['key']}": teacher["checksum"]}
    assert store.run("student", {"e": 1}, fn, seed=0, depends=[teacher]) == student and fn.calls == 1
    # the teacher is retrained (another result, another checksum): the student is stale and recomputed
    teacher2 = store.run("teacher", {"e": 1}, Counter({"acc": 0.8}), seed=0, force=True)
    with pytest.warns(UserWarning, match=f"stale.*teacher/{teacher['key']}"):
        student2 = store.run("student", {"e": 1}, fn, seed=0, depends=[teacher2])
    assert fn.calls == 2 and student2["meta"]["depends"][f"teacher/{teacher['key']}"] == teacher2["checksum"]
    # a record written without dependencies: returned, flagged, counted
    legacy = store.run("old", {"e": 1}, fn, seed=0)
    with pytest.warns(UserWarning, match="no recorded dependencies"):
        got = store.run("old", {"e": 1}, fn, seed=0, depends=[teacher2])
    assert fn.calls == 3 and got["meta"]["unverified_depends"] is True and got["result"] == legacy["result"]
    assert "1 legacy" in store.summary("old")
    with pytest.raises(ValueError, match="depends= must be a list of store records"):
        store.run("x", {}, fn, seed=0, depends=["teacher"])


# --- weights ----------------------------------------------------------------------------------------------------

def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))


def test_weights_roundtrip_float16(tmp_path):
    store, net = Store(tmp_path / "results"), _net()
    info = store.save_weights("t", "0123456789abcdef", net)
    assert info["path"] == "weights/t/0123456789abcdef.safetensors" and info["dtype"] == "float16"
    path = tmp_path / "results" / info["path"]
    assert info["bytes"] == path.stat().st_size and len(info["sha256"]) == 64
    other = store.load_weights("t", "0123456789abcdef", _net().double(), info["sha256"])
    assert other[0].weight.dtype == torch.float64
    assert torch.equal(other[0].weight, net[0].weight.half().double())
    assert torch.equal(other[1].num_batches_tracked, net[1].num_batches_tracked)
    assert not list(path.parent.glob("*.tmp"))


@pytest.mark.parametrize("damage", ["missing", "flip", "truncate", "sha", "other_model"])
def test_weights_damage_detected(tmp_path, damage):
    from kdbook.store import WeightsError
    store = Store(tmp_path / "results")
    info = store.save_weights("t", "0123456789abcdef", _net())
    path, sha, model = tmp_path / "results" / info["path"], info["sha256"], _net()
    if damage == "missing":
        path.unlink()
    elif damage == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "sha":
        sha = "0" * 64
    elif damage == "other_model":
        model = torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(WeightsError, match=str(path).replace(".", r"\.")):
        store.load_weights("t", "0123456789abcdef", model, sha)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "nothing may be loaded"


def test_run_model_reuses_stored_weights_and_retrains_missing(tmp_path):
    store, calls = Store(tmp_path / "results", verbose=False), []

    def train(model):
        calls.append(1)
        with torch.no_grad():
            model[0].weight.mul_(1.001)  # values that float16 rounds
        return {"acc": 0.5}

    rec, model = store.run_model("t", {"e": 1}, 0, _net, train)
    rec2, model2 = store.run_model("t", {"e": 1}, 0, _net, train)
    assert len(calls) == 1 and rec2 == rec
    assert torch.equal(model[0].weight, model2[0].weight), "the fresh model must carry the stored 16-bit weights"
    assert model[0].weight.dtype == torch.float32
    assert store.run_model("t", {"e": 1}, 0, _net, train, need_model=False) == (rec, None)
    student = store.run("s", {"e": 1}, Counter(), seed=0, depends=[rec])
    path = tmp_path / "results" / rec["result"]["weights"]["path"]
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)  # corrupt: detected, retrained
    with pytest.warns(UserWarning, match="do not match"):
        rec3, model3 = store.run_model("t", {"e": 1}, 0, _net, train)
    assert len(calls) == 2 and rec3["checksum"] != rec["checksum"]  # created differs
    assert torch.equal(model3[0].weight, model[0].weight)  # deterministic on CPU
    with pytest.warns(UserWarning, match="stale"):
        store.run("s", {"e": 1}, Counter(), seed=0, depends=[rec3])
    assert student is not None


def test_resume_path(tmp_path):
    store = Store(tmp_path / "results")
    p = store.resume_path("exp", {"lr": 0.1}, 3)
    assert p == tmp_path / "data" / "checkpoints" / "partial" / f"exp-{run_key('exp', {'lr': 0.1}, 3)}.pt"
    with pytest.raises(ValueError, match="store name"):
        store.resume_path("..", {}, 0)


def test_legacy_record_older_than_its_dependency_is_stale(tmp_path):
    store, fn = Store(tmp_path, verbose=False), Counter()
    old_student = store.run("student", {"e": 1}, fn, seed=0)  # written before dependencies were recorded
    teacher = store.run("teacher", {"e": 1}, Counter({"acc": 0.9}), seed=0)  # the teacher was (re)trained later
    with pytest.warns(UserWarning, match="stale: it has no recorded dependencies and teacher/"):
        new = store.run("student", {"e": 1}, fn, seed=0, depends=[teacher])
    assert fn.calls == 2 and new["meta"]["depends"] and new["checksum"] != old_student["checksum"]
    assert "1 stale" in store.summary("student")


def test_weights_outside_float16_range_refused(tmp_path):
    store, net = Store(tmp_path / "results"), torch.nn.Linear(2, 2)
    with torch.no_grad():
        net.weight[0, 0] = 1e6
    with pytest.raises(ValueError, match="not finite in float16"):
        store.save_weights("t", "0123456789abcdef", net)
    assert not list((tmp_path / "results").rglob("*.safetensors"))


def test_committed_results_stay_within_their_size_budgets():
    """The committed store travels with every checkout (to Colab, to a borrowed GPU machine): stored weights stay
    within the book's budget of about 40 MB, and no single file of the store exceeds 16 MB (what one slice of
    `make gpu` can bring back, and what plain git handles well)."""
    from pathlib import Path
    results = Path(__file__).resolve().parents[1] / "results"
    weights = sum(p.stat().st_size for p in (results / "weights").rglob("*") if p.is_file())
    assert weights <= 40 * 10**6, f"stored weights take {weights / 1e6:.1f} MB, over the 40 MB budget"
    big = [f"{p.relative_to(results)}: {p.stat().st_size / 1e6:.1f} MB" for p in results.rglob("*")
           if p.is_file() and p.stat().st_size > 16 * 2**20]
    assert not big, f"files of the store over 16 MiB: {big}"


# --- messages stay out of rendered pages; input errors name the fix; concurrent writers; number types ---------------

def test_quiet_by_default_but_logged_and_warnings_stay(tmp_path, capsys, caplog):
    import logging
    store, fn = Store(tmp_path), Counter()
    with caplog.at_level(logging.INFO, logger="kdbook.store"):
        rec = store.run("exp", {"lr": 0.1}, fn, seed=0)
        store.run("exp", {"lr": 0.1}, fn, seed=0)
    assert capsys.readouterr().out == "", "a chapter's output must not carry the store's progress lines"
    assert f"store: reused exp {rec['key']}" in caplog.text
    store.path("exp", {"lr": 0.1}, 0).write_text("{broken")
    with pytest.warns(UserWarning, match="local copy is damaged"):
        store.run("exp", {"lr": 0.1}, fn, seed=0)


def test_depends_given_a_string_or_a_single_record(tmp_path):
    store, fn = Store(tmp_path), Counter()
    teacher = store.run("t", {"e": 1}, Counter(), seed=0)
    for bad, says in [("t/0123456789abcdef", "got a str"), (teacher, "a single record"), ([teacher["key"]], "not their keys")]:
        with pytest.raises(ValueError, match="depends=") as err:
            store.run("s", {"e": 1}, fn, seed=0, depends=bad)
        assert says in str(err.value) and "depends=[teacher_record]" in str(err.value) or says == "not their keys"
    assert fn.calls == 0 and not (tmp_path / "s").exists()


def test_folder_where_the_record_belongs_is_refused_before_work(tmp_path):
    store, fn = Store(tmp_path), Counter()
    store.path("exp", {"lr": 0.1}, 0).mkdir(parents=True)
    with pytest.raises(IsADirectoryError, match="is a folder.*move or delete"):
        store.run("exp", {"lr": 0.1}, fn, seed=0)
    assert fn.calls == 0
    with pytest.warns(UserWarning, match="is a folder"):
        assert store.records() == []


def test_read_only_store_refused_before_fn_but_still_read(tmp_path, monkeypatch):
    import os
    import kdbook.store as ks
    store, fn = Store(tmp_path / "results"), Counter()
    rec = store.run("exp", {"lr": 0.1}, fn, seed=0)
    for folder in (tmp_path / "results", tmp_path / "results" / "exp"):
        os.chmod(folder, 0o555)
    try:
        if os.access(tmp_path / "results" / "exp", os.W_OK):  # root ignores permissions: a read-only mount instead
            def read_only(path):
                raise OSError(30, "Read-only file system", str(path))
            monkeypatch.setattr(ks, "_flock", read_only)
        assert store.run("exp", {"lr": 0.1}, fn, seed=0) == rec  # a valid record is still served
        with pytest.raises(PermissionError, match="not writable.*nothing was computed"):
            store.run("exp", {"lr": 0.2}, fn, seed=0)
        assert fn.calls == 1, "fn() must not run when its result cannot be stored"
    finally:
        for folder in (tmp_path / "results", tmp_path / "results" / "exp"):
            os.chmod(folder, 0o755)


def test_int_and_float_parameters_are_one_run(tmp_path):
    from kdbook.store import numeric_form
    store, fn = Store(tmp_path), Counter()
    rec = store.run("exp", {"tau": 4.0, "epochs": 3}, fn, seed=0)
    again = store.run("exp", {"tau": 4, "epochs": 3.0}, fn, seed=0)  # e.g. papermill -p tau 4
    assert fn.calls == 1 and again == rec
    assert store.load("exp", {"tau": 4, "epochs": 3}, 0) == rec
    forced = store.run("exp", {"tau": 4, "epochs": 3}, fn, seed=0, force=True)  # replaces the record, same key
    assert forced["key"] == rec["key"] and forced["params"] == rec["params"] and len(list(tmp_path.glob("exp/*.json"))) == 1
    store.run("exp", {"tau": 4.5, "epochs": 3}, fn, seed=0)  # another value is another run
    store.run("exp", {"tau": True, "epochs": 3}, fn, seed=0)  # a bool is not the number 1
    assert fn.calls == 4
    assert numeric_form({"a": [1.0, 2.5, True], "b": -0.0}) == {"a": [1, 2.5, True], "b": 0}


def test_committed_records_keep_their_keys():
    from pathlib import Path
    store = Store(Path(__file__).resolve().parents[1] / "results")
    records = store.records()
    assert records, "the committed store has records"
    assert all(run_key(r["name"], r["params"], r["seed"]) == r["key"] for r in records)


_WRITER = """
import sys, time, torch
from kdbook.store import Store
root, tag, start, force = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
store = Store(root)
def build():
    torch.manual_seed(0)
    return torch.nn.Linear(2, 2)
def train(model):
    with open(root + "/trainings.txt", "a") as f:
        f.write(f"{tag}\\n")
    time.sleep(1.0)  # both processes are inside compute-or-reuse at once
    with torch.no_grad():
        model.weight.fill_(tag)
    return {"tag": tag}
while time.time() < start:
    time.sleep(0.005)
rec, model = store.run_model("t", {"e": 1}, 0, build, train, force=force)
assert model.weight[0, 0].item() == rec["result"]["tag"], "a record paired with another run's weights"
print(rec["result"]["tag"])
"""


@pytest.mark.parametrize("force", [False, True])
def test_two_processes_writing_one_key(tmp_path, force):
    "Two real processes run the same key at once: one trains, the other reuses its record and weights (or, forced, both train in turn)."
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    start = time.time() + 4.0
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), str(tag), str(start), str(int(force))],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for tag in (1.0, 2.0)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    trainings = (tmp_path / "trainings.txt").read_text().split()
    assert len(trainings) == (2 if force else 1), trainings
    store = Store(tmp_path)
    rec, model = store.run_model("t", {"e": 1}, 0, lambda: torch.nn.Linear(2, 2), lambda m: {"tag": -1.0})
    assert model.weight[0, 0].item() == rec["result"]["tag"] and rec["result"]["tag"] in (1.0, 2.0)
    if not force:  # both processes got the one training's record
        assert {float(o[0].strip()) for o in outs} == {rec["result"]["tag"]}
    assert not list(tmp_path.rglob("*.lock")) and not list(tmp_path.rglob("*.tmp"))


def test_fn_that_is_not_a_function_is_refused_before_anything_is_written(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(ValueError, match="fn must be a function returning the result dict, got NoneType"):
        store.run("exp", {"lr": 0.1}, None, seed=0)
    assert not (tmp_path / "exp").exists()
