import pytest

from kdexp.data import DATASETS
from kdexp.errors import ConfigError
from kdexp.methods import METHODS
from kdexp.models import MODELS, get_model, list_models
from kdexp.registry import Registry


def test_register_get_and_list():
    r = Registry("widget")
    r.register("b")(1)
    r.register("a")(2)
    assert r.get("a") == 2 and r.names() == ["a", "b"] and "b" in r and len(r) == 2


def test_duplicate_name_raises():
    r = Registry("widget")
    r.register("x")(1)
    with pytest.raises(ValueError, match="already registered"):
        r.register("x")(2)


def test_unknown_name_lists_names_and_closest_match():
    r = Registry("method")
    for n in ("kd", "ce", "fitnet"):
        r.register(n)(n)
    with pytest.raises(ConfigError) as e:
        r.get("fitnett")
    msg = str(e.value)
    assert "'fitnett'" in msg and "Did you mean 'fitnet'" in msg and "ce, fitnet, kd" in msg


def test_project_registries_hold_the_issue_names():
    assert {"digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "npz"} <= set(DATASETS.names())
    assert {"cnn", "mlp", "lenet5", "resnet8", "resnet20"} <= set(list_models())
    assert {"ce", "kd"} <= set(METHODS.names())


def test_model_argument_typo_names_valid_arguments():
    with pytest.raises(ConfigError, match="hidden"):
        get_model("mlp", (1, 8, 8), 10, hiden=3)
    assert MODELS.get("mlp") is not None
