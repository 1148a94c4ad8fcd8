"""The engine (kdbook.engine) on CPU: packed runs equal separate runs, runs that diverge stop, checkpoints
are verified, resumes check what they resume, VGG-16 (dropout) resumes bit-identically."""
import copy
import re

import pytest
import torch

from kdbook.data import ImageSet
from kdbook.engine import FunctionalOptimizer, TrainConfig, data_fingerprint, load_train_state, save_train_state
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
    save_train_state(path, {"a": torch.arange(5), "b": "x"})
    assert torch.equal(load_train_state(path)["a"], torch.arange(5))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"c\.pt.*(corrupt|damaged).*delete"):
        load_train_state(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"delete"):
        load_train_state(path)


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
        fit(make_model("lenet5", seed=0, num_classes=12), train, test, c, seed=1, checkpoint=ckpt)


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


# --- refusals name the argument, before any training --------------------------------------------------------------

def _share_first_conv(a, b):
    name = next(n for n, m in a.named_modules() if isinstance(m, torch.nn.Conv2d))
    b.get_submodule(name).weight = a.get_submodule(name).weight


def _refusal_cases():
    mnist_like = dict(shape=(1, 28, 28))
    t, s = make_model("lenet5", seed=1), make_model("lenet5", seed=2)
    shared = make_model("lenet5", seed=3)
    _share_first_conv(t, shared)
    twin = make_model("lenet5", seed=4)
    return [
        ("fit_many same module", lambda d: fit_many([s, s], d, d, cfg(), seeds=[0, 1]), r"models\[0\] and models\[1\] are the same module"),
        ("fit_many shared", lambda d: fit_many([t, shared], d, d, cfg(), seeds=[0, 1]), r"models\[0\] and models\[1\] share parameters"),
        ("distill into itself", lambda d: distill(s, s, d, d, cfg(), seed=0), "also the teacher"),
        ("teacher shares", lambda d: distill(shared, t, d, d, cfg(), seed=0), "shares parameters with the teacher"),
        ("distill_many into teacher", lambda d: distill_many([twin, t], t, d, d, cfg(), seeds=[0, 1]), "also the teacher"),
        ("class counts", lambda d: distill(make_model("lenet5", seed=0, num_classes=5), t, d, d, cfg(), seed=0),
         "teacher outputs 10 classes but the student outputs 5"),
        ("labels", lambda d: fit(make_model("lenet5", seed=0, num_classes=5), d, d, cfg(), seed=0), r"the largest train label must be an integer <= 4, got 9; the model outputs 5 classes"),
        ("tau", lambda d: distill(make_model("lenet5", seed=0), t, d, d, cfg(), seed=0, tau=1e-40), r"tau must be >= 0\.0001, got 1e-40; below it logits / tau overflow"),
        ("image shape", lambda d: fit(make_model("resnet20", seed=0, num_classes=10), d, d, cfg(), seed=0),
         r"cannot take train images of shape \(1, 28, 28\)"),
    ], mnist_like


def test_refusals_name_the_argument():
    cases, kw = _refusal_cases()
    d = data(32, 0, **kw)
    for what, call, msg in cases:
        with pytest.raises(ValueError, match=msg):
            call(d)
    one = data(1, 0)
    with pytest.raises(ValueError, match="BatchNorm needs at least 2 examples"):
        fit(make_model("resnet20", seed=0, num_classes=10), one, one, cfg(), seed=0)


def test_huge_learning_rate_is_a_floating_point_error():
    train = data(48, 0, shape=(1, 28, 28))
    with pytest.raises(FloatingPointError, match="learning rate"):
        fit(make_model("lenet5", seed=0), train, train, cfg(lr=1e6, policy="none"), seed=0)


def test_loss_growth_stops_a_finite_run():
    from kdbook.engine import GROWTH_LIMIT, Run, _diverged_message, _growth
    run = Run(name="fit of a net", model=None, models=[], images=None, labels=None, cfg=cfg(), seeds=[0],
              device=torch.device("cpu"))
    assert _growth([2.3], [2.3 * 50]) is None  # worse, but no divergence
    assert _growth([0.001], [5.0]) is None  # a run starting trained: the floor keeps it going
    what = _growth([2.3], [2.3 * GROWTH_LIMIT * 1.01])
    assert re.search(r"train_loss = .* over 1000 x the first epoch's 2\.3.*learning rate",
                     _diverged_message(run, what, 3, "10-19", 0.05))


# --- checkpoints of packed runs, SIGTERM, KDBOOK_DEADLINE ------------------------------------------------------------

@pytest.mark.parametrize("packing", ["loop", "grouped"])
def test_packed_resume_is_bit_identical(tmp_path, packing):
    train, test = data(48, 0, shape=(1, 28, 28)), data(16, 1, shape=(1, 28, 28))
    c = cfg(checkpoint_every=1, policy="baseline")
    teacher = make_model("lenet5", seed=9)
    straight = [make_model("lenet5", seed=s) for s in (0, 1)]
    h1 = distill_many(straight, teacher, train, test, c, seeds=[3, 4], packing=packing)
    ckpt = tmp_path / "pack.pt"

    def kill(epoch, histories):
        assert isinstance(histories, list) and len(histories) == 2
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        distill_many([make_model("lenet5", seed=s) for s in (0, 1)], teacher, train, test, c, seeds=[3, 4],
                     packing=packing, checkpoint=ckpt, callback=kill)
    resumed = [make_model("lenet5", seed=s) for s in (0, 1)]
    h2 = distill_many(resumed, teacher, train, test, c, seeds=[3, 4], packing=packing, checkpoint=ckpt)
    for a, b in zip(h1, h2):
        assert a["train_loss"] == b["train_loss"] and a["test_acc"] == b["test_acc"]
    for m1, m2 in zip(straight, resumed):
        for (n, x), y in zip(m1.state_dict().items(), m2.state_dict().values()):
            assert torch.equal(x, y), n
    with pytest.raises(ValueError, match="belongs to another run"):  # a pack of another size
        fit_many([make_model("lenet5", seed=s) for s in (0, 1, 2)], train, test, c, seeds=[3, 4, 5], checkpoint=ckpt)


class _Tiny(torch.nn.Module):
    "A linear classifier of 1x8x8 images whose training forward can sleep (a slow step) or send SIGTERM at call n."

    def __init__(self, seed, sleep=0.0, sigterm_at=None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc = torch.nn.Linear(64, 10)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(10, 64, generator=g) * 0.1)
            self.fc.bias.copy_(torch.randn(10, generator=g) * 0.1)
        self.sleep, self.sigterm_at, self.calls = sleep, sigterm_at, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.sigterm_at == self.calls:
                import os
                import signal
                os.kill(os.getpid(), signal.SIGTERM)
            if self.sleep:
                import time
                time.sleep(self.sleep)
        return self.fc(x.flatten(1))


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_sigterm_checkpoints_mid_epoch_and_resumes_bit_identically(tmp_path):
    import signal
    from kdbook.engine import TrainingStopped
    train = data(40, 0, shape=(1, 8, 8))
    c = cfg(epochs=3, batch_size=8, policy="baseline", checkpoint_every=1)
    straight = _Tiny(0)
    h1 = fit(straight, train, train, c, seed=2)
    ckpt = tmp_path / "run.pt"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingStopped, match="SIGTERM.*resumes from it") as stop:
        fit(_Tiny(0, sigterm_at=7), train, train, c, seed=2, checkpoint=ckpt)  # step 7: inside the second epoch
    assert signal.getsignal(signal.SIGTERM) == before, "the handler is installed only while a run is in progress"
    assert stop.value.checkpoint == ckpt and load_train_state(ckpt)["pos"] == 2  # 5 steps per epoch: 2 into epoch 2
    resumed = _Tiny(0)
    h2 = fit(resumed, train, train, c, seed=2, checkpoint=ckpt)
    assert _same(straight, resumed) and h1["train_loss"] == h2["train_loss"]


def test_deadline_stops_cleanly_and_resumes(tmp_path, monkeypatch):
    import time
    import kdbook.engine as ke
    from kdbook.engine import TrainingStopped
    monkeypatch.setattr(ke, "DEADLINE_MARGIN_S", 0.5)
    train = data(32, 0, shape=(1, 8, 8))
    c = cfg(epochs=30, batch_size=8, policy="none", checkpoint_every=10)  # 4 steps of >= 50 ms per epoch: >= 6 s in all
    straight = _Tiny(0)
    fit(straight, train, train, c, seed=1)
    ckpt = tmp_path / "run.pt"
    monkeypatch.setenv("KDBOOK_DEADLINE", str(time.time() + 2.0))
    t0 = time.time()
    with pytest.raises(TrainingStopped, match="KDBOOK_DEADLINE"):
        fit(_Tiny(0, sleep=0.05), train, train, c, seed=1, checkpoint=ckpt)
    assert time.time() - t0 < 2.0 and ckpt.exists(), "stopped before the deadline, with its work kept"
    # without a checkpoint the run stops as soon as its measured rate says it cannot finish
    monkeypatch.setenv("KDBOOK_DEADLINE", str(time.time() + 2.0))
    t0 = time.time()
    with pytest.raises(TrainingStopped, match="epochs left need"):
        fit(_Tiny(0, sleep=0.05), train, train, c, seed=1)
    assert time.time() - t0 < 1.0  # after its first epoch, not at the deadline
    # a deadline that leaves no time: not started at all
    monkeypatch.setenv("KDBOOK_DEADLINE", str(time.time() + 0.1))
    with pytest.raises(TrainingStopped, match="not started"):
        fit(_Tiny(0), train, train, c, seed=1, checkpoint=tmp_path / "other.pt")
    assert not (tmp_path / "other.pt").exists()
    monkeypatch.setenv("KDBOOK_DEADLINE", "tomorrow")
    with pytest.raises(ValueError, match="KDBOOK_DEADLINE must be a unix time"):
        fit(_Tiny(0), train, train, c, seed=1)
    monkeypatch.delenv("KDBOOK_DEADLINE")
    resumed = _Tiny(0)
    fit(resumed, train, train, c, seed=1, checkpoint=ckpt)
    assert _same(straight, resumed)


# --- the functional step equals an eager torch.optim loop, step by step (the CPU half of the CUDA-graph check) ------

def learnable(n, seed, classes=4):
    "Random 1x28x28 images labelled by which quadrant is brightest: a task a LeNet-5 learns in a few steps."
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    quads = images.float().view(n, 2, 14, 2, 14).mean((2, 4)).flatten(1)
    return ImageSet(images, quads.argmax(1), [str(i) for i in range(classes)], "synthetic", "brightest quadrant")


def eager_reference(model, data, c, seed):
    "fit's arithmetic written out with torch.optim: the engine's data streams, cosine lr, one CE step per batch."
    import torch.nn.functional as F
    from kdbook.engine import Stream, batch_starts, cosine_lr, next_batch, seed_global_rng
    from kdbook.train import make_optimizer
    opt = make_optimizer(model.parameters(), c)
    seed_global_rng(seed, torch.device("cpu"))
    stream, starts = Stream(seed, torch.device("cpu")), batch_starts(len(data), c.batch_size)
    total, losses, lrs = c.epochs * len(starts), [], []
    model.train()
    with torch.random.fork_rng(devices=[]):
        for epoch in range(c.epochs):
            stream.new_epoch(len(data), torch.device("cpu"))
            for start in starts:
                x, y = next_batch([stream], data.images, data.labels, start, c, None, False, False)
                lr = cosine_lr(len(lrs), total, c.lr, c.lr_min)
                for group in opt.param_groups:
                    group["lr"] = lr
                loss = F.cross_entropy(model(x).float(), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
                lrs.append(lr)
    return losses, lrs


@pytest.mark.parametrize("optimizer,kw", [("sgd", dict(lr=0.05, momentum=0.9, weight_decay=5e-4)),
                                          ("adam", dict(lr=2e-3, weight_decay=1e-4))])
def test_functional_steps_equal_eager_torch_optim(optimizer, kw):
    from kdbook.engine import trace_steps
    data = learnable(72, 0)  # 4 batches of 16 and a partial one of 8 per epoch
    c = cfg(epochs=3, batch_size=16, optimizer=optimizer, lr_min=1e-4, policy="baseline", **kw)
    model = make_model("lenet5", seed=0, num_classes=4)
    reference = copy.deepcopy(model)
    with trace_steps():
        h = fit(model, data, data, c, seed=5)
    ref_losses, ref_lrs = eager_reference(reference, data, c, seed=5)
    assert len(h["step_loss"]) == len(ref_losses) == 15
    torch.testing.assert_close(torch.tensor(h["step_loss"]), torch.tensor(ref_losses), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(h["step_lr"]), torch.tensor(ref_lrs), rtol=1e-6, atol=0)
    for (n, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")
    assert sum(ref_losses[-5:]) < sum(ref_losses[:5]), "the task is learnable: the loss falls"
    assert "step_loss" not in fit(copy.deepcopy(reference), data, data, cfg(epochs=1), seed=5), "traces only on demand"


def test_store_meta_tells_graphed_from_eager(tmp_path):
    from kdbook.store import Store
    train = data(16, 0, shape=(1, 8, 8))
    store = Store(tmp_path)
    rec = store.run("t", {"e": 1}, lambda: {"loss": fit(_Tiny(0), train, train, cfg(epochs=1), seed=0)["train_loss"]}, 0)
    assert rec["meta"]["cuda_graphs"] == {"graphed": 0, "eager": 1}  # a CPU run never captures a graph
    assert "cuda_graphs" not in store.run("u", {"e": 1}, lambda: {"x": 1}, 0)["meta"]  # no training, no entry


def test_benchmark_probe_runs_on_cpu(tmp_path):
    """`benchmarks/distill_throughput.py --probe --device cpu` runs every probe row (teacher fit, same-batch students,
    students on parallel streams beside the loop, the SN-GAN) end to end and writes its record where --out says."""
    import importlib.util
    import json
    from pathlib import Path

    from kdbook.engine import benchmark_rows
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "distill_throughput.py"
    spec = importlib.util.spec_from_file_location("distill_throughput", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "sub" / "probe.json"
    record = bench.main(["--probe", "--device", "cpu", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    assert record["probe"] and record["format"] == 2 and record["config"]["data"] == "random uint8 images"
    rows = record["rows"]
    assert [r for r in rows if r.get("error")] == []
    assert {r["row"] for r in rows} == {"t", "d", "s", "g"}
    assert {(r["k"], r["packing"]) for r in rows if r["row"] == "s"} == {(4, "loop"), (4, "streams")}
    assert sorted(r["k"] for r in rows if r["row"] == "d") == [1, 4] and all(r["same_batches"] for r in rows if r["row"] == "d")
    gan = [r for r in rows if r["row"] == "g"]
    assert len(gan) == 1 and gan[0]["s_per_generator_step"] > 0 and gan[0]["n_dis"] == 5
    assert all(r["images_per_s_total"] > 0 for r in rows if r["row"] != "g")
    table = benchmark_rows(record)
    assert table[-1]["s per generator step"] == gan[0]["s_per_generator_step"]
    with pytest.raises(SystemExit):  # bad settings stop before anything runs
        bench.main(["--probe", "--device", "cpu", "--gan-channels", "8", "--out", str(out)])
