"""The engine on CUDA (skipped without a GPU): graphed steps give the eager numbers; packed and eager runs work.

Synthetic data (random uint8 images), so no dataset is needed; about 20 s on one H100."""
import copy
import warnings

import pytest
import torch

from kdbook.data import ImageSet
from kdbook.train import Ensemble, TrainConfig, distill, distill_many, fit, fit_many, make_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def data(n, seed, classes=10):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, classes, (n,), generator=g)
    return ImageSet(images, labels, [str(i) for i in range(classes)], "synthetic", "random uint8 images")


@pytest.fixture(scope="module")
def sets():
    return data(544, 0), data(256, 1)  # 544 = 8 batches of 64 and a partial batch of 32


def cfg(**kw):
    base = dict(epochs=2, batch_size=64, lr=0.05, lr_min=0.0, policy="baseline", device="cuda", progress=False,
                amp=True, channels_last=True, cuda_graphs=True)
    base.update(kw)
    return TrainConfig(**base)


def close(a, b, rel=3e-2):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert abs(x - y) <= rel * max(abs(x), abs(y), 1e-3), (a, b)


def no_fallback(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed capture warns: make it fail the test
        return fn()


@pytest.mark.parametrize("amp", [True, False])
def test_fit_graphed_equals_eager(sets, amp):
    train, test = sets
    runs = {}
    for graphs in (True, False):
        model = make_model("resnet20", seed=0, num_classes=10)
        runs[graphs] = no_fallback(lambda: fit(model, train, test, cfg(cuda_graphs=graphs, amp=amp), seed=3))
    assert runs[True]["graphed"] is True and runs[False]["graphed"] is False
    close(runs[True]["train_loss"], runs[False]["train_loss"], 3e-2 if amp else 1e-3)
    close(runs[True]["test_nll"], runs[False]["test_nll"], 5e-2 if amp else 1e-3)


def test_distill_graphed_equals_eager(sets):
    train, test = sets
    teachers = [make_model("resnet20", seed=s, num_classes=10) for s in (10, 11)]
    runs = {}
    for graphs in (True, False):
        student = make_model("resnet20", seed=0, num_classes=10)
        runs[graphs] = no_fallback(lambda: distill(student, Ensemble(copy.deepcopy(teachers)), train, test,
                                                   cfg(cuda_graphs=graphs), seed=3))
    g, e = runs[True], runs[False]
    assert g["graphed"] is True and e["graphed"] is False
    close(g["train_loss"], e["train_loss"])
    close(g["train_kd_loss"], e["train_kd_loss"])
    assert abs(g["train_agreement"][-1] - e["train_agreement"][-1]) < 0.1
    close(g["test_kl"], e["test_kl"], 5e-2)


@pytest.mark.parametrize("same_batches,packing", [(False, "loop"), (True, "loop"), (False, "grouped"), (True, "grouped")])
def test_packed_distill_graphed(sets, same_batches, packing):
    train, test = sets
    teacher = make_model("resnet20", seed=10, num_classes=10)
    runs = {}
    for graphs in (True, False):
        students = [make_model("resnet20", seed=s, num_classes=10, norm="layer") for s in range(3)]
        runs[graphs] = no_fallback(lambda: distill_many(students, teacher, train, test, cfg(cuda_graphs=graphs),
                                                        seeds=[1, 2, 3], same_batches=same_batches, packing=packing))
    for g, e in zip(runs[True], runs[False]):
        assert g["graphed"] is True and e["graphed"] is False
        close(g["train_loss"], e["train_loss"])


@pytest.mark.parametrize("packing", ["loop", "grouped"])
def test_packed_fit_graphed(sets, packing):
    train, test = sets
    runs = {}
    for graphs in (True, False):
        models = [make_model("resnet20", seed=s, num_classes=10) for s in range(2)]
        runs[graphs] = no_fallback(lambda: fit_many(models, train, test, cfg(cuda_graphs=graphs), seeds=[1, 2],
                                                    packing=packing))
    for g, e in zip(runs[True], runs[False]):
        assert g["graphed"] is True
        close(g["train_loss"], e["train_loss"])


def test_vgg_dropout_graphed_runs(sets):
    train, test = sets
    hist = no_fallback(lambda: fit(make_model("vgg16", seed=0, num_classes=10), train, test, cfg(epochs=1), seed=0))
    assert hist["graphed"] is True and hist["train_loss"][0] == hist["train_loss"][0]
