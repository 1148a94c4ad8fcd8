"""The training engine (kdbook.train) on tiny real data: learning, distillation, validation, resume, ensembles."""
import copy

import pytest
import torch

from kdbook.data import load_dataset, stratified_subset
from kdbook.losses import ensemble_logits
from kdbook.train import (Ensemble, TrainConfig, by_profile, cosine_lr, distill, distill_many, fit, fit_many,
                          make_model, predict_logits)


@pytest.fixture(scope="module")
def mnist():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    train = load_dataset("mnist", "train")
    test = load_dataset("mnist", "test")
    return (train.subset(stratified_subset(train.labels, 200, 0)),
            test.subset(stratified_subset(test.labels, 200, 0)))


def cfg(**kw):
    base = dict(epochs=2, batch_size=32, lr=0.05, lr_min=0.0, policy="none", device="cpu", progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_config_and_profile_validation():
    with pytest.raises(ValueError, match="optimizer"):
        cfg(optimizer="lbfgs")
    with pytest.raises(ValueError, match="policy"):
        cfg(policy="autoaugment")
    with pytest.raises(ValueError, match="epochs"):
        cfg(epochs=0)
    with pytest.raises(ValueError, match="batch_size"):
        cfg(batch_size=-1)
    with pytest.raises(ValueError, match="lr"):
        cfg(lr=0.1, lr_min=0.2)
    with pytest.raises(ValueError, match="unknown profile 'medium'; choose one of 'smoke', 'quick', 'paper'"):
        by_profile("medium", smoke=1, quick=2, paper=3)
    assert by_profile("paper", smoke=1, quick=2, paper=3) == 3
    assert cosine_lr(0, 10, 0.1, 0.001) == pytest.approx(0.1)
    assert cosine_lr(10, 10, 0.1, 0.001) == pytest.approx(0.001)


def test_fit_reduces_loss(mnist):
    train, test = mnist
    model = make_model("lenet5", seed=0)
    hist = fit(model, train, test, cfg(epochs=4, optimizer="adam", lr=5e-3, weight_decay=0.0), seed=0)
    assert len(hist["train_loss"]) == 4 and hist["epoch"] == [1, 2, 3, 4]
    assert hist["train_loss"][-1] < 0.9 * hist["train_loss"][0], hist["train_loss"]
    assert hist["test_nll"][-1] < hist["test_nll"][0]
    assert hist["test_acc"][-1] > 0.3 * (100 if hist["test_acc"][-1] > 1 else 1)  # chance is 10%


def test_distill_from_identical_teacher_agrees(mnist):
    train, test = mnist
    teacher = make_model("lenet5", seed=1)
    student = copy.deepcopy(teacher)
    hist = distill(student, teacher, train, test, cfg(epochs=1, lr=1e-9, momentum=0.0, weight_decay=0.0), seed=0)
    one = 100.0 if hist["test_agreement"][-1] > 1 else 1.0
    assert hist["test_agreement"][-1] == pytest.approx(one)
    assert hist["distill_agreement"][-1] == pytest.approx(one)
    assert hist["test_kl"][-1] == pytest.approx(0.0, abs=1e-6)
    assert hist["test_acc"][-1] == pytest.approx(hist["teacher_test_acc"][0])


def test_distill_moves_student_towards_teacher(mnist):
    train, test = mnist
    teacher = make_model("lenet5", seed=1)
    student = make_model("lenet5", seed=2)
    hist = distill(student, teacher, train, test, cfg(epochs=3, optimizer="adam", lr=2e-3), seed=0, tau=4.0)
    assert hist["distill_kl"][-1] < hist["distill_kl"][0]
    assert hist["train_loss"][-1] < hist["train_loss"][0]


def test_distill_argument_errors(mnist):
    train, test = mnist
    teacher, student = make_model("lenet5", seed=1), make_model("lenet5", seed=2)
    for kw, msg in [(dict(tau=0.0), "tau"), (dict(alpha=1.5), "alpha"), (dict(alpha=-0.1), "alpha"),
                    (dict(alpha=0.5, extra_data=train), "alpha")]:
        with pytest.raises(ValueError, match=msg):
            distill(student, teacher, train, test, cfg(epochs=1), seed=0, **kw)


class Killed(Exception):
    pass


@pytest.mark.parametrize("mode", ["fit", "distill"])
def test_resume_is_bit_identical(mnist, tmp_path, mode):
    train, test = mnist
    train = train.subset(torch.arange(96))
    c = cfg(epochs=2, batch_size=16, policy="baseline", checkpoint_every=1)
    teacher = make_model("lenet5", seed=5)

    def run(model, checkpoint=None, callback=None):
        if mode == "fit":
            return fit(model, train, test, c, seed=3, checkpoint=checkpoint, callback=callback)
        return distill(model, teacher, train, test, c, seed=3, checkpoint=checkpoint, callback=callback)

    straight = make_model("lenet5", seed=0)
    h_straight = run(straight)

    def kill(epoch, history):
        if epoch == 1:
            raise Killed

    ckpt = tmp_path / "run.pt"
    with pytest.raises(Killed):
        run(make_model("lenet5", seed=0), ckpt, kill)
    assert ckpt.exists()
    resumed = make_model("lenet5", seed=0)  # a fresh process: same init, state comes from the checkpoint
    h_resumed = run(resumed, ckpt)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{k} differs after resume"
    for key in h_straight:
        if key != "wall_time_s":
            assert h_straight[key] == h_resumed[key], key
    # a checkpoint of a different configuration is refused
    with pytest.raises(ValueError, match="different settings"):
        fit(make_model("lenet5", seed=0), train, test, cfg(epochs=3, batch_size=16, checkpoint_every=1),
            seed=3, checkpoint=ckpt)


@pytest.mark.parametrize("arch,kw,shape", [("resnet20", {}, (3, 3, 32, 32)),
                                           ("resnet20", {"norm": "layer"}, (3, 3, 32, 32)),
                                           ("lenet5", {}, (3, 1, 28, 28))])
def test_vmapped_ensemble_equals_loop(arch, kw, shape):
    members = [make_model(arch, seed=s, **kw) for s in range(2)]
    gen = torch.Generator().manual_seed(0)
    for m in members:  # non-trivial running statistics, so a vmap that ignored buffers would fail
        for name, buf in m.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=gen) + 0.5)
    x = torch.rand(shape, generator=gen) * 2 - 1
    fast, slow = Ensemble(members), Ensemble(members, vectorize=False)
    assert fast.vectorize and not slow.vectorize
    # packed (one grouped network, the CUDA default) against the loop (the CPU default)
    torch.testing.assert_close(fast.member_logits(x, vectorize=True), slow.member_logits(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast(x), ensemble_logits(torch.stack([m.eval()(x) for m in members])),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(predict_logits(members, x, batch_size=2), fast(x), rtol=1e-4, atol=1e-4)


def test_ensemble_of_mixed_architectures_falls_back():
    members = [make_model("resnet20", seed=0), make_model("resnet20", seed=1, norm="layer")]
    ens = Ensemble(members)
    assert not ens.vectorize
    assert ens(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("mode", ["fit", "distill"])
def test_many_equals_separate_runs(mnist, mode):
    train, test = mnist
    train, test = train.subset(torch.arange(48)), test.subset(torch.arange(64))
    c = cfg(epochs=2, batch_size=16, policy="baseline", optimizer="adam" if mode == "fit" else "sgd", lr=1e-3)
    teacher = make_model("lenet5", seed=9)
    seeds, inits = [4, 7], [1, 2]
    many = [make_model("lenet5", seed=s) for s in inits]
    if mode == "fit":
        hists = fit_many(many, train, test, c, seeds=seeds)
    else:
        hists = distill_many(many, teacher, train, test, c, seeds=seeds)
    for init, seed, model, hist in zip(inits, seeds, many, hists):
        alone = make_model("lenet5", seed=init)
        ref = fit(alone, train, test, c, seed=seed) if mode == "fit" else distill(alone, teacher, train, test, c, seed=seed)
        assert hist["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-4, abs=1e-5)
        assert hist["test_nll"] == pytest.approx(ref["test_nll"], rel=1e-4, abs=1e-5)
        for a, b in zip(alone.parameters(), model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="one seed per model"):
        fit_many([make_model("lenet5", seed=0)], train, test, c, seeds=[0, 1])
    with pytest.raises(ValueError, match="cannot be trained together"):
        fit_many([make_model("resnet20", seed=0), make_model("lenet5", seed=0)], train, test, c, seeds=[0, 1])


def test_teacher_logits_computed_once_per_teacher_and_data(mnist):
    import kdbook.train as kt
    train, test = mnist
    train = train.subset(torch.arange(64))
    teacher = make_model("lenet5", seed=7)
    calls = []
    hook = teacher.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    kt._teacher_logits.clear()
    c = cfg(epochs=1, batch_size=16)
    steps = 64 // 16
    try:
        h1 = distill(make_model("lenet5", seed=0), teacher, train, test, c, seed=0)
        first = len(calls)
        assert first > steps, "the first student's evaluation runs the teacher"
        calls.clear()
        h2 = distill(make_model("lenet5", seed=1), teacher, train, test, c, seed=1)
        assert len(calls) == steps, f"the second student's evaluation ran the teacher {len(calls) - steps} times"
        assert all(h1[k] == h2[k] for k in h1 if k.startswith("teacher_test_"))
        with torch.no_grad():  # new weights: new logits
            next(teacher.parameters()).mul_(1.5)
        calls.clear()
        h3 = distill(make_model("lenet5", seed=1), teacher, train, test, c, seed=1)
        assert len(calls) > steps and h3["teacher_test_nll"] != h2["teacher_test_nll"]
    finally:
        hook.remove()
    cached = kt.teacher_logits(teacher, test.images, 1000, torch.device("cpu"))
    assert torch.equal(cached, predict_logits(teacher, test.images, 1000)), "the cache returns the same numbers"


def test_gpu_plan_shares_the_zoo_work_and_reads_mnist_pair(monkeypatch):
    "A.3's plan: the zoo's keyed teacher/student items (the same keys §4.2 plans, so counted once) + its own CPU pair."
    import kdbook.train as train
    import kdbook.experiments.synthetic as zoo
    from kdbook.costs import START_S, project
    items = train.gpu_plan("quick")
    keyed = [it.key for it in items if it.key is not None]
    assert len(keyed) == zoo.N_TRIALS["quick"] + 1 and len(set(keyed)) == len(keyed)
    assert set(keyed) <= {it.key for it in zoo.gpu_plan("quick")}  # teachers 0, 1 and the +0 self students of §4.2
    per = project(zoo.gpu_plan("quick") + items)
    own = sum(it.seconds for it in items if it.key is None)
    assert per["a3_training"] == pytest.approx(own / 60) and own > START_S
    # the MNIST item moves with the chapter's own table (no second copy of the sizes)
    before = own
    monkeypatch.setitem(train.MNIST_PAIR, "quick", {**train.MNIST_PAIR["quick"], "n_train": 2 * train.MNIST_PAIR["quick"]["n_train"]})
    assert sum(it.seconds for it in train.gpu_plan("quick") if it.key is None) > before
    with pytest.raises(ValueError, match="unknown profile"):
        train.gpu_plan("fast")


def test_mnist_pair_configs_run_on_the_cpu():
    from kdbook.train import MNIST_PAIR, mnist_configs
    for profile, p in MNIST_PAIR.items():
        teacher, student = mnist_configs(profile)
        assert teacher.device == student.device == "cpu"
        assert teacher.epochs == student.epochs == p["epochs"] and teacher.eval_every == p["eval_every"]
        assert student.lr_min == (1e-6 if p["optimizer"] == "sgd" else 0.0)
    assert MNIST_PAIR["quick"]["n_train"] <= 10_000  # small: it runs on the CPU while the GPU waits


def test_unlabelled_images_are_refused_before_training(mnist):
    train, test = mnist
    model, teacher = make_model("lenet5", seed=0), make_model("lenet5", seed=1)
    with pytest.raises(ValueError, match="fit needs a label for every image, but the augmentation policy 'ood'"):
        fit(model, train, test, cfg(policy="ood"), seed=0)
    with pytest.raises(ValueError, match="alpha > 0 needs a label for every image, but the augmentation policy 'ood'"):
        distill(model, teacher, train, test, cfg(policy="ood"), seed=0, alpha=0.5)
    with pytest.raises(ValueError, match="alpha > 0 needs a label for every image, but extra_data is unlabelled"):
        distill(model, teacher, train, test, cfg(), seed=0, alpha=0.5, extra_data=train)
