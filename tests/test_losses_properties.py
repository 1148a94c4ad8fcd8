"""Properties of the §3 losses that the chapter states but does not list inline: where the KD loss is minimal, its
limits, the ensemble teacher's invariances, and the errors for malformed ensembles and gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdbook.losses import ensemble_logits, kd_grad, kd_grad_limit, kd_grad_sweep, kd_loss


def _z(seed, n=64, c=10, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, c, generator=g, dtype=torch.float64)


ZS, ZT = _z(0), _z(1)
Y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(2))


def test_a_one_hot_teacher_gives_the_nll_of_its_labels():
    torch.testing.assert_close(kd_loss(ZS, 1e4 * F.one_hot(Y, 10).double(), tau=1.0), F.cross_entropy(ZS, Y),
                               rtol=0, atol=1e-10)


def test_the_loss_is_minimal_at_the_teachers_logits_up_to_a_shift():
    z = (ZT + 3.0).clone().requires_grad_(True)
    kd_loss(z, ZT, tau=4.0).backward()
    assert z.grad.abs().max().item() < 1e-12


def test_extreme_finite_logits_give_a_finite_loss():
    assert torch.isfinite(kd_loss(torch.tensor([[1e4, -1e4]]), torch.tensor([[-1e4, 1e4]]), tau=1.0))


def test_the_ensemble_teacher_is_a_normalised_order_free_average():
    members = _z(3, scale=3.0).reshape(1, 64, 10).repeat(5, 1, 1) + _z(4, n=5 * 64).reshape(5, 64, 10)
    zt = ensemble_logits(members)
    torch.testing.assert_close(zt.logsumexp(dim=1), torch.zeros(64, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(ensemble_logits(list(members)), zt)  # a list of members is the same ensemble
    torch.testing.assert_close(ensemble_logits(members[[4, 2, 0, 1, 3]]), zt, rtol=0, atol=1e-12)
    big = torch.tensor([[[-2000.0, 0.0]], [[-1000.0, 0.0]]])  # the first probability underflows in every member
    assert torch.isfinite(ensemble_logits(big)).all()
    assert abs(ensemble_logits(big)[0, 0].item() - (-1000.0 - math.log(2))) < 1e-3  # computed in the log domain


@pytest.mark.parametrize("members,message", [
    ([], "at least one member"),
    (ZS, "(m, batch, n_classes)"),
    ([ZS, ZT[:, :5]], "same shape"),
])
def test_malformed_ensembles_are_refused(members, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ensemble_logits(members)


def test_the_kd_gradient_is_centred_and_its_error_is_first_order_in_one_over_tau():
    torch.testing.assert_close(kd_grad(ZS, ZT, tau=7.0).sum(dim=1), torch.zeros(64, dtype=torch.float64),
                               rtol=0, atol=1e-12)  # orthogonal to the all-ones vector
    e1, e2 = [t * (kd_grad(ZS, ZT, tau=t) - kd_grad_limit(ZS, ZT)) for t in (1e3, 1e4)]
    torch.testing.assert_close(e1, e2, rtol=0, atol=1e-2)  # tau * (gradient - limit) converges
    assert math.isfinite(kd_grad(ZS, ZT, tau=1e5).abs().max().item())


def test_the_sweep_converges_to_the_limit():
    s = kd_grad_sweep(ZS, ZT, [1.0, 1e2, 1e4])
    assert s["rel_err"].shape == (3, len(ZS))
    assert (s["rel_err"][2] < s["rel_err"][1]).all() and s["cos_limit"][2].min() > 0.9999


@pytest.mark.parametrize("call,message", [
    (lambda: kd_grad(ZS, ZT, tau=0.0), "tau must be > 0"),
    (lambda: kd_grad_limit(ZS, ZT[:, :3]), "same shape"),
])
def test_the_gradients_refuse_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()
