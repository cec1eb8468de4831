"""The Keras MNIST KD demo pair (CNN teacher, MLP student) and LeNet-5."""
from typing import Tuple

import torch.nn as nn

from kdexp.errors import ConfigError
from kdexp.models.layers import MaxPool2d
from kdexp.models.registry import register_model
from kdexp.models.taps import set_feature_layers

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def _image_shape(name: str, in_shape: Tuple[int, ...]) -> Tuple[int, int, int]:
    if len(in_shape) != 3:
        raise ConfigError(f"model {name!r} needs image inputs (C,H,W); this dataset gives shape {in_shape}")
    return in_shape


def _pool(size: int) -> nn.Module:
    # Halve while the map is at least 2 pixels wide, so tiny inputs (8x8 digits) still fit.
    return MaxPool2d(2, ceil_mode=True) if size >= 2 else nn.Identity()


@register_model("cnn")
def cnn(in_shape, num_classes, channels: Tuple[int, ...] = (32, 64, 64), dropout: float = 0.0) -> nn.Module:
    """Keras demo teacher: 3x3 convs (32-64-64, ReLU, 'same' padding), max-pool after all
    but the last, flatten, dense to classes."""
    c, h, w = _image_shape("cnn", in_shape)
    layers, convs = [], []
    for i, out in enumerate(channels):
        convs.append(len(layers))
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU()]
        if i < len(channels) - 1:
            layers.append(_pool(min(h, w)))
            h, w = (h + 1) // 2 if h >= 2 else h, (w + 1) // 2 if w >= 2 else w
        c = out
    model = nn.Sequential(
        nn.Sequential(*layers),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(c * h * w, num_classes),
    )
    # feature taps: each conv's ReLU output is a stage (its conv output the pre-activation)
    return set_feature_layers(model, stages=[f"0.{i + 1}" for i in convs], preact=[f"0.{i}" for i in convs],
                              embedding="1")


@register_model("mlp")
def mlp(in_shape, num_classes, hidden: int = 64, activation: str = "sigmoid", depth: int = 1) -> nn.Module:
    """Keras demo student: flatten, `depth` hidden layers of width `hidden`, dense to classes."""
    if activation not in ACTIVATIONS:
        raise ConfigError(f"mlp activation={activation!r}; valid: {sorted(ACTIVATIONS)}")
    d_in = 1
    for s in in_shape:
        d_in *= s
    layers = [nn.Flatten()]
    for _ in range(depth):
        layers += [nn.Linear(d_in, hidden), ACTIVATIONS[activation]()]
        d_in = hidden
    layers.append(nn.Linear(d_in, num_classes))
    hidden_layers = range(1, 2 * depth, 2)  # feature taps: the hidden layers (Linear, activation)
    return set_feature_layers(nn.Sequential(*layers), stages=[str(i + 1) for i in hidden_layers],
                              preact=[str(i) for i in hidden_layers], embedding=str(2 * depth) if depth else None)


@register_model("lenet5")
def lenet5(in_shape, num_classes) -> nn.Module:
    """LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling; 'same' padding and an adaptive
    pool to 5x5 before the dense layers let it take any input size (32x32 is the classic)."""
    c, _, _ = _image_shape("lenet5", in_shape)
    model = nn.Sequential(
        nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(), MaxPool2d(2, ceil_mode=True),
        nn.AdaptiveAvgPool2d(5), nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_classes),
    )
    return set_feature_layers(model, stages=["1", "4"], preact=["0", "3"], embedding="11")
