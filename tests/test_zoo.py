"""The CIFAR model zoo, torchvision models by name, the `fake` dataset and the CIFAR-100
experiment presets (2 steps each on fake data of CIFAR-100's shape)."""
import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from kdexp import config_dir
from kdexp.data import load_dataset
from kdexp.models import get_model, list_models
from kdexp.models.taps import default_layers, feature_shapes
from kdexp.train import run
from tests.conftest import group_options

CIFAR = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4", "resnet32x4",
         "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg13", "mobilenetv2", "shufflenet_v1", "shufflenet_v2"]
TORCHVISION = ["resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large"]
PRESETS = {"cifar100_resnet32x4_resnet8x4": ("resnet32x4", "resnet8x4"),
           "cifar100_wrn_40_2_wrn_16_2": ("wrn_40_2", "wrn_16_2"),
           "cifar100_resnet56_resnet20": ("resnet56", "resnet20"),
           "cifar100_vgg13_vgg8": ("vgg13", "vgg8")}


def test_zoo_is_registered():
    assert set(CIFAR + TORCHVISION) <= set(list_models())


@pytest.mark.parametrize("name", CIFAR + TORCHVISION)
def test_forward_shapes_and_default_taps(name):
    for shape in [(1, 8, 8), (3, 32, 32)]:
        model = get_model(name, shape, 7)
        assert model(torch.randn(2, *shape)).shape == (2, 7), (name, shape)
        for role in ("stages", "preact", "embedding"):
            names = default_layers(model, role)
            shapes = feature_shapes(model, names, shape)
            assert all(len(s) in (1, 3) for s in shapes), (name, role, shapes)
        stages = feature_shapes(model, default_layers(model, "stages"), shape)
        assert len(stages) >= 1 and all(len(s) == 3 for s in stages)


@pytest.mark.parametrize("name,depth_blocks,widths", [("resnet8", 1, (16, 32, 64)), ("resnet56", 9, (16, 32, 64)),
                                                      ("resnet110", 18, (16, 32, 64)),
                                                      ("resnet32x4", 5, (64, 128, 256))])
def test_cifar_resnet_structure(name, depth_blocks, widths):
    model = get_model(name, (3, 32, 32), 100)
    for i, w in enumerate(widths):
        layer = getattr(model, f"layer{i + 1}")
        assert len(layer) == depth_blocks and layer[-1].conv2.out_channels == w
    assert model.fc.in_features == widths[-1]


def test_reference_parameter_names():
    """The parameter names of RepDistiller's models, so that its checkpoints load as teachers."""
    keys = set(get_model("resnet8x4", (3, 32, 32), 100).state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight", "layer3.0.conv2.weight",
            "fc.bias"} <= keys
    keys = set(get_model("wrn_40_2", (3, 32, 32), 100).state_dict())
    assert {"conv1.weight", "block1.layer.0.convShortcut.weight", "block3.layer.5.bn2.weight", "bn1.weight",
            "fc.weight"} <= keys
    keys = set(get_model("vgg13", (3, 32, 32), 100).state_dict())
    assert {"block0.0.weight", "block0.4.running_var", "block4.3.weight", "classifier.weight"} <= keys
    assert "block0.5.weight" not in keys  # the last ReLU of a block is not in the Sequential
    keys = set(get_model("mobilenetv2", (3, 32, 32), 100).state_dict())
    assert {"conv1.0.weight", "blocks.6.0.conv.7.weight", "conv2.1.weight", "classifier.0.weight"} <= keys
    keys = set(get_model("shufflenet_v2", (3, 32, 32), 100).state_dict())
    assert {"layer1.0.conv5.weight", "layer3.3.bn3.weight", "conv2.weight", "linear.weight"} <= keys
    for name, millions in [("resnet32x4", 7.43), ("resnet8x4", 1.23), ("wrn_40_2", 2.26), ("resnet56", 0.86),
                           ("vgg13", 9.46), ("mobilenetv2", 0.81)]:  # CRD paper / RepDistiller (100 classes)
        n = sum(p.numel() for p in get_model(name, (3, 32, 32), 100).parameters()) / 1e6
        assert n == pytest.approx(millions, rel=0.02), name


def test_old_resnet_options_still_compose(compose_cfg):
    for group, option in (("student", "resnet8"), ("teacher", "resnet20")):
        m = compose_cfg(f"{group}={option}")[group]
        assert get_model(m.arch, (1, 8, 8), 10, **m.args)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert {"resnet8x4", "wrn_16_2", "resnet20", "vgg8"} <= set(group_options("student"))
    assert {"resnet32x4", "wrn_40_2", "resnet56", "vgg13"} <= set(group_options("teacher"))


def test_fake_dataset(compose_cfg):
    cfg = compose_cfg("dataset=fake", "dataset.shape=[2,5,6]", "dataset.num_classes=4", "dataset.train_size=30")
    data = load_dataset(cfg.dataset)
    assert data.x_train.shape == (30, 2, 5, 6) and data.x_val.shape == (128, 2, 5, 6) and data.num_classes == 4
    assert set(data.y_train.tolist()) == {0, 1, 2, 3}
    again = load_dataset(cfg.dataset)
    assert torch.equal(data.x_train, again.x_train)  # fixed by dataset.seed
    default = compose_cfg("dataset=fake").dataset
    assert list(default.shape) == [3, 32, 32] and default.num_classes == 100


@pytest.fixture
def preset_cfg(tmp_path):
    def _compose(preset, *overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose("config", overrides=[f"experiment={preset}", f"paths.cache_dir={tmp_path / 'cache'}",
                                                f"paths.data_dir={tmp_path / 'data'}", *overrides])
    yield _compose
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("preset", PRESETS)
def test_cifar_preset_protocol(preset_cfg, preset):
    cfg = preset_cfg(preset)
    assert (cfg.dataset.name, cfg.teacher.arch, cfg.student.arch) == ("cifar100", *PRESETS[preset])
    for o, epochs in ((cfg.optim, cfg.epochs), (cfg.teacher.optim, cfg.teacher.epochs)):
        assert (o.name, o.lr, o.momentum, o.weight_decay, o.schedule, list(o.milestones), o.gamma, epochs) == \
            ("sgd", 0.05, 0.9, 0.0005, "step", [150, 180, 210], 0.1, 240)
    assert cfg.batch_size == 64 and cfg.teacher.batch_size == 64
    assert (cfg.dataset.augment, cfg.dataset.augment_pad, cfg.dataset.augment_views) == ("crop_flip", 4, 0)


# the widest pair (resnet32x4 -> resnet8x4, ~20 s here) and two more run with the slow tests
@pytest.mark.parametrize("preset", [p if "resnet56" in p else pytest.param(p, marks=pytest.mark.slow) for p in PRESETS])
def test_cifar_preset_runs_two_steps_on_fake_data(preset_cfg, tmp_path, preset):
    cfg = preset_cfg(preset, "dataset=fake", "epochs=1", "teacher.epochs=1", "progress=false", "method=kd")
    run(cfg, str(tmp_path / "run"))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["status"] == "done" and m["teacher"]["source"] == "trained" and len(m["history"]) == 1
    assert m["history"][0]["lr"] == 0.05
    assert m["augment"]["kind"] == "crop_flip" and m["teacher_cache"]["online_calls"] == 2  # fresh draws: online


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("method", ["fitnet", "at", "nst", "ab", "ft", "fsp", "sp", "pkt", "rkd", "cc", "vid", "crd",
                                    "darkrank", "jacobian"])
def test_every_method_on_every_cifar_pair_of_fake_data(preset_cfg, tmp_path, preset, method):
    extra = ["method.init_epochs=1"] if method in ("fitnet", "ab", "ft", "fsp") else []
    cfg = preset_cfg(preset, "dataset=fake", "epochs=1", "teacher.epochs=1", "progress=false", f"method={method}",
                     "method.beta=1", *extra)
    run(cfg, str(tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "done"
