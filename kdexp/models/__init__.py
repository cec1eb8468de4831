"""Model registry. A model builder takes (in_shape, num_classes, **args) and returns an
nn.Module that maps a batch of inputs to logits; in_shape comes from the dataset, so
every model runs on every dataset."""
import inspect
from typing import Tuple

import torch.nn as nn

from kdexp.errors import ConfigError
from kdexp.registry import Registry

MODELS = Registry("model")
register_model = MODELS.register
list_models = MODELS.names


def get_model(name: str, in_shape: Tuple[int, ...], num_classes: int, **args) -> nn.Module:
    """Build a registered model; unknown keyword arguments fail naming the valid ones."""
    builder = MODELS.get(name)
    params = inspect.signature(builder).parameters
    valid = [p for p in params if p not in ("in_shape", "num_classes")]
    unknown = sorted(set(args) - set(valid))
    if unknown:
        raise ConfigError(f"model {name!r} has no argument(s) {unknown}; valid: {valid or 'none'}")
    return builder(tuple(in_shape), num_classes, **args)


from kdexp.models import classic, cifar  # noqa: E402,F401  (register the models)
