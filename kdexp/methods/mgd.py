"""MGD: masked generative distillation (Yang et al. ECCV 2022, "Masked Generative Distillation",
authors' code yzd-v/MGD, mmrazor's MGDLoss). The student's last stage output, aligned to the
teacher's channels, is randomly masked; a small generation block must reconstruct the teacher's
full feature from what is left, so the student learns features from which the teacher's can be
generated rather than copying them."""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from kdexp.errors import ConfigError
from kdexp.losses import mgd_loss
from kdexp.methods.base import Requirements, register_method
from kdexp.methods.feature import FeatureConfig, FeatureMethod
from kdexp.models.connectors import Connector
from kdexp.models.taps import feature_kind

MASKS = ("channel", "spatial")
_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: consecutive draws get well separated seeds


@dataclass
class MGDConfig(FeatureConfig):
    name: str = "mgd"
    # alpha_mgd of the authors' ImageNet classification configs (ResNet-34 -> ResNet-18, ResNet-50 ->
    # MobileNet): the loss is a sum over C*H*W, so the weight is small. Their later cls_KD repo uses
    # 0.0012 for CIFAR-100 (ResNet-34 -> ResNet-18).
    beta: float = 7e-5
    mask_ratio: float = 0.15  # lambda_mgd: the fraction masked (classification configs; detection 0.65)
    # channel: whole channels dropped per sample, (B, C, 1, 1) (the authors' classification code) |
    # spatial: positions dropped across all channels, (B, 1, H, W) (their detection and segmentation code)
    mask: str = "channel"


@register_method("mgd", config=MGDConfig)
class MGD(FeatureMethod):
    """Yang et al. ECCV 2022: the teacher's last-stage feature, generated from a masked student map

    MGD (Yang et al. ECCV 2022, arXiv 2205.01529): at the last stage, align (kdexp's Connector,
    resize + 1x1 conv + BN, when the student's shape differs from the teacher's; the authors use a
    plain 1x1 conv) -> random mask (each channel, or each position, zeroed with probability
    mask_ratio) -> generation block (3x3 conv, ReLU, 3x3 conv at the teacher's width, trained with
    the student) -> beta * sum of squared errors to the teacher's feature / B.

    The mask comes from a generator of the method's own, seeded per step from (mask_seed,
    mask_draws); both are in the method's state_dict, so a resumed run draws the masks an
    uninterrupted one would, on any device, and the global RNG is left alone. mask_seed is taken
    from the run's torch seed at construction."""
    requires = Requirements(features="maps")
    pick = "last"
    term = "mgd"

    def build(self, s_shapes, t_shapes):
        cfg = self.cfg
        if not 0.0 <= cfg.mask_ratio < 1.0:
            raise ConfigError(f"method.mask_ratio={cfg.mask_ratio} must be in [0, 1)")
        if cfg.mask not in MASKS:
            raise ConfigError(f"method.mask={cfg.mask!r}; one of {', '.join(MASKS)}")
        self.mask_seed = torch.initial_seed() % 2 ** 63  # the run seed's stream, without drawing from it
        self.mask_draws = 0
        self.align: Optional[nn.Module] = None
        self.generation: Optional[nn.Module] = None
        if feature_kind(s_shapes[0]) != "map" or feature_kind(t_shapes[0]) != "map":
            return  # not maps: the run plan rejects these layers and names the options that fit
        c = t_shapes[0][0]
        self.align = Connector(s_shapes[0], t_shapes[0], identity_if_equal=True)
        self.generation = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))

    # The mask stream's position is state: a resumed run continues it.
    def get_extra_state(self):
        return {"mask_seed": int(self.mask_seed), "mask_draws": int(self.mask_draws)}

    def set_extra_state(self, state):
        self.mask_seed, self.mask_draws = int(state["mask_seed"]), int(state["mask_draws"])

    def draw_mask(self, features: torch.Tensor) -> torch.Tensor:
        """The next keep-mask for (B, C, H, W) features: 1 kept, 0 masked (probability mask_ratio),
        shaped (B, C, 1, 1) or (B, 1, H, W) by method.mask, in the features' dtype and device."""
        b, c, h, w = features.shape
        shape = (b, c, 1, 1) if self.cfg.mask == "channel" else (b, 1, h, w)
        gen = torch.Generator(device=features.device)
        gen.manual_seed((self.mask_seed + self.mask_draws * _MIX) % 2 ** 63)
        self.mask_draws += 1
        u = torch.rand(shape, generator=gen, device=features.device)
        return (u >= self.cfg.mask_ratio).to(features.dtype)

    def feature_loss(self, s, t, batch):
        if self.align is None:
            raise ConfigError("method=mgd compares spatial feature maps (C,H,W with H*W > 1); the tapped layers "
                              "give vectors: set method.student_layers / method.teacher_layers to conv stages")
        aligned = self.align(s[0])
        return mgd_loss(self.generation(aligned * self.draw_mask(aligned)), t[0])
