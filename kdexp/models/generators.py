"""Generators of synthetic inputs for data-free distillation (kdexp.methods.data_free): a latent
batch z (B, latent_dim) -> inputs of the data's shape, images (C,H,W) or vectors (D,).

`DAFLGenerator` is the generator of DAFL (Chen et al. ICCV 2019, the authors' DAFL-train.py), a
DCGAN-style decoder: Linear -> BatchNorm -> 2x nearest upsampling -> conv 3x3 (width) -> BN ->
LeakyReLU(0.2) -> 2x upsampling -> conv 3x3 (width/2) -> BN -> LeakyReLU -> conv 3x3 to C channels
-> tanh -> BatchNorm without affine parameters, so that the images it makes are standardized per
channel like the data the teacher was trained on. Zero-Shot KT's generator (Micaelli & Storkey
2019) is the same decoder without the tanh (`tanh=False`).
"""
import math
from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdexp.errors import ConfigError

# The authors' hidden BatchNorms are nn.BatchNorm2d(C, 0.8): the positional 0.8 is eps (the
# PyTorch-GAN DCGAN code they start from; it reads like a momentum). Kept: it damps the
# normalization of the hidden layers, and it is what DAFL's results were produced with.
DAFL_BN_EPS = 0.8


def _image_size(size: int, halvings: int) -> int:
    return max(1, math.ceil(size / 2 ** halvings))


class DAFLGenerator(nn.Module):
    """z (B, latent_dim) -> x (B, *out_shape). Images (C,H,W): the first layer makes a width-channel
    map of ceil(H/4) x ceil(W/4), upsampled to ceil(H/2) x ceil(W/2) and then to H x W (2x each when
    H and W are multiples of 4: the authors' 32 -> 8 -> 16 -> 32). Vectors (D,): the same chain with
    Linear layers in place of the convolutions and no upsampling (hidden widths width, width, width/2).
    `hidden_bn_eps`: eps of the hidden BatchNorms (DAFL_BN_EPS as the authors; 1e-5 is PyTorch's)."""

    def __init__(self, latent_dim: int, out_shape: Sequence[int], width: int = 128, tanh: bool = True,
                 hidden_bn_eps: float = DAFL_BN_EPS):
        super().__init__()
        out_shape = tuple(int(s) for s in out_shape)
        if latent_dim < 1 or width < 2:
            raise ConfigError(f"generator: latent_dim >= 1 and width >= 2 are required (got {latent_dim}, {width})")
        if len(out_shape) not in (1, 3):
            raise ConfigError(f"generator: inputs of shape {out_shape} are neither images (C,H,W) nor vectors (D,)")
        self.latent_dim, self.out_shape, self.width = int(latent_dim), out_shape, int(width)
        half = max(1, width // 2)
        if len(out_shape) == 3:
            c, h, w = out_shape
            self.sizes: Tuple[Tuple[int, int], ...] = tuple((_image_size(h, k), _image_size(w, k)) for k in (2, 1, 0))
            self.l1 = nn.Linear(latent_dim, width * self.sizes[0][0] * self.sizes[0][1])
            self.bn0 = nn.BatchNorm2d(width)
            self.block1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width, eps=hidden_bn_eps),
                                        nn.LeakyReLU(0.2))
            self.block2 = nn.Sequential(nn.Conv2d(width, half, 3, padding=1), nn.BatchNorm2d(half, eps=hidden_bn_eps),
                                        nn.LeakyReLU(0.2), nn.Conv2d(half, c, 3, padding=1))
            self.out_norm = nn.BatchNorm2d(c, affine=False)
        else:
            (d,) = out_shape
            self.sizes = ()
            self.l1 = nn.Linear(latent_dim, width)
            self.bn0 = nn.BatchNorm1d(width)
            self.block1 = nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width, eps=hidden_bn_eps),
                                        nn.LeakyReLU(0.2))
            self.block2 = nn.Sequential(nn.Linear(width, half), nn.BatchNorm1d(half, eps=hidden_bn_eps),
                                        nn.LeakyReLU(0.2), nn.Linear(half, d))
            self.out_norm = nn.BatchNorm1d(d, affine=False)
        self.tanh = bool(tanh)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.bn0(self._first(z))
        if self.sizes:
            out = F.interpolate(out, size=self.sizes[1], mode="nearest")
        out = self.block1(out)
        if self.sizes:
            out = F.interpolate(out, size=self.sizes[2], mode="nearest")
        out = self.block2(out)
        return self.out_norm(torch.tanh(out) if self.tanh else out)

    def _first(self, z: torch.Tensor) -> torch.Tensor:
        out = self.l1(z)
        if self.sizes:
            h, w = self.sizes[0]
            out = out.view(len(z), self.width, h, w)
        return out
