"""Bring your own data: dataset=imagefolder (a folder of real PNG digits) and dataset=custom (a
torch Dataset by import path), in process through load_dataset / dataset_signature and from the
command line end to end."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from kdexp.config import CustomDatasetConfig, ImageFolderDatasetConfig
from kdexp.data import Signature, dataset_signature, load_dataset
from kdexp.data.builtin import _digits_arrays
from kdexp.errors import ConfigError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def folder_cfg(path, **kw):
    return OmegaConf.merge(OmegaConf.structured(ImageFolderDatasetConfig), {"path": str(path), **kw})


def custom_cfg(train, val=None, **kw):
    return OmegaConf.merge(OmegaConf.structured(CustomDatasetConfig),
                           {"train": train, "val": val or {"_target_": None}, **kw})


def digit_png(image: np.ndarray, size: int = 28) -> Image.Image:
    """One 8x8 digit (values 0..16) as a size x size grayscale PIL image (bilinear upsampling)."""
    return Image.fromarray((image * 255 / 16).astype(np.uint8), "L").resize((size, size), Image.BILINEAR)


def write_digits(root, train_per_class: int, val_per_class: int, val: bool = True):
    """scikit-learn's digits as 28x28 PNGs in root/train/<0..9>/ and root/val/<0..9>/: the first
    train_per_class images of each class to train/, the next val_per_class to val/."""
    images, labels = _digits_arrays()
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        splits = [("train", idx[:train_per_class])] + ([("val", idx[train_per_class:][:val_per_class])] if val else [])
        for split, chosen in splits:
            os.makedirs(root / split / str(c), exist_ok=True)
            for i in chosen:
                digit_png(images[i]).save(root / split / str(c) / f"{i:04d}.png")
    return root


def write_images(root, spec):
    """spec: {"train/cat": [(mode, (w, h)), ...], ...} -> solid images, each a distinct gray level."""
    for folder, images in spec.items():
        os.makedirs(root / folder, exist_ok=True)
        for k, (mode, size) in enumerate(images):
            Image.new(mode, size, color=(40 * k + 10) if mode == "L" else (40 * k + 10, 0, 200)).save(
                root / folder / f"{k}.png")
    return root


def run_cli(cwd, *overrides, pythonpath=ROOT):
    """python -m kdexp.train from `cwd` -> (completed process, metrics.json of the run or None)."""
    env = {**os.environ, "PYTHONPATH": pythonpath}
    proc = subprocess.run([sys.executable, "-m", "kdexp.train", *overrides, "hydra.run.dir=run", "progress=false"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    path = cwd / "run" / "metrics.json"
    return proc, (json.loads(path.read_text()) if path.is_file() else None)


# ------------------------------------------------------------------------------ imagefolder

def test_imagefolder_loads_shapes_labels_class_order_and_signature(tmp_path):
    write_images(tmp_path, {"train/cat": [("L", (6, 4))] * 3, "train/ant": [("L", (6, 4))] * 2,
                            "val/cat": [("L", (6, 4))], "val/ant": [("L", (6, 4))] * 2})
    cfg = folder_cfg(tmp_path, normalize=False)
    d = load_dataset(cfg)
    assert d.x_train.shape == (5, 1, 4, 6) and d.x_val.shape == (3, 1, 4, 6) and d.num_classes == 2
    assert d.y_train.tolist() == [0, 0, 1, 1, 1] and d.y_val.tolist() == [0, 0, 1]  # ant < cat, sorted files
    assert d.x_train.dtype == torch.float32 and abs(float(d.x_train[2, 0, 0, 0]) - 10 / 255) < 1e-6  # cat/0.png
    assert dataset_signature(cfg) == Signature(d.in_shape, d.num_classes) == Signature((1, 4, 6), 2)


def test_imagefolder_channels_auto_explicit_and_image_size(tmp_path):
    write_images(tmp_path, {"train/a": [("RGB", (5, 5)), ("L", (5, 5))], "train/b": [("L", (5, 5))] * 2,
                            "val/a": [("L", (5, 5))], "val/b": [("L", (5, 5))]})
    auto = folder_cfg(tmp_path)
    assert load_dataset(auto).in_shape == (3, 5, 5) == dataset_signature(auto).in_shape  # one colour image: RGB
    gray = folder_cfg(tmp_path, channels=1, image_size=[7, 9])
    d = load_dataset(gray)
    assert d.in_shape == (1, 7, 9) == dataset_signature(gray).in_shape and d.x_val.shape == (2, 1, 7, 9)
    assert load_dataset(folder_cfg(tmp_path, image_size=8)).in_shape == (3, 8, 8)


def test_imagefolder_of_digits_without_val_is_split_stratified(tmp_path):
    write_digits(tmp_path, train_per_class=10, val_per_class=0, val=False)
    cfg = folder_cfg(tmp_path, val_fraction=0.2)
    d = load_dataset(cfg, cache_dir=str(tmp_path / "cache"))
    assert d.x_train.shape == (80, 1, 28, 28) and d.x_val.shape == (20, 1, 28, 28)
    assert torch.bincount(d.y_val).tolist() == [2] * 10
    assert dataset_signature(cfg) == Signature((1, 28, 28), 10)


@pytest.mark.parametrize("layout,overrides,error,words", [
    ("missing", {}, DataError, "no such directory"),
    ({"val/a": [("L", (4, 4))]}, {}, DataError, "no train/ folder"),
    ({"train/.hidden": []}, {}, DataError, "has no class folders"),
    ({"train/a": [("L", (4, 4))] * 2, "train/b": []}, {}, DataError, "train/b has no images"),
    ({"train/a": [("L", (4, 4))] * 2, "train/b": [("L", (4, 4))] * 2, "val/a": [("L", (4, 4))],
      "val/c": [("L", (4, 4))]}, {}, DataError, "only in train/: ['b']; only in val/: ['c']"),
    ({"train/a": [("L", (4, 4))] * 2, "train/b": [("L", (4, 5))] * 2}, {}, ConfigError,
     "set dataset.image_size=[H,W]"),
    ({"train/a": [("L", (4, 4))] * 2, "train/b": [("RGB", (4, 4))] * 2}, {}, ConfigError,
     "set dataset.channels=3"),
    ({"train/a": [("L", (4, 4))] * 2}, {"channels": 2}, ConfigError, "dataset.channels=2"),
    ({"train/a": [("L", (4, 4))] * 2}, {"image_size": [0, 3]}, ConfigError, "dataset.image_size=[0, 3]"),
])
def test_imagefolder_errors_are_one_line_naming_the_path(tmp_path, layout, overrides, error, words):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
        write_images(root, layout)
    with pytest.raises(error) as e:
        load_dataset(folder_cfg(root, **overrides))
    msg = str(e.value)
    assert words in msg and "\n" not in msg
    assert "dataset.path=" in msg or "dataset.channels" in msg or "dataset.image_size" in msg


def test_imagefolder_corrupt_image_is_named(tmp_path):
    write_images(tmp_path, {"train/a": [("L", (4, 4))] * 2, "train/b": [("L", (4, 4))] * 2})
    (tmp_path / "train" / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match=r"image .*train/b/1\.png is corrupt") as e:
        load_dataset(folder_cfg(tmp_path))
    assert "\n" not in str(e.value)


def test_imagefolder_signature_without_data_is_unknown_not_an_error(tmp_path):
    assert dataset_signature(folder_cfg(tmp_path / "nowhere")) == Signature(None, None)
    assert dataset_signature(folder_cfg(None)) == Signature(None, None)


@pytest.mark.slow
def test_kd_on_an_imagefolder_of_png_digits_from_the_command_line(tmp_path):
    write_digits(tmp_path / "digits", train_per_class=120, val_per_class=30)
    proc, m = run_cli(tmp_path, "dataset=imagefolder", f"dataset.path={tmp_path / 'digits'}", "epochs=6",
                      "teacher.epochs=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert m["status"] == "done" and m["val/acc"] > 0.8, m["val/acc"]
    assert "10 classes ['0', '1'," in proc.stderr + proc.stdout


# ------------------------------------------------------------------------------ custom

CUSTOM_MODULE = '''
import numpy as np
import torch
from PIL import Image


class Tensors(torch.utils.data.Dataset):
    """n samples (1, 4, 4) whose label is the sample's mean level, classes named."""
    classes = ["low", "mid", "high"]

    def __init__(self, n=30, offset=0):
        self.n, self.offset = n, offset

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        y = (i + self.offset) % 3
        return torch.full((1, 4, 4), float(y)), torch.tensor(y)


class Pictures(torch.utils.data.Dataset):
    """RGB PIL images, labels 0..3 from their red level; no classes attribute."""

    def __len__(self):
        return 24

    def __getitem__(self, i):
        return Image.new("RGB", (5, 3), (60 * (i % 4), 0, 255)), i % 4


class Ragged(Tensors):
    def __getitem__(self, i):
        return torch.zeros(1, 4, 4 + (i == 5)), 0


def broken():
    raise RuntimeError("no data here")
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "userdata.py").write_text(textwrap.dedent(CUSTOM_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("userdata", None)
    yield "userdata"
    sys.modules.pop("userdata", None)


def test_custom_tensor_dataset_with_its_own_val(user_module):
    cfg = custom_cfg({"_target_": "userdata.Tensors", "n": 12}, {"_target_": "userdata.Tensors", "n": 6, "offset": 1},
                     normalize=False)
    d = load_dataset(cfg)
    assert d.x_train.shape == (12, 1, 4, 4) and d.x_val.shape == (6, 1, 4, 4) and d.num_classes == 3
    assert d.y_train[:4].tolist() == [0, 1, 2, 0] and d.y_val[:3].tolist() == [1, 2, 0]
    assert float(d.x_train[2].mean()) == 2.0
    assert dataset_signature(cfg) == Signature(None, None)  # the run plan does not construct user classes


def test_custom_pil_dataset_split_stratified_and_classes_from_labels(user_module, tmp_path):
    d = load_dataset(custom_cfg({"_target_": "userdata.Pictures"}, normalize=False, val_fraction=0.25),
                     cache_dir=str(tmp_path / "cache"))
    assert d.x_train.shape == (18, 3, 3, 5) and d.x_val.shape == (6, 3, 3, 5) and d.num_classes == 4
    red = d.x_train[:, 0, 0, 0]
    assert torch.allclose(red, d.y_train.float() * 60 / 255)  # PIL uint8 / 255, channel first, label kept with it
    assert bool((d.x_train[:, 2] == 1.0).all())


def test_a_custom_dataset_streams_the_samples_it_reads_in_memory(user_module, tmp_path):
    from kdexp.data.stream import LazyInputs, batches_of

    kw = dict(val_fraction=0.25, split_seed=3)
    mem = load_dataset(custom_cfg({"_target_": "userdata.Pictures"}, in_memory=True, **kw), cache_dir=str(tmp_path))
    lazy = load_dataset(custom_cfg({"_target_": "userdata.Pictures"}, in_memory=False, workers=2, **kw),
                        cache_dir=str(tmp_path))
    assert isinstance(lazy.x_train, LazyInputs) and lazy.x_train.shape == mem.x_train.shape
    assert torch.equal(lazy.y_train, mem.y_train) and lazy.num_classes == mem.num_classes == 4
    assert torch.equal(torch.cat([x for _, x in batches_of(lazy.x_train, 5)]), mem.x_train)  # same split, statistics


@pytest.mark.parametrize("train,error,words", [
    ({"_target_": None}, ConfigError, "needs dataset.train._target_=pkg.module.MyDataset"),
    ({"_target_": "Tensors"}, ConfigError, "name a Dataset class by import path"),
    ({"_target_": "nosuchpkg.Data"}, ConfigError, "cannot import module 'nosuchpkg' (ModuleNotFoundError"),
    ({"_target_": "userdata.Nope"}, ConfigError, "has no attribute 'Nope'"),
    ({"_target_": "userdata.Tensors", "bogus": 1}, ConfigError, "unexpected keyword argument 'bogus'"),
    ({"_target_": "userdata.broken"}, ConfigError, "(RuntimeError: no data here)"),
    ({"_target_": "userdata.Ragged", "n": 9}, DataError, "item 5 has input shape (1, 4, 5)"),
])
def test_custom_errors_are_one_line(user_module, train, error, words):
    with pytest.raises(error) as e:
        load_dataset(custom_cfg(train))
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_kd_on_a_custom_dataset_from_the_command_line(tmp_path):
    (tmp_path / "userdata.py").write_text(textwrap.dedent(CUSTOM_MODULE))
    proc, m = run_cli(tmp_path, "dataset=custom", "dataset.train._target_=userdata.Tensors", "+dataset.train.n=640",
                      "dataset.val._target_=userdata.Tensors", "+dataset.val.n=90", "epochs=3", "teacher.epochs=2",
                      pythonpath=f"{ROOT}{os.pathsep}{tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert m["status"] == "done" and m["val/acc"] > 0.9 and m["hparams"]["dataset.name"] == "custom"


class TinyDataset(torch.utils.data.Dataset):
    """20 samples (1, 3, 3), two classes: dataset=custom by import path (tests.test_your_data.TinyDataset)."""

    def __len__(self):
        return 20

    def __getitem__(self, i):
        return torch.full((1, 3, 3), float(i)), i % 2
