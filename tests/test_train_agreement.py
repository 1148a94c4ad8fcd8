"""§6.1's readers of the stored students: record selection, grouping keys and the refusal of groups that mix
experiments (the cases moved out of chapters/61_train_agreement)."""
import copy

import pytest

from kdbook.experiments.train_agreement import gpu_plan, group, policies_key, recycling_key, select, synthetic_key


def _records():
    return [{"meta": {"profile": p, "created": c}, "params": {"recipe": {"epochs": e, "policy": pol}, "policy": pol},
             "result": ({"train_agreement": v} if v is not None else {})}
            for p, c, e, pol, v in [("smoke", "2", 1, "rotation", 80.0), ("smoke", "1", 1, "baseline", 99.0),
                                    ("quick", "3", 1, "baseline", 97.0), ("smoke", "4", 2, "baseline", 50.0),
                                    ("smoke", "5", 1, "rotation", None)]]


def test_select_keeps_the_profile_and_recipe_oldest_first():
    recs = _records()
    sel = select(recs, "smoke", {"epochs": 1, "policy": "baseline"})
    assert [r["meta"]["created"] for r in sel] == ["1", "2", "5"]  # the profile, the recipe (policy aside), oldest first
    recs[1]["params"]["test"] = {"n": 50}  # an older record measured on another test set
    assert [r["meta"]["created"] for r in select(recs, "smoke", {"epochs": 1})] == ["2", "5"]


def test_keys_and_group():
    assert synthetic_key({"params": {"teachers": ["a", "b", "c"], "synthetic": {"size": 64}, "train": {"n": 128}}}) == (3, 0.5)
    assert recycling_key(4.0)({"params": {"distill_set": "D1", "teachers": ["a"], "tau": 1.0}}) is None
    assert policies_key({"params": {"role": "s-prime", "policy": "baseline", "teachers": ["a"]}}) is None
    assert policies_key({"params": {"role": "student", "policy": "combined", "teachers": ["a"]}}) == ("combined", 1)
    sel = select(_records(), "smoke", {"epochs": 1, "policy": "baseline"})
    assert group(sel, lambda r: r["params"]["policy"]) == ({"baseline": [99.0], "rotation": [80.0]}, 1)
    assert group(sel, lambda r: None)[0] == {}
    assert [it.seconds for it in gpu_plan("quick")] == [15.0]


_BASE = {"meta": {"profile": "quick", "created": "1"}, "seed": 0, "result": {"train_agreement": 99.0},
         "params": {"teachers": ["t0"], "tau": 4.0, "synthetic": {"source": "sn-gan", "key": "g1", "size": 64},
                    "train": {"n": 128, "fingerprint": "a"}, "test": {"n": 100, "fingerprint": "b"}}}


def _variant(**change):
    r = copy.deepcopy(_BASE)
    r["seed"] = 1
    r["params"].update(change)
    return r


@pytest.mark.parametrize("other,field", [
    (_variant(tau=1.0), "tau"),
    (_variant(synthetic={"source": "mixup-standin", "key": "s", "size": 64}), "synthetic source"),
    (_variant(train={"n": 128, "fingerprint": "c"}), "training data"),
    (_variant(split={"seed": 1}), "split"),
    (_variant(test={"n": 100, "fingerprint": "d"}), "test data"),
])
def test_a_group_that_mixes_experiments_is_refused(other, field):
    "Two records that differ in only one of the context fields are not trials of one experiment."
    with pytest.raises(ValueError, match=field):
        group([_BASE, other], synthetic_key)


def test_teachers_must_be_one_or_one_per_trial():
    same_seed = _variant(teachers=["t9"])
    same_seed["seed"] = 0
    with pytest.raises(ValueError, match="teacher keys"):
        group([_BASE, same_seed], synthetic_key)
    rotated = _variant(teachers=["t1"])  # the next trial: another seed, another teacher
    assert group([_BASE, rotated], synthetic_key)[0] == {(1, 0.5): [99.0, 99.0]}
