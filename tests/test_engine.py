"""The engine (kdbook.engine) on CPU: packed runs equal separate runs, runs that diverge stop, checkpoints
are verified, resumes check what they resume, VGG-16 (dropout) resumes bit-identically."""
import copy

import pytest
import torch

from kdbook.data import ImageSet
from kdbook.engine import FunctionalOptimizer, TrainConfig, data_fingerprint, load_checkpoint, save_checkpoint
from kdbook.train import distill, distill_many, fit, fit_many, make_model


def data(n, seed, classes=10, shape=(3, 32, 32)):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, classes, (n,), generator=g)
    return ImageSet(images, labels, [str(i) for i in range(classes)], "synthetic", "random uint8 images")


def cfg(**kw):
    base = dict(epochs=2, batch_size=16, lr=0.05, lr_min=0.0, policy="baseline", device="cpu", progress=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(autouse=True)
def threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("value", [{"nesterov": "no"}, {"amp": 1}, {"channels_last": None}, {"cuda_graphs": "yes"},
                                   {"progress": 0}, {"lr": float("inf")}, {"lr": "0.1"}, {"momentum": float("nan")},
                                   {"weight_decay": None}, {"epochs": 2.0}, {"checkpoint_every": True}])
def test_config_rejects_bad_values(value):
    name = next(iter(value))
    with pytest.raises(ValueError, match=name):
        cfg(**value)


def test_diverged_run_raises_naming_run_and_cause():
    train, test = data(64, 0, shape=(1, 28, 28)), data(32, 1, shape=(1, 28, 28))
    with pytest.raises(FloatingPointError, match=r"fit of a .*seed 5.*epoch 1.*learning rate"):
        fit(make_model("lenet5", seed=0), train, test, cfg(lr=1e12, momentum=0.0, policy="none"), seed=5)


def test_functional_sgd_matches_torch_over_steps():
    torch.manual_seed(0)
    a = make_model("resnet20", seed=0, num_classes=10)
    b = copy.deepcopy(a)
    c = cfg(lr=0.1, weight_decay=5e-4)
    ref = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    mine = FunctionalOptimizer(b.parameters(), c)
    for t in range(4):
        x = torch.randn(4, 3, 32, 32)
        for g in ref.param_groups:
            g["lr"] = 0.1 / (t + 1)
        mine.lr.fill_(0.1 / (t + 1))
        ref.zero_grad()
        a(x).logsumexp(1).mean().backward()
        ref.step()
        mine.zero_grad()
        b(x).logsumexp(1).mean().backward()
        mine.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=n)


def test_checkpoint_checksum_and_unique_temp(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"a": torch.arange(5), "b": "x"})
    assert torch.equal(load_checkpoint(path)["a"], torch.arange(5))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"c\.pt.*(corrupt|damaged).*delete"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"delete"):
        load_checkpoint(path)


def test_fingerprint_sees_labels_and_images():
    d = data(40, 0)
    f = data_fingerprint(d.images, d.labels)
    labels = d.labels.clone()
    labels[3] = (labels[3] + 1) % 10
    assert data_fingerprint(d.images, labels) != f
    assert data_fingerprint(d.images[:39], d.labels[:39]) != f
    assert data_fingerprint(d.images.clone(), d.labels.clone()) == f


class Killed(Exception):
    pass


def _kill_after_first(epoch, history):
    if epoch == 1:
        raise Killed


def test_resume_refuses_another_runs_checkpoint(tmp_path):
    train, test = data(48, 0, shape=(1, 28, 28)), data(16, 1, shape=(1, 28, 28))
    c = cfg(checkpoint_every=1, policy="none")
    ckpt = tmp_path / "run.pt"
    with pytest.raises(Killed):
        fit(make_model("lenet5", seed=0), train, test, c, seed=1, checkpoint=ckpt, callback=_kill_after_first)
    with pytest.raises(ValueError, match="seeds"):
        fit(make_model("lenet5", seed=0), train, test, c, seed=2, checkpoint=ckpt)
    with pytest.raises(ValueError, match="data"):
        fit(make_model("lenet5", seed=0), data(48, 7, shape=(1, 28, 28)), test, c, seed=1, checkpoint=ckpt)
    with pytest.raises(ValueError, match="parameter shapes"):
        fit(make_model("lenet5", seed=0, num_classes=7), train, test, c, seed=1, checkpoint=ckpt)


def test_vgg_dropout_resume_is_bit_identical(tmp_path):
    train, test = data(32, 0), data(8, 1)
    c = cfg(checkpoint_every=1, batch_size=16, lr=0.01)
    straight = make_model("vgg16", seed=0, num_classes=10)
    h1 = fit(straight, train, test, c, seed=4)
    ckpt = tmp_path / "vgg.pt"
    with pytest.raises(Killed):
        fit(make_model("vgg16", seed=0, num_classes=10), train, test, c, seed=4, checkpoint=ckpt,
            callback=_kill_after_first)
    torch.manual_seed(12345)  # the caller's RNG state must not matter
    resumed = make_model("vgg16", seed=0, num_classes=10)
    h2 = fit(resumed, train, test, c, seed=4, checkpoint=ckpt)
    assert h1["train_loss"] == h2["train_loss"]
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n


def test_distill_reports_paper_train_agreement():
    train, test = data(48, 0, shape=(1, 28, 28)), data(16, 1, shape=(1, 28, 28))
    teacher = make_model("lenet5", seed=1)
    student = copy.deepcopy(teacher)
    h = distill(student, teacher, train, test, cfg(epochs=1, lr=1e-9, momentum=0.0, weight_decay=0.0,
                                                    policy="baseline"), seed=0)
    # the student is the teacher: agreement 1 on the augmented batches, and the KD loss is the teacher's entropy
    assert h["train_agreement"] == [pytest.approx(1.0)]
    assert h["train_kd_loss"][0] > 0 and h["graphed"] is False


def _many_vs_separate(mode, arch, kw, same_batches=False, packing="loop"):
    train, test = data(40, 0), data(16, 1)
    # lr 0.01: rounding differences of grouped and plain convolutions grow with the learning rate (random labels)
    c = cfg(epochs=3, batch_size=16, lr=0.01)
    teacher = make_model("resnet20", seed=9, num_classes=10)
    seeds, inits = [4, 7, 8], [1, 2, 3]
    many = [make_model(arch, seed=s, num_classes=10, **kw) for s in inits]
    if mode == "fit":
        hists = fit_many(many, train, test, c, seeds=seeds, packing=packing)
    else:
        hists = distill_many(many, teacher, train, test, c, seeds=seeds, same_batches=same_batches, packing=packing)
    for init, seed, model, hist in zip(inits, seeds, many, hists):
        alone = make_model(arch, seed=init, num_classes=10, **kw)
        s = seeds[0] if same_batches else seed
        ref = fit(alone, train, test, c, seed=s) if mode == "fit" else distill(alone, teacher, train, test, c, seed=s)
        assert hist["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-3, abs=1e-5)
        assert hist["test_nll"] == pytest.approx(ref["test_nll"], rel=1e-3, abs=1e-5)
        for (n, a), b in zip(alone.state_dict().items(), model.state_dict().values()):
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=2e-3, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("mode", ["fit", "distill"])
def test_packed_layernorm_equals_separate(mode):
    _many_vs_separate(mode, "resnet20", {"norm": "layer"}, packing="grouped")


@pytest.mark.parametrize("packing", ["loop", "grouped"])
def test_packed_same_batches_equals_separate(packing):
    _many_vs_separate("distill", "resnet20", {}, same_batches=True, packing=packing)


@pytest.mark.parametrize("mode,packing", [("fit", "loop"), ("distill", "loop"), ("fit", "grouped"), ("distill", "grouped")])
def test_packed_batchnorm_equals_separate(mode, packing):
    _many_vs_separate(mode, "resnet20", {}, packing=packing)
