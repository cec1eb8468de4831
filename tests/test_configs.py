"""Every option of every config group composes with Hydra's compose API and builds."""
import numpy as np
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from kdexp.config import validate
from kdexp.data import load_dataset
from kdexp.errors import ConfigError, DataError
from kdexp.methods import get_method
from kdexp.models import get_model
from kdexp.engine.hardware import select_device
from tests.conftest import GROUPS, group_options

OFFLINE_DATASETS = {"mnist", "fashion_mnist", "cifar10", "cifar100", "imagenet"}  # need files under dataset.root


def test_groups_exist_with_their_options():
    assert {"digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "npz"} <= set(group_options("dataset"))
    assert {"auto", "cpu", "cuda"} <= set(group_options("hardware"))
    assert {"ce", "kd"} <= set(group_options("method"))
    for g in GROUPS:
        assert group_options(g), g


@pytest.mark.parametrize("option", group_options("method"))
def test_method_options_build(compose_cfg, option):
    cfg = compose_cfg(f"method={option}")
    validate(cfg)
    assert cfg.method.name == option  # option name == registry name
    from kdexp.engine.teacher import FrozenTeacher

    student = get_model("cnn", (1, 8, 8), 10)
    # a CNN teacher of the student's architecture suits every method: feature methods tap its
    # layers, ts_adapt/finetune copy its weights
    cls = get_method(option)
    teacher = FrozenTeacher(get_model("cnn", (1, 8, 8), 10), in_shape=(1, 8, 8)) if cls.requires.uses_teacher else None
    method = cls(cfg.method, student, teacher)
    trainable = [p for g in method.param_groups(cfg.optim) for p in g["params"]]
    assert trainable and all(p.requires_grad for p in trainable)


@pytest.mark.parametrize("group", ["teacher", "student"])
def test_model_options_build_on_every_input_shape(compose_cfg, group):
    import torch

    placeholders = []
    for option in group_options(group):
        m = compose_cfg(f"{group}={option}")[group]
        if OmegaConf.is_missing(m, "arch"):  # an option for the user's own model (arch=???)
            placeholders.append(option)
            continue
        for shape in [(1, 8, 8), (1, 28, 28), (3, 32, 32)]:
            model = get_model(m.arch, shape, 7, **m.args)
            assert model(torch.zeros(2, *shape)).shape == (2, 7), (option, shape)
    assert placeholders == ["custom"]


@pytest.mark.parametrize("option", group_options("hardware"))
def test_hardware_options(compose_cfg, option):
    import torch

    cfg = compose_cfg(f"hardware={option}")
    if option == "cuda" and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no GPU"):
            select_device(cfg.hardware)
    else:
        assert select_device(cfg.hardware).type in ("cpu", "cuda")


@pytest.mark.parametrize("option", group_options("dataset"))
def test_dataset_options(compose_cfg, tmp_path, option):
    extra = []
    if option == "npz":
        rng = np.random.default_rng(0)
        np.savez(tmp_path / "d.npz", x=rng.random((60, 6, 6), dtype=np.float32), y=np.arange(60) % 3)
        extra = [f"dataset.path={tmp_path / 'd.npz'}"]
    if option == "imagefolder":  # two classes of 3x3 gray PNGs, split stratified
        from PIL import Image

        for c in range(2):
            (tmp_path / "imgs" / "train" / str(c)).mkdir(parents=True)
            for k in range(10):
                Image.new("L", (3, 3), 20 * k + c).save(tmp_path / "imgs" / "train" / str(c) / f"{k}.png")
        extra = [f"dataset.path={tmp_path / 'imgs'}"]
    if option == "custom":  # a tiny torch Dataset by import path (tests/test_your_data.py)
        extra = ["dataset.train._target_=tests.test_your_data.TinyDataset"]
    cfg = compose_cfg(f"dataset={option}", *extra, "dataset.download=false")
    validate(cfg)
    if option in OFFLINE_DATASETS:
        with pytest.raises(DataError, match=str(tmp_path / "data")):
            load_dataset(cfg.dataset)
        return
    data = load_dataset(cfg.dataset)
    assert data.x_train.dim() == 4 and len(data.x_train) == len(data.y_train) > 0
    assert int(data.y_train.max()) < data.num_classes


def test_misspelled_key_and_wrong_type_are_rejected(compose_cfg):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose_cfg("method.tempreature=4")
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_cfg("method.temperature=hot")
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose_cfg("student.args.hiden=3")
    with pytest.raises(ConfigCompositionException, match="kd"):
        compose_cfg("method=kdd")


@pytest.mark.parametrize("override,key", [("method.temperature=-1", "method.temperature"),
                                          ("method.alpha=1.5", "method.alpha"), ("epochs=0", "epochs"),
                                          ("optim.lr=0", "optim.lr"), ("optim.name=rmsprop", "optim.name")])
def test_out_of_range_values_name_the_key(compose_cfg, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_cfg(override))
