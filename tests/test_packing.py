"""Tests for kdbook.packing (chapter a3d_packing): k networks packed into one compute exactly what
the k separate networks compute — forward (train and eval), one SGD step, a 3-epoch training loop,
BatchNorm running statistics included — and the weights go in and out as ordinary state dicts."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbook.models import lenet5, preresnet, resnet20, resnet56, vgg16
from kdbook.packing import Packed, can_pack, pack

# name -> (constructor, input shape); widths kept small so that the CPU tests stay fast
ARCHS = {
    "lenet5": (lambda: lenet5(), (1, 28, 28)),
    "resnet20": (lambda: resnet20(10, width=4), (3, 32, 32)),
    "resnet20_layer": (lambda: resnet20(10, norm="layer", width=4), (3, 32, 32)),
    "resnet56": (lambda: resnet56(10, width=4), (3, 32, 32)),
    "preresnet8": (lambda: preresnet(8, 10, width=4), (3, 32, 32)),
    "preresnet11_bottleneck": (lambda: preresnet(11, 10, width=4, block="bottleneck"), (3, 32, 32)),
    "vgg16": (lambda: vgg16(10), (3, 32, 32)),
    "vgg16_bn": (lambda: vgg16(10, batch_norm=True), (3, 32, 32)),
}


def _members(name, k, seed=0, dtype=torch.float32):
    make, shape = ARCHS[name]
    torch.manual_seed(seed)
    models = [make().to(dtype) for _ in range(k)]
    for m in models:  # dropout draws different masks packed and separate: switch it off to compare train mode
        for d in m.modules():
            if isinstance(d, nn.Dropout):
                d.p = 0.0
    return models, shape


def _close(a, b, rel=1e-5, atol=1e-7):
    err = (a.double() - b.double()).abs().max().item()
    scale = b.double().abs().max().item()
    assert err <= rel * scale + atol, f"max abs error {err:.3e} > {rel} * {scale:.3e} + {atol}"


# Training tests run in float64: in float32 the backward pass of a BatchNorm network at batch 8
# amplifies the rounding differences of grouped vs dense kernels to ~1e-5 of the weights, which a
# real mismatch (mixed gradients, wrong statistics) could hide behind; in float64 packed and
# separate agree to ~1e-13, and any bug shows as an O(1) difference.
F64 = dict(rel=1e-9, atol=1e-12)


def _assert_states_close(states, models, rel=1e-5, atol=1e-7):
    for i, (s, m) in enumerate(zip(states, models)):
        ref = m.state_dict()
        assert list(s) == list(ref), f"member {i}: keys differ"
        for key in ref:
            if key.endswith("num_batches_tracked"):
                assert torch.equal(s[key], ref[key]), f"member {i} {key}: {s[key]} != {ref[key]}"
            else:
                _close(s[key], ref[key], rel, atol)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name", sorted(ARCHS))
def test_forward_equals_separate(name, k):
    models, shape = _members(name, k)
    for shared in (False, True):
        packed = pack(models, shared_input=shared)
        assert isinstance(packed, Packed) and packed.k == k and packed.shared_input == shared
        for train in (True, False):
            packed.train(train)
            for m in models:
                m.train(train)
            x = torch.randn(4, *shape) if shared else torch.randn(k, 4, *shape)
            y = packed(x)
            assert y.shape == (k, 4, 10)
            _close(y, torch.stack([m(x if shared else x[i]) for i, m in enumerate(models)]))
            if not shared and train is False:  # k students evaluated on one batch
                _close(packed(x[0], shared=True), torch.stack([m(x[0]) for m in models]))
        # both train-mode passes updated the BatchNorm statistics of packed and separate alike
        _assert_states_close(packed.state_dicts(), models)


@pytest.mark.parametrize("name", ["lenet5", "resnet20", "resnet20_layer"])
def test_channels_last_and_bf16_autocast(name):
    models, shape = _members(name, 2)
    packed = pack(models).eval().to(memory_format=torch.channels_last)
    c, h, w = shape
    x = torch.randn(2, 4, h, w, c).permute(0, 1, 4, 2, 3)  # each member's batch NHWC
    assert x[0].is_contiguous(memory_format=torch.channels_last)
    ref = torch.stack([m.eval()(xi) for m, xi in zip(models, x)])
    _close(packed(x), ref)
    teacher = pack(models, shared_input=True).eval()
    _close(teacher(x[0].contiguous(memory_format=torch.channels_last)), torch.stack([m(x[0]) for m in models]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = packed(x)
    assert y.dtype == torch.bfloat16
    _close(y, ref, rel=5e-2)


def _member_loss(logits, y):
    "Sum over members of each member's mean cross-entropy: member i's gradient is that of its own loss."
    k, b = y.shape
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(k, b).mean(1).sum()


SGD = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)


@pytest.mark.parametrize("name", ["lenet5", "resnet20", "resnet20_layer", "resnet56"])
def test_one_sgd_step_equals_separate(name):
    models, shape = _members(name, 3, dtype=torch.float64)
    packed = pack(models)
    x, y = torch.randn(3, 8, *shape, dtype=torch.float64), torch.randint(0, 10, (3, 8))
    opt = torch.optim.SGD(packed.parameters(), **SGD)
    for _ in range(2):  # two steps, so that momentum buffers matter
        opt.zero_grad()
        _member_loss(packed(x), y).backward()
        opt.step()
    for m, xi, yi in zip(models, x, y):
        opt_i = torch.optim.SGD(m.parameters(), **SGD)
        for _ in range(2):
            opt_i.zero_grad()
            F.cross_entropy(m(xi), yi).backward()
            opt_i.step()
    _assert_states_close(packed.state_dicts(), models, **F64)


@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_three_epochs_packed_equal_separate_runs(name):
    """A 3-epoch training run of k=3 packed networks equals 3 separate runs, each member with its own
    batch order: weights, BatchNorm running statistics and batch counts."""
    k, n, batch, epochs = 3, 24, 8, 3
    models, shape = _members(name, k, dtype=torch.float64)
    torch.manual_seed(1)
    images, labels = torch.randn(n, *shape, dtype=torch.float64), torch.randint(0, 10, (n,))

    def order(member, epoch):
        return torch.randperm(n, generator=torch.Generator().manual_seed(1000 * member + epoch))

    separate = [copy.deepcopy(m) for m in models]
    for i, m in enumerate(separate):
        m.train()
        opt = torch.optim.SGD(m.parameters(), **SGD)
        for epoch in range(epochs):
            for idx in order(i, epoch).split(batch):
                opt.zero_grad()
                F.cross_entropy(m(images[idx]), labels[idx]).backward()
                opt.step()

    packed = pack(models).train()
    opt = torch.optim.SGD(packed.parameters(), **SGD)
    for epoch in range(epochs):
        batches = list(zip(*[order(i, epoch).split(batch) for i in range(k)]))  # step s: each member's s-th batch
        for idxs in batches:
            idx = torch.stack(idxs)  # (k, batch)
            opt.zero_grad()
            _member_loss(packed(images[idx]), labels[idx]).backward()
            opt.step()
    _assert_states_close(packed.state_dicts(), separate, **F64)
    # and the trained members predict as the separate runs do
    x = torch.randn(5, *shape, dtype=torch.float64)
    _close(packed.eval()(x.expand(k, *x.shape)), torch.stack([m.eval()(x) for m in separate]), **F64)
    _close(torch.stack([m.eval()(x) for m in packed.unpack()]), torch.stack([m(x) for m in separate]), **F64)


@pytest.mark.parametrize("name", ["lenet5", "resnet20", "resnet20_layer", "vgg16_bn"])
def test_state_dict_round_trips(name, tmp_path):
    from safetensors.torch import load_file, save_file
    models, shape = _members(name, 3)
    packed = pack(models)
    packed.train()(torch.randn(3, 4, *shape))  # running statistics and counters move
    states = packed.state_dicts()
    assert [list(s) for s in states] == [list(m.state_dict()) for m in models]
    # load_state_dicts is the inverse of state_dicts, exactly
    other, _ = _members(name, 3, seed=1)
    packed2 = pack(other)
    packed2.load_state_dicts(states)
    for a, b in zip(packed2.state_dicts(), states):
        assert all(torch.equal(a[key], b[key]) for key in b)
    # unpack: new modules of the original class, same tensors, same predictions
    unpacked = packed.unpack()
    assert all(type(u) is type(models[0]) and u is not m for u, m in zip(unpacked, models))
    for u, s in zip(unpacked, states):
        assert all(torch.equal(u.state_dict()[key], s[key]) for key in s)
    x = torch.randn(3, 4, *shape)
    packed.eval()
    _close(packed(x), torch.stack([u.eval()(xi) for u, xi in zip(unpacked, x)]))
    # copy_to writes into the existing modules in place: parameters keep their identity
    ids = [[id(p) for p in m.parameters()] for m in other]
    packed.copy_to(other)
    assert ids == [[id(p) for p in m.parameters()] for m in other]
    for m, s in zip(other, states):
        assert all(torch.equal(m.state_dict()[key], s[key]) for key in s)
    # a checkpoint is an ordinary per-model state dict: safetensors round trip into a plain model
    save_file({key: t.contiguous() for key, t in states[1].items()}, tmp_path / "member1.safetensors")
    plain = ARCHS[name][0]()
    plain.load_state_dict(load_file(tmp_path / "member1.safetensors"))
    assert all(torch.equal(plain.state_dict()[key], states[1][key]) for key in states[1])


def test_state_dicts_are_copies():
    models, _ = _members("resnet20", 2)
    packed = pack(models)
    states = packed.state_dicts()
    states[0]["conv1.weight"].zero_()
    assert not torch.equal(packed.state_dicts()[0]["conv1.weight"], states[0]["conv1.weight"])


def test_frozen_members_stay_frozen():
    models, _ = _members("resnet20", 2)
    for m in models:
        m.requires_grad_(False)
    assert not any(p.requires_grad for p in pack(models).parameters())


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="at least one model"):
        pack([])
    with pytest.raises(ValueError, match="Sequential.*PreResNet|PreResNet.*Sequential"):
        pack([lenet5(), resnet20()])
    with pytest.raises(ValueError, match=r"model 1 differs from model 0 \(fc: Linear\(.*out_features=100.* vs .*out_features=10,"):
        pack([resnet20(10), resnet20(100)])
    with pytest.raises(ValueError, match="differs from model 0.*GroupNorm.* vs .*BatchNorm2d"):
        pack([resnet20(10, norm="batch"), resnet20(10, norm="layer")])
    with pytest.raises(ValueError, match="differs from model 0.*float64"):
        pack([lenet5(), lenet5().double()])
    with pytest.raises(ValueError, match="list of nn.Module"):
        pack(lenet5())
    with pytest.raises(ValueError, match="MultiheadAttention"):
        pack([nn.Sequential(nn.MultiheadAttention(4, 2))])
    with pytest.raises(ValueError, match="LayerNorm"):
        pack([nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))] * 2)
    with pytest.raises(ValueError, match="Flatten"):
        pack([nn.Sequential(nn.Flatten(0), nn.Linear(4, 4))])
    packed = pack([resnet20(10, width=4) for _ in range(3)])
    with pytest.raises(ValueError, match=r"\(3, B, 3, H, W\).*\(2, 4, 3, 32, 32\)"):
        packed(torch.randn(2, 4, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(3, B, 3, H, W\)"):
        packed(torch.randn(4, 3, 32, 32))
    teacher = pack([resnet20(10, width=4) for _ in range(3)], shared_input=True)
    with pytest.raises(ValueError, match=r"shared input.*\(B, 3, H, W\)"):
        teacher(torch.randn(3, 4, 3, 32, 32))
    states = packed.state_dicts()
    with pytest.raises(ValueError, match="list of 3 state dicts"):
        packed.load_state_dicts(states[:2])
    bad = [dict(s) for s in states]
    del bad[1]["fc.bias"]
    with pytest.raises(ValueError, match="state dict 1: missing keys.*fc.bias"):
        packed.load_state_dicts(bad)
    with pytest.raises(ValueError, match="state dict 0: wrong shapes"):
        packed.load_state_dicts([resnet20(100, width=4).state_dict()] + states[1:])
    with pytest.raises(ValueError, match="copy_to needs a list of 3"):
        packed.copy_to([resnet20(10, width=4)])
    assert can_pack([resnet20(10, width=4)] * 2) is None


def test_mlp_with_batchnorm1d_and_linear_first():
    """A network whose first weight layer is a Linear (inputs replicated for shared_input) with BatchNorm1d."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
              for _ in range(3)]
    for shared in (False, True):
        packed = pack(models, shared_input=shared).train()
        x = torch.randn(5, 3, 2, 2) if shared else torch.randn(3, 5, 3, 2, 2)
        _close(packed(x), torch.stack([m.train()(x if shared else x[i]) for i, m in enumerate(models)]))
        _assert_states_close(packed.state_dicts(), models)


def test_parameters_keep_their_names_and_bias_stays_1d():
    """Optimizer rules by name or by ndim (e.g. no weight decay on biases and norm weights) still apply."""
    models, _ = _members("resnet20", 3)
    packed = pack(models)
    names = [n.removeprefix("net.") for n, _ in packed.named_parameters()]
    assert names == [n for n, _ in models[0].named_parameters()]
    ndims = {n.removeprefix("net."): p.ndim for n, p in packed.named_parameters()}
    assert ndims == {n: p.ndim for n, p in models[0].named_parameters()} | {"fc.weight": 3}


def test_batchnorm_counters_per_member_and_momentum_none():
    models, shape = _members("resnet20", 2)
    models[1].train()(torch.randn(2, *shape))  # member 1 has seen one batch more
    packed = pack(models)
    assert [s["bn.num_batches_tracked"].item() for s in packed.state_dicts()] == [0, 1]
    packed.train()(torch.randn(2, 2, *shape))
    assert [s["bn.num_batches_tracked"].item() for s in packed.state_dicts()] == [1, 2]
    for m in models:
        for b in m.modules():
            if isinstance(b, nn.BatchNorm2d):
                b.momentum = None  # cumulative average: the shared counter would be wrong for one member
    with pytest.raises(ValueError, match="momentum=None"):
        pack(models)


# --- LoopStack(streams=True): members on parallel CUDA streams; on a CPU the plain loop ------------------------------

def _stream_step_run(streams, shared, device, steps=3, graphs=False, k=3):
    "`steps` engine steps of k BatchNorm ResNet-20s in a LoopStack; returns (state dicts, loss sums, graphed)."
    from kdbook.engine import FunctionalOptimizer, GraphedStep, LoopStack, Step, TrainConfig
    models, shape = _members("resnet20", k, seed=1)
    teacher = None
    if shared:  # distillation: one teacher labels the shared batch
        torch.manual_seed(2)
        teacher = ARCHS["resnet20"][0]().eval().to(device)
    models = [m.to(device) for m in models]
    stack = LoopStack(models, shared_input=shared, streams=streams)
    cfg = TrainConfig(batch_size=8, lr=0.05, device=str(device), amp=False, channels_last=False, progress=False)
    opt = FunctionalOptimizer(stack.parameters(), cfg)
    step = Step(stack, opt, k, teacher, tau=4.0, packed=True, shared_input=shared, amp=False, device=device)
    runner = GraphedStep(step, graphs)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = torch.randn((8, *shape) if shared else (k, 8, *shape), generator=g).to(device)
        y = torch.randint(0, 10, (8,) if shared else (k, 8), generator=g).to(device)
        runner(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return [{n: t.cpu() for n, t in m.state_dict().items()} for m in models], step.loss_sum.cpu(), runner.graphed


@pytest.mark.parametrize("shared", [False, True])
def test_loopstack_streams_equals_loop_on_cpu(shared):
    "On a CPU the option is accepted and is the loop: bit-identical weights, BatchNorm statistics and losses."
    a, loss_a, _ = _stream_step_run(False, shared, torch.device("cpu"))
    b, loss_b, _ = _stream_step_run(True, shared, torch.device("cpu"))
    assert torch.equal(loss_a, loss_b)
    assert loss_a.ne(0).all()
    for sa, sb in zip(a, b):
        assert list(sa) == list(sb)
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
    # the steps did train every member: its weights moved from their initial values
    initial, _ = _members("resnet20", 3, seed=1)
    for sa, m in zip(a, initial):
        assert any(not torch.equal(sa[key], t) for key, t in m.state_dict().items() if t.is_floating_point())


def test_loopstack_streams_option_checked_and_copyable():
    from kdbook.engine import LoopStack
    models, shape = _members("lenet5", 2)
    with pytest.raises(ValueError, match="streams"):
        LoopStack(models, streams="yes")
    stack = LoopStack(models, streams=True)
    assert stack.streams and not LoopStack(models).streams  # off by default
    twin = copy.deepcopy(stack)  # a copy makes its own streams on first use
    assert twin.streams and twin._side == {}
    x = torch.randn(2, 4, *shape)
    assert torch.equal(twin(x), stack(x))
    stack.join_streams()  # nothing to join on a CPU: a no-op


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (parallel streams inside a CUDA graph)")
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("graphs", [False, True])
def test_loopstack_streams_equals_loop_on_cuda(shared, graphs):
    "On CUDA, members on parallel streams (eager, and captured in the whole-step graph) compute the loop's result."
    dev = torch.device("cuda")
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        a, loss_a, graphed_a = _stream_step_run(False, shared, dev, steps=6, graphs=graphs)
        b, loss_b, graphed_b = _stream_step_run(True, shared, dev, steps=6, graphs=graphs)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags
    assert graphed_a == graphed_b == graphs
    _close(loss_b, loss_a, rel=1e-5, atol=1e-6)
    for sa, sb in zip(a, b):
        for key in sa:
            if key.endswith("num_batches_tracked"):
                assert torch.equal(sa[key], sb[key]), key
            else:
                _close(sb[key], sa[key], rel=1e-4, atol=1e-6)
