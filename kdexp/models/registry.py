"""The model registry: builders by name, built for real (`get_model`) or as meta-device
skeletons (`skeleton`)."""
import inspect
from typing import Tuple

import torch
import torch.nn as nn

from kdexp.errors import ConfigError
from kdexp.registry import Registry

MODELS = Registry("model")
register_model = MODELS.register
list_models = MODELS.names


def check_model_args(name: str, args: dict, key: str = "") -> None:
    """Unknown keyword arguments of model `name` fail naming them and the valid ones (`key`, e.g.
    "student.args", names the config node in the message)."""
    params = inspect.signature(MODELS.get(name)).parameters
    valid = [p for p in params if p not in ("in_shape", "num_classes")]
    unknown = sorted(set(args) - set(valid))
    if unknown:
        where = f"{key}: " if key else ""
        raise ConfigError(f"{where}model {name!r} has no argument(s) {unknown}; valid: {valid or 'none'}")


def get_model(name: str, in_shape: Tuple[int, ...], num_classes: int, **args) -> nn.Module:
    """Build a registered model; unknown keyword arguments fail naming the valid ones."""
    check_model_args(name, args)
    return MODELS.get(name)(tuple(in_shape), num_classes, **args)


def skeleton(name: str, in_shape: Tuple[int, ...], num_classes: int, **args) -> nn.Module:
    """`get_model(...)` built on the meta device: the real model's modules, parameter shapes and
    default feature layers, with no memory and no initialization cost, so a run plan can check
    layer names and feature shapes (kdexp.models.taps.feature_shapes / list_features run a meta
    zero batch through it) before anything is trained. The global RNG is left as it was: a plan
    that builds skeletons before a seeded run changes none of its draws. Unknown names and
    arguments raise as get_model does. Every registered model builds and runs on meta with the
    shapes of the real one (tests/test_signatures.py), so none needs a CPU fallback."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return get_model(name, in_shape, num_classes, **args)
