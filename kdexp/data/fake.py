"""`fake`: random tensors of a configurable shape, class count and size, for smoke tests of
model/method wiring at the real data's shape (e.g. CIFAR-100's 3x32x32 and 100 classes)
without the data. Nothing can be learned from it: accuracies are chance level."""
from typing import Tuple

import numpy as np

from kdexp.data.core import register_dataset
from kdexp.errors import ConfigError


def _checked_shape(cfg) -> Tuple[int, ...]:
    """dataset.shape, after the checks of every key the builder uses (shared by the builder and
    its signature, so a run plan reports the same errors as loading)."""
    shape = tuple(int(s) for s in cfg.shape)
    if not shape or min(shape) < 1:
        raise ConfigError(f"dataset.shape={list(shape)}: needs positive sizes, e.g. [3, 32, 32]")
    if cfg.num_classes < 2:
        raise ConfigError(f"dataset.num_classes={cfg.num_classes}: needs at least 2 classes")
    if cfg.train_size < 1 or cfg.val_size < 1:
        raise ConfigError(f"dataset.train_size={cfg.train_size}, val_size={cfg.val_size}: both must be >= 1")
    return shape


@register_dataset("fake", signature=lambda cfg: (_checked_shape(cfg), int(cfg.num_classes)),
                  held_out=lambda cfg: f"random validation tensors (dataset.val_size={cfg.val_size})")
def fake(cfg):
    """x ~ N(0, 1) of shape (N, *dataset.shape), labels cycling through the classes in random
    order; train_size / val_size samples, fixed by dataset.seed."""
    shape = _checked_shape(cfg)
    rng = np.random.default_rng(cfg.seed)
    splits = []
    for n in (cfg.train_size, cfg.val_size):
        x = rng.standard_normal((n, *shape), dtype=np.float32)
        y = rng.permutation(np.arange(n) % cfg.num_classes)
        splits += [x, y]
    return splits[0], splits[1], splits[2], splits[3], int(cfg.num_classes)
