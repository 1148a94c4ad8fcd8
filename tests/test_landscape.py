"""Tests of kdbook.experiments.landscape (§6.2, Figure 6b/6c): interpolation, the plane through three weight vectors, and the
distillation loss evaluated on that plane."""
import pytest
import torch
from torch import nn

import numpy as np

from kdbook.data import ImageSet
from kdbook.experiments.landscape import (augmented_agreement, cka_rbf_median_sq, flatten_state, functional_model, interpolate_state,
                              loss_on_plane, plane_basis, plane_grid, rbf_gram_median_sq, unflatten_state)
from kdbook.metrics import cka_linear
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
    with pytest.raises(ValueError, match=r"\[0, 1\]"):  # NaN too: "lam must be a finite number in [0, 1], got nan"
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


# --- train agreement on augmented batches (§6.1) --------------------------------------------------------------

@pytest.fixture
def images():
    g = torch.Generator().manual_seed(5)
    return ImageSet(images=torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8, generator=g),
                    labels=torch.arange(50) % 6, classes=[str(i) for i in range(6)], name="toy", source="random")


def _np_softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def test_augmented_agreement_without_augmentation_is_plain_agreement(images):
    teacher, student = tiny(0).eval(), tiny(1).eval()
    x = images.images.float() / 127.5 - 1
    with torch.no_grad():
        zt, zs = teacher(x).double().numpy(), student(x).double().numpy()
    pt, ps = _np_softmax(zt / 4), _np_softmax(zs / 4)
    expected_loss = float(np.mean(-16 * (pt * np.log(ps)).sum(1)))  # τ²·CE(σ(z_t/τ), σ(z_s/τ)), numpy
    expected_floor = float(np.mean(-16 * (pt * np.log(pt)).sum(1)))  # τ²·H(σ(z_t/τ))
    out = augmented_agreement(student, teacher, images, "none", seed=0, tau=4.0, batch_size=16)
    assert out["n"] == 50
    assert out["agreement"] == pytest.approx(float(np.mean(zt.argmax(1) == zs.argmax(1))), abs=1e-12)
    assert out["kd_loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert out["kd_loss_min"] == pytest.approx(expected_floor, rel=1e-5)


def test_augmented_agreement_is_seeded_and_sees_augmented_images(images):
    teacher, student = tiny(0), tiny(1)
    a = augmented_agreement(student, teacher, images, "baseline", seed=7, tau=4.0, batch_size=16)
    assert a == augmented_agreement(student, teacher, images, "baseline", seed=7, tau=4.0, batch_size=16)
    clean = augmented_agreement(student, teacher, images, "none", seed=7, tau=4.0, batch_size=16)
    assert a["kd_loss"] != pytest.approx(clean["kd_loss"], rel=1e-9)  # crops and flips change the inputs
    same = augmented_agreement(teacher, teacher, images, "baseline", seed=7, tau=4.0, batch_size=16)
    assert same["agreement"] == 1.0 and same["kd_loss"] == pytest.approx(same["kd_loss_min"], rel=1e-12)
    assert teacher.training and student.training  # modes are restored


def test_augmented_agreement_rejects_bad_input(images):
    with pytest.raises(ValueError, match="ImageSet"):
        augmented_agreement(tiny(1), tiny(0), torch.zeros(4, 3, 8, 8), "baseline")
    with pytest.raises(ValueError, match="adds images"):
        augmented_agreement(tiny(1), tiny(0), images, "synthetic")
    with pytest.raises(ValueError, match="batch_size"):
        augmented_agreement(tiny(1), tiny(0), images, "baseline", batch_size=0)


# --- CKA with the authors' RBF bandwidth, over examples (Table 1) --------------------------------------------------

def _np_cka_rbf_median_sq(x, y):
    "Independent numpy reference: RBF Gram over examples, σ² = median of the non-zero squared distances, centred HSIC."
    def gram(a):
        d2 = ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)
        return np.exp(-d2 / (2 * np.median(d2[d2 > 0])))
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = h @ gram(x) @ h, h @ gram(y) @ h
    return float((k * l).sum() / np.sqrt((k * k).sum() * (l * l).sum()))


@pytest.mark.parametrize("n", [9, 20])  # odd and even counts of distances: numpy's median convention
def test_cka_rbf_median_sq_matches_numpy(n):
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=(n, 6)), rng.normal(size=(n, 4))
    y[:, 0] += 2 * x[:, 0]  # some shared structure
    ours = cka_rbf_median_sq(torch.tensor(x), torch.tensor(y))
    assert ours == pytest.approx(_np_cka_rbf_median_sq(x, y), abs=1e-10)
    assert 0 < ours < 1
    # activations with more than two axes are flattened per example
    x4 = rng.normal(size=(n, 2, 3, 3))
    assert cka_rbf_median_sq(torch.tensor(x4), torch.tensor(y)) == pytest.approx(
        _np_cka_rbf_median_sq(x4.reshape(n, -1), y), abs=1e-10)


def test_cka_rbf_median_sq_invariances_and_difference_from_linear():
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(25, 8)))
    q = torch.linalg.qr(torch.tensor(rng.normal(size=(8, 8))))[0]
    assert cka_rbf_median_sq(x, x) == pytest.approx(1.0, abs=1e-12)
    assert cka_rbf_median_sq(x, 5 * x @ q + 1.0) == pytest.approx(1.0, abs=1e-9)  # rotation, scale, shift
    y = torch.tensor(rng.normal(size=(25, 8))) + 0.5 * x
    assert abs(cka_rbf_median_sq(x, y) - cka_linear(x, y)) > 1e-4  # a different kernel, a different number
    k = rbf_gram_median_sq(x)
    assert torch.allclose(torch.diagonal(k), torch.ones(25, dtype=k.dtype)) and torch.allclose(k, k.T)


def test_cka_rbf_median_sq_rejects_bad_input():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="examples"):
        cka_rbf_median_sq(x, torch.randn(9, 3))
    with pytest.raises(ValueError, match="identical"):
        cka_rbf_median_sq(torch.ones(6, 3), torch.randn(6, 3))
    with pytest.raises(ValueError, match="n_examples"):
        cka_rbf_median_sq(torch.randn(1, 3), torch.randn(1, 3))


# --- the committed §6.2 records pair with their own weights and teachers ---------------------------------------

def test_committed_s62_records_pair_with_their_weights_and_teachers():
    from pathlib import Path

    from kdbook.store import Store
    from kdbook.train import make_model
    store = Store(Path(__file__).resolve().parents[1] / "results", verbose=False)
    teachers = {f"s62-teacher/{r['key']}": r for r in store.records("s62-teacher")}
    if not teachers:
        pytest.skip("no §6.2 records are committed")
    by_id = dict(teachers)
    for r in teachers.values():  # every teacher's weights are stored and match its record
        store.load_weights("s62-teacher", r["key"], make_model("resnet20", 0, num_classes=100, norm="layer"),
                           r["result"]["weights"]["sha256"])
    students = store.records("s62-student")
    by_id.update({f"s62-student/{r['key']}": r for r in students})
    for r in [*students, *store.records("s62-plane")]:
        depends = r["meta"].get("depends")
        assert depends, f"{r['name']}/{r['key']} names no record it was computed from"
        for ref, checksum in depends.items():  # ... and each names records that exist, unchanged
            assert ref in by_id and by_id[ref]["checksum"] == checksum, f"{r['name']}/{r['key']}: {ref} is missing or changed"
        if "weights" in r["result"]:
            store.load_weights(r["name"], r["key"], make_model("resnet20", 0, num_classes=100, norm="layer"),
                               r["result"]["weights"]["sha256"])


# --- the chapter's sizes: profile defaults and the GPU plan --------------------------------------------------

@pytest.mark.parametrize("profile", ["smoke", "quick", "paper"])
def test_profile_defaults_keep_zero_and_false(profile):
    "checkpoint_every = 0 means never, and a 0 seed is a seed: only None takes the profile's value."
    from kdbook.experiments.landscape import PROFILE_SIZES, profile_params
    assert profile_params(profile, checkpoint_every=0)["checkpoint_every"] == 0
    assert profile_params(profile, checkpoint_every=None)["checkpoint_every"] == PROFILE_SIZES[profile]["checkpoint_every"] > 0
    assert profile_params(profile, aug_seed=0)["aug_seed"] == 0
    assert profile_params(profile, seed=5)["aug_seed"] == 5 + 3000
    assert profile_params(profile, fig6a_trials=0)["fig6a_trials"] == 0
    with pytest.raises(ValueError, match="unknown parameter"):
        profile_params(profile, checkpoint_evry=0)


def test_quick_plan_reuses_the_stored_teacher_and_follows_the_table(tmp_path, monkeypatch):
    "Trial 0's stored 80-epoch teacher costs nothing; in an empty store it is planned; the plan reads PROFILE_SIZES."
    import kdbook.experiments.landscape as landscape
    plan = landscape.gpu_plan("quick")
    stored = [it for it in plan if it.what.startswith("teacher of trial")]
    assert len(stored) == landscape.PROFILE_SIZES["quick"]["n_trials"]
    assert stored[0].what.endswith("(stored)") and stored[0].seconds == 0  # results/s62-teacher/62ccbfcd450b0676.json
    empty = landscape.gpu_plan("quick", results_dir=tmp_path)
    assert all(it.seconds > 0 for it in empty if it.what.startswith("teacher of trial"))
    base = sum(it.seconds for it in plan)
    monkeypatch.setitem(landscape.PROFILE_SIZES, "quick", landscape.PROFILE_SIZES["quick"] | {"student_epochs": 16})
    assert sum(it.seconds for it in landscape.gpu_plan("quick")) > base
