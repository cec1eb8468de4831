import gzip
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kdexp.config import DatasetConfig
from kdexp.data import load_dataset
from kdexp.errors import ConfigError, DataError


def ds(**kw):
    return OmegaConf.merge(OmegaConf.structured(DatasetConfig), kw)


def test_digits_stratified_fixed_split():
    a, b = load_dataset(ds(name="digits")), load_dataset(ds(name="digits"))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert a.in_shape == (1, 8, 8) and a.num_classes == 10
    assert len(a.x_train) + len(a.x_val) == 1797 and len(a.x_val) == 360
    counts = torch.bincount(a.y_val, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 per class
    assert abs(a.x_train.mean().item()) < 1e-4  # standardized with training statistics
    other = load_dataset(ds(name="digits", split_seed=1))
    assert not torch.equal(a.y_train, other.y_train)


def test_digits_without_importing_sklearn_equal_load_digits():
    from sklearn.datasets import load_digits

    from kdexp.data.builtin import _digits_arrays

    images, target = _digits_arrays()
    d = load_digits()
    assert np.array_equal(images, d.images) and np.array_equal(target, d.target)


def test_cached_splits_equal_fresh_ones_and_spare_the_sklearn_import(tmp_path):
    fresh = load_dataset(ds(name="digits", split_seed=3))
    first = load_dataset(ds(name="digits", split_seed=3), cache_dir=str(tmp_path))
    again = load_dataset(ds(name="digits", split_seed=3), cache_dir=str(tmp_path))
    assert len(list((tmp_path / "splits").glob("*.npz"))) == 1
    for k in ("x_train", "y_train", "x_val", "y_val"):
        assert torch.equal(getattr(fresh, k), getattr(first, k)) and torch.equal(getattr(fresh, k), getattr(again, k))
    other = load_dataset(ds(name="digits", split_seed=4, val_fraction=0.3), cache_dir=str(tmp_path))
    assert len(list((tmp_path / "splits").glob("*.npz"))) == 2 and len(other.x_val) == 540
    code = ("import sys; from omegaconf import OmegaConf; from kdexp.config import DatasetConfig; "
            "from kdexp.data import load_dataset; "
            "load_dataset(OmegaConf.merge(OmegaConf.structured(DatasetConfig), {'name': 'digits', 'split_seed': 3}), "
            f"cache_dir={str(tmp_path)!r}); print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_class_subset_remaps_labels_in_given_order():
    full = load_dataset(ds(name="digits", normalize=False))
    sub = load_dataset(ds(name="digits", classes=[9, 6], normalize=False))
    assert sub.num_classes == 2 and set(sub.y_train.tolist()) == {0, 1}
    nines = full.x_train[full.y_train == 9]
    assert torch.equal(sub.x_train[sub.y_train == 0], nines)  # 9 -> 0, 6 -> 1


def test_bad_class_subset():
    with pytest.raises(ConfigError, match="dataset.classes"):
        load_dataset(ds(name="digits", classes=[3, 12]))


def test_npz_shapes_split_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "hw.npz", x=rng.random((50, 5, 5)), y=np.arange(50) % 5)
    np.savez(tmp_path / "vec.npz", x=rng.random((40, 7)), y=np.arange(40) % 2)
    np.savez(tmp_path / "hwc.npz", x=rng.random((40, 6, 6, 3)), y=np.arange(40) % 2,
             x_val=rng.random((10, 6, 6, 3)), y_val=np.arange(10) % 2)
    d = load_dataset(ds(name="npz", path=str(tmp_path / "hw.npz")))
    assert d.in_shape == (1, 5, 5) and len(d.x_val) == 10 and d.num_classes == 5
    assert load_dataset(ds(name="npz", path=str(tmp_path / "vec.npz"))).in_shape == (7,)
    d = load_dataset(ds(name="npz", path=str(tmp_path / "hwc.npz")))
    assert d.in_shape == (3, 6, 6) and len(d.x_val) == 10
    np.savez(tmp_path / "nox.npz", images=rng.random((5, 2)), y=np.arange(5))
    with pytest.raises(ConfigError, match=r"lacks array\(s\) \['x'\]"):
        load_dataset(ds(name="npz", path=str(tmp_path / "nox.npz")))
    np.savez(tmp_path / "len.npz", x=rng.random((5, 2)), y=np.arange(4))
    with pytest.raises(DataError, match="5 samples but y has 4"):  # bad data, not a bad config value
        load_dataset(ds(name="npz", path=str(tmp_path / "len.npz")))
    with pytest.raises(ConfigError, match="no such file"):
        load_dataset(ds(name="npz", path=str(tmp_path / "missing.npz")))
    with pytest.raises(ConfigError, match="dataset.path"):
        load_dataset(ds(name="npz"))


def _write_idx(path, arr: np.ndarray):
    magic = {1: 2049, 3: 2051}[arr.ndim]
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">" + "I" * (1 + arr.ndim), magic, *arr.shape) + arr.astype(np.uint8).tobytes())


def test_mnist_files_are_read_from_root(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 12)):
        _write_idx(raw / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(raw / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
        # torchvision reads the unpacked files
        with gzip.open(raw / f"{split}-images-idx3-ubyte.gz") as f:
            (raw / f"{split}-images-idx3-ubyte").write_bytes(f.read())
        with gzip.open(raw / f"{split}-labels-idx1-ubyte.gz") as f:
            (raw / f"{split}-labels-idx1-ubyte").write_bytes(f.read())
    d = load_dataset(ds(name="mnist", root=str(tmp_path), download=False))
    assert d.in_shape == (1, 28, 28) and len(d.x_train) == 30 and len(d.x_val) == 12 and d.num_classes == 10


def test_missing_torchvision_files_say_where_to_put_them(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset(ds(name="cifar10", root=str(tmp_path / "nodata"), download=False))
    assert str(tmp_path / "nodata") in str(e.value) and "cifar-10-batches-py" in str(e.value)
