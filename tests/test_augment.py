"""kdbook.augment: every policy deterministic, in range, vectorised over the batch, device-agnostic."""
import colorsys

import pytest
import torch

from kdbook.augment import (POLICIES, augment, random_crop, random_hflip, random_vflip, random_rotation,
                            color_jitter, rgb_to_hsv, hsv_to_rgb, mixup, uniform_noise, append_ood,
                            append_synthetic)


def g(seed=0): return torch.Generator().manual_seed(seed)


X = torch.rand(16, 3, 32, 32, generator=g(123)) * 2 - 1
POOL = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g(9))
def SAMPLER(k, gen): return torch.rand(k, 3, 32, 32, generator=gen) * 2 - 1
KW = {"ood": dict(pool=POOL), "synthetic": dict(sampler=SAMPLER)}


def test_policy_names():
    assert set(POLICIES) == {"none", "baseline", "rotation", "vflip", "color_jitter", "combined", "mixup",
                             "noise", "ood", "synthetic"}


@pytest.mark.parametrize("policy", list(POLICIES))
def test_deterministic_in_range_and_shaped(policy):
    a = augment(X, policy, g(1), **KW.get(policy, {}))
    b = augment(X, policy, g(1), **KW.get(policy, {}))
    assert torch.equal(a, b)
    if policy != "none":
        assert not torch.equal(a, augment(X, policy, g(2), **KW.get(policy, {})))
        assert not torch.equal(a, X)
    assert a.dtype == X.dtype and a.min() >= -1 and a.max() <= 1
    assert a.shape == ((20,) if policy in ("ood", "synthetic") else (16,)) + X.shape[1:]
    assert torch.equal(X, torch.rand(16, 3, 32, 32, generator=g(123)) * 2 - 1)  # input untouched


@pytest.mark.parametrize("policy", ["baseline", "rotation", "vflip", "color_jitter", "combined", "noise"])
def test_greyscale_batches(policy):
    x = torch.rand(8, 1, 28, 28, generator=g(4)) * 2 - 1
    a = augment(x, policy, g(0))
    assert a.shape == x.shape and a.min() >= -1 and a.max() <= 1


def test_unknown_policy_and_bad_input():
    with pytest.raises(ValueError, match="choose one of 'none', 'baseline', 'rotation'"):
        augment(X, "autoaugment", g())
    with pytest.raises(ValueError, match="to_float"):
        augment(POOL[:2], "baseline", g())
    with pytest.raises(ValueError, match="pool="):
        augment(X, "ood", g())
    with pytest.raises(ValueError, match="sampler="):
        augment(X, "synthetic", g())
    with pytest.raises(ValueError, match="must match"):
        augment(X, "ood", g(), pool=POOL[:, :, :28, :28])


def test_crop_keeps_pixels_up_to_padding():
    x = (torch.randperm(16 * 3 * 32 * 32, generator=g(5)).float() / (16 * 3 * 32 * 32)).view(16, 3, 32, 32)
    c = random_crop(x, g(6), padding=4)
    for i in range(16):
        inside = c[i][c[i] > -1]
        assert torch.isin(inside, x[i]).all()  # every non-padding value comes from the same image
        assert len(torch.unique(inside)) == len(inside)  # and only once
        assert len(inside) >= 3 * 24 * 24  # at most 4 rows and 4 columns of padding show
    shifted = [not torch.equal(c[i], x[i]) for i in range(16)]
    assert sum(shifted) >= 12  # offsets are random, (0, 0) only 1 time in 81
    assert torch.equal(random_crop(x, g(6), padding=0), x)


def test_crop_offsets_cover_the_range():
    x = torch.zeros(2000, 1, 8, 8); x[:, :, 0, 0] = 1.0  # track where the top-left pixel lands
    c = random_crop(x, g(7), padding=4)
    hit = (c == 1.0).flatten(1).any(1)
    assert 0.1 < hit.float().mean() < 0.5  # visible only when the offset does not cut it off (25/81)


def test_flips():
    assert torch.equal(random_hflip(random_hflip(X, g(1), p=1.0), g(2), p=1.0), X)
    assert torch.equal(random_hflip(X, g(), p=1.0), X.flip(-1))
    assert torch.equal(random_vflip(X, g(), p=1.0), X.flip(-2))
    assert torch.equal(random_hflip(X, g(), p=0.0), X)
    big = torch.rand(4000, 1, 2, 2, generator=g(3))
    share = (random_hflip(big, g(8)) != big).flatten(1).any(1).float().mean().item()
    assert 0.45 < share < 0.55


def test_rotation():
    assert torch.allclose(random_rotation(X, g(), degrees=0.0), X, atol=1e-5)
    r = random_rotation(X, g(), degrees=20.0)
    assert r.shape == X.shape and not torch.allclose(r, X)
    corners = r[:, :, 0, 0]
    assert (corners == -1).float().mean() > 0.3  # black fill comes in at the corners


def test_color_jitter():
    assert torch.allclose(color_jitter(X, g(), 0.0, 0.0, 0.0, 0.0), X, atol=1e-5)
    # a pure hue shift keeps each pixel's value (max channel) and saturation
    h = color_jitter(X, g(), 0.0, 0.0, 0.0, 0.5)
    assert torch.allclose(((h + 1) / 2).amax(1), ((X + 1) / 2).amax(1), atol=1e-5)
    assert not torch.allclose(h, X, atol=1e-2)
    b = color_jitter(X, g(), brightness=0.2, contrast=0.0, saturation=0.0, hue=0.0)
    ratio = ((b + 1) / 2).flatten(1).sum(1) / ((X + 1) / 2).flatten(1).sum(1)
    assert ratio.min() > 0.75 and ratio.max() < 1.21


def test_hsv_matches_colorsys():
    rgb = torch.rand(1, 3, 5, 5, generator=g(11))
    hsv = rgb_to_hsv(rgb)
    for i in range(5):
        for j in range(5):
            ref = colorsys.rgb_to_hsv(*rgb[0, :, i, j].tolist())
            assert torch.allclose(hsv[0, :, i, j], torch.tensor(ref), atol=1e-5)
    assert torch.allclose(hsv_to_rgb(hsv), rgb, atol=1e-5)


def test_mixup_one_lambda_per_batch():
    x = torch.rand(64, 3, 4, 4, generator=g(2)) * 2 - 1
    m = mixup(x, g(3))
    assert torch.allclose(m.mean(0), x.mean(0), atol=1e-5)  # a permutation partner keeps the batch mean
    pair = torch.stack([torch.ones(1, 1, 1), -torch.ones(1, 1, 1)])
    lams = []
    for s in range(200):
        o = mixup(pair, g(s))
        if o[0].item() != 1.0: lams.append((o[0].item() + 1) / 2)  # swapped partner: o0 = 2*lam - 1
        assert abs(o[0].item() + o[1].item()) < 1e-6 or o[0].item() == 1.0  # one lambda for both images
    assert 0.35 < sum(lams) / len(lams) < 0.65


def test_noise():
    x = torch.zeros(5000, 1, 2, 2)
    n = uniform_noise(x, g(1), p=0.2)
    share = (n != 0).flatten(1).any(1).float().mean().item()
    assert 0.18 < share < 0.22
    assert n.min() >= -1 and n.max() <= 1
    assert torch.equal(augment(X, "noise", g(4), p=0.0), augment(X, "baseline", g(4)))


def test_ood_and_synthetic_append():
    o = append_ood(X, g(1), pool=POOL, ratio=0.25)
    assert torch.equal(o[:16], X)
    ref = POOL.float() / 127.5 - 1
    assert all(any(torch.equal(row, p) for p in ref) for row in o[16:])
    seen = []
    def sampler(k, gen): seen.append(k); return torch.zeros(k, 3, 32, 32)
    s = append_synthetic(X, g(1), sampler=sampler)
    assert seen == [4] and torch.equal(s[16:], torch.zeros(4, 3, 32, 32))
    with pytest.raises(ValueError, match="expected"):
        append_synthetic(X, g(), sampler=lambda k, gen: torch.zeros(k, 1, 32, 32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("policy", list(POLICIES))
def test_same_on_cuda(policy):
    kw = {"ood": dict(pool=POOL.cuda()), "synthetic": dict(sampler=SAMPLER)}.get(policy, {})
    a = augment(X, policy, g(5), **KW.get(policy, {}))
    b = augment(X.cuda(), policy, g(5), **kw)
    assert b.device.type == "cuda" and torch.allclose(a, b.cpu(), atol=1e-4)


@pytest.mark.parametrize("policy,kw,words", [
    ("baseline", dict(padding=-1), "padding must be an integer >= 0"),
    ("baseline", dict(padding=2.5), "padding must be an integer"),
    ("rotation", dict(degrees=float("nan")), "degrees must be a finite number in [0, 180], got nan"),
    ("rotation", dict(degrees=float("inf")), "degrees must be a finite number in [0, 180], got inf"),
    ("rotation", dict(degrees=-5), "degrees"),
    ("noise", dict(p=1.5), "p must be in [0, 1], got 1.5"),
    ("noise", dict(p=-0.1), "p must be"),
    ("noise", dict(p=float("nan")), "p must be"),
    ("color_jitter", dict(hue=0.7), "hue must be in [0, 0.5], got 0.7"),
    ("color_jitter", dict(brightness=True), "brightness"),
    ("ood", dict(pool=torch.zeros(4, 3, 8, 8), ratio=-0.25), "ratio must be >= 0, got -0.25"),
    ("baseline", dict(paddding=4), "policy 'baseline' takes no option paddding; its options: padding"),
    ("vflip", dict(p=0.5), "takes no option p; its options: none"),
])
def test_out_of_range_settings_are_refused(policy, kw, words):
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    with pytest.raises(ValueError) as e:
        augment(x, policy, torch.Generator().manual_seed(0), **kw)
    assert words in str(e.value), str(e.value)


def test_flip_helpers_refuse_bad_probabilities():
    x, g = torch.zeros(2, 1, 4, 4), torch.Generator().manual_seed(0)
    for fn in (random_hflip, random_vflip):
        with pytest.raises(ValueError, match=r"p must be in \[0, 1\], got 2"):
            fn(x, g, p=2.0)
