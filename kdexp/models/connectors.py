"""Connectors: the small trainable adapters that map student features onto the teacher's
shape (channels and spatial size), shared by every method that needs shape matching. They
are submodules of the Method, so the optimizer trains them with the student.

- `Connector(s_shape, t_shape)`: image features (C,H,W) -> spatial resize to the teacher's
  H x W, then 1x1 conv + BatchNorm to its channels; vectors (D,) -> Linear + BatchNorm1d.
- `Embed(d_in, d_out)`: flatten, Linear, L2-normalize (contrastive embeddings).
- `resize` / `match_spatial`: parameter-free resizing used inside the losses' callers.
"""
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdexp.errors import ConfigError


def resize(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(B,C,H,W) -> (B,C,*size): adaptive average pooling when shrinking, bilinear
    interpolation when enlarging (per axis: shrinking wins if the axes disagree)."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    if h >= size[0] and w >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    if h <= size[0] and w <= size[1]:
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return F.adaptive_avg_pool2d(F.interpolate(x, size=(max(h, size[0]), max(w, size[1])), mode="bilinear",
                                               align_corners=False), size)


def match_spatial(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bring two (B,C,H,W) maps to the same H x W by average-pooling the larger one down
    (the convention of NST/FSP/VID/FT reference code); vectors pass through."""
    if a.dim() != 4 or b.dim() != 4:
        return a, b
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    return resize(a, size), resize(b, size)


def as_map(x: torch.Tensor) -> torch.Tensor:
    """Feature maps stay (B,C,H,W); vectors (B,D) become (B,D,1,1)."""
    return x if x.dim() == 4 else x.reshape(x.shape[0], -1, 1, 1)


class Connector(nn.Module):
    """Student feature -> teacher feature shape. Image features: resize to the teacher's H x W
    (pool down or interpolate up), 1x1 conv (no bias) + BatchNorm2d to the teacher's channels.
    Vectors: Linear (no bias) + BatchNorm1d. An image feature mapped onto a vector is globally
    average-pooled first. `identity_if_equal`: no parameters when the shapes already match."""

    def __init__(self, s_shape: Tuple[int, ...], t_shape: Tuple[int, ...], identity_if_equal: bool = False):
        super().__init__()
        self.s_shape, self.t_shape = tuple(s_shape), tuple(t_shape)
        if len(self.s_shape) not in (1, 3) or len(self.t_shape) not in (1, 3):
            raise ConfigError(f"connector: features must be (C,H,W) or (D,), got student {self.s_shape} "
                              f"and teacher {self.t_shape}")
        if len(self.s_shape) == 1 and len(self.t_shape) == 3:
            raise ConfigError(f"connector: cannot map a student vector {self.s_shape} onto a teacher feature map "
                              f"{self.t_shape}; tap a student feature map instead")
        self.identity = identity_if_equal and self.s_shape == self.t_shape
        if self.identity:
            self.proj = nn.Identity()
        elif len(self.t_shape) == 3:
            self.proj = nn.Sequential(nn.Conv2d(self.s_shape[0], self.t_shape[0], 1, bias=False),
                                      nn.BatchNorm2d(self.t_shape[0]))
        else:
            self.proj = nn.Sequential(nn.Linear(self.s_shape[0], self.t_shape[0], bias=False),
                                      nn.BatchNorm1d(self.t_shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return x
        if len(self.t_shape) == 3:
            return self.proj(resize(x, self.t_shape[1:]))
        if x.dim() == 4:
            x = F.adaptive_avg_pool2d(x, 1)
        return self.proj(x.flatten(1))


class Embed(nn.Module):
    """Flatten, Linear to `d_out`, L2-normalize (CRD's projection head)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


def flat_dim(shape: Tuple[int, ...]) -> int:
    """Number of elements of a feature of this shape (without batch)."""
    n = 1
    for s in shape:
        n *= s
    return n


def map_channels(shape: Tuple[int, ...]) -> int:
    """Channels of a feature once seen as a map (`as_map`): C for (C,H,W), D for vectors."""
    return shape[0] if len(shape) == 3 else flat_dim(shape)


def _conv_stack(channels, transpose: bool = False) -> nn.Sequential:
    """3x3 convolutions (stride 1, padding 1) between consecutive `channels`, each followed by
    LeakyReLU(0.1), without BatchNorm (as the factor-transfer authors' code)."""
    conv = nn.ConvTranspose2d if transpose else nn.Conv2d
    layers = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [conv(c_in, c_out, 3, 1, 1), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """Factor transfer's paraphraser (Kim et al. NeurIPS 2018): a convolutional autoencoder on a
    teacher feature map with C channels; the encoder (3 convs: C -> C -> kC -> kC) gives the
    teacher factor, the decoder (3 transposed convs back to C) reconstructs the feature."""

    def __init__(self, channels: int, rate: float = 0.5):
        super().__init__()
        factor = max(1, int(round(channels * rate)))
        self.encoder = _conv_stack([channels, channels, factor, factor])
        self.decoder = _conv_stack([factor, factor, channels, channels], transpose=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of x (the pre-training target)."""
        return self.decoder(self.encoder(x))


class Translator(nn.Module):
    """Factor transfer's translator: 3 convs from the student feature's channels to the teacher
    factor's (C_s -> C_s -> kC_t -> kC_t), LeakyReLU(0.1) after each."""

    def __init__(self, student_channels: int, teacher_channels: int, rate: float = 0.5):
        super().__init__()
        factor = max(1, int(round(teacher_channels * rate)))
        self.encoder = _conv_stack([student_channels, student_channels, factor, factor])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)
