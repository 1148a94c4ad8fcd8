"""Tests for kdbook.models (chapter a2_models): parameter counts of the authors' code, shapes,
CPU forward/backward, get_model errors, the §6.2 BatchNorm-vs-LayerNorm property, stage outputs."""
import copy

import pytest
import torch
from torch import nn

from kdbook.models import (count_params, get_model, lenet5, preresnet, resnet20, resnet56, resnet110,
                           stage_outputs, vgg16, MODELS)

# Counts of the authors' code (shared/paper/FACTS.md), 100 classes (LeNet-5: 10).
AUTHORS_COUNTS = {"lenet5": 61_706, "resnet20": 278_132, "resnet56": 613_556, "vgg16": 15_291_300}


@pytest.mark.parametrize("name,expected", sorted(AUTHORS_COUNTS.items()))
def test_param_counts_match_authors_code(name, expected):
    assert count_params(get_model(name)) == expected


def test_layernorm_variant_same_count_no_batchnorm_no_buffers():
    net = resnet20(norm="layer")
    assert count_params(net) == AUTHORS_COUNTS["resnet20"]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert sum(isinstance(m, nn.GroupNorm) and m.num_groups == 1 for m in net.modules()) == 20 - 1
    assert list(net.buffers()) == []


def test_block_types_and_depth_rules():
    assert resnet20().block == "BasicBlock" and resnet56().block == "Bottleneck"
    assert len(resnet56().layer1) == 6 and len(resnet20().layer1) == 3 and len(resnet110().layer1) == 12
    # shortcuts: bare 1x1 convs (no norm) only where the shape changes
    downs = [m.downsample for m in resnet56().modules() if hasattr(m, "downsample") and m.downsample is not None]
    assert len(downs) == 3 and all(len(d) == 1 and isinstance(d[0], nn.Conv2d) for d in downs)
    for bad, msg in [(21, r"6n\+2"), (2, r"6n\+2"), (50, r"9n\+2")]:
        with pytest.raises(ValueError, match=msg):
            preresnet(bad)
    with pytest.raises(ValueError, match="unknown norm"):
        resnet20(norm="instance")


def test_he_fan_out_init():
    torch.manual_seed(0)
    net = resnet56()
    w = net.layer3[0].conv2.weight  # 64 -> 64, 3x3: std = sqrt(2 / (9 * 64))
    assert abs(w.std().item() - (2 / (9 * 64)) ** 0.5) < 0.01


@pytest.mark.parametrize("name,shape,classes", [("lenet5", (1, 28, 28), 10), ("resnet20", (3, 32, 32), 100),
                                               ("resnet56", (3, 32, 32), 100), ("vgg16", (3, 32, 32), 100)])
def test_forward_backward_cpu(name, shape, classes):
    torch.manual_seed(0)
    net = get_model(name)
    x = torch.randn(4, *shape)
    out = net(x)
    assert out.shape == (4, classes)
    out.logsumexp(1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_num_classes_width_and_channels_last():
    torch.manual_seed(0)
    assert resnet20(num_classes=10)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert count_params(resnet20(width=32)) > 3 * count_params(resnet20())
    net = resnet56().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = net(x)
        out = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_get_model_errors_list_names():
    with pytest.raises(ValueError) as e:
        get_model("resnet18")
    for name in MODELS:
        assert name in str(e.value)
    assert count_params(get_model("preresnet", depth=20)) == AUTHORS_COUNTS["resnet20"]


def test_constructors_use_callers_seed():
    torch.manual_seed(1); a = resnet20()
    torch.manual_seed(1); b = resnet20()
    torch.manual_seed(2); c = resnet20()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def _twin(net):
    # same parameters, fresh buffers (running statistics)
    twin = copy.deepcopy(net)
    for m in twin.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
    return twin


def test_layernorm_twins_identical_batchnorm_twins_not():
    """§6.2: identical weights give identical predictions with LayerNorm, not with BatchNorm."""
    torch.manual_seed(0)
    data_a, data_b, test = torch.randn(64, 3, 32, 32), 0.5 * torch.randn(64, 3, 32, 32) + 0.3, torch.randn(16, 3, 32, 32)
    for norm in ("batch", "layer"):
        a = resnet20(norm=norm)
        b = _twin(a)
        with torch.no_grad():
            a.train(); a(data_a)  # accumulate statistics on different data
            b.train(); b(data_b)
            a.eval(); b.eval()
            same_eval = torch.equal(a(test), b(test))
            a.train(); b.train()
            # train mode: an example's output depends on the rest of its batch only with BatchNorm
            full = a(test)[:4]
            part = a(test[:4])
            same_batch_dep = torch.allclose(full, part, atol=1e-5)
        if norm == "layer":
            assert same_eval and same_batch_dep
        else:
            assert not same_eval and not same_batch_dep


def test_stage_outputs_shapes_and_consistency():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for net, chans in [(resnet20(), (16, 32, 64)), (resnet56(), (64, 128, 256))]:
        net.eval()
        logits, feats = stage_outputs(net, x)
        assert [tuple(f.shape) for f in feats] == [(2, chans[0], 32, 32), (2, chans[1], 16, 16), (2, chans[2], 8, 8)]
        assert torch.equal(logits, net(x))
        for f, g in zip(feats, net.forward_features(x)):
            assert torch.equal(f, g)
        assert all(len(s._forward_hooks) == 0 for s in net.stages)
    with pytest.raises(ValueError, match="layer1"):
        stage_outputs(lenet5(), torch.zeros(1, 1, 28, 28))


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_channels_last_preserved_through_every_layer(norm):
    net = resnet56(norm=norm).to(memory_format=torch.channels_last)
    bad = []
    def hook(module, inputs, output):
        if output.dim() == 4 and not output.is_contiguous(memory_format=torch.channels_last):
            bad.append(type(module).__name__)
    handles = [m.register_forward_hook(hook) for m in net.modules() if m is not net]
    net(torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last))
    for h in handles:
        h.remove()
    assert bad == []


def test_block_override():
    assert preresnet(56, block="basic").block == "BasicBlock"
    assert count_params(preresnet(56, block="basic")) > count_params(resnet56())
    assert preresnet(29, block="bottleneck").block == "Bottleneck"
    with pytest.raises(ValueError, match="unknown block"):
        preresnet(20, block="bottle")
