"""Tests of kdbook.landscape (§6.2, Figure 6b/6c): interpolation, the plane through three weight vectors, and the
distillation loss evaluated on that plane."""
import pytest
import torch
from torch import nn

from kdbook.landscape import (flatten_state, functional_model, interpolate_state, loss_on_plane, plane_basis,
                              plane_grid, unflatten_state)
from kdbook.losses import kd_loss


def tiny(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(1, 4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6))


@pytest.fixture
def states():
    return tiny(0).state_dict(), tiny(1).state_dict()


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_interpolation_endpoints_exact(states, lam):
    t, r = states
    s = interpolate_state(t, r, lam)
    for k in t:
        assert torch.equal(s[k], t[k] if lam == 1.0 else r[k])


def test_interpolation_midpoint_and_linearity(states):
    t, r = states
    s = interpolate_state(t, r, 0.3)
    for k in t:
        torch.testing.assert_close(s[k], 0.3 * t[k] + 0.7 * r[k])
    vt, vr, vs = (flatten_state(x)[0] for x in (t, r, s))
    # distance to the teacher shrinks linearly: ‖θ_s − θ_t‖ = (1 − λ)‖θ_r − θ_t‖
    assert abs(float((vs - vt).norm()) - 0.7 * float((vr - vt).norm())) < 1e-5


def test_interpolation_keeps_integer_buffers():
    t = nn.BatchNorm2d(3).state_dict()
    r = {k: v.clone() for k, v in t.items()}
    r["num_batches_tracked"] += 5
    s = interpolate_state(t, r, 0.5)
    assert s["num_batches_tracked"].dtype == torch.long and int(s["num_batches_tracked"]) == int(t["num_batches_tracked"])


@pytest.mark.parametrize("lam", [-0.01, 1.01, float("nan"), True, "0.5"])
def test_interpolation_rejects_bad_lambda(states, lam):
    t, r = states
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        interpolate_state(t, r, lam)


def test_interpolation_rejects_mismatch(states):
    t, r = states
    with pytest.raises(ValueError, match="different keys"):
        interpolate_state(t, {k: v for k, v in r.items() if k != "5.bias"}, 0.5)
    with pytest.raises(ValueError, match="shape mismatch"):
        interpolate_state(t, {**r, "5.weight": torch.zeros(6, 5)}, 0.5)


def test_flatten_roundtrip(states):
    t, _ = states
    v, spec = flatten_state(t)
    assert v.dtype == torch.float64 and v.numel() == spec.numel == sum(p.numel() for p in tiny(0).parameters())
    back = unflatten_state(v, spec)
    assert all(torch.equal(back[k], t[k]) and back[k].dtype == t[k].dtype for k in t)
    with pytest.raises(ValueError):
        unflatten_state(v[1:], spec)
    with pytest.raises(ValueError):
        flatten_state(t, keys=["nope"])


@pytest.fixture
def plane(states):
    t, r = states
    torch.manual_seed(3)
    vt = flatten_state(t)[0]
    v0 = flatten_state(interpolate_state(t, r, 0.25))[0]
    v1 = v0 + 0.2 * torch.randn_like(v0)
    return vt, v0, v1, plane_basis(vt, v0, v1)


def test_plane_is_orthonormal_and_contains_the_three_points(plane):
    vt, v0, v1, b = plane
    assert abs(float(b.u @ b.u) - 1) < 1e-12 and abs(float(b.v @ b.v) - 1) < 1e-12 and abs(float(b.u @ b.v)) < 1e-12
    assert b.coords["teacher"] == (0.0, 0.0)
    assert b.coords["init"][1] == 0.0 and b.coords["final"][1] > 0
    for name, x in (("teacher", vt), ("init", v0), ("final", v1)):
        a, bb, dist = b.project(x)
        assert abs(a - b.coords[name][0]) < 1e-10 and abs(bb - b.coords[name][1]) < 1e-10 and dist < 1e-10
        assert float((b.point(*b.coords[name]) - x).abs().max()) < 1e-10
    # coordinates are weight-space distances: |init − teacher| and |final − teacher| are preserved
    assert abs(b.coords["init"][0] - float((v0 - vt).norm())) < 1e-10
    assert abs(float(torch.tensor(b.coords["final"], dtype=torch.float64).norm()) - float((v1 - vt).norm())) < 1e-10


def test_plane_projection_of_an_off_plane_point(plane):
    vt, v0, v1, b = plane
    normal = torch.randn_like(vt)
    normal -= (normal @ b.u) * b.u + (normal @ b.v) * b.v
    normal /= normal.norm()
    a, bb, dist = b.project(b.point(1.5, -2.0) + 3.0 * normal)
    assert abs(a - 1.5) < 1e-9 and abs(bb + 2.0) < 1e-9 and abs(dist - 3.0) < 1e-9


def test_plane_rejects_degenerate_inputs(plane):
    vt, v0, v1, _ = plane
    with pytest.raises(ValueError, match="undefined"):
        plane_basis(vt, vt, v1)
    with pytest.raises(ValueError, match="collinear"):
        plane_basis(vt, v0, vt + 3 * (v0 - vt))
    with pytest.raises(ValueError, match="lengths"):
        plane_basis(vt, v0, v1[:-2])


def test_plane_grid_window(plane):
    *_, b = plane
    alphas, betas = plane_grid(b, resolution=7, margin=0.1)
    assert len(alphas) == len(betas) == 7
    assert abs(float(alphas[-1] - alphas[0]) - float(betas[-1] - betas[0])) < 1e-9  # square window
    for a, bb in b.coords.values():
        assert alphas[0] < a < alphas[-1] and betas[0] < bb < betas[-1]
    with pytest.raises(ValueError):
        plane_grid(b, resolution=1)


def test_loss_on_plane_matches_direct_evaluation(states, plane):
    t, r = states
    vt, v0, v1, b = plane
    _, spec = flatten_state(t)
    torch.manual_seed(4)
    x = torch.rand(10, 3, 6, 6) * 2 - 1
    f = functional_model(tiny(0), spec)
    zt = f(vt, x)

    def direct(state):
        m = tiny(9)
        m.load_state_dict(state)
        m.eval()
        with torch.no_grad():
            return float(kd_loss(m(x).double(), zt.double(), tau=4.0, alpha=0.0))

    grid = ([0.0, b.coords["init"][0], b.coords["final"][0]], [0.0, b.coords["final"][1]])
    losses = loss_on_plane(f, b, grid, x, zt, tau=4.0, batch_size=3)
    assert losses.shape == (2, 3)
    assert abs(float(losses[0, 0]) - direct(t)) < 1e-5
    assert abs(float(losses[0, 1]) - direct(interpolate_state(t, r, 0.25))) < 1e-5
    assert abs(float(losses[1, 2]) - direct(unflatten_state(v1, spec))) < 1e-5
    # at the teacher the loss is τ²·H(softmax(z_t/τ)) (KL = 0), the smallest value anywhere on the plane
    p = torch.softmax(zt.double() / 4, -1)
    entropy = float(-(16 * (p * p.log()).sum(-1)).mean())
    assert abs(float(losses[0, 0]) - entropy) < 1e-6
    assert bool((losses >= entropy - 1e-9).all()) and float(losses[0, 1]) > entropy + 1e-6
    with pytest.raises(ValueError):
        loss_on_plane(f, b, grid, x, zt[:-1], tau=4.0)
