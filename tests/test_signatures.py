"""Run-plan inputs: a dataset's signature without its data (kdexp.data.dataset_signature) and
model skeletons on the meta device (kdexp.models.skeleton). Each is checked against the real
thing: the loaded dataset, the model built and run on CPU."""
import gzip
import struct
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from kdexp.config import DatasetConfig, DomainConfig, FakeDatasetConfig
from kdexp.data import Signature, dataset_signature, load_dataset
from kdexp.data.domain import TRANSFORMS, apply_transforms, parse_steps, target_shape
from kdexp.errors import ConfigError
from kdexp.models import feature_kind, get_model, list_models, skeleton
from kdexp.models.taps import ROLES, default_layers, feature_shapes, list_features
from kdexp.registry import UnknownNameError
from tests.conftest import group_options


def ds(**kw):
    return OmegaConf.merge(OmegaConf.structured(DatasetConfig), kw)


def fake(**kw):
    return OmegaConf.merge(OmegaConf.structured(FakeDatasetConfig), {"train_size": 40, "val_size": 20, **kw})


def domain(*transforms, **kw):
    return OmegaConf.merge(OmegaConf.structured(DomainConfig), {"name": "test", "transforms": list(transforms), **kw})


def loaded(cfg, dom=None):
    data = load_dataset(cfg, dom)
    return Signature(data.in_shape, data.num_classes)


# ------------------------------------------------------------------------------ datasets

@pytest.mark.parametrize("classes,dom", [(None, None), ([9, 6], None), (None, "vflip"), ([1, 2, 3], "lowres")])
def test_digits_signature_equals_loaded(classes, dom, tmp_path):
    cfg, d = ds(name="digits", classes=classes), domain(dom) if dom else None
    assert dataset_signature(cfg, d) == loaded(cfg, d) == Signature((1, 8, 8), len(classes) if classes else 10)


@pytest.mark.parametrize("shape,num_classes,classes,dom", [
    ([3, 32, 32], 100, None, None),
    ([1, 5, 7], 3, None, "vflip"),
    ([1, 5, 7], 3, [2, 0], {"name": "rotate", "angle": 90}),  # 90 degrees on a non-square image: bilinear, same size
    ([2, 4, 4], 4, [0, 3], "lowres"),
    ([2, 6, 6], 5, None, {"name": "blur", "sigma": 2.0}),
    ([7], 2, None, None),  # vectors
    ([7], 3, [1, 2], "noise"),  # noise and invert also take vectors
])
def test_fake_signature_equals_loaded(shape, num_classes, classes, dom):
    cfg, d = fake(shape=shape, num_classes=num_classes, classes=classes), domain(dom) if dom else None
    sig = dataset_signature(cfg, d)
    assert sig == loaded(cfg, d)
    assert sig.in_shape == tuple(shape) and sig.num_classes == (len(classes) if classes else num_classes)


def test_signature_raises_the_loaders_config_errors():
    for cfg, dom in ((fake(shape=[7], num_classes=2), domain("vflip")),  # an image transform on vectors
                     (fake(shape=[0, 4]), None), (fake(num_classes=1), None),
                     (ds(name="digits", classes=[3, 12]), None), (ds(name="digits", classes=[3, 3]), None)):
        with pytest.raises(ConfigError) as planned:
            dataset_signature(cfg, dom)
        with pytest.raises(ConfigError) as loading:
            load_dataset(cfg, dom)
        assert str(planned.value) == str(loading.value)


def test_unknown_dataset_raises_the_registry_error():
    with pytest.raises(UnknownNameError, match="Did you mean 'digits'"):
        dataset_signature(ds(name="digit"))


def _write_npz(path, x, y, compressed=False, **extra):
    (np.savez_compressed if compressed else np.savez)(path, x=x, y=y, **extra)
    return str(path)


@pytest.mark.parametrize("x_shape,in_shape", [
    ((30, 5, 5), (1, 5, 5)),  # (N, H, W): a channel axis is added
    ((30, 1, 5, 5), (1, 5, 5)),
    ((30, 3, 6, 6), (3, 6, 6)),
    ((30, 6, 6, 3), (3, 6, 6)),  # channels-last
    ((30, 6, 6, 1), (1, 6, 6)),
    ((30, 7), (7,)),  # vectors
])
@pytest.mark.parametrize("compressed", [False, True])
def test_npz_signature_from_the_header_equals_loaded(tmp_path, monkeypatch, x_shape, in_shape, compressed):
    rng = np.random.default_rng(0)
    path = _write_npz(tmp_path / "d.npz", rng.random(x_shape).astype(np.float32), np.arange(30) % 3, compressed)
    cfg, sub = ds(name="npz", path=path), ds(name="npz", path=path, classes=[2, 0])
    real, real_sub = loaded(cfg), loaded(sub)
    assert real.in_shape == in_shape
    with monkeypatch.context() as m:  # the signature reads headers only, never an array
        def boom(*a, **k):
            raise AssertionError("an array was read")
        m.setattr(np, "load", boom)
        m.setattr(np.lib.format, "read_array", boom)
        planned, planned_sub = dataset_signature(cfg), dataset_signature(sub)
    assert planned == Signature(real.in_shape, None)  # the class count needs the labels
    assert planned_sub == real_sub == Signature(in_shape, 2)
    if len(in_shape) == 3:
        assert dataset_signature(cfg, domain("vflip", "lowres")) == Signature(loaded(cfg, domain("vflip", "lowres")).in_shape, None)


def test_npz_with_its_own_val_split(tmp_path):
    rng = np.random.default_rng(0)
    path = _write_npz(tmp_path / "v.npz", rng.random((20, 6, 6, 3)), np.arange(20) % 2,
                      x_val=rng.random((8, 6, 6, 3)), y_val=np.arange(8) % 2)
    assert dataset_signature(ds(name="npz", path=path)).in_shape == loaded(ds(name="npz", path=path)).in_shape == (3, 6, 6)


def test_missing_or_unreadable_npz_gives_none_and_the_loader_reports_it(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "text.npz").write_text("not a zip file")
    np.savez(tmp_path / "nox.npz", images=rng.random((5, 2)), y=np.arange(5))
    np.savez(tmp_path / "noy.npz", x=rng.random((5, 2)))
    np.savez(tmp_path / "obj.npz", x=np.array([[1], "a"], dtype=object), y=np.arange(2))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "nox.npz").read_bytes()[:40])
    for path in (None, tmp_path / "missing.npz", *(tmp_path / f"{n}.npz" for n in ("text", "nox", "noy", "obj", "cut"))):
        cfg = ds(name="npz", path=str(path) if path else None)
        assert dataset_signature(cfg) == Signature(None, None)
        with pytest.raises((ConfigError, ValueError)):  # the loader's own message (a pickle: numpy's)
            load_dataset(cfg)
    assert dataset_signature(ds(name="npz", path=str(tmp_path / "missing.npz"), classes=[0, 1])) == Signature(None, 2)


TORCHVISION = {"mnist": Signature((1, 28, 28), 10), "fashion_mnist": Signature((1, 28, 28), 10),
               "cifar10": Signature((3, 32, 32), 10), "cifar100": Signature((3, 32, 32), 100)}


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_signature_needs_no_files(name, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)  # importing it now fails
    root = tmp_path / "nodata"
    expected = TORCHVISION[name]
    assert dataset_signature(ds(name=name, root=str(root), download=True)) == expected
    assert dataset_signature(ds(name=name, root=str(root), classes=[3, 7]), domain("vflip")) == Signature(expected.in_shape, 2)
    assert not root.exists()


def _write_idx(path, arr: np.ndarray):
    magic = {1: 2049, 3: 2051}[arr.ndim]
    with open(path, "wb") as f:  # torchvision reads the unpacked files
        f.write(struct.pack(">" + "I" * (1 + arr.ndim), magic, *arr.shape) + arr.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_like_signature_equals_loaded_from_files(name, folder, tmp_path):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 12)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    for cfg, dom in ((ds(name=name, root=str(tmp_path), download=False), None),
                     (ds(name=name, root=str(tmp_path), download=False, classes=[4, 1]), domain("lowres"))):
        assert dataset_signature(cfg, dom) == loaded(cfg, dom)


@pytest.mark.parametrize("option", group_options("dataset"))
def test_every_dataset_option_has_a_signature(option, compose_cfg):
    cfg = compose_cfg(f"dataset={option}", "domain=vflip")
    sig = dataset_signature(cfg.dataset, cfg.domain)
    if option in ("digits", "fake"):
        assert sig == loaded(cfg.dataset, cfg.domain)
    elif option in ("npz", "imagefolder", "imagenet", "custom"):  # no dataset.path / train._target_ / ImageNet folder
        assert sig == Signature(None, None)
    else:
        assert sig == TORCHVISION[option]


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 6, 5), (2, 1, 1), (1, 2, 3)])
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_every_domain_transform_keeps_the_shape(name, shape):
    steps = parse_steps([name], {"angle": 30.0, "factor": 2, "blur_sigma": 1.5, "noise_sigma": 0.3, "dx": 1, "dy": -2})
    x = torch.rand(3, *shape)
    assert target_shape(shape, steps) == tuple(apply_transforms(x, steps).shape[1:]) == shape


# ------------------------------------------------------------------------------ models

def _role_specs(model):
    specs = []
    for role in ROLES:
        try:
            specs += default_layers(model, role)
        except ConfigError:  # the model declares no such role
            pass
    return specs


@pytest.mark.parametrize("in_shape,num_classes", [((1, 8, 8), 10), ((3, 32, 32), 100)])
@pytest.mark.parametrize("name", list_models())
def test_skeleton_shapes_equal_the_real_model(name, in_shape, num_classes):
    torch.manual_seed(0)
    real = get_model(name, in_shape, num_classes)
    skel = skeleton(name, in_shape, num_classes)
    assert {t.device.type for t in (*skel.parameters(), *skel.buffers())} == {"meta"}
    assert [(n, p.shape) for n, p in skel.named_parameters()] == [(n, p.shape) for n, p in real.named_parameters()]
    assert [(n, b.shape) for n, b in skel.named_buffers()] == [(n, b.shape) for n, b in real.named_buffers()]
    assert getattr(skel, "feature_layers", None) == getattr(real, "feature_layers", None)
    specs = _role_specs(real)
    assert specs, f"{name} declares no default feature layers"
    assert feature_shapes(skel, specs, in_shape) == feature_shapes(real, specs, in_shape)
    assert list_features(skel, in_shape) == list_features(real, in_shape)
    assert skel.training  # probing restores the mode, as on the real model


def test_skeleton_leaves_the_rng_and_errors_as_get_model():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    skeleton("resnet8", (3, 32, 32), 10)
    skeleton("mobilenet_v3_small", (3, 32, 32), 10)
    assert torch.equal(torch.random.get_rng_state(), state)
    with pytest.raises(UnknownNameError, match="unknown model 'resnet9'"):
        skeleton("resnet9", (3, 32, 32), 10)
    with pytest.raises(ConfigError, match=r"has no argument\(s\) \['widht'\]"):
        skeleton("resnet8", (3, 32, 32), 10, widht=2)
    with pytest.raises(ConfigError, match="needs image inputs"):
        skeleton("resnet8", (64,), 10)
    assert skeleton("resnet8", (3, 32, 32), 10, width=2).fc.in_features == get_model("resnet8", (3, 32, 32), 10, width=2).fc.in_features


def test_probe_edges_on_meta():
    with torch.device("meta"):
        buffers_only = nn.Sequential(nn.BatchNorm2d(3, affine=False), nn.Flatten())
    assert list_features(buffers_only, (3, 4, 4)) == {"0": (3, 4, 4), "1": (48,)}  # the batch went to meta
    assert list_features(nn.Sequential(nn.Flatten()), (2, 3)) == {"0": (6,)}  # no tensors at all: CPU

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return {"a": self.lin(x)}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()

        def forward(self, x):
            return self.pair(x)["a"]

    with torch.device("meta"):
        net = Net()
    assert "pair" not in list_features(net, (4,))  # a module returning no tensor is left out
    with pytest.raises(ConfigError, match="does not produce a tensor"):
        feature_shapes(net, ["pair"], (4,))


@pytest.mark.parametrize("shape,kind", [
    ((64, 8, 8), "map"), ((16, 2, 1), "map"), ((8, 1, 3), "map"),
    ((64, 1, 1), "vector"), ((128,), "vector"), ((3, 1, 1), "vector"),
])
def test_feature_kind(shape, kind):
    assert feature_kind(shape) == kind
    assert feature_kind(list(shape)) == kind
