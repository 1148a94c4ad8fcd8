"Checks of the Appendix B and C chapters' modules (kdbook.experiments.ensembles, kdbook.experiments.capacity): networks, settings, student packs through the store, GPU plans."
from dataclasses import replace

import pytest
import torch

from kdbook.experiments.capacity import C_SETUP, c_conditions, c_setup, enlarged, gpu_plan as c_plan, paired_gain
from kdbook.data import ImageSet
from kdbook.experiments.ensembles import (B_SETUP, BC_NAME, Net, b_points, b_setup, bc_students, cost_as, gpu_plan as b_plan,
                              values, vgg16_scaled)
from kdbook.models import count_params, vgg16
from kdbook.store import Store
from kdbook.train import make_model
from kdbook.experiments.synthetic import STUDENT_NAME, Recipe, zoo_item, zoo_teachers


def test_net_builds_the_papers_networks():
    a = Net(arch="vgg16", width=64, batch_norm=False).build(5, 100)
    b = make_model("vgg16", 5, num_classes=100)
    assert count_params(a) == count_params(vgg16()) == 15_291_300
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert count_params(Net(arch="preresnet", depth=38).build(0, 100)) > count_params(Net(arch="resnet20").build(0, 100))
    assert Net(arch="resnet56", epochs=7).to_dict() == Recipe(arch="resnet56", epochs=7).to_dict()
    assert count_params(vgg16_scaled(10, width=8)) < count_params(vgg16_scaled(10, width=16))
    for bad, msg in ((dict(arch="vgg11"), "unknown architecture"), (dict(arch="preresnet", depth=0), "needs depth"),
                     (dict(arch="resnet20", batch_norm=False), "vgg16' only"), (dict(arch="resnet20", epochs=0), "epochs")):
        with pytest.raises(ValueError, match=msg):
            Net(**bad)


def test_settings_fill_none_only():
    assert b_setup("quick", n_trials=None)["n_trials"] == B_SETUP["quick"]["n_trials"]
    for k, v in (("n_trials", 0), ("n_train", 0), ("n_trials", False), ("taus", [])):
        with pytest.raises(ValueError, match=k):
            b_setup("quick", **{k: v})
    with pytest.raises(ValueError, match="unknown parameter of Appendix B: tau"):
        b_setup("quick", tau=4)
    assert len(b_points(b_setup("quick"))) == len(set(b_points(b_setup("quick"))))
    assert c_setup("smoke", alphas=[0, 0.25])["alphas"] == (0.0, 0.25)
    with pytest.raises(ValueError, match="include 0"):
        c_setup("smoke", alphas=[0.25])


def test_enlarged_students_keep_the_schedule():
    base = B_SETUP["quick"]["student"]
    deep, wide = enlarged(base, "depth", 2), enlarged(base, "width", 2)
    assert (deep.depth, wide.width) == (38, 32)
    assert replace(deep, arch="resnet20", depth=0) == base and replace(wide, width=16) == base
    with pytest.raises(ValueError, match="factor"):
        enlarged(base, "depth", 0)


def test_students_pack_and_are_read_back(tmp_path):
    g = torch.Generator().manual_seed(1)
    data = ImageSet(torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(40) % 4,
                    list("abcd"), "toy", "random pixels")
    net = Net(arch="resnet20", width=2, epochs=1, batch_size=16, lr=0.05, lr_min=1e-6)
    store = Store(tmp_path, verbose=False)
    teachers = zoo_teachers(store, [0, 1], data, data, net, device="cpu")
    recs = bc_students(store, teachers, data, data, net, [5, 6], tau=2.0, alpha=0.5, device="cpu")
    assert [r["result"]["trained"] for r in recs] == ["packed with 2, same batches"] * 2
    assert {r["params"]["alpha"] for r in recs} == {0.5} and recs[0]["params"]["teachers"] == [r["key"] for r, _ in teachers]
    again = bc_students(store, teachers, data, data, net, [5, 6], tau=2.0, alpha=0.5, device="cpu")
    assert [r["checksum"] for r in again] == [r["checksum"] for r in recs]  # nothing retrained
    assert len(list((tmp_path / BC_NAME).glob("*.json"))) == 2
    assert all(0 <= v <= 100 for v in values(recs, "test_agreement"))
    with pytest.raises(ValueError, match="same trials"):
        paired_gain(recs, recs[::-1], "test_agreement")
    plain = bc_students(store, teachers, data, data, net, [5, 6], tau=2.0, device="cpu")  # α = 0: §4.2's students
    assert {r["name"] for r in plain} == {STUDENT_NAME} and paired_gain(plain, recs, "test_acc")


def test_plans_follow_the_chapters_tables(monkeypatch):
    base = sum(it.seconds for it in b_plan("quick"))
    monkeypatch.setitem(B_SETUP, "quick", {**B_SETUP["quick"], "n_train": 2 * B_SETUP["quick"]["n_train"]})
    assert sum(it.seconds for it in b_plan("quick")) > 1.8 * base - 60  # (start-up does not scale)
    monkeypatch.undo()
    c_base = sum(it.seconds for it in c_plan("quick"))
    monkeypatch.setitem(C_SETUP, "quick", {**C_SETUP["quick"], "alphas": (0.0, 0.5, 0.9)})
    assert sum(it.seconds for it in c_plan("quick")) > c_base


def test_quick_shares_the_zoo_of_section_4_2():
    from kdbook.experiments.synthetic import gpu_plan as zoo_plan
    zoo_keys = {it.key for it in zoo_plan("quick") if it.key is not None}
    b_items = b_plan("quick")
    assert {zoo_item("x", "quick", s).key for s in range(3)} <= {it.key for it in b_items} & zoo_keys
    from kdbook.experiments.synthetic import baseline_items
    assert baseline_items("x", "quick", 3)[0].key in {it.key for it in b_items} & zoo_keys  # §4.2's +0 ensemble students
    assert not {it.key for it in b_plan("paper") if it.key} & {it.key for it in zoo_plan("paper") if it.key}  # paper: nothing is §4.2's


def test_appendix_c_reuses_appendix_b():
    from kdbook.costs import project
    b_keys = {it.key for it in b_plan("quick")}
    shared = [it for it in c_plan("quick") if it.key is not None and it.key in b_keys]
    assert any(it.key[0] == "zoo-teacher" for it in shared) and len(shared) >= 4  # 3 teachers + the m = 3, τ = 4 group
    both = project(b_plan("quick") + c_plan("quick"))
    assert both["c1_capacity"] < project(c_plan("quick"))["c1_capacity"]
    assert both["b1_ensemble_size"] <= 8 and both["c1_capacity"] <= 8
    assert all(cost_as(s) for _, s, t, *_ in c_conditions(c_setup("paper")))
