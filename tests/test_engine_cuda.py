"""The engine on CUDA (skipped without a GPU): graphed steps compute what eager steps compute, step by step.

fp32 (no autocast) on learnable synthetic data: every step's loss, the learning rate each replay really used (recorded
inside the graph by `trace_steps`) and the final weights of a graphed run equal those of the eager run to about 1e-4.
The same comparison of the functional step against an eager torch.optim loop runs on CPU in tests/test_engine.py.
Twenty-odd short ResNet-20 runs on 544 images: well under a minute on one H100 (not yet timed in this form)."""
import copy
import warnings

import pytest
import torch

from kdbook.data import ImageSet
from kdbook.engine import cosine_lr, trace_steps
from kdbook.train import Ensemble, TrainConfig, distill, distill_many, fit, fit_many, make_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

RTOL, ATOL = 1e-4, 1e-5


def learnable(n, seed, classes=4):
    "Random 3x32x32 images labelled by their brightest quadrant: a task a ResNet-20 learns within a few steps."
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    quads = images.float().mean(1).view(n, 2, 16, 2, 16).mean((2, 4)).flatten(1)
    return ImageSet(images, quads.argmax(1), [str(i) for i in range(classes)], "synthetic", "brightest quadrant")


@pytest.fixture(scope="module")
def sets():
    return learnable(544, 0), learnable(256, 1)  # 544 = 8 batches of 64 and a partial batch of 32 (run eagerly)


@pytest.fixture(autouse=True)
def deterministic():
    "The same kernels both ways: no atomics-based cuDNN algorithms, no autotuning."
    old = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old


def cfg(**kw):
    base = dict(epochs=2, batch_size=64, lr=0.05, lr_min=1e-3, weight_decay=5e-4, momentum=0.9, policy="baseline",
                device="cuda", progress=False, amp=False, channels_last=True, cuda_graphs=True)
    base.update(kw)
    return TrainConfig(**base)


def no_fallback(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed capture warns: make it fail the test
        with trace_steps():
            return fn()


def schedule(c, steps_per_epoch):
    total = c.epochs * steps_per_epoch
    return [cosine_lr(t, total, c.lr, c.lr_min) for t in range(total)]


def same_steps(g, e, c, rtol=RTOL, atol=ATOL):
    assert g["graphed"] is True and e["graphed"] is False
    assert len(g["step_loss"]) == len(e["step_loss"]) == c.epochs * 9
    torch.testing.assert_close(torch.tensor(g["step_loss"]), torch.tensor(e["step_loss"]), rtol=rtol, atol=atol)
    # the learning rate each replay used, read back from the graph's own record: it follows the schedule
    torch.testing.assert_close(torch.tensor(g["step_lr"]), torch.tensor(schedule(c, 9)), rtol=1e-6, atol=0)


def same_weights(a, b, rtol=RTOL, atol=ATOL):
    for (n, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x.float(), y.float(), rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fit_graphed_equals_eager(sets, optimizer):
    train, test = sets
    c = {g: cfg(cuda_graphs=g, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 2e-3) for g in (True, False)}
    models = {g: make_model("resnet20", seed=0, num_classes=4) for g in (True, False)}
    runs = {g: no_fallback(lambda: fit(models[g], train, test, c[g], seed=3)) for g in (True, False)}
    same_steps(runs[True], runs[False], c[True])
    assert sum(runs[True]["step_loss"][-4:]) < sum(runs[True]["step_loss"][:4]), "the data is learnable: the loss falls"
    same_weights(models[True], models[False])
    torch.testing.assert_close(torch.tensor(runs[True]["test_nll"]), torch.tensor(runs[False]["test_nll"]), rtol=RTOL, atol=ATOL)


def test_distill_graphed_equals_eager(sets):
    train, test = sets
    teachers = [make_model("resnet20", seed=s, num_classes=4) for s in (10, 11)]
    students = {g: make_model("resnet20", seed=0, num_classes=4) for g in (True, False)}
    runs = {g: no_fallback(lambda: distill(students[g], Ensemble(copy.deepcopy(teachers)), train, test,
                                           cfg(cuda_graphs=g), seed=3)) for g in (True, False)}
    same_steps(runs[True], runs[False], cfg())
    same_weights(students[True], students[False])
    assert runs[True]["train_agreement"] == pytest.approx(runs[False]["train_agreement"], abs=1e-3)


@pytest.mark.parametrize("same_batches,packing", [(False, "loop"), (True, "loop"), (False, "grouped"), (True, "grouped")])
def test_packed_distill_graphed_equals_eager(sets, same_batches, packing):
    train, test = sets
    teacher = make_model("resnet20", seed=10, num_classes=4)
    students = {g: [make_model("resnet20", seed=s, num_classes=4, norm="layer") for s in range(3)] for g in (True, False)}
    runs = {g: no_fallback(lambda: distill_many(students[g], teacher, train, test, cfg(cuda_graphs=g), seeds=[1, 2, 3],
                                                same_batches=same_batches, packing=packing)) for g in (True, False)}
    for g, e in zip(runs[True], runs[False]):
        same_steps(g, e, cfg())
    for a, b in zip(students[True], students[False]):
        same_weights(a, b)


@pytest.mark.parametrize("packing", ["loop", "grouped"])
def test_packed_fit_graphed_equals_eager(sets, packing):
    train, test = sets
    models = {g: [make_model("resnet20", seed=s, num_classes=4) for s in range(2)] for g in (True, False)}
    runs = {g: no_fallback(lambda: fit_many(models[g], train, test, cfg(cuda_graphs=g), seeds=[1, 2], packing=packing))
            for g in (True, False)}
    for g, e in zip(runs[True], runs[False]):
        same_steps(g, e, cfg())
    for a, b in zip(models[True], models[False]):
        same_weights(a, b)


def test_bf16_graphed_runs_close_to_eager(sets):
    "The book's GPU setting (bf16 autocast): the graph is used and follows the eager run (bf16 rounding: 2e-2)."
    train, test = sets
    runs = {g: no_fallback(lambda: fit(make_model("resnet20", seed=0, num_classes=4), train, test,
                                       cfg(cuda_graphs=g, amp=True), seed=3)) for g in (True, False)}
    assert runs[True]["graphed"] is True
    torch.testing.assert_close(torch.tensor(runs[True]["step_loss"]), torch.tensor(runs[False]["step_loss"]),
                               rtol=2e-2, atol=1e-3)


def test_vgg_dropout_graphed_runs(sets):
    train, test = sets
    hist = no_fallback(lambda: fit(make_model("vgg16", seed=0, num_classes=4), train, test, cfg(epochs=1), seed=0))
    assert hist["graphed"] is True and all(v == v for v in hist["step_loss"])
