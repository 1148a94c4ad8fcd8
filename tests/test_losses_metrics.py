"""kdbook.losses and kdbook.metrics against independent references (scipy, torchmetrics, numpy, hand)."""
import math
import re

import numpy as np
import pytest
import torch
from scipy.special import log_softmax as sp_log_softmax
from scipy.special import rel_entr, softmax as sp_softmax

from kdbook.losses import ensemble_logits, kd_grad, kd_grad_limit, kd_loss
from kdbook.metrics import accuracy, cka_linear, cka_rbf, ece, nll, predictive_kl, top1_agreement


def _logits(seed, n=200, c=10, scale=3.0):
    rng = np.random.default_rng(seed)
    return scale * rng.standard_normal((n, c))


def _t(a):
    return torch.tensor(a, dtype=torch.float64)


# ---------------------------------------------------------------- kd_loss (Eq. 1)
@pytest.mark.parametrize("seed,tau", [(0, 1.0), (1, 4.0), (2, 0.5), (3, 20.0)])
def test_kd_loss_matches_scipy(seed, tau):
    zs, zt = _logits(seed), _logits(seed + 100)
    p = sp_softmax(zt / tau, axis=1)
    expected = tau**2 * np.mean(-(p * sp_log_softmax(zs / tau, axis=1)).sum(axis=1))
    assert kd_loss(_t(zs), _t(zt), tau=tau).item() == pytest.approx(expected, rel=1e-12)


def test_kd_loss_alpha_mixes_nll_and_kd():
    zs, zt = _logits(4), _logits(5)
    y = np.random.default_rng(6).integers(0, 10, len(zs))
    nll_ref = -np.mean(sp_log_softmax(zs, axis=1)[np.arange(len(y)), y])
    kd_ref = 16 * np.mean(-(sp_softmax(zt / 4, axis=1) * sp_log_softmax(zs / 4, axis=1)).sum(axis=1))
    got = kd_loss(_t(zs), _t(zt), torch.tensor(y), tau=4.0, alpha=0.3).item()
    assert got == pytest.approx(0.3 * nll_ref + 0.7 * kd_ref, rel=1e-12)
    assert kd_loss(_t(zs), _t(zt), torch.tensor(y), tau=4.0, alpha=1.0).item() == pytest.approx(nll_ref, rel=1e-12)


def test_kd_loss_by_hand():
    # c = 2, tau = 2: p_t = softmax((2 ln 3, 0) / 2) = (3/4, 1/4); q = (1/2, 1/2); L = 4 * (-(3/4 + 1/4) ln 1/2)
    got = kd_loss(_t([[0.0, 0.0]]), _t([[2 * math.log(3), 0.0]]), tau=2.0).item()
    assert got == pytest.approx(4 * math.log(2), rel=1e-12)


def test_kd_loss_tau1_minus_entropy_is_kl():
    zs, zt = _logits(7), _logits(8)
    p = sp_softmax(zt, axis=1)
    entropy = -np.mean((p * np.log(p)).sum(axis=1))
    kl = np.mean(rel_entr(p, sp_softmax(zs, axis=1)).sum(axis=1))
    assert kd_loss(_t(zs), _t(zt), tau=1.0).item() - entropy == pytest.approx(kl, rel=1e-10)


def test_kd_loss_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    zt = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 1])
    for tau, alpha in [(1.0, 0.0), (4.0, 0.0), (3.0, 0.5)]:
        assert torch.autograd.gradcheck(lambda a, b: kd_loss(a, b, y, tau=tau, alpha=alpha), (zs, zt))


def test_kd_grad_closed_form_and_limit():
    zs, zt = _t(_logits(9)), _t(_logits(10))
    z = zs.clone().requires_grad_(True)
    (kd_loss(z, zt, tau=3.0) * len(zs)).backward()
    torch.testing.assert_close(z.grad, kd_grad(zs, zt, tau=3.0), rtol=1e-10, atol=1e-12)
    # independent limit: (centred z_s - centred z_t) / c written with numpy
    d = zs.numpy() - zt.numpy()
    lim = (d - d.mean(axis=1, keepdims=True)) / d.shape[1]
    np.testing.assert_allclose(kd_grad_limit(zs, zt).numpy(), lim, rtol=1e-12)
    err = [np.linalg.norm(kd_grad(zs, zt, tau=t).numpy() - lim) for t in (1e2, 1e3, 1e4)]
    assert err[0] > 5 * err[1] > 25 * err[2]  # O(1/tau)


@pytest.mark.parametrize("kwargs,message", [
    (dict(tau=0.0), "tau must be > 0"), (dict(tau=-2.0), "tau must be > 0"),
    (dict(tau=float("inf")), "finite"), (dict(tau=float("nan")), "finite"),
    (dict(alpha=1.01), "alpha"), (dict(alpha=-0.5), "alpha"), (dict(alpha=0.5), "labels"),
])
def test_kd_loss_bad_arguments(kwargs, message):
    zs, zt = _t(_logits(0, n=4)), _t(_logits(1, n=4))
    with pytest.raises(ValueError, match=message):
        kd_loss(zs, zt, **kwargs)


def test_kd_loss_bad_shapes():
    zs = _t(_logits(0, n=4))
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(zs, zs[:, :3])
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(zs, zs[:2])
    with pytest.raises(ValueError, match="shape"):
        kd_loss(zs[0], zs[0])


# ---------------------------------------------------------------- ensembles
def test_ensemble_logits_matches_numpy():
    members = np.stack([_logits(s, n=50) for s in range(5)])
    expected = np.log(sp_softmax(members, axis=2).mean(axis=0))
    np.testing.assert_allclose(ensemble_logits(_t(members)).numpy(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        sp_softmax(ensemble_logits(_t(members[:1])).numpy(), axis=1), sp_softmax(members[0], axis=1), rtol=1e-12)
    with pytest.raises(ValueError):
        ensemble_logits(_t(members[0]))


# ---------------------------------------------------------------- metrics
def test_accuracy_and_nll_against_references():
    import torchmetrics.functional.classification as tmf

    z = _logits(11, n=500)
    y = np.random.default_rng(12).integers(0, 10, 500)
    ref_acc = tmf.multiclass_accuracy(_t(z), torch.tensor(y), num_classes=10, average="micro").item()
    assert accuracy(_t(z), torch.tensor(y)) == pytest.approx(ref_acc, abs=1e-6)  # torchmetrics returns float32
    assert accuracy(_t(z), torch.tensor(y)) == pytest.approx(np.mean(z.argmax(1) == y), abs=1e-12)
    assert nll(_t(z), torch.tensor(y)) == pytest.approx(-np.mean(sp_log_softmax(z, axis=1)[np.arange(500), y]), rel=1e-12)


@pytest.mark.parametrize("seed,scale", [(0, 1.0), (1, 3.0), (2, 0.3)])
def test_ece_matches_torchmetrics(seed, scale):
    from torchmetrics.classification import MulticlassCalibrationError

    z = _logits(seed, n=2000, scale=scale)
    rng = np.random.default_rng(seed + 50)
    # labels drawn from the model's own distribution for half the examples: a non-trivial calibration error
    y = np.where(rng.random(2000) < 0.5, z.argmax(1), rng.integers(0, 10, 2000))
    metric = MulticlassCalibrationError(num_classes=10, n_bins=10, norm="l1")
    ref = metric(torch.tensor(sp_softmax(z, axis=1)), torch.tensor(y)).item()
    assert ece(_t(z), torch.tensor(y)) == pytest.approx(ref, abs=1e-6)


def test_ece_by_hand_and_calibrated_toy():
    z = np.log([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.4, 0.6]])
    y = torch.tensor([0, 1, 1, 1])
    assert ece(_t(z), y) == pytest.approx(0.75 * abs(2 / 3 - 0.9) + 0.25 * 0.4, abs=1e-12)
    zc = np.log([[0.8, 0.2]] * 5)
    assert ece(_t(zc), torch.tensor([0, 0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-12)


def test_fidelity_metrics_against_scipy():
    zt, zs = _logits(13), _logits(14)
    kl = np.mean(rel_entr(sp_softmax(zt, axis=1), sp_softmax(zs, axis=1)).sum(axis=1))
    assert predictive_kl(_t(zt), _t(zs)) == pytest.approx(kl, rel=1e-10)
    assert predictive_kl(_t(zt), _t(zt)) == pytest.approx(0.0, abs=1e-14)
    assert top1_agreement(_t(zt), _t(zs)) == pytest.approx(np.mean(zt.argmax(1) == zs.argmax(1)), abs=1e-12)
    assert top1_agreement(_t(zt), _t(zt)) == 1.0
    assert isinstance(predictive_kl(_t(zt), _t(zs)), float) and isinstance(top1_agreement(_t(zt), _t(zs)), float)
    with pytest.raises(ValueError, match="same shape"):
        predictive_kl(_t(zt), _t(zs[:, :4]))


# ---------------------------------------------------------------- CKA (Kornblith et al. 2019)
def _hsic_ref(k, l):
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def _cka_ref(k, l):
    return _hsic_ref(k, l) / math.sqrt(_hsic_ref(k, k) * _hsic_ref(l, l))


def _rbf_ref(x, sigma_frac):
    sq = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return np.exp(-sq / (2 * sigma_frac**2 * np.median(sq)))


@pytest.mark.parametrize("seed", [0, 1])
def test_cka_against_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((60, 12))
    y = np.tanh(x @ rng.standard_normal((12, 7))) + 0.3 * rng.standard_normal((60, 7))
    assert cka_linear(_t(x), _t(y)) == pytest.approx(_cka_ref(x @ x.T, y @ y.T), rel=1e-10)
    for frac in (0.2, 0.5, 1.0):
        assert cka_rbf(_t(x), _t(y), sigma_frac=frac) == pytest.approx(
            _cka_ref(_rbf_ref(x, frac), _rbf_ref(y, frac)), rel=1e-8)
    # the feature-space form of linear CKA (Kornblith et al. eq. 6) agrees with the Gram form
    xc, yc = x - x.mean(0), y - y.mean(0)
    feat = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert cka_linear(_t(x), _t(y)) == pytest.approx(feat, rel=1e-10)


def test_cka_invariances_and_errors():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((80, 10))
    y = x[:, :5] @ rng.standard_normal((5, 6)) + rng.standard_normal((80, 6))
    q, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    for f in (cka_linear, cka_rbf):
        assert f(_t(x), _t(x)) == pytest.approx(1.0, abs=1e-12)
        assert f(_t(x @ q * 5.0), _t(y)) == pytest.approx(f(_t(x), _t(y)), rel=1e-9)
        with pytest.raises(ValueError, match="examples"):
            f(_t(x), _t(y[:40]))
    with pytest.raises(ValueError, match="sigma_frac"):
        cka_rbf(_t(x), _t(y), sigma_frac=-1.0)


# ---------------------------------------------------------------- bad labels, empty batches, extreme tau
@pytest.mark.parametrize("labels,words", [
    (torch.tensor([0, 1, 2, 10]), "outside the 10 classes"), (torch.tensor([0, 1, -1, 3]), "labels run from -1"),
    (torch.tensor([0.0, 1.0, 2.0, 3.0]), "integer class indices"), (torch.tensor([0, 1]), "labels must have shape (4,)"),
])
def test_labels_are_checked_by_kd_loss_and_metrics(labels, words):
    from kdbook.metrics import accuracy, ece, nll
    zs, zt = _t(_logits(0, n=4)), _t(_logits(1, n=4))
    calls = [lambda: kd_loss(zs, zt, labels, alpha=0.5), lambda: accuracy(zs, labels), lambda: nll(zs, labels),
             lambda: ece(zs, labels)]
    for call in calls:
        with pytest.raises(ValueError) as e:
            call()
        assert words in str(e.value), str(e.value)


def test_empty_batches_are_refused():
    from kdbook.metrics import accuracy, predictive_kl, top1_agreement
    z, y = torch.zeros(0, 10), torch.zeros(0, dtype=torch.long)
    for call in (lambda: kd_loss(z, z), lambda: accuracy(z, y), lambda: top1_agreement(z, z),
                 lambda: predictive_kl(z, z)):
        with pytest.raises(ValueError, match="batch > 0"):
            call()


@pytest.mark.parametrize("tau", [1e-40, 1e25])
def test_tau_so_extreme_that_the_loss_is_not_finite_is_refused(tau):
    zs, zt = torch.randn(8, 10), torch.randn(8, 10)  # float32, as in training
    with pytest.raises(ValueError, match=re.escape(f"at tau={tau}: tau is too extreme")):
        kd_loss(zs, zt, tau=tau)
    assert torch.isfinite(kd_loss(zs, zt, tau=1e-3)) and torch.isfinite(kd_loss(zs, zt, tau=1e3))


def test_nan_logits_are_named():
    from kdbook.metrics import nll
    z = torch.full((4, 10), float("nan"))
    with pytest.raises(ValueError, match="NaN or inf"):
        kd_loss(z, z)
    with pytest.raises(ValueError, match="NaN"):
        nll(z, torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------- the refusal catalogues moved out of chapters 10 and 11
def _z(seed, n=64, c=10):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, c, generator=g, dtype=torch.float64)


_ZS, _ZT, _Y = _z(0), _z(1), torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("call,message", [
    (lambda: kd_loss(_ZS, _ZT, tau=0), "tau must be > 0"),
    (lambda: kd_loss(_ZS, _ZT, tau=-1.0), "tau must be > 0"),
    (lambda: kd_loss(_ZS, _ZT, tau=float("inf")), "finite"),
    (lambda: kd_loss(_ZS, _ZT, tau=float("nan")), "finite"),
    (lambda: kd_loss(_ZS, _ZT, tau="4"), "real number"),
    (lambda: kd_loss(_ZS, _ZT, alpha=1.5), "alpha must be"),
    (lambda: kd_loss(_ZS, _ZT, alpha=-0.1), "alpha must be"),
    (lambda: kd_loss(_ZS, _ZT[:, :5]), "same shape"),
    (lambda: kd_loss(_ZS, _ZT[:10]), "same shape"),
    (lambda: kd_loss(_ZS[0], _ZT[0]), "shape (batch, n_classes)"),
    (lambda: kd_loss(_ZS, _ZT, alpha=0.5), "needs labels"),
    (lambda: kd_loss(_ZS, _ZT, _Y[:5], alpha=0.5), "labels must have shape"),
    (lambda: kd_loss(_ZS, _ZT, torch.full_like(_Y, 99), alpha=0.5), "outside the"),
    (lambda: kd_loss(_ZS, _ZT, _Y.float(), alpha=0.5), "integer class indices"),
    (lambda: kd_loss(_ZS[:0], _ZT[:0]), "batch > 0"),
    (lambda: kd_loss(_ZS, _ZT, tau=1e-320), "at tau=1e-320"),  # logits/tau overflows: not a number
], ids=lambda v: v if isinstance(v, str) else "")
def test_kd_loss_refuses_with_a_message(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert message in str(e.value), str(e.value)


_ZM = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.4, 0.6]]).log()
_YM = torch.tensor([0, 1, 1, 1])
_XC = torch.randn(200, 30, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
_YC = _XC[:, :15] + 0.5 * torch.randn(200, 15, generator=torch.Generator().manual_seed(4), dtype=torch.float64)


@pytest.mark.parametrize("call,message", [
    (lambda: ece(_ZM, _YM, n_bins=0), "n_bins"),
    (lambda: accuracy(_ZM, _YM[:2]), "labels"),
    (lambda: nll(torch.zeros(4), _YM), "shape"),
    (lambda: accuracy(_ZM, torch.tensor([0, 1, 2, 1])), "outside the 2 classes"),
    (lambda: nll(_ZM, _YM.float()), "integer class indices"),
    (lambda: accuracy(_ZM[:0], _YM[:0]), "batch > 0"),
    (lambda: ece(_ZM * float("nan"), _YM), "NaN"),
    (lambda: top1_agreement(_ZS, _ZT[:, :5]), "same shape"),
    (lambda: predictive_kl(_ZS[0], _ZT[0]), "shape"),
    (lambda: cka_linear(_XC, _YC[:100]), "same examples"),
    (lambda: cka_rbf(_XC, _YC[:100]), "same examples"),
    (lambda: cka_rbf(_XC, _YC, sigma_frac=0), "sigma_frac"),
    (lambda: cka_linear(torch.ones(10, 3, dtype=torch.float64), _YC[:10]), "constant"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_metrics_refuse_with_a_message(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert message in str(e.value), str(e.value)


# ---------------------------------------------------------------- checks moved out of the chapter on §3.2
def test_metric_cases_of_the_chapter():
    "The worked cases that used to sit under the definitions in chapters/11_metrics: by hand, extremes, symmetry."
    z = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.4, 0.6]]).log()
    y = torch.tensor([0, 1, 1, 1])
    assert ece(z, y) == pytest.approx(3 / 4 * abs(2 / 3 - 0.9) + 1 / 4 * abs(1 - 0.6), abs=1e-7)
    assert accuracy(z, y) == 3 / 4 and accuracy(z, torch.tensor([0, 0, 1, 1])) == 1.0
    assert nll(z, y) == pytest.approx(-(math.log(0.9) + math.log(0.1) + math.log(0.9) + math.log(0.6)) / 4, abs=1e-7)
    assert nll(torch.zeros(5, 4), torch.tensor([0, 1, 2, 3, 0])) == pytest.approx(math.log(4), abs=1e-12)
    g = torch.Generator().manual_seed(0)
    zt, zs = 3 * torch.randn(512, 10, generator=g), 3 * torch.randn(512, 10, generator=g)
    assert predictive_kl(zt, zt) == pytest.approx(0.0, abs=1e-12) and predictive_kl(zt, zs) > 0
    assert top1_agreement(zt, zs) == top1_agreement(zs, zt)
    # by hand: p_t = (0.5, 0.5), p_s = (0.9, 0.1)
    assert predictive_kl(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.9, 0.1]], dtype=torch.float64).log()) == \
        pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), abs=1e-12)
    # extreme logits: a probability that underflows must not give nan
    assert predictive_kl(torch.tensor([[1000.0, 0.0]]), torch.tensor([[0.0, 1000.0]])) == pytest.approx(1000.0, abs=1e-6)


def test_cka_cases_of_the_chapter():
    g = torch.Generator().manual_seed(0)
    f64 = dict(generator=g, dtype=torch.float64)
    x = torch.randn(200, 30, **f64)
    y = x[:, :20] @ torch.randn(20, 15, **f64) + 0.5 * torch.randn(200, 15, **f64)
    for f in (cka_linear, cka_rbf):
        assert 0 < f(x, y) < 1
        assert f(x, y) == pytest.approx(f(y, x), abs=1e-12)
    # conv activations (n, C, H, W) are flattened per example
    assert cka_linear(x.reshape(200, 3, 10), y) == pytest.approx(cka_linear(x, y), abs=1e-12)


@pytest.mark.parametrize("f", [cka_linear, cka_rbf])
def test_cka_refuses_degenerate_activations(f):
    "Identical activations make CKA 0/0 (for RBF through a median distance of 0): one check refuses both."
    x = torch.randn(10, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="identical activations"):
        f(torch.ones(10, 3, dtype=torch.float64), x)
    mostly_same = torch.cat([torch.ones(8, 3), torch.randn(2, 3)]).double()  # median distance 0
    if f is cka_rbf:
        with pytest.raises(ValueError, match="identical activations"):
            f(mostly_same, x)
    with pytest.raises(ValueError, match="n_examples of x must be an integer >= 2, got 1"):
        f(x[:1], x[:1])
