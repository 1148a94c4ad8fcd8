"Checks of kdbook.costs (chapters/a3e_costs.ipynb): unit costs from the stored benchmark, the projection of the quick edition (<= 30 GPU-minutes, <= 8 per chapter), a plan for every owed chapter, and plans that read the chapters' own profile tables."
from pathlib import Path

import pytest

from kdbook.costs import (CAPTURE_S, START_S, Item, chapter_specs, eval_s, gan_s, load_plan, owed, plans, project,
                          student_s, teacher_fit_s, toc_order, unit_costs)

ROOT = Path(__file__).resolve().parents[1]
TOTAL_MIN, CHAPTER_MIN = 30.0, 8.0  # the quick edition's budget on one H100


def test_unit_costs_fit_the_benchmark():
    u = unit_costs(ROOT)
    assert all(abs(e) < 0.01 for e in u["check"].values()), u["check"]  # y = S + 5T/k on every same-batch row
    assert 40e-6 < u["student"]["resnet56"] < 60e-6 and 8e-6 < u["teacher"]["resnet56"] < 16e-6
    assert u["fit"]["resnet20"] < u["fit"]["resnet56"]


def test_unit_functions():
    u = unit_costs()
    assert student_s(1000, 3, k=3) == pytest.approx(1000 * (u["student"]["resnet56"] + u["teacher"]["resnet56"]))
    assert student_s(1000, 1, arch="resnet20") < student_s(1000, 1)
    assert teacher_fit_s(1000) == pytest.approx(1000 * u["fit"]["resnet56"])
    assert eval_s(1000, n_models=4) == pytest.approx(4 * eval_s(1000))
    assert gan_s(1000, amp=True) < gan_s(1000)
    with pytest.raises(ValueError, match="no unit cost"):
        student_s(10, 1, arch="lenet9")
    with pytest.raises(ValueError, match="m must be >= 1, got 0"):
        student_s(10, 0)


def test_project_counts_shared_work_once():
    key = ("zoo-teacher", "resnet20", "d", "r", 0)
    items = [Item("b", "t0", 60, key), Item("b", "own", 60), Item("c", "t0", 60, key)]
    assert project(items) == {"b": 2.0, "c": 0.0}
    with pytest.raises(ValueError, match="key must be a tuple"):
        Item("b", "x", 1, key="zoo")


def test_every_owed_chapter_has_a_plan():
    specs = chapter_specs(ROOT)
    missing = [s for s in owed(ROOT, "quick") if not specs[s]["plan"]]
    assert not missing, f"owed chapters without a `plan:` in profiles.yml: {missing}"
    for stem, spec in specs.items():
        if spec["plan"]:
            assert stem in toc_order(ROOT), f"{stem} has a plan but is not in _toc.yml"
            load_plan(spec["plan"])


@pytest.mark.parametrize("profile", ["quick", "paper"])
def test_every_plan_returns_items(profile):
    "plans() trusts the chapters' gpu_plan functions to return Items; this is where that is checked."
    fields = ("chapter", "what", "seconds", "key", "basis")
    for stem, spec in chapter_specs(ROOT).items():
        if spec["plan"]:
            for it in load_plan(spec["plan"])(profile):
                assert all(hasattr(it, f) for f in fields), f"{spec['plan']} returned {type(it).__name__}, not an Item"
                assert it.chapter == stem, f"{spec['plan']} returned an Item of {it.chapter}, not of {stem}"


@pytest.fixture(scope="module")
def quick():
    items = plans(ROOT, "quick")
    return items, project(items)


def test_quick_edition_fits_the_budget(quick):
    items, per = quick
    assert all(it.seconds >= 0 for it in items)
    total = sum(per.values())
    assert total <= TOTAL_MIN, f"quick edition projected at {total:.1f} GPU-min > {TOTAL_MIN}: {per}"
    over = {c: round(m, 1) for c, m in per.items() if m > CHAPTER_MIN}
    assert not over, f"chapters over {CHAPTER_MIN} GPU-min: {over}"


def test_plans_count_startup(quick):
    items, per = quick
    for chapter in per:
        assert any(it.what.startswith("chapter start") and it.seconds == START_S for it in items if it.chapter == chapter), chapter


def test_plans_read_the_chapters_tables(monkeypatch):
    "A plan built from a second copy of the sizes would not move when the chapter's own table does."
    import kdbook.experiments.gan as gan
    import kdbook.experiments.synthetic as zoo
    base22 = sum(it.seconds for it in gan.gpu_plan("quick"))
    monkeypatch.setitem(gan.PROFILE_SETTINGS["quick"], "g_steps", 2 * gan.PROFILE_SETTINGS["quick"]["g_steps"])
    assert sum(it.seconds for it in gan.gpu_plan("quick")) > base22
    base23 = sum(it.seconds for it in zoo.gpu_plan("quick"))
    monkeypatch.setitem(zoo.STUDENT_RECIPES, "quick", zoo.Recipe(**{**zoo.STUDENT_RECIPES["quick"].to_dict(),
                                                                    "epochs": 2 * zoo.STUDENT_RECIPES["quick"].epochs}))
    assert sum(it.seconds for it in zoo.gpu_plan("quick")) > base23
