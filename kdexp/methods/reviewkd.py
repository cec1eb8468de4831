"""Knowledge review (ReviewKD, Chen et al. CVPR 2021, arXiv 2104.09044): each student stage is
fused with the already fused deeper stages by attention-based fusion (ABF), top-down from the
pooled embedding, and every fused level is matched to the teacher's feature of the same level
by the hierarchical context loss (`kdexp.losses.hcl_loss`).

Layers (null defaults): the student's stage ends (post-activation, as the authors' code and
mdistiller's `STU_PREACT: False`; `method.student_preact=true` takes their pre-activations), the
teacher's stage pre-activations, each followed by the model's pooled embedding as a 1x1 map:
mdistiller's `feats + [pooled_feat]` and `preact_feats[1:] + [pooled_feat]`.
"""
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdexp.errors import ConfigError
from kdexp.losses import hcl_loss
from kdexp.methods.base import check_warmup, register_method, warmup_ramp, warmup_warnings
from kdexp.methods.feature import FeatureConfig, FeatureMethod
from kdexp.models.connectors import as_map, map_channels
from kdexp.models.taps import default_layers, feature_kind


@dataclass
class ReviewKDConfig(FeatureConfig):
    name: str = "reviewkd"
    # mdistiller's CIFAR-100 config (REVIEWKD_WEIGHT 5.0; the authors' script: 5.0 for the wrn_40_2 and
    # resnet32x4 pairs, 0.6 for resnet56 -> resnet20, 1.0 for resnet110 -> resnet32)
    beta: float = 5.0
    w_ce: Optional[float] = 1.0  # mdistiller CE_WEIGHT (the authors' --ce-loss-weight)
    warmup_epochs: int = 20  # beta ramps as min(epoch / warmup_epochs, 1), epoch from 1 (DKD's ramp); 0: off
    max_mid_channels: int = 512  # ABF width: min(max_mid_channels, channels of the deepest student level)
    levels: List[int] = field(default_factory=lambda: [4, 2, 1])  # HCL pooling sizes, weights 1/2, 1/4, 1/8
    student_preact: bool = False  # default student layers: stage pre-activations instead of stage ends


class ABF(nn.Module):
    """Attention-based fusion of one level (ReviewKD): the student feature is reduced to `c_mid`
    channels (1x1 conv + BN); a fusing level (all but the deepest) upsamples the deeper level's
    fused map to its own size (nearest), predicts two attention maps from both (1x1 conv, sigmoid)
    and takes their weighted sum. The fused map is resized to the teacher's size (nearest, as the
    authors' code) and passed on to the next shallower level; a 3x3 conv + BN maps it to the
    teacher's channels for the loss. Convolutions initialized kaiming-uniform (a=1) as theirs."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, fuse: bool):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(c_in, c_mid, 1, bias=False), nn.BatchNorm2d(c_mid))
        self.out = nn.Sequential(nn.Conv2d(c_mid, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.attention = nn.Sequential(nn.Conv2d(2 * c_mid, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.out[0].weight, a=1)

    def forward(self, x: torch.Tensor, deeper: Optional[torch.Tensor],
                out_size: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(output at the teacher's shape, fused map for the next level)."""
        x = self.reduce(x)
        if self.attention is not None:
            deeper = F.interpolate(deeper, size=tuple(x.shape[-2:]), mode="nearest")
            w = self.attention(torch.cat([x, deeper], dim=1))
            x = x * w[:, :1] + deeper * w[:, 1:]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.out(x), x


@register_method("reviewkd", config=ReviewKDConfig)
class ReviewKD(FeatureMethod):
    """Chen et al. CVPR 2021: the teacher's multi-level features from fused student levels (HCL)

    w_ce * CE (+ alpha * KD) + min(epoch / warmup, 1) * beta * HCL(ABF-fused student levels,
    teacher levels). Levels pair one to one, shallow to deep; all but the deepest must be spatial
    maps (C,H,W); the deepest (the pooled embedding by default) may be a vector, taken as (D,1,1).
    Student and teacher sizes may differ per level: the fused map is resized to the teacher's
    (nearest), channels are mapped by the ABF convolutions (widths from the probed shapes).

    Conventions vs the authors' code: the warm-up counts epochs from 1 (mdistiller; the authors'
    train.py from 0, so their first epoch has no review term); HCL skips a level l >= min(H, W)
    (theirs: l >= H, square maps)."""
    term = "review"

    def _defaults(self, model: nn.Module, what: str) -> List[str]:
        role = "preact" if what == "teacher" or self.cfg.student_preact else "stages"
        return default_layers(model, role, what) + default_layers(model, "embedding", what)

    def build(self, s_shapes, t_shapes):
        cfg = self.cfg
        check_warmup(cfg)
        if cfg.max_mid_channels < 1:
            raise ConfigError(f"method.max_mid_channels={cfg.max_mid_channels} is out of range: must be >= 1")
        if any(int(level) < 1 for level in cfg.levels):
            raise ConfigError(f"method.levels={list(cfg.levels)}: pooling sizes must be integers >= 1")
        for side, layers, shapes in (("student", self.s_layers, s_shapes), ("teacher", self.t_layers, t_shapes)):
            flat = [f"{n} {tuple(s)}" for n, s in zip(layers[:-1], shapes[:-1]) if feature_kind(s) != "map"]
            if flat:
                raise ConfigError(f"method=reviewkd fuses spatial stage features (C,H,W); the {side}'s layers "
                                  f"{', '.join(flat)} are vectors (only the deepest level may be one): use a "
                                  f"convolutional {side} (e.g. {side}=cnn or {side}=resnet20) or set "
                                  f"method.{side}_layers")
        mid = min(cfg.max_mid_channels, map_channels(s_shapes[-1]))
        n = len(s_shapes)
        self.abfs = nn.ModuleList(ABF(map_channels(s), mid, map_channels(t), fuse=i < n - 1)
                                  for i, (s, t) in enumerate(zip(s_shapes, t_shapes)))
        self.out_sizes = [tuple(t[1:]) if len(t) == 3 else (1, 1) for t in t_shapes]

    @classmethod
    def config_warnings(cls, cfg):
        return warmup_warnings(cfg, "the review (HCL) terms")

    def fuse(self, s: List[torch.Tensor]) -> List[torch.Tensor]:
        """The ABF outputs of the student levels (shallow to deep), fused top-down from the deepest."""
        out: List[torch.Tensor] = [None] * len(s)
        deeper = None
        for i in reversed(range(len(s))):
            out[i], deeper = self.abfs[i](as_map(s[i]), deeper, self.out_sizes[i])
        return out

    def feature_loss(self, s, t, batch):
        ramp = warmup_ramp(self.epoch, self.cfg.warmup_epochs)
        return ramp * hcl_loss(self.fuse(s), [as_map(f) for f in t], [int(v) for v in self.cfg.levels])
