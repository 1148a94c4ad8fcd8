"""Chapters §5.1 (kdbook.experiments.policies), §5.2 (kdbook.experiments.recycling) and §6.1 (kdbook.experiments.train_agreement): the D0/D1 split,
the policy runs, bad input refused before the store is touched, and students stored and read back.
CPU only, tiny networks, a few seconds."""
from __future__ import annotations

import pytest
import torch

from kdbook.augment import augment
from kdbook.data import ImageSet
from kdbook.experiments.policies import (APPENDED_RATIOS, POLICY_RUNS, POOL_POLICIES, S51_NAME, PoolSampler, check_policies,
                             distill_students, policy_options, policy_params, policy_recipe, student_images)
from kdbook.experiments.recycling import DISTILL_SETS, S52_NAME, check_fraction, recycling_params, recycling_sets, recycling_split
from kdbook.store import Store
from kdbook.train import make_model
from kdbook.experiments.train_agreement import CONTEXT_FIELDS, group, policies_key, recycling_key, select, synthetic_key
from kdbook.experiments.synthetic import Recipe, check_ensemble_size, zoo_ensemble

TINY = Recipe(arch="resnet20", width=2, epochs=1, batch_size=8, lr=0.05, lr_min=1e-6, amp=False)


def _set(n=24, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(n) % classes,
                    [str(c) for c in range(classes)], "tiny", "random")


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.fixture
def store_and_teachers(tmp_path):
    store = Store(tmp_path / "results", verbose=False, profile="smoke")
    teachers = [(store.run("zoo-teacher", {"tiny": i}, lambda: {"note": "random"}, i),
                 make_model("resnet20", i, num_classes=3, width=2).eval()) for i in range(2)]
    return store, teachers


# --- §5.2: the D0/D1 split ------------------------------------------------------------------------------------

def test_split_disjoint_covering_balanced_deterministic():
    labels = torch.arange(5000) % 100  # CIFAR-100's shape at a tenth of its size: 50 per class
    d0, d1 = recycling_split(labels, seed=0)
    assert not set(d0.tolist()) & set(d1.tolist())
    assert torch.equal(torch.cat([d0, d1]).sort().values, torch.arange(5000))
    assert torch.equal(torch.bincount(labels[d0], minlength=100), torch.full((100,), 25))
    assert all(torch.equal(a, b) for a, b in zip(recycling_split(labels, seed=0), (d0, d1)))
    assert not torch.equal(recycling_split(labels, seed=1)[0], d0)


def test_split_other_fractions_stay_within_one_per_class():
    labels = torch.randint(0, 7, (301,), generator=torch.Generator().manual_seed(0))
    for fraction in (0.1, 0.37, 0.5, 0.9):
        d0, d1 = recycling_split(labels, 5, fraction)
        assert len(d0) == round(fraction * 301) and len(d0) + len(d1) == 301
        per = torch.bincount(labels[d0], minlength=7).double() - fraction * torch.bincount(labels, minlength=7).double()
        assert (per.abs() < 1).all()


@pytest.mark.parametrize("bad", [0, 0.0, 1, 1.0, -0.5, 2, float("nan"), float("inf"), True, None, "0.5"])
def test_fraction_outside_open_interval_is_refused(bad):
    with pytest.raises(ValueError, match=r"fraction must be (a real number |a finite number )?in \(0, 1\)"):
        check_fraction(bad)
    with pytest.raises(ValueError, match=r"fraction must be (a real number |a finite number )?in \(0, 1\)"):
        recycling_sets(_set(), 0, bad)


def test_students_never_see_true_labels():
    sets = recycling_sets(_set(30), seed=0)
    assert (sets["teacher"].labels >= 0).all()
    assert all((sets[k].labels == -1).all() for k in DISTILL_SETS)
    assert len(sets["D0+D1"]) == 30 and len(sets["D0"]) + len(sets["D1"]) == 30


# --- §5.1: the policies -------------------------------------------------------------------------------------

def test_policy_runs_cover_figure_3():
    assert [label for _, _, label in POLICY_RUNS.values()] == [
        "Baseline (τ = 1)", "Baseline (τ = 4)", "Rotation", "Vertical flip", "Color jitter", "Combined", "MixUp", "GAN",
        "Noise", "OOD"]
    assert policy_recipe(TINY, "gan").policy == "synthetic" and policy_recipe(TINY, "ood").policy == "ood"


def test_unknown_policy_is_refused_before_the_store_is_touched(tmp_path, store_and_teachers):
    store, teachers = store_and_teachers
    before = _files(store.root)
    for bad in (["cutout"], [], ["noise", "noise"]):
        with pytest.raises(ValueError, match="unknown augmentation policy|non-empty|repeat"):
            check_policies(bad)
    with pytest.raises(ValueError, match="unknown augmentation policy 'blur'"):
        policy_params("blur", teachers, TINY, _set(), _set())
    with pytest.raises(ValueError, match="appends images from a pool"):
        policy_params("ood", teachers, TINY, _set(), _set())
    with pytest.raises(ValueError, match="needs pools\\['gan'\\]"):
        policy_options("gan", {}, "cpu")
    assert _files(store.root) == before


def test_ensemble_size_the_zoo_lacks_is_refused():
    for bad in (2, 4, 6, 0, True):
        with pytest.raises(ValueError, match="unknown ensemble size"):
            check_ensemble_size(bad, 10)
    with pytest.raises(ValueError, match="only 3 were given"):
        zoo_ensemble([("r", "m")] * 3, 5)


def test_pool_policies_append_their_share():
    "GAN: one synthetic image per four real ones (the paper's 1:4); OOD: one per five (10,000 appended to 50,000)."
    pool = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    for name, appended in (("gan", 5), ("ood", 4)):
        out = augment(torch.zeros(20, 3, 32, 32), POLICY_RUNS[name][0], torch.Generator().manual_seed(0),
                      **policy_options(name, {name: pool}, "cpu"))
        assert out.shape == (20 + appended, 3, 32, 32)
    assert set(POOL_POLICIES) == set(APPENDED_RATIOS) and APPENDED_RATIOS["ood"] == pytest.approx(10000 / 50000)
    s = PoolSampler(pool)
    assert torch.equal(s(4, torch.Generator().manual_seed(2)), s(4, torch.Generator().manual_seed(2)))
    assert student_images(["baseline", "ood", "gan"], 1, 1, 100) == 100 + 120 + 125


@pytest.mark.parametrize("module", ["policies", "recycling"])
def test_profile_defaults_keep_zero_and_false(module):
    "A parameter given as 0 or False is used as given; only None takes the profile's value (no `x or default`)."
    import importlib
    m = importlib.import_module(f"kdbook.experiments.{module}")
    for profile in ("smoke", "quick", "paper"):
        default = m.profile_params(profile)
        assert default == m.profile_params(profile, **{k: None for k in default})
        assert m.profile_params(profile, n_trials=0)["n_trials"] == 0
        assert m.profile_params(profile, pack_students=False)["pack_students"] is False
        assert m.profile_params(profile, pack_students=True)["pack_students"] is True
    with pytest.raises(ValueError, match="unknown parameter"):
        m.profile_params("quick", seeed=1)
    with pytest.raises(ValueError, match="unknown profile"):
        m.profile_params("fast")


def test_policy_and_recycling_plans_follow_their_tables(monkeypatch):
    "The GPU plans read the chapters' own tables: more trials in the table, more planned seconds."
    import kdbook.experiments.policies as policies
    import kdbook.experiments.recycling as recycling
    for m in (policies, recycling):
        base = sum(it.seconds for it in m.gpu_plan("quick"))
        assert m.gpu_plan("quick")[0].what == "chapter start"
        monkeypatch.setitem(m.PROFILE_SIZES, "quick", m.PROFILE_SIZES["quick"] | {"n_trials": 4})
        assert sum(it.seconds for it in m.gpu_plan("quick")) > base
    shared = [it.key for it in policies.gpu_plan("quick") if it.key]  # zoo teachers + §4.2's Baseline students
    assert len(shared) == len(set(shared)) == 2 * policies.PROFILE_SIZES["quick"]["ensemble_size"] + 2


def test_pool_policy_students_pack_on_shared_batches(store_and_teachers):
    "Two OOD-policy students trained together: one batch stream (the first seed's), both records stored."
    store, teachers = store_and_teachers
    data, pool = _set(), torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    params = policy_params("ood", teachers[:1], TINY, data, data, pool={"source": "random", "key": "p", "n": 6})
    recs = distill_students(store, S51_NAME, params, teachers[:1], data, data, policy_recipe(TINY, "ood"), [1, 2],
                            policy_options("ood", {"ood": pool}, "cpu"), device="cpu", packed=True)
    assert [r["result"]["trained"] for r in recs] == ["packed with 2 on the batches of seed 1"] * 2
    assert recs[0]["result"]["history"]["same_batches"] is True


def test_students_stored_and_read_back(store_and_teachers):
    store, teachers = store_and_teachers
    data = _set()
    params = policy_params("rotation", teachers[:1], TINY, data, data, controls=[teachers[1:]])
    first = distill_students(store, S51_NAME, params, teachers[:1], data, data, policy_recipe(TINY, "rotation"),
                             [1, 2], controls=[teachers[1:]], device="cpu", packed=True)
    again = distill_students(store, S51_NAME, params, teachers[:1], data, data, policy_recipe(TINY, "rotation"),
                             [1, 2], controls=[teachers[1:]], device="cpu", packed=False)
    assert [r["meta"]["created"] for r in again] == [r["meta"]["created"] for r in first]  # not retrained
    res = first[0]["result"]
    assert 0 <= res["train_agreement"] <= 100 and 0 <= res["test_agreement"] <= 100 and res["test_kl"] >= 0
    assert first[0]["params"]["role"] == "student" and len(res["controls"]) == 1
    # §6.1 reads them back
    recs = select(store.records(S51_NAME), "smoke", TINY.to_dict())
    values, missing = group(recs, policies_key)
    assert values == {("rotation", 1): [r["result"]["train_agreement"] for r in first]} and missing == 0


def test_recycling_students_keyed_by_their_set(store_and_teachers):
    store, teachers = store_and_teachers
    sets = recycling_sets(_set(24), seed=0)
    keys = set()
    for name in DISTILL_SETS:
        p = recycling_params(name, teachers[:1], TINY, sets[name], _set(), 4.0, {"seed": 0, "fraction": 0.5})
        keys.add(store.key(S52_NAME, p, 0))
    assert len(keys) == 3
    with pytest.raises(ValueError, match="unknown distillation set"):
        recycling_params("D2", teachers[:1], TINY, sets["D0"], _set(), 4.0, {})


def test_train_agreement_keys_and_pending_records():
    recs = [{"meta": {"profile": "smoke", "created": "1"}, "result": {},
             "params": {"recipe": {}, "distill_set": "D1", "teachers": ["a", "b", "c"], "tau": 4.0}}]
    assert group(select(recs, "smoke"), recycling_key(4.0)) == ({}, 1)  # no train agreement yet: pending, not replaced
    assert recycling_key(1.0)(recs[0]) is None
    assert synthetic_key({"params": {"teachers": ["a"], "synthetic": {"size": 0}, "train": {"n": 10}}}) == (1, 0.0)
    assert select(recs, "quick") == []



def _fig5_record(seed=0, **change):
    params = {"teachers": ["t0"], "tau": 4.0, "synthetic": {"source": "sn-gan", "key": "g1", "size": 64},
              "train": {"n": 128, "fingerprint": "a"}, "test": {"n": 100, "fingerprint": "b"},
              "recipe": {}, "distill_set": "D0", "split": {"seed": 0, "fraction": 0.5}}
    params.update(change)
    return {"meta": {"profile": "quick", "created": str(seed)}, "seed": seed, "params": params,
            "result": {"train_agreement": 95.0}}


@pytest.mark.parametrize("field, change", [
    ("synthetic source", {"synthetic": {"source": "mixup-standin", "key": "seed 200", "size": 64}}),
    ("tau", {"tau": 1.0}),
    ("split", {"split": {"seed": 1, "fraction": 0.5}}),
    ("training data", {"train": {"n": 128, "fingerprint": "other"}}),
    ("test data", {"test": {"n": 100, "fingerprint": "other"}})])
def test_figure5_groups_refuse_records_that_differ_in_one_field(field, change):
    assert field in CONTEXT_FIELDS
    for key in (synthetic_key, recycling_key(4.0) if field != "tau" else (lambda r: ("D0", 1))):
        with pytest.raises(ValueError, match=field):
            group([_fig5_record(0), _fig5_record(1, **change)], key)


def test_figure5_groups_refuse_mixed_teachers_but_accept_rotated_trials():
    with pytest.raises(ValueError, match="teacher keys"):  # same seed, another teacher: two experiments
        group([_fig5_record(0), _fig5_record(0, teachers=["t9"])], synthetic_key)
    values, _ = group([_fig5_record(0), _fig5_record(1, teachers=["t1"])], synthetic_key)  # trial i <- teacher i
    assert values == {(1, 0.5): [95.0, 95.0]}

class _Stop(Exception):
    pass


def test_pool_policy_student_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    "A GAN-policy student stopped after one of two epochs (end of a GPU slice) resumes to the uninterrupted result."
    from dataclasses import replace

    import kdbook.experiments.policies
    from kdbook.train import distill
    data, recipe = _set(), replace(policy_recipe(TINY, "gan"), epochs=2)
    ran = []  # epochs distill_students ran, per run

    def counting(*args, **kw):
        ran.append([])
        return distill(*args, **kw, callback=lambda epoch, history: ran[-1].append(epoch))

    monkeypatch.setattr(kdbook.experiments.policies, "distill", counting)
    results = []
    for interrupted in (False, True):
        store = Store(tmp_path / f"r{interrupted}", checkpoints_dir=tmp_path / f"c{interrupted}", verbose=False,
                      profile="smoke")
        teachers = [(store.run("zoo-teacher", {"tiny": 0}, lambda: {"note": "random"}, 0),
                     make_model("resnet20", 0, num_classes=3, width=2).eval())]
        params = policy_params("gan", teachers, TINY, data, data, pool={"source": "random", "key": "k", "n": 24})
        kw = policy_options("gan", {"gan": data.images}, "cpu")
        if interrupted:
            def stop(epoch, history):
                if epoch == 1:
                    raise _Stop()
            resume = store.resume_path(S51_NAME, params, 7)
            with pytest.raises(_Stop):
                distill(recipe.build(7, 3), [m for _, m in teachers], data, data, recipe.config("cpu", checkpoint_every=1),
                        7, tau=4.0, checkpoint=resume, augment_kw=kw, callback=stop)
            assert resume.exists()
        rec = distill_students(store, S51_NAME, params, teachers, data, data, recipe, [7], kw, device="cpu")[0]
        assert not store.resume_path(S51_NAME, params, 7).exists()  # removed once the record is stored
        results.append(rec["result"])
    assert ran == [[1, 2], [2]]  # the second student resumed after its first epoch
    for key in ("test_acc", "test_agreement", "test_kl", "train_agreement", "train_kd_loss"):
        assert results[0][key] == results[1][key], key
