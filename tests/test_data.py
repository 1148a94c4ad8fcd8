"""kdbook.data against the real offline copies (shared/datasets) and small hand-built roots."""
import gzip
import io
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import kdbook.data as D
from kdbook.data import (ImageSet, load_dataset, to_float, stratified_subset, split_halves, fraction_subset,
                         datasets_dir, load_cached, read_jpeg_tar)

REPO = Path(__file__).resolve().parents[1]


def _offline_root():
    env = os.environ.get("KDBOOK_DATASETS")
    if env and Path(env).is_dir(): return Path(env)
    ci = REPO.parent / "shared" / "datasets"
    return ci if ci.is_dir() else None


ROOT = _offline_root()
needs_data = pytest.mark.skipif(ROOT is None, reason="no offline datasets: KDBOOK_DATASETS is unset and "
                                                     "../shared/datasets is absent")
CACHE = REPO / "data"  # the chapters' cache (git-ignored), so the JPEGs are decoded once for tests and book


# ---------- real data ----------
@needs_data
def test_mnist_counts_and_labels():
    tr, te = load_dataset("mnist", "train", root=ROOT, cache_dir=CACHE), load_dataset("mnist", "test", root=ROOT, cache_dir=CACHE)
    assert (len(tr), len(te)) == (60000, 10000)
    assert tr.images.dtype == torch.uint8 and tr.images.shape[1:] == (1, 28, 28)
    assert tr.labels.dtype == torch.int64
    assert torch.bincount(te.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert tr.origin == "offline" and "MNIST" in tr.source and "lossless" in tr.source


@needs_data
def test_cifar100_counts_and_label_order():
    tr = load_dataset("cifar100", "train", root=ROOT, cache_dir=CACHE)
    te = load_dataset("cifar100", "test", root=ROOT, cache_dir=CACHE)
    assert (len(tr), len(te)) == (50000, 10000)
    assert tr.images.shape[1:] == (3, 32, 32)
    assert tr.classes[0] == "apple" and tr.classes[99] == "worm" and len(tr.classes) == 100
    assert tr.classes == sorted(tr.classes)
    assert torch.bincount(tr.labels).tolist() == [500] * 100
    assert torch.bincount(te.labels).tolist() == [100] * 100
    assert bool((tr.labels[1:] >= tr.labels[:-1]).all())  # fixed order: by label, then file name
    assert "JPEG" in tr.source and tr.name == "cifar100"


@needs_data
def test_cifar100_loads_from_cache_fast():
    import time
    load_dataset("cifar100", "train", root=ROOT, cache_dir=CACHE)  # warm
    t0 = time.perf_counter()
    load_dataset("cifar100", "train", root=ROOT, cache_dir=CACHE)
    assert time.perf_counter() - t0 < 3.0  # ~0.4 s on an idle machine; generous for a shared CI box


@needs_data
def test_emnist_standin_is_fashion_mnist():
    s = load_dataset("emnist", "test", root=ROOT, cache_dir=CACHE)
    assert s.name == "fashion_mnist" and len(s) == 10000
    assert "stand-in" in s.source and "EMNIST" in s.source


@needs_data
def test_splits_on_real_labels():
    mn = load_dataset("mnist", "train", root=ROOT, cache_dir=CACHE)
    sub = stratified_subset(mn.labels, 200, seed=0)
    assert torch.bincount(mn.labels[sub], minlength=10).tolist() == [20] * 10
    assert torch.equal(sub, stratified_subset(mn.labels, 200, seed=0))
    assert not torch.equal(sub, stratified_subset(mn.labels, 200, seed=1))
    c = load_dataset("cifar100", "train", root=ROOT, cache_dir=CACHE)
    d0, d1 = split_halves(c.labels, seed=0)
    assert len(d0) == len(d1) == 25000
    assert not torch.isin(d0, d1).any()
    assert torch.equal(torch.cat([d0, d1]).sort().values, torch.arange(50000))
    assert torch.bincount(c.labels[d0]).tolist() == [250] * 100
    e0, _ = split_halves(c.labels, seed=1)
    assert not torch.equal(d0, e0)


# ---------- cache ----------
def _copy_mnist(dst: Path):
    shutil.copytree(ROOT / "MNIST", dst / "MNIST")
    return dst


@needs_data
def test_cache_reused_and_rebuilt_when_corrupt(tmp_path, monkeypatch):
    root = _copy_mnist(tmp_path / "ds")
    cache = tmp_path / "cache"
    a = load_dataset("mnist", "test", root=root, cache_dir=cache)
    files = list((cache / "arrays").glob("offline-mnist-test-*.npz"))
    assert len(files) == 1
    # reuse: the IDX reader is not called again
    def boom(*a, **k): raise AssertionError("decoded again although the cache is valid")
    monkeypatch.setattr(D, "read_idx_gz", boom)
    b = load_dataset("mnist", "test", root=root, cache_dir=cache)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    monkeypatch.undo()
    # corrupt: flip bytes in the middle of the image data -> CRC mismatch -> rebuilt
    raw = bytearray(files[0].read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = bytes(255 - x for x in raw[len(raw) // 2: len(raw) // 2 + 64])
    files[0].write_bytes(bytes(raw))
    assert load_cached(files[0]) is None
    c = load_dataset("mnist", "test", root=root, cache_dir=cache)
    assert torch.equal(a.images, c.images)
    assert load_cached(files[0]) is not None  # rewritten
    # truncated (a partial write) -> rebuilt too
    files[0].write_bytes(files[0].read_bytes()[:1000])
    assert load_cached(files[0]) is None
    assert torch.equal(load_dataset("mnist", "test", root=root, cache_dir=cache).images, a.images)
    # the key is the sha256 of the verified source files: a touched file keeps its entry, other bytes get a new one
    src = root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    load_dataset("mnist", "test", root=root, cache_dir=cache)
    assert len(list((cache / "arrays").glob("offline-mnist-test-*.npz"))) == 1
    src.write_bytes(gzip.compress(gzip.decompress(src.read_bytes()), compresslevel=1))  # same images, other bytes
    with pytest.warns(UserWarning, match="not the published copy"):
        load_dataset("mnist", "test", root=root, cache_dir=cache)
    assert len(list((cache / "arrays").glob("offline-mnist-test-*.npz"))) == 2
    assert not list((cache / "arrays").glob("*.tmp"))  # atomic writes leave no temp files


# ---------- JPEG tarballs (tiny, hand-built) ----------
def _jpeg(color):
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _tar(path: Path, split: str, spec: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for cls, files in spec.items():
            for fname, color in files:
                data = _jpeg(color)
                ti = tarfile.TarInfo(f"{split}/{cls}/{fname}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))


def test_read_jpeg_tar_order_and_labels(tmp_path):
    spec = {"worm": [("b.jpg", (0, 0, 250)), ("a.jpg", (0, 250, 0))], "apple": [("z.jpg", (250, 0, 0))],
            "bee": [("c.jpg", (250, 250, 250))]}
    _tar(tmp_path / "t.tar.gz", "train", spec)
    x, y, classes = read_jpeg_tar(tmp_path / "t.tar.gz", threads=2)
    assert classes == ["apple", "bee", "worm"]
    assert y.tolist() == [0, 1, 2, 2]
    assert x.shape == (4, 3, 32, 32) and x.dtype == np.uint8
    # worm/a.jpg (green) comes before worm/b.jpg (blue)
    assert x[2, 1].mean() > 200 and x[3, 2].mean() > 200
    assert x[0, 0].mean() > 200  # apple is red


def _fake_cifar_root(root: Path):
    for folder in ("CIFAR100-JPEG", "CIFAR10-JPEG"):
        for split in ("train", "test"):
            _tar(root / folder / f"{split}.tar.gz", split,
                 {"cat": [("1.jpg", (10, 20, 30))], "apple": [("2.jpg", (200, 100, 0)), ("1.jpg", (0, 0, 0))]})
    return root


@pytest.fixture
def tiny_cifar(monkeypatch):
    "Expect the hand-built tiny CIFAR tarballs (3 images, 2 classes) instead of the real sets' counts."
    for name in ("cifar10", "cifar100"):
        for split in ("train", "test"):
            monkeypatch.setitem(D.EXPECTED, (name, split), D.Expected(3, (3, 32, 32), 2, (2, 1), ("apple", "cat")))


def test_offline_cifar_and_svhn_standin(tmp_path, tiny_cifar):
    root, cache = _fake_cifar_root(tmp_path / "ds"), tmp_path / "cache"
    c = load_dataset("cifar100", "train", root=root, cache_dir=cache)
    assert c.classes == ["apple", "cat"] and c.labels.tolist() == [0, 0, 1] and c.origin == "offline"
    s = load_dataset("svhn", "test", root=root, cache_dir=cache)
    assert s.name == "cifar10" and "stand-in" in s.source and "SVHN" in s.source


def test_env_var_is_used(tmp_path, monkeypatch, tiny_cifar):
    root = _fake_cifar_root(tmp_path / "ds")
    monkeypatch.setenv("KDBOOK_DATASETS", str(root))
    assert datasets_dir() == root
    assert len(load_dataset("cifar10", "test", cache_dir=tmp_path / "c")) == 3


# ---------- errors ----------
def test_unknown_name_and_split():
    with pytest.raises(ValueError, match="choose one of 'mnist', 'emnist', 'fashion_mnist', 'cifar10', 'cifar100', 'svhn'"):
        load_dataset("imagenet", "train")
    with pytest.raises(ValueError, match="unknown split 'validation'; choose one of 'train', 'test'"):
        load_dataset("mnist", "validation")


@pytest.mark.parametrize("name", ["mnist", "emnist", "cifar100", "svhn"])
def test_missing_dataset_names_both_ways(tmp_path, name):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        load_dataset(name, "train", root=tmp_path / "empty", cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert "KDBOOK_DATASETS" in msg and "download=True" in msg and repr(name) in msg


def test_missing_datasets_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        datasets_dir(tmp_path / "nope")


# ---------- torchvision path, no network ----------
@needs_data
def test_torchvision_route_reads_a_torchvision_root(tmp_path):
    """A torchvision-style root (decompressed IDX files in <cache>/torchvision/MNIST/raw) is read through
    torchvision.datasets.MNIST(download=False) and preferred over the offline copy."""
    raw = tmp_path / "cache" / "torchvision" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in (ROOT / "MNIST" / "raw").glob("*.gz"):
        (raw / gz.name[:-3]).write_bytes(gzip.decompress(gz.read_bytes()))
    tv = load_dataset("mnist", "test", root=ROOT, cache_dir=tmp_path / "cache")
    assert tv.origin == "torchvision" and "torchvision.datasets.MNIST" in tv.source
    off = load_dataset("mnist", "test", root=ROOT, cache_dir=CACHE)
    assert torch.equal(tv.images, off.images) and torch.equal(tv.labels, off.labels)
    assert tv.classes[0].startswith("0")


class _FakeSVHN:
    def __init__(self, n=8):
        g = np.random.default_rng(0)
        self.data = g.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        self.labels = np.arange(n) % 10


def test_download_true_calls_torchvision_with_download(tmp_path, monkeypatch):
    monkeypatch.setitem(D.EXPECTED, ("svhn", "train"), D.Expected(8, (3, 32, 32), 10))
    calls = []
    def fake(name, split, tv_root, download):
        calls.append((name, split, Path(tv_root), download))
        return _FakeSVHN()
    monkeypatch.setattr(D, "_tv_dataset", fake)
    (tmp_path / "empty").mkdir()
    s = load_dataset("svhn", "train", root=tmp_path / "empty", cache_dir=tmp_path / "cache", download=True)
    assert calls == [("svhn", "train", tmp_path / "cache" / "torchvision", True)]
    assert s.origin == "torchvision" and s.name == "svhn" and len(s) == 8 and s.images.shape[1:] == (3, 32, 32)


def test_download_failure_falls_back_to_standin(tmp_path, monkeypatch, tiny_cifar):
    def offline(*a, **k): raise RuntimeError("network unreachable")
    monkeypatch.setattr(D, "_tv_dataset", offline)
    root = _fake_cifar_root(tmp_path / "ds")
    s = load_dataset("svhn", "train", root=root, cache_dir=tmp_path / "cache", download=True)
    assert s.name == "cifar10" and "download failed" in s.source
    with pytest.raises(FileNotFoundError, match="network unreachable"):
        load_dataset("mnist", "train", root=root, cache_dir=tmp_path / "cache", download=True)


def test_emnist_torchvision_images_are_transposed_back():
    class DS:
        data = torch.arange(2 * 28 * 28, dtype=torch.uint8).view(2, 28, 28)
        targets = torch.tensor([0, 1]); classes = ["0", "1"]
    x, y, _ = D._tv_arrays("emnist", DS)
    assert x.shape == (2, 1, 28, 28) and np.array_equal(x[0, 0], DS.data[0].numpy().T)


# ---------- small pieces ----------
def test_imageset_and_to_float():
    s = ImageSet(torch.arange(48, dtype=torch.uint8).view(3, 1, 4, 4), torch.tensor([0, 1, 2]), list("abc"), "t", "hand")
    assert len(s) == 3 and s.subset(torch.tensor([2])).labels.tolist() == [2]
    assert s.to("cpu").images.device.type == "cpu"
    with pytest.raises(ValueError, match="int64"):
        ImageSet(s.images, torch.tensor([0, 1, 2], dtype=torch.int32), [], "t", "")
    f = to_float(torch.tensor([0, 255, 127], dtype=torch.uint8))
    assert f.dtype == torch.float32 and f[0] == -1 and f[1] == 1 and abs(f[2].item()) < 0.01
    with pytest.raises(ValueError, match="uint8"):
        to_float(torch.zeros(3))


def test_fraction_subset():
    a, b, c = (fraction_subset(1000, f, seed=3) for f in (0.25, 0.5, 1.0))
    assert (len(a), len(b), len(c)) == (250, 500, 1000)
    assert torch.isin(a, b).all() and torch.equal(c, torch.arange(1000))
    assert not torch.equal(a, fraction_subset(1000, 0.25, seed=4))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fraction_subset(10, -0.1, seed=0)


def test_stratified_subset_errors():
    with pytest.raises(ValueError, match="fewer than"):
        stratified_subset(torch.tensor([0, 0, 0, 1]), 4, seed=0)  # class 1 cannot give 2 examples
    with pytest.raises(ValueError, match="n must be"):
        stratified_subset(torch.tensor([0, 0, 1]), 0, seed=0)


# ---------- damaged copies: every fault is a DatasetError naming the file, and nothing is cached ----------
MN = "MNIST/raw/"


def _regz(path: Path, edit):
    "Rewrite a gzip file's decompressed content with `edit(bytearray) -> bytes` (a valid gzip stream again)."
    path.write_bytes(gzip.compress(bytes(edit(bytearray(gzip.decompress(path.read_bytes()))))))


def _flip(path: Path, frac=0.5, n=64):
    b = bytearray(path.read_bytes())
    i = int(len(b) * frac)
    b[i:i + n] = bytes(255 - x for x in b[i:i + n])
    path.write_bytes(bytes(b))


def _set_label(b, i, v):
    b[8 + i] = v
    return b


def _cut_to(n, item):
    return lambda b: b[:4] + n.to_bytes(4, "big") + b[8:8 + 4 * (b[3] - 1) + n * item]


IDX_FAULTS = {  # fault -> (file it damages, how, words the error must hold)
    "truncated": ("t10k-images-idx3-ubyte.gz", lambda p: p.write_bytes(p.read_bytes()[:700_000]), "truncated"),
    "bytes flipped mid-stream": ("t10k-images-idx3-ubyte.gz", _flip, "CRC check failed"),
    "not gzip": ("t10k-images-idx3-ubyte.gz", lambda p: p.write_bytes(gzip.decompress(p.read_bytes())), "gzip"),
    "label out of range": ("t10k-labels-idx1-ubyte.gz", lambda p: _regz(p, lambda b: _set_label(b, 5, 12)),
                           "outside 0..9"),
    "label changed in range": ("t10k-labels-idx1-ubyte.gz", lambda p: _regz(p, lambda b: _set_label(b, 0, 1)),
                               "wrong number of examples"),
    "labels of the other split": ("t10k-labels-idx1-ubyte.gz",
                                  lambda p: shutil.copy(p.with_name("train-labels-idx1-ubyte.gz"), p),
                                  "60000 labels for 10000 images"),
    "9000 images and labels": ("t10k-images-idx3-ubyte.gz", lambda p: (
        _regz(p, _cut_to(9000, 784)), _regz(p.with_name("t10k-labels-idx1-ubyte.gz"), _cut_to(9000, 1))),
        "holds 9,000 mnist test images"),
    "header promises more than it holds": ("t10k-images-idx3-ubyte.gz", lambda p: _regz(p, lambda b: b[:-784]),
                                           "its header promises"),
}


@needs_data
@pytest.mark.parametrize("fault", sorted(IDX_FAULTS))
def test_damaged_idx_copy_is_an_error_naming_the_file(tmp_path, fault):
    fname, damage, words = IDX_FAULTS[fault]
    root, cache = _copy_mnist(tmp_path / "ds"), tmp_path / "cache"
    damage(root / MN / fname)
    with pytest.raises(D.DatasetError) as e:
        load_dataset("mnist", "test", root=root, cache_dir=cache)
    msg = str(e.value)
    assert str(root / MN / fname) in msg and words in msg, msg
    assert "Re-copy" in msg and "download=True" in msg and "BytesIO" not in msg
    assert not list(cache.rglob("*.npz")), "a damaged split was cached"


def _repack(path: Path, keep=lambda name: True, edit=lambda name, data: data):
    out = io.BytesIO()
    with tarfile.open(path) as src, tarfile.open(fileobj=out, mode="w:gz") as dst:
        for m in src:
            if not keep(m.name): continue
            data = src.extractfile(m).read() if m.isfile() else None
            if data is None:
                dst.addfile(m)
                continue
            data = edit(m.name, data)
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    path.write_bytes(out.getvalue())


TAR_FAULTS = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:1_500_000]), "truncated"),
    "bytes flipped mid-stream": (lambda p: _flip(p, 0.4), "CRC check failed"),
    "class folder missing": (lambda p: _repack(p, keep=lambda n: "/cat" not in n), "holds 9,000 cifar10 test images"),
    "unreadable JPEG": (lambda p: _repack(p, edit=lambda n, d: b"garbage" * 50 if n.endswith("dog/0007.jpg") else d),
                        "member dog/0007.jpg is not a readable JPEG"),
}


@needs_data
@pytest.mark.parametrize("fault", sorted(TAR_FAULTS))
def test_damaged_cifar_tar_copy_is_an_error_naming_the_file(tmp_path, fault):
    damage, words = TAR_FAULTS[fault]
    tar = tmp_path / "ds" / "CIFAR10-JPEG" / "test.tar.gz"
    shutil.copytree(ROOT / "CIFAR10-JPEG", tar.parent)
    damage(tar)
    cache = tmp_path / "cache"
    with pytest.raises(D.DatasetError) as e:
        load_dataset("cifar10", "test", root=tmp_path / "ds", cache_dir=cache)
    msg = str(e.value)
    assert str(tar) in msg and words in msg and "download=True" in msg and "BytesIO" not in msg, msg
    assert not list(cache.rglob("*.npz"))


def test_renamed_class_folder_is_refused(tmp_path, monkeypatch):
    "A renamed folder would shift every later label: the class names must be the set's own."
    monkeypatch.setitem(D.EXPECTED, ("cifar10", "test"), D.Expected(3, (3, 32, 32), 2, (2, 1), ("apple", "cat")))
    for split in ("train", "test"):
        _tar(tmp_path / "ds" / "CIFAR10-JPEG" / f"{split}.tar.gz", split,
             {"kat": [("1.jpg", (10, 20, 30))], "apple": [("2.jpg", (0, 0, 0)), ("1.jpg", (0, 0, 0))]})
    with pytest.raises(D.DatasetError, match="missing cat, unexpected kat"):
        load_dataset("cifar10", "test", root=tmp_path / "ds", cache_dir=tmp_path / "cache")


def test_tar_of_the_wrong_split_is_refused(tmp_path, tiny_cifar):
    root = _fake_cifar_root(tmp_path / "ds")
    shutil.copy(root / "CIFAR10-JPEG" / "train.tar.gz", root / "CIFAR10-JPEG" / "test.tar.gz")
    with pytest.raises(D.DatasetError, match="is not test/<class>/<file>.jpg"):
        load_dataset("cifar10", "test", root=root, cache_dir=tmp_path / "cache")


@needs_data
def test_missing_split_file_is_named(tmp_path):
    shutil.copytree(ROOT / "MNIST", tmp_path / "ds" / "MNIST")
    (tmp_path / "ds" / MN / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="lacks MNIST/raw/t10k-labels-idx1-ubyte.gz"):
        load_dataset("mnist", "train", root=tmp_path / "ds", cache_dir=tmp_path / "cache")


def test_svhn_message_reads_correctly(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("svhn", "test", root=tmp_path / "empty", cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert "CIFAR10-JPEG/ so that cifar10 stands in (svhn itself has no offline copy)" in msg, msg
    assert "no offline copy is supported" not in msg and "shared/" not in msg


@needs_data
def test_a_different_but_valid_copy_is_used_with_a_warning(tmp_path):
    root = _copy_mnist(tmp_path / "ds")
    p = root / MN / "t10k-labels-idx1-ubyte.gz"
    p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes()), compresslevel=1))  # same content, other bytes
    with pytest.warns(UserWarning, match="not the published copy"):
        s = load_dataset("mnist", "test", root=root, cache_dir=tmp_path / "cache")
    assert len(s) == 10000


@needs_data
def test_cache_entry_not_written_by_these_checks_is_rebuilt(tmp_path):
    "A cache entry that lacks this version's `verified` mark, or fails the checks, is never returned."
    root, cache = _copy_mnist(tmp_path / "ds"), tmp_path / "cache"
    good = load_dataset("mnist", "test", root=root, cache_dir=cache)
    (entry,) = (cache / "arrays").glob("offline-mnist-test-*.npz")
    x, y, meta = load_cached(entry)
    for poisoned in (dict(meta, verified=1), meta):  # written by older code; or marked but partial
        D.save_cached(entry, x[:4000], y[:4000], poisoned)
        again = load_dataset("mnist", "test", root=root, cache_dir=cache)
        assert torch.equal(again.images, good.images) and len(again) == 10000
        assert len(load_cached(entry)[0]) == 10000  # rebuilt from the verified files


@needs_data
def test_datasets_env_pointing_nowhere_does_not_block_torchvision(tmp_path, monkeypatch):
    raw = tmp_path / "cache" / "torchvision" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in (ROOT / "MNIST" / "raw").glob("*.gz"):
        (raw / gz.name[:-3]).write_bytes(gzip.decompress(gz.read_bytes()))
    monkeypatch.setenv("KDBOOK_DATASETS", str(tmp_path / "nowhere"))
    with pytest.warns(UserWarning, match="KDBOOK_DATASETS=.*nowhere is not a directory"):
        s = load_dataset("mnist", "test", cache_dir=tmp_path / "cache")
    assert s.origin == "torchvision" and len(s) == 10000
