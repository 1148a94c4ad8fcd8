"""kdbook.experiments.gan (chapter 22): the SN-GAN's networks, losses, resumable training, the stored synthetic sets and the
Fréchet distance. CPU only, small widths, a few seconds."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize

from kdbook.data import to_float
import kdbook.experiments.gan as gan
from kdbook.experiments.gan import (GANCheckpointError, GANConfig, GANPaused, SyntheticSetError, build_discriminator,
                        build_generator, classifier_features, d_hinge_loss, discriminator_step, frechet_distance,
                        frechet_distance_gaussians, g_hinge_loss, generate_images, generator_from_record, images_sha256,
                        linear_lr, load_synthetic_set, profile_settings, regenerate_synthetic_set, save_synthetic_set,
                        to_uint8, train_gan)
from kdbook.models import resnet20
from kdbook.store import Store

TINY = dict(g_channels=8, d_channels=8, device="cpu")


def _images(n=64, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_shapes_and_paper_sizes():
    cfg = GANConfig(**TINY)
    G, D = build_generator(cfg, 0), build_discriminator(cfg, 1)
    x = G(torch.randn(5, cfg.z_dim))
    assert x.shape == (5, 3, 32, 32) and x.abs().max() <= 1
    assert D(x).shape == (5,)
    paper = GANConfig()
    # Miyato et al.'s CIFAR ResNets: about 4.3M generator and 1.1M discriminator parameters
    assert 4.2e6 < sum(p.numel() for p in build_generator(paper, 0).parameters()) < 4.4e6
    assert 1.0e6 < sum(p.numel() for p in build_discriminator(paper, 0).parameters()) < 1.1e6


def test_spectral_norm_on_every_discriminator_layer():
    cfg = GANConfig(**TINY)
    D = build_discriminator(cfg, 1).train()
    layers = [m for m in D.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    # 2 convolutions per block, 1x1 shortcuts in the two down-sampling blocks, the output layer
    assert len(layers) == 11 and all(parametrize.is_parametrized(m, "weight") for m in layers)
    with torch.no_grad():
        for _ in range(30):  # power iterations converge in training mode
            D(torch.zeros(1, 3, 32, 32))
    D.eval()
    for m in layers:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert abs(float(sigma) - 1.0) < 0.05, f"largest singular value {float(sigma):.3f} of {m}"
    assert not any(parametrize.is_parametrized(m) for m in build_generator(cfg, 0).modules())


def test_hinge_losses_on_known_values():
    assert float(d_hinge_loss(torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0]))) == pytest.approx(0.75)
    assert float(d_hinge_loss(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -5.0]))) == 0.0
    assert float(d_hinge_loss(torch.tensor([-1.0]), torch.tensor([1.0]))) == pytest.approx(4.0)
    assert float(g_hinge_loss(torch.tensor([1.0, 3.0]))) == pytest.approx(-2.0)
    assert linear_lr(0, 10, 2e-4) == 2e-4 and linear_lr(10, 10, 2e-4) == 0.0
    assert linear_lr(5, 10, 2e-4) == pytest.approx(1e-4)


def test_discriminator_step_reduces_its_loss_on_a_fixed_batch():
    cfg = GANConfig(**TINY)
    G, D = build_generator(cfg, 0), build_discriminator(cfg, 1)
    opt = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.0, 0.9))
    real, z = to_float(_images(8)), torch.randn(8, cfg.z_dim, generator=torch.Generator().manual_seed(1))
    losses = [float(discriminator_step(G, D, opt, real, z)) for _ in range(6)]
    assert losses[-1] < losses[0]


def test_resume_is_bit_identical_on_cpu(tmp_path):
    cfg = GANConfig(g_steps=4, n_dis=2, batch_size=4, log_every=1, **TINY)
    images = _images()
    Ga, Da = build_generator(cfg, 0), build_discriminator(cfg, 1)
    ha = train_gan(Ga, Da, images, cfg, seed=3)
    ck = tmp_path / "gan.pt"
    with pytest.raises(GANPaused, match="paused at generator step 1 of 4"):
        train_gan(build_generator(cfg, 0), build_discriminator(cfg, 1), images, cfg, seed=3, checkpoint=ck, max_steps=1)
    with pytest.raises(GANPaused, match="paused at generator step 3 of 4"):
        train_gan(build_generator(cfg, 0), build_discriminator(cfg, 1), images, cfg, seed=3, checkpoint=ck, max_steps=2)
    Gb, Db = build_generator(cfg, 0), build_discriminator(cfg, 1)
    hb = train_gan(Gb, Db, images, cfg, seed=3, checkpoint=ck)
    for a, b in zip([*Ga.state_dict().values(), *Da.state_dict().values()], [*Gb.state_dict().values(), *Db.state_dict().values()]):
        assert torch.equal(a, b)
    assert hb["d_loss"] == ha["d_loss"] and hb["g_loss"] == ha["g_loss"] and hb["step"] == [1, 2, 3, 4]


def test_mismatched_or_corrupt_checkpoint_is_a_clear_error_and_untouched(tmp_path):
    cfg = GANConfig(g_steps=3, n_dis=1, batch_size=4, **TINY)
    ck = tmp_path / "gan.pt"
    with pytest.raises(GANPaused):
        train_gan(build_generator(cfg, 0), build_discriminator(cfg, 1), _images(), cfg, seed=0, checkpoint=ck, max_steps=1)
    before = ck.read_bytes()
    other = GANConfig(g_steps=3, n_dis=1, batch_size=4, g_channels=16, d_channels=8, device="cpu")
    with pytest.raises(GANCheckpointError, match="g_channels: 8 there, 16 here"):
        train_gan(build_generator(other, 0), build_discriminator(other, 1), _images(), other, seed=0, checkpoint=ck)
    with pytest.raises(GANCheckpointError, match="seed 0 there, 1 here"):
        train_gan(build_generator(cfg, 0), build_discriminator(cfg, 1), _images(), cfg, seed=1, checkpoint=ck)
    assert ck.read_bytes() == before
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(GANCheckpointError, match="not a readable GAN checkpoint"):
        train_gan(build_generator(cfg, 0), build_discriminator(cfg, 1), _images(), cfg, seed=0, checkpoint=bad)
    with pytest.raises(ValueError, match="uint8"):
        train_gan(build_generator(cfg, 0), build_discriminator(cfg, 1), _images().float(), cfg, seed=0)


def test_generated_sets_are_nested_and_round_trip():
    G = build_generator(GANConfig(**TINY), 0)
    a, b = generate_images(G, 9, seed=2, batch_size=4), generate_images(G, 5, seed=2, batch_size=5)
    assert a.dtype == torch.uint8 and torch.equal(a[:5], b)
    u = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(to_float(u)), u)


def _set_record(store, images, profile="smoke"):
    params = dict(profile=profile, sizes=[len(images) // 2, len(images)])
    key = store.key("gan-synthetic", params, 0)
    return store.run("gan-synthetic", params, lambda: {"synthetic_set": save_synthetic_set(store, "gan-synthetic", key, images)},
                     seed=0)


def test_synthetic_set_loader_serves_prefixes_and_refuses_bad_requests(tmp_path):
    store = Store(tmp_path / "results", verbose=False)
    images = _images(12)
    rec = _set_record(store, images)
    assert torch.equal(load_synthetic_set(store, rec, 12), images)
    assert torch.equal(load_synthetic_set(store, rec, 5), images[:5])
    before = _snapshot(store.root)
    with pytest.raises(SyntheticSetError, match="asked for 13 synthetic images but only 12 were generated"):
        load_synthetic_set(store, rec, 13)
    for size in (0, -1, 2.5, True):
        with pytest.raises(SyntheticSetError, match="positive"):
            load_synthetic_set(store, rec, size)
    with pytest.raises(SyntheticSetError, match="not a synthetic-set record"):
        load_synthetic_set(store, {"result": {"weights": {}}}, 4)
    assert _snapshot(store.root) == before  # errors leave the store as it was
    path = store.root / rec["result"]["synthetic_set"]["path"]
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(SyntheticSetError, match="does not match the sha256"):
        load_synthetic_set(store, rec, 4)
    path.unlink()
    with pytest.raises(SyntheticSetError, match="is missing"):
        load_synthetic_set(store, rec, 4)


GENERATION = dict(seed=7, batch_size=3)  # batch size not dividing n: the last batch is shorter


def _gan_and_set(tmp_path, n=10, profile="quick"):
    """A store whose checkpoints are in tmp/data (so its data folder is tmp/data), a tiny GAN record with stored
    weights, and a set of n images drawn from it the way the chapter draws them, stored through its record."""
    data = tmp_path / "data"
    store = Store(tmp_path / "results", checkpoints_dir=data / "checkpoints", verbose=False)
    cfg = GANConfig(**TINY)
    gan_record, _ = store.run_model("gan-sngan", dict(gan=cfg.training_settings()), 0,
                                    build=lambda: build_generator(cfg, 0), train=lambda G: {})
    images = generate_images(generator_from_record(store, gan_record), n, device="cpu", **GENERATION)
    params = dict(profile=profile, gan=gan_record["key"], sizes=[n // 2, n])
    key = store.key("gan-synthetic", params, 200)
    record = store.run("gan-synthetic", params, lambda: {"synthetic_set": save_synthetic_set(
        store, "gan-synthetic", key, images, data_dir=data, generation=GENERATION)}, 200, depends=[gan_record])
    return store, data, gan_record, record, images


def test_small_sets_stay_beside_their_record(tmp_path):
    store, data, _, record, images = _gan_and_set(tmp_path, profile="smoke")
    info = record["result"]["synthetic_set"]
    assert "location" not in info and info["path"] == f"gan-synthetic/{record['key']}.npz"
    assert (store.root / info["path"]).exists() and not (data / "synthetic").exists()
    assert info["generation"] == GENERATION and info["bytes"] <= gan.COMMIT_LIMIT_BYTES
    assert torch.equal(load_synthetic_set(store, record, 10), images)


def test_a_set_over_the_limit_goes_to_the_data_folder_and_is_regenerated_identically(tmp_path, monkeypatch):
    monkeypatch.setattr(gan, "COMMIT_LIMIT_BYTES", 1000)
    store, data, gan_record, record, images = _gan_and_set(tmp_path)
    info = record["result"]["synthetic_set"]
    assert info["location"] == "data" and info["n_images"] == 10 and info["shape"] == [10, 3, 32, 32]
    assert info["sha256"] == images_sha256(images) and info["generation"] == GENERATION
    cached = data / "synthetic" / f"gan-synthetic-{record['key']}.npz"
    assert info["path"] == cached.relative_to(data).as_posix() and cached.exists()
    assert not list((store.root / "gan-synthetic").glob("*.npz"))  # nothing large beside the record
    assert torch.equal(load_synthetic_set(store, record, 10), images)
    cached.unlink()
    before = _snapshot(store.root)
    # the GAN record is found through the set's meta.depends; the sha256 of the pixels is checked, then cached
    assert torch.equal(load_synthetic_set(store, record, 4), images[:4])
    assert cached.exists() and _snapshot(store.root) == before
    assert torch.equal(load_synthetic_set(store, record, 10, regenerate=False), images)  # served from the cache
    assert torch.equal(regenerate_synthetic_set(store, record, gan_record), images)
    cached.unlink()
    assert torch.equal(load_synthetic_set(store, record, 10, data_dir=data,
                                          regenerate=lambda rec: regenerate_synthetic_set(store, rec, gan_record)), images)


def test_a_tampered_cache_or_other_regenerated_pixels_are_errors_and_nothing_is_served(tmp_path, monkeypatch):
    monkeypatch.setattr(gan, "COMMIT_LIMIT_BYTES", 1000)
    store, data, gan_record, record, images = _gan_and_set(tmp_path)
    cached = data / record["result"]["synthetic_set"]["path"]
    other = images.clone()
    other[0, 0, 0, 0] ^= 1  # one pixel, one bit
    buf = io.BytesIO()
    np.savez_compressed(buf, images=other.numpy())
    cached.write_bytes(buf.getvalue())
    with pytest.raises(SyntheticSetError, match="does not match the sha256 of its record"):
        load_synthetic_set(store, record, 4)
    cached.write_bytes(b"not an npz")
    with pytest.raises(SyntheticSetError, match="cannot be read"):
        load_synthetic_set(store, record, 4)
    assert cached.read_bytes() == b"not an npz"  # an error leaves the file for the reader to inspect
    cached.unlink()
    with pytest.raises(SyntheticSetError) as err:
        load_synthetic_set(store, record, 4, regenerate=lambda rec: other)
    message = str(err.value)
    assert images_sha256(other) in message and record["result"]["synthetic_set"]["sha256"] in message
    assert "regenerate it on that kind of device" in message and "delete the set's record" in message
    assert not cached.exists()  # nothing cached
    with pytest.raises(SyntheticSetError, match="regeneration is off"):
        load_synthetic_set(store, record, 4, regenerate=False)
    # a set drawn on CUDA is not redrawn on the CPU: its pixels would not match
    on_gpu = {**record, "meta": {**record["meta"], "device": "cuda: NVIDIA H100 80GB HBM3"}}
    if not torch.cuda.is_available():
        with pytest.raises(SyntheticSetError, match="drawn on cuda: NVIDIA H100"):
            load_synthetic_set(store, on_gpu, 4)
    # another generator record, or none that can be found, is refused before anything is drawn
    cfg = GANConfig(**TINY)
    other_gan, _ = store.run_model("gan-sngan", dict(gan=cfg.training_settings()), 1,
                                   build=lambda: build_generator(cfg, 1), train=lambda G: {})
    with pytest.raises(SyntheticSetError, match="was not drawn from the generator record"):
        regenerate_synthetic_set(store, record, other_gan)
    orphan = {**record, "meta": {**record["meta"], "depends": {f"gan-sngan/{gan_record['key']}": "0" * 64}}}
    with pytest.raises(SyntheticSetError, match="is not in the store"):
        load_synthetic_set(store, orphan, 4)
    assert not cached.exists()


def test_a_large_set_needs_its_generation_settings(tmp_path):
    store = Store(tmp_path / "results", verbose=False)
    with pytest.raises(ValueError, match="generation=dict"):
        save_synthetic_set(store, "gan-synthetic", "0" * 16, _images(8), data_dir=tmp_path / "data", limit=0)
    assert not (tmp_path / "data").exists() and not (store.root / "gan-synthetic").exists()


def test_unknown_profile_is_a_clear_error():
    assert profile_settings("paper")["synthetic_sizes"] == [12500, 25000, 37500, 50000]
    assert profile_settings("paper")["g_steps"] == 100_000
    with pytest.raises(ValueError, match="unknown profile 'fast'"):
        profile_settings("fast")
    s = profile_settings("smoke")
    s["synthetic_sizes"].append(1)  # a copy: the defaults stay
    assert profile_settings("smoke")["synthetic_sizes"] == [100, 200, 300, 400]


def _exact(n, mu, cov, rng):
    x = rng.normal(size=(n, len(mu)))
    x = (x - x.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T
    return x @ np.linalg.cholesky(cov).T + mu


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    rng = np.random.default_rng(1)
    mu_a, mu_b = rng.normal(size=3), rng.normal(size=3)
    sd_a, sd_b = rng.uniform(0.5, 2, 3), rng.uniform(0.5, 2, 3)
    closed = ((mu_a - mu_b) ** 2).sum() + ((sd_a - sd_b) ** 2).sum()
    assert frechet_distance_gaussians(mu_a, np.diag(sd_a**2), mu_b, np.diag(sd_b**2)) == pytest.approx(closed, abs=1e-9)
    fa, fb = _exact(500, mu_a, np.diag(sd_a**2), rng), _exact(400, mu_b, np.diag(sd_b**2), rng)
    assert frechet_distance(fa, fb) == pytest.approx(closed, abs=1e-6)
    # general covariances: against the formula with an independent matrix square root (eigendecomposition)
    A, B = rng.normal(size=(3, 3)), rng.normal(size=(3, 3))
    ca, cb = A @ A.T + np.eye(3), B @ B.T + np.eye(3)
    w, v = np.linalg.eigh(ca)
    ra = v @ np.diag(np.sqrt(w)) @ v.T
    w2 = np.linalg.eigvalsh(ra @ cb @ ra)  # tr((ca cb)^1/2) = tr((ca^1/2 cb ca^1/2)^1/2)
    ref = ((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * np.sqrt(np.clip(w2, 0, None)).sum()
    assert frechet_distance_gaussians(mu_a, ca, mu_b, cb) == pytest.approx(ref, abs=1e-8)


def test_frechet_distance_properties():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(300, 6)), rng.normal(1.0, 2.0, size=(250, 6))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), abs=1e-6)
    assert frechet_distance(a, b) > frechet_distance(a, rng.normal(size=(250, 6))) > 0
    assert frechet_distance(a + 3.0, a) == pytest.approx(9.0 * 6, abs=1e-6)
    with pytest.raises(ValueError, match="same d"):
        frechet_distance(a, b[:, :2])
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], b)


def test_classifier_features_are_the_input_of_fc():
    net = resnet20(num_classes=100).eval()
    images = _images(6)
    feats = classifier_features(net, images, batch_size=4)
    assert feats.shape == (6, 64) and feats.dtype == np.float64
    with torch.no_grad():
        logits = net(to_float(images))
    torch.testing.assert_close(torch.from_numpy(feats).float() @ net.fc.weight.T + net.fc.bias, logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="PreResNet"):
        classifier_features(torch.nn.Linear(3, 3), images)


def test_deadline_budget_and_plan():
    from kdbook.experiments.gan import DEADLINE_RESERVE_S, deadline_budget, gpu_plan
    assert deadline_budget(None, env={}) is None and deadline_budget(30.0, env={}) == 30.0
    assert deadline_budget(None, env={"KDBOOK_DEADLINE": "1000"}, now=400.0) == 600.0 - DEADLINE_RESERVE_S
    assert deadline_budget(10.0, env={"KDBOOK_DEADLINE": "1000"}, now=400.0) == 10.0
    assert deadline_budget(None, env={"KDBOOK_DEADLINE": "1000"}, now=999.0) == 0.0
    with pytest.raises(ValueError, match="unix time"):
        deadline_budget(None, env={"KDBOOK_DEADLINE": "tomorrow"})
    plan = gpu_plan("quick")
    assert [it.key[0] for it in plan if it.key is not None] == ["zoo-teacher"]  # the feature network is shared
    assert profile_settings("quick")["g_steps"] * 0.1 < sum(it.seconds for it in plan)

