"Fast CPU checks of kdbook.experiments.synthetic (chapters/23_synthetic.ipynb): the teacher zoo's store keys, and bad input refused with the store untouched."
from pathlib import Path

import pytest
import torch

from kdbook.store import Store
from kdbook.experiments.synthetic import (ENSEMBLE_SIZES, STUDENT_NAME, ZOO_NAME, Recipe, baseline_students, check_ensemble_size,
                        check_synthetic_sizes, fig1_students, no_synthetic,
                        distill_student, gpu_minutes, mixup_standin, student_recipe, synthetic_subset, teacher_recipe,
                        toy_cifar100, zoo_ensemble, zoo_params, zoo_teachers)

TINY = Recipe(width=2, epochs=1, batch_size=16)


def files(root: Path) -> list:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture(scope="module")
def data():
    return toy_cifar100(32, 0), toy_cifar100(16, 1)


def test_paper_recipes_follow_appendix_a3():
    t, s = teacher_recipe("paper"), student_recipe("paper")
    assert (t.arch, t.width, t.epochs, t.batch_size, t.lr, t.lr_min, t.weight_decay) == ("resnet56", 16, 200, 256, 0.1, 0.0, 1e-4)
    assert (s.epochs, s.batch_size, s.lr, s.lr_min) == (300, 128, 0.05, 1e-6)
    cfg = t.config(device="cpu")
    assert cfg.nesterov and cfg.momentum == 0.9 and cfg.policy == "baseline"
    with pytest.raises(ValueError, match="unknown profile"):
        teacher_recipe("fast")


@pytest.mark.parametrize("kwargs,match", [(dict(width=0), "Recipe.width must be an integer >= 1"),
                                          (dict(batch_size=0), "batch_size"),
                                          (dict(arch="resnet57"), "unknown architecture 'resnet57'")])
def test_bad_recipes_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Recipe(**kwargs)


def test_unknown_student_kinds_are_refused_before_training(tmp_path, data):
    store = Store(tmp_path / "results", verbose=False)
    train, test = data
    with pytest.raises(ValueError, match="unknown kind 'twin'"):
        fig1_students(store, [], "twin", train, test, None, no_synthetic(), "smoke", 2)
    with pytest.raises(ValueError, match="m = 1 and m = 3"):
        baseline_students(store, [], train, test, "smoke", m=5)
    with pytest.raises(ValueError, match="2 self-distillation trials need 2 zoo teachers, got 0"):
        fig1_students(store, [], "self", train, test, None, no_synthetic(), "smoke", 2)
    assert files(tmp_path) == []


def test_zoo_key_depends_on_recipe_and_data_not_on_device(data):
    train, test = data
    p = zoo_params(TINY, train, test)
    assert "device" not in str(p) and "packed" not in str(p)
    assert zoo_params(TINY, train, test) == p
    assert zoo_params(Recipe(width=2, epochs=2, batch_size=16), train, test) != p
    assert zoo_params(TINY, toy_cifar100(32, 5), test) != p  # other images, other teacher


def test_packed_and_alone_give_the_same_store_keys(tmp_path, data):
    train, test = data
    a, b = Store(tmp_path / "a", verbose=False), Store(tmp_path / "b", verbose=False)
    packed = zoo_teachers(a, [3, 4], train, test, TINY, device="cpu", packed=True)
    alone = zoo_teachers(b, [3, 4], train, test, TINY, device="cpu", packed=False)
    assert [r["key"] for r, _ in packed] == [r["key"] for r, _ in alone]
    assert [r["result"]["trained"] for r, _ in packed] == ["packed with 2"] * 2
    assert [r["result"]["trained"] for r, _ in alone] == ["alone"] * 2
    assert not list((tmp_path / "a").parent.rglob("*.pt"))  # no resumable checkpoint is left behind
    again = zoo_teachers(a, [4, 3], train, test, TINY, device="cpu", packed=True)  # reused, any order
    assert a.counts[ZOO_NAME]["computed"] == 2 and a.counts[ZOO_NAME]["reused"] == 2
    assert [r["seed"] for r, _ in again] == [4, 3]


@pytest.mark.parametrize("seeds,match", [([], "non-empty"), ([1, 1], "distinct"), ([-1], ">= 0"), ([True], "integers")])
def test_bad_seeds_leave_the_store_untouched(tmp_path, data, seeds, match):
    store = Store(tmp_path / "results", verbose=False)
    with pytest.raises(ValueError, match=match):
        zoo_teachers(store, seeds, *data, TINY, device="cpu")
    assert files(tmp_path) == []


@pytest.mark.parametrize("m,available,match", [(2, 6, "unknown ensemble size"), (4, 6, "unknown ensemble size"),
                                               (0, 6, "unknown ensemble size"), (True, 6, "unknown ensemble size"),
                                               (5, 3, "only 3")])
def test_unknown_or_unavailable_ensemble_sizes(m, available, match):
    with pytest.raises(ValueError, match=match):
        check_ensemble_size(m, available)
    with pytest.raises(ValueError, match=match):
        zoo_ensemble([None] * available, m)


def test_known_ensemble_sizes_take_the_first_members():
    zoo = list(range(6))
    for m in ENSEMBLE_SIZES:
        assert zoo_ensemble(zoo, m) == zoo[:m]


def test_synthetic_size_larger_than_generated_is_refused(tmp_path, data):
    train, test = data
    images = mixup_standin(train, 10, seed=0)
    with pytest.raises(ValueError, match=r"must be an integer in \[0, 10\], got 20; only 10 synthetic images were generated"):
        check_synthetic_sizes([0, 5, 20], len(images))
    with pytest.raises(ValueError, match=r"must be an integer in \[0, 10\], got -1"):
        check_synthetic_sizes([0, -1], len(images))
    with pytest.raises(ValueError, match="only 10 synthetic images were generated"):
        synthetic_subset(images, 11, "stand-in", train.classes)
    with pytest.raises(ValueError, match="non-empty"):
        check_synthetic_sizes([], 10)
    # a size that does not match the images given is refused before the store or the teachers are touched
    store = Store(tmp_path / "results", verbose=False)
    with pytest.raises(ValueError, match="4 synthetic images were given"):
        distill_student(store, [], train, test, synthetic_subset(images, 4, "stand-in", train.classes),
                        {"source": "mixup", "key": "k", "size": 8}, TINY, seed=0, device="cpu")
    assert files(tmp_path) == []


def test_synthetic_subsets_are_nested_and_unlabelled(data):
    train, _ = data
    images = mixup_standin(train, 12, seed=1)
    small, big = synthetic_subset(images, 4, "s", train.classes), synthetic_subset(images, 8, "s", train.classes)
    assert torch.equal(small.images, big.images[:4])
    assert big.labels.tolist() == [-1] * 8
    assert synthetic_subset(images, 0, "s", train.classes) is None


def test_student_record_names_its_teachers_and_reports_train_agreement(tmp_path, data):
    train, test = data
    store = Store(tmp_path / "results", verbose=False)
    zoo = zoo_teachers(store, [0, 1], train, test, TINY, device="cpu")
    syn = synthetic_subset(mixup_standin(train, 8, seed=2), 8, "stand-in", train.classes)
    rec = distill_student(store, zoo_ensemble(zoo, 1), train, test, syn, {"source": "mixup", "key": "k", "size": 8},
                          TINY, seed=7, device="cpu", controls=[zoo[1]])
    r = rec["result"]
    assert r["n_distill"] == 40 and 0 <= r["train_agreement"] <= 100 and r["test_kl"] >= 0
    assert set(rec["meta"]["depends"]) == {f"{ZOO_NAME}/{z['key']}" for z, _ in zoo}
    assert rec["params"]["teachers"] == [zoo[0][0]["key"]] and rec["params"]["controls"] == [zoo[1][0]["key"]]
    assert store.counts[STUDENT_NAME]["computed"] == 1


def test_gpu_minutes_adds_teacher_and_student_images():
    g = gpu_minutes(2, Recipe(epochs=3), 1000, Recipe(epochs=2), [0, 500], 4,
                    basis={"teacher_fit": 100.0, "distill": 50.0})
    assert g["images"] == {"teachers": 6000, "students": 4 * 2 * 2500}
    assert g["teachers"] == pytest.approx(6000 / 100 / 60) and g["students"] == pytest.approx(20000 / 50 / 60)


def _run_chapter(tmp_path, **params) -> str:
    "Execute chapters/23_synthetic.ipynb at smoke with papermill; the error text of the failing cell ('' if none)."
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError
    repo = Path(__file__).resolve().parents[1]
    try:
        pm.execute_notebook(str(repo / "chapters" / "23_synthetic.ipynb"), str(tmp_path / "out.ipynb"),
                            parameters={"profile": "smoke", **params}, kernel_name="kdbook",
                            cwd=str(repo / "chapters"), progress_bar=False, execution_timeout=300)
    except PapermillExecutionError as err:
        return f"{err.ename}: {err.evalue}"
    return ""


def test_chapter_refuses_a_synthetic_size_beyond_the_stored_gan_set(tmp_path):
    from kdbook.experiments.gan import save_synthetic_set
    store = Store(tmp_path / "results", verbose=False)
    params = {"profile": "smoke", "gan": "0" * 16, "sizes": [10], "sample_seed": 0}
    key = store.key("gan-synthetic", params, 0)
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    store.run("gan-synthetic", params,
              lambda: {"synthetic_set": save_synthetic_set(store, "gan-synthetic", key, images), "sizes": [10]}, 0)
    before = files(tmp_path / "results")
    error = _run_chapter(tmp_path, results_dir=str(tmp_path / "results"), synthetic_sizes=[0, 64])
    assert "ValueError" in error and "got 64; only 10 synthetic images were generated" in error
    assert files(tmp_path / "results") == before  # no teacher, no student, nothing half-written


def test_chapter_refuses_an_unknown_ensemble_size(tmp_path):
    error = _run_chapter(tmp_path, results_dir=str(tmp_path / "results"), ensemble_size=4)
    assert "unknown ensemble size 4" in error
    assert files(tmp_path / "results") == []


def test_chapter_without_gan_sets_trains_the_zoo_then_says_what_is_missing(tmp_path):
    error = _run_chapter(tmp_path, results_dir=str(tmp_path / "results"), synthetic_source="gan")
    assert "holds no SN-GAN sets at profile 'smoke'" in error and "run the SN-GAN chapter" in error
    stored = files(tmp_path / "results")
    assert any(f.startswith(f"{ZOO_NAME}/") for f in stored)  # the teachers do not need the synthetic images
    assert not any(f.startswith(f"{STUDENT_NAME}/") for f in stored)


def test_quick_follows_appendix_b_and_holds_steps_fixed():
    from kdbook.experiments.synthetic import FIXED_STEPS, N_TRIALS, SYNTHETIC_SIZES, ZOO_DATA, student_recipe_for
    t, s = teacher_recipe("quick"), student_recipe("quick")
    assert (t.arch, s.arch, ZOO_DATA["quick"]["n_train"]) == ("resnet20", "resnet20", 10000)
    assert SYNTHETIC_SIZES["quick"] == [0, 10000] and N_TRIALS["quick"] >= 2 and FIXED_STEPS["quick"]
    n = ZOO_DATA["quick"]["n_train"]
    steps = {size: student_recipe_for("quick", n, size).epochs * (n + size) for size in SYNTHETIC_SIZES["quick"]}
    assert len(set(steps.values())) == 1, steps  # every synthetic size gets the same number of images (SGD steps)
    assert student_recipe_for("paper", 50000, 50000).epochs == student_recipe("paper").epochs


def test_baseline_students_are_shared_with_section_5_1(data, tmp_path, monkeypatch):
    "§4.2's +0 students and §5.1's Baseline students: one store name, one key, one planned Item."
    import kdbook.experiments.synthetic as zoo_mod
    from kdbook.experiments.synthetic import baseline_items, baseline_students, fig1_students, gpu_plan, no_synthetic
    train, test = data
    store = Store(tmp_path / "results", verbose=False)
    zoo = zoo_teachers(store, [0, 1, 2], train, test, TINY, device="cpu")
    monkeypatch.setitem(zoo_mod.STUDENT_RECIPES, "smoke", TINY)
    a = fig1_students(store, zoo, "ensemble", train, test, None, no_synthetic(), "smoke", 2, device="cpu")
    b = baseline_students(store, zoo, train, test, "smoke", m=3, device="cpu")
    assert [r["key"] for r in a] == [r["key"] for r in b]
    assert store.counts[STUDENT_NAME]["computed"] == 2
    assert {r["params"]["batch_seed"] for r in a} == {1000}
    keys = {it.key for it in gpu_plan("quick") if it.key is not None}
    assert baseline_items("51_augmentation", "quick", 1)[0].key in keys
    with pytest.raises(ValueError, match="m = 1 and m = 3"):
        baseline_items("51_augmentation", "quick", 5)
