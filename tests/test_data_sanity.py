"""Data sanity at load (kdexp.data.sanity, run by load_dataset for every dataset): bad data stops
with one line that names the dataset (the file, for npz) and what to do; valid but suspicious
data loads with a warning line in Data.warnings and the "kdexp" log."""
import logging
import re
import struct

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kdexp.config import DatasetConfig
from kdexp.data import Data, DataContentError, dataset_signature, load_dataset
from kdexp.errors import ConfigError, DataError


def ds(**kw):
    return OmegaConf.merge(OmegaConf.structured(DatasetConfig), kw)


def npz_file(path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def data_error(cfg) -> str:
    """The message of the DataError (never a ConfigError) that loading cfg raises: one line."""
    with pytest.raises(DataError) as e:
        load_dataset(cfg)
    assert not isinstance(e.value, ConfigError) and "\n" not in str(e.value)
    return str(e.value)


def config_error(cfg) -> str:
    """The message of the ConfigError (never a DataError) that loading cfg raises: one line."""
    with pytest.raises(ConfigError) as e:
        load_dataset(cfg)
    assert not isinstance(e.value, DataError) and "\n" not in str(e.value)
    return str(e.value)


RNG = np.random.default_rng(0)
X40 = RNG.random((40, 4))


# ------------------------------------------------------------------------------ labels

def test_labels_one_to_ten_are_an_error_whose_suggested_classes_work(tmp_path):
    y = np.arange(100) % 10 + 1  # 1..10: max + 1 = 11 classes, class 0 empty
    path = npz_file(tmp_path / "l.npz", x=RNG.random((100, 4)), y=y)
    msg = data_error(ds(name="npz", path=path))
    assert f"dataset.path={path!r}" in msg and "class 0 has no sample in train or val" in msg
    assert "dataset.classes=[1,2,3,4,5,6,7,8,9,10]" in msg
    suggested = [int(c) for c in re.search(r"dataset\.classes=\[([\d,]+)\]", msg).group(1).split(",")]
    d = load_dataset(ds(name="npz", path=path, classes=suggested))
    assert d.num_classes == 10 and d.warnings == []
    assert set(d.y_train.tolist()) == set(d.y_val.tolist()) == set(range(10))
    plain = load_dataset(ds(name="npz", path=npz_file(tmp_path / "l0.npz", x=RNG.random((100, 4)), y=y - 1)))
    assert torch.bincount(d.y_train).tolist() == torch.bincount(plain.y_train).tolist()  # label k -> class k-1


def test_negative_label(tmp_path):
    path = npz_file(tmp_path / "neg.npz", x=X40, y=np.arange(40) % 3 - 1)
    msg = data_error(ds(name="npz", path=path))
    assert path in msg and "label -1 is negative" in msg and "0..C-1" in msg


def test_non_whole_float_labels(tmp_path):
    path = npz_file(tmp_path / "half.npz", x=X40, y=(np.arange(40) % 2) + 0.5)
    msg = data_error(ds(name="npz", path=path))
    assert path in msg and "dtype float64" in msg and "e.g. 0.5 at index 0" in msg
    msg = data_error(ds(name="npz", path=npz_file(tmp_path / "s.npz", x=X40, y=np.array(["a", "b"] * 20))))
    assert "integer class ids" in msg and "dtype <U1" in msg and "'a'" in msg


def test_whole_float_labels_are_accepted_as_the_integers(tmp_path):
    y = np.arange(40) % 3
    ints = load_dataset(ds(name="npz", path=npz_file(tmp_path / "i.npz", x=X40, y=y)))
    floats = load_dataset(ds(name="npz", path=npz_file(tmp_path / "f.npz", x=X40, y=y.astype(np.float64))))
    for k in ("x_train", "y_train", "x_val", "y_val"):
        assert torch.equal(getattr(ints, k), getattr(floats, k))
    assert floats.y_train.dtype == torch.int64 and floats.num_classes == 3
    one_two = npz_file(tmp_path / "12.npz", x=X40, y=(np.arange(40) % 2) + 1.0)  # 1.0 / 2.0
    d = load_dataset(ds(name="npz", path=one_two, classes=[1, 2]))
    assert d.num_classes == 2 and set(d.y_train.tolist()) == {0, 1}
    assert "dataset.classes=[1,2]" in data_error(ds(name="npz", path=one_two))  # class 0 would be empty


def test_labels_must_be_one_dimensional(tmp_path):
    msg = data_error(ds(name="npz", path=npz_file(tmp_path / "col.npz", x=X40, y=(np.arange(40) % 2)[:, None])))
    assert "y must be a 1-D array" in msg and "(40, 1)" in msg and "y.ravel()" in msg


# ------------------------------------------------------------------------------ pairing

def test_length_mismatch_in_train_and_in_val(tmp_path):
    msg = data_error(ds(name="npz", path=npz_file(tmp_path / "t.npz", x=RNG.random((5, 2)), y=np.arange(4) % 2)))
    assert "x has 5 samples but y has 4" in msg
    path = npz_file(tmp_path / "v.npz", x=X40, y=np.arange(40) % 2, x_val=RNG.random((8, 4)), y_val=np.arange(7) % 2)
    msg = data_error(ds(name="npz", path=path))
    assert path in msg and "x_val has 8 samples but y_val has 7" in msg


def test_x_val_without_y_val(tmp_path):
    msg = data_error(ds(name="npz", path=npz_file(tmp_path / "h.npz", x=X40, y=np.arange(40) % 2, x_val=X40[:8])))
    assert "has x_val but not y_val" in msg


def test_a_class_too_small_to_split(tmp_path):
    y = np.r_[np.arange(40) % 2, 2]  # label 2: one sample, no stratified split
    msg = data_error(ds(name="npz", path=npz_file(tmp_path / "s.npz", x=RNG.random((41, 4)), y=y)))
    assert "no stratified train/val split of its 41 samples" in msg and "x_val and y_val" in msg


# ------------------------------------------------------------------------------ class counts

def test_a_single_class_subset_is_a_config_error():
    msg = config_error(ds(name="digits", classes=[3]))
    assert msg.startswith("dataset.classes=[3]") and "a classifier needs at least 2 classes" in msg
    with pytest.raises(ConfigError) as planned:  # the run plan refuses it before any data is read
        dataset_signature(ds(name="digits", classes=[3]))
    assert str(planned.value) == msg


def test_a_single_class_in_a_split(tmp_path):
    path = npz_file(tmp_path / "one.npz", x=X40, y=np.zeros(40, int), x_val=X40[:8], y_val=np.arange(8) % 2)
    msg = data_error(ds(name="npz", path=path))
    assert path in msg and "the training split has a single class (label 0)" in msg
    assert "a classifier needs at least 2 classes" in msg
    path = npz_file(tmp_path / "v.npz", x=X40, y=np.arange(40) % 3, x_val=X40[:8], y_val=np.arange(8) % 2)
    msg = config_error(ds(name="npz", path=path, classes=[2, 0]))  # label 2 has no validation sample
    assert "dataset.classes=[2,0] leaves a single class in the validation split (label 0)" in msg


def test_a_selected_label_without_samples(tmp_path):
    path = npz_file(tmp_path / "gap.npz", x=X40, y=np.array([0, 1, 3, 4] * 10))
    assert "dataset.classes=[1,2,3] selects label(s) [2]" in config_error(ds(name="npz", path=path, classes=[1, 2, 3]))


# ------------------------------------------------------------------------------ warnings

def test_a_class_without_validation_or_training_samples_is_a_warning(tmp_path, caplog):
    path = npz_file(tmp_path / "v.npz", x=X40, y=np.arange(40) % 3, x_val=X40[:8], y_val=np.arange(8) % 2)
    with caplog.at_level(logging.WARNING, logger="kdexp"):
        d = load_dataset(ds(name="npz", path=path))
    assert d.num_classes == 3
    assert d.warnings == [f"dataset.path={path!r}: class 2 has no validation sample: val/acc does not measure it"]
    assert [r.getMessage() for r in caplog.records if r.name == "kdexp"] == d.warnings
    assert load_dataset(ds(name="npz", path=path, classes=[2, 0, 1])).warnings == [
        f"dataset.path={path!r}: dataset.classes=[2,0,1] leaves class 0 (label 2) with no validation sample: "
        f"val/acc does not measure it"]
    path = npz_file(tmp_path / "t.npz", x=X40, y=np.arange(40) % 2, x_val=X40[:9], y_val=np.arange(9) % 3)
    assert load_dataset(ds(name="npz", path=path)).warnings == [
        f"dataset.path={path!r}: class 2 has no training sample: the model cannot learn it"]


def test_valid_data_has_no_warnings_and_data_keeps_its_fields():
    d = load_dataset(ds(name="digits"))
    assert d.warnings == [] and d.to("cpu").warnings == [] and d.source_only().warnings == []
    positional = Data(d.x_train, d.y_train, d.x_val, d.y_val, 10, "digits", None, None, None, None, "train", None)
    assert positional.warnings == [] and positional.view == "train"


# ------------------------------------------------------------------------------ inputs

def test_nan_and_inf_inputs_are_counted(tmp_path):
    x, x_val = RNG.random((40, 4, 5)), RNG.random((8, 4, 5))
    x[3].flat[:12] = np.nan
    x[7, 0, :3] = [np.inf, -np.inf, np.inf]
    x_val[1, 2, 2] = np.nan
    path = npz_file(tmp_path / "nan.npz", x=x, y=np.arange(40) % 2, x_val=x_val, y_val=np.arange(8) % 2)
    msg = data_error(ds(name="npz", path=path))
    assert path in msg and ("x has 12 NaN and 3 inf values in 2 training samples, "
                            "and 1 NaN and 0 inf values in 1 validation sample") in msg


def test_inputs_too_large_to_standardize(tmp_path):
    path = npz_file(tmp_path / "big.npz", x=np.where(X40 > 0.5, 3e38, -3e38), y=np.arange(40) % 2)
    msg = data_error(ds(name="npz", path=path))
    assert "too large to standardize" in msg and "dataset.normalize=false" in msg
    assert torch.isfinite(load_dataset(ds(name="npz", path=path, normalize=False)).x_train).all()


def test_a_constant_feature_stays_finite(tmp_path):
    x = X40.copy()
    x[:, 1] = 7.0
    d = load_dataset(ds(name="npz", path=npz_file(tmp_path / "c.npz", x=x, y=np.arange(40) % 2)))
    assert torch.isfinite(d.x_train).all() and torch.isfinite(d.x_val).all()


# ------------------------------------------------------------------------------ corrupt npz files

@pytest.fixture
def good_npz(tmp_path):
    return npz_file(tmp_path / "good.npz", x=RNG.random((20, 3)), y=np.arange(20) % 2)


def corrupt_message(path) -> str:
    msg = data_error(ds(name="npz", path=str(path)))
    assert msg.startswith(f"dataset.path={str(path)!r}: the file is corrupt or not an .npz (")
    return msg


def test_truncated_npz(tmp_path, good_npz):
    cut = tmp_path / "cut.npz"
    data = open(good_npz, "rb").read()
    cut.write_bytes(data[: len(data) // 2])
    assert "truncated or damaged zip archive" in corrupt_message(cut)


def test_text_file_named_npz(tmp_path):
    (tmp_path / "text.npz").write_text("x,y\n1,2\n")
    assert "(not a zip archive)" in corrupt_message(tmp_path / "text.npz")
    (tmp_path / "empty.npz").write_bytes(b"")
    assert "(the file is empty)" in corrupt_message(tmp_path / "empty.npz")
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "one.npz").write_bytes((tmp_path / "one.npy").read_bytes())
    assert "a single .npy array" in corrupt_message(tmp_path / "one.npz")


def test_corrupt_npz_member(tmp_path, good_npz):
    data = bytearray(open(good_npz, "rb").read())
    data[data.find(b"\x93NUMPY") + 150] ^= 0xFF  # a byte of x's values: its CRC no longer matches
    (tmp_path / "crc.npz").write_bytes(data)
    assert "array 'x': Bad CRC-32" in corrupt_message(tmp_path / "crc.npz")
    np.savez_compressed(tmp_path / "z.npz", x=RNG.random((20, 3)), y=np.arange(20) % 2)
    data = bytearray((tmp_path / "z.npz").read_bytes())
    start = data.find(b"x.npy") + 40
    data[start:start + 20] = bytes(20)  # the deflate stream of x no longer decompresses
    (tmp_path / "zbad.npz").write_bytes(data)
    assert "array 'x': " in corrupt_message(tmp_path / "zbad.npz")


def test_object_array_is_refused_by_name(tmp_path):
    np.savez(tmp_path / "obj.npz", x=np.array([[1], "a"], dtype=object), y=np.arange(2))
    with pytest.raises(DataContentError, match="array 'x' holds Python objects") as e:
        load_dataset(ds(name="npz", path=str(tmp_path / "obj.npz")))
    assert isinstance(e.value, DataError) and isinstance(e.value, ValueError)


# ------------------------------------------------------------------------------ corrupt torchvision files

def _write_idx(path, arr: np.ndarray, magic=None):
    magic = magic if magic is not None else {1: 0x801, 3: 0x803}[arr.ndim]
    path.write_bytes(struct.pack(">" + "I" * (1 + arr.ndim), magic, *arr.shape) + arr.astype(np.uint8).tobytes())


@pytest.fixture
def mnist_root(tmp_path):
    """MNIST's four idx files under root/MNIST/raw, read by torchvision from disk (no download)."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 30), ("t10k", 12)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", RNG.integers(0, 255, (n, 28, 28)))
        _write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    return tmp_path


def mnist_error(root, download=False) -> str:
    msg = data_error(ds(name="mnist", root=str(root), download=download))
    assert msg.startswith(f"dataset=mnist: corrupt file under dataset.root={root}: ")
    return msg


def test_mnist_wrong_magic_number(mnist_root):
    raw = mnist_root / "MNIST" / "raw"
    _write_idx(raw / "train-images-idx3-ubyte", RNG.integers(0, 255, (30, 28, 28)), magic=0x999)
    for download in (False, True):  # torchvision keeps MNIST files it finds: no download is tried
        msg = mnist_error(mnist_root, download)
        assert "MNIST/raw/train-images-idx3-ubyte (magic number 0x00000999 instead of 0x00000803" in msg
        assert "delete it and set dataset.download=true" in msg


def test_mnist_truncated_files(mnist_root):
    raw = mnist_root / "MNIST" / "raw"
    images = raw / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    msg = mnist_error(mnist_root)
    assert "train-images-idx3-ubyte (truncated: 1000 bytes, but its header announces 30x28x28 values" in msg
    _write_idx(images, RNG.integers(0, 255, (30, 28, 28)))
    labels = raw / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:10])
    assert "t10k-labels-idx1-ubyte (truncated: 10 bytes" in mnist_error(mnist_root)
    labels.write_bytes(b"")
    assert "t10k-labels-idx1-ubyte (0 bytes, shorter than its idx header)" in mnist_error(mnist_root)


def test_mnist_missing_file_keeps_the_not_found_message(mnist_root):
    (mnist_root / "MNIST" / "raw" / "train-labels-idx1-ubyte").unlink()
    msg = data_error(ds(name="mnist", root=str(mnist_root), download=False))
    assert msg.startswith(f"dataset=mnist: files not found under {mnist_root}. Put them in {mnist_root}/MNIST/raw/")


def test_mnist_images_and_labels_that_do_not_pair(mnist_root):
    _write_idx(mnist_root / "MNIST" / "raw" / "train-labels-idx1-ubyte", np.arange(20) % 10)
    msg = data_error(ds(name="mnist", root=str(mnist_root), download=False))
    assert msg == (f"dataset=mnist (dataset.root={mnist_root}): x has 30 samples but y has 20; "
                   f"each input needs exactly one label")


def test_mnist_label_past_its_ten_classes(mnist_root):
    labels = np.arange(30) % 10
    labels[4] = 12
    _write_idx(mnist_root / "MNIST" / "raw" / "train-labels-idx1-ubyte", labels)
    msg = data_error(ds(name="mnist", root=str(mnist_root), download=False))
    assert msg.startswith(f"dataset=mnist (dataset.root={mnist_root}): training label 12 is not a class id of "
                          f"the dataset's 10 classes; labels must be in 0..9")


def test_cifar_garbage_pickles(tmp_path):
    import torchvision.datasets as tvd

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, _ in [*tvd.CIFAR10.train_list, *tvd.CIFAR10.test_list, (tvd.CIFAR10.meta["filename"], None)]:
        (folder / name).write_bytes(b"\x80\x04garbage")
    msg = data_error(ds(name="cifar10", root=str(tmp_path), download=False))
    assert msg.startswith(f"dataset=cifar10: corrupt files under dataset.root={tmp_path}: "
                          f"cifar-10-batches-py/data_batch_1, cifar-10-batches-py/data_batch_2")
    assert "(md5 differs from the official file)" in msg and "delete them and set dataset.download=true" in msg
