"""A comprehensive overhaul of feature distillation (OFD, Heo et al. ICCV 2019, arXiv 1904.01866):
the student's pre-ReLU features, through connectors (1x1 conv + BN), match the teacher's pre-ReLU
features by a partial L2 distance (`kdexp.losses.ofd_partial_l2`) in which each teacher response
is raised to a per-channel margin (`kdexp.losses.ofd_margin`): the expected value of its negative
responses, from the BatchNorm that produces the teacher's feature.

Layers (null defaults): the stage pre-activations of both models (mdistiller's `preact_feats[1:]`;
for WRNs the BNs of the authors' `get_bn_before_relu`).
"""
import logging
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn

from kdexp.errors import ConfigError
from kdexp.losses import ofd_margin, ofd_partial_l2
from kdexp.methods.base import register_method
from kdexp.methods.feature import FeatureConfig, FeatureMethod
from kdexp.models.connectors import Connector, map_channels
from kdexp.models.taps import producing_batchnorms

log = logging.getLogger(__name__)

# teacher options of conf/teacher whose stage pre-activations come out of a BatchNorm
TEACHERS_WITH_BN = ("resnet20", "resnet56", "resnet32x4", "wrn_40_2", "vgg13")


@dataclass
class OFDConfig(FeatureConfig):
    name: str = "ofd"
    # the authors' CIFAR code: loss_CE + loss_distill.sum() / batch_size / 1000 (mdistiller FEAT_WEIGHT 0.001
    # on the per-sample sum); ofd_partial_l2 is that per-sample sum, so beta carries the 1/1000
    beta: float = 1e-3
    w_ce: Optional[float] = 1.0  # mdistiller CE_WEIGHT


def teacher_margins(model: nn.Module, layers: List[str], shapes, in_shape) -> List[torch.Tensor]:
    """OFD's margin (C,) of each tapped teacher feature, from the BatchNorm producing it (its bias and
    |weight|: the feature's mean and std per channel). A ConfigError names the layers without one."""
    bn_names = producing_batchnorms(model, layers, in_shape, "teacher")
    missing = [n for n, bn in zip(layers, bn_names) if bn is None]
    if missing:
        raise ConfigError(
            f"method=ofd takes its margins from the BatchNorm that produces each teacher pre-ReLU feature, and "
            f"the teacher ({type(model).__name__}) has no BatchNorm before the tapped layer(s) {missing}: use a "
            f"teacher with BatchNorm, e.g. teacher=resnet20 (or {', '.join(TEACHERS_WITH_BN[1:])}), or set "
            f"method.teacher_layers to features that a BatchNorm produces")
    modules = dict(model.named_modules())
    margins = []
    for layer, shape, name in zip(layers, shapes, bn_names):
        bn = modules[name]
        if bn.num_features != map_channels(shape):
            raise ConfigError(f"method=ofd: the teacher's layer {layer} {tuple(shape)} comes out of BatchNorm {name} "
                              f"with {bn.num_features} channels; tap a feature with one margin per channel")
        if bn.affine:
            mean, std = bn.bias.detach(), bn.weight.detach().abs()
        else:  # no affine parameters: the output is the normalized input, N(0, 1)
            mean, std = torch.zeros(bn.num_features), torch.ones(bn.num_features)
        margins.append(ofd_margin(mean, std))
        log.info("ofd: teacher %s takes its margins from %s", layer, name)
    return margins


@register_method("ofd", config=OFDConfig)
class OFD(FeatureMethod):
    """w_ce * CE (+ alpha * KD) + beta * sum_l 2^(l-n+1) * partial L2(connector_l(s_l), t_l; margin_l)
    over n layer pairs (layer l of n weighs 2^(l-n+1), the deepest 1, as the authors' code).

    Connectors: kdexp's Connector (resize to the teacher's H x W, 1x1 conv without bias, BN), conv
    initialized N(0, 2 / (k*k*C_out)) as the authors'. Conventions vs their code: a student map of
    another size is resized to the teacher's (mdistiller pools the teacher to the student's; this
    keeps the teacher's responses, to which the margins refer, as they are); the margins are
    buffers computed from the frozen teacher when the method is built (not saved in checkpoints)."""
    role = "preact"
    term = "ofd"

    def build(self, s_shapes, t_shapes):
        margins = teacher_margins(self.teacher.model, self.t_layers, t_shapes, self.teacher.in_shape)
        self.connectors = nn.ModuleList(Connector(s, t) for s, t in zip(s_shapes, t_shapes))
        for conn in self.connectors:
            for m in conn.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for i, margin in enumerate(margins):
            self.register_buffer(f"margin{i}", margin, persistent=False)

    def margins(self) -> List[torch.Tensor]:
        return [getattr(self, f"margin{i}") for i in range(len(self.connectors))]

    def feature_loss(self, s, t, batch):
        n = len(s)
        return sum(ofd_partial_l2(conn(fs), ft, margin) / 2 ** (n - 1 - i)
                   for i, (conn, fs, ft, margin) in enumerate(zip(self.connectors, s, t, self.margins())))
