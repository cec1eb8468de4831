"""A comprehensive overhaul of feature distillation (OFD, Heo et al. ICCV 2019, arXiv 1904.01866):
the student's pre-ReLU features, through connectors (1x1 conv + BN), match the teacher's pre-ReLU
features by a partial L2 distance (`kdexp.losses.ofd_partial_l2`) in which each teacher response
is raised to a per-channel margin (`kdexp.losses.ofd_margin`): the expected value of its negative
responses, from the BatchNorm that produces the teacher's feature (or, without one, measured).

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
from kdexp.models.taps import producing_batchnorms, run_with_features

log = logging.getLogger(__name__)

@dataclass
class OFDConfig(FeatureConfig):
    name: str = "ofd"
    # the authors' CIFAR code: loss_CE + loss_distill.sum() / batch_size / 1000 (mdistiller FEAT_WEIGHT 0.001
    # on the per-sample sum); ofd_partial_l2 is that per-sample sum, so beta carries the 1/1000
    beta: float = 1e-3
    w_ce: Optional[float] = 1.0  # mdistiller CE_WEIGHT
    # a teacher feature without a BatchNorm before it: its margins are measured on this many training inputs
    margin_samples: int = 2048


def bn_margins(model: nn.Module, layers: List[str], shapes, in_shape) -> List[Optional[torch.Tensor]]:
    """OFD's margin (C,) of each tapped teacher feature from the BatchNorm producing it (its bias and
    |weight|: the feature's mean and std per channel), None for a feature no BatchNorm produces."""
    bn_names = producing_batchnorms(model, layers, in_shape, "teacher")
    modules = dict(model.named_modules())
    margins = []
    for layer, shape, name in zip(layers, shapes, bn_names):
        if name is None:
            log.info("ofd: no BatchNorm produces the teacher's %s; its margins come from the training data", layer)
            margins.append(None)
            continue
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


def measured_margin(features: torch.Tensor) -> torch.Tensor:
    """OFD's margin from measured responses (N, C, ...) instead of BatchNorm parameters: the same
    Gaussian formula (`ofd_margin`) on each channel's mean and std over samples and positions."""
    per_channel = features.transpose(0, 1).reshape(features.shape[1], -1).double()
    return ofd_margin(per_channel.mean(1), per_channel.std(1)).to(features.dtype)


@register_method("ofd", config=OFDConfig)
class OFD(FeatureMethod):
    """Heo et al. ICCV 2019: the teacher's pre-ReLU stage features, through connectors (partial L2)

    w_ce * CE (+ alpha * KD) + beta * sum_l 2^(l-n+1) * partial L2(connector_l(s_l), t_l; margin_l)
    over n layer pairs (layer l of n weighs 2^(l-n+1), the deepest 1, as the authors' code).

    Connectors: kdexp's Connector (resize to the teacher's H x W, 1x1 conv without bias, BN), conv
    initialized N(0, 2 / (k*k*C_out)) as the authors'. Conventions vs their code: a student map of
    another size is resized to the teacher's (mdistiller pools the teacher to the student's; this
    keeps the teacher's responses, to which the margins refer, as they are).

    A teacher feature that no BatchNorm produces (e.g. the digits CNN's convs) takes its margin
    from the teacher's measured responses instead: the same Gaussian formula on each channel's mean
    and std over (up to `margin_samples`) training inputs, in `prepare` (an extension of the paper,
    which reads them off BN; logged). The margins are buffers saved in checkpoints."""
    role = "preact"
    term = "ofd"

    def build(self, s_shapes, t_shapes):
        if self.cfg.margin_samples < 2:
            raise ConfigError(f"method.margin_samples={self.cfg.margin_samples} is out of range: must be >= 2 "
                              f"(a channel's std needs two responses)")
        margins = bn_margins(self.teacher.model, self.t_layers, t_shapes, self.teacher.in_shape)
        self.measured = [i for i, m in enumerate(margins) if m is None]  # filled by prepare
        margins = [torch.zeros(map_channels(t)) if m is None else m for m, t in zip(margins, t_shapes)]
        self.connectors = nn.ModuleList(Connector(s, t) for s, t in zip(s_shapes, t_shapes))
        for conn in self.connectors:
            for m in conn.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for i, margin in enumerate(margins):
            self.register_buffer(f"margin{i}", margin)

    @torch.no_grad()
    def prepare(self, data, device):
        if not self.measured:
            return
        x = data.x_train[:self.cfg.margin_samples].to(device)
        layers = [self.t_layers[i] for i in self.measured]
        feats = {n: [] for n in layers}
        for chunk in x.split(256):
            _, f = run_with_features(self.teacher.model, chunk, layers, "teacher")
            for n in layers:
                feats[n].append(f[n])
        for i, n in zip(self.measured, layers):
            getattr(self, f"margin{i}").copy_(measured_margin(torch.cat(feats[n])))

    def margins(self) -> List[torch.Tensor]:
        return [getattr(self, f"margin{i}") for i in range(len(self.connectors))]

    def feature_loss(self, s, t, batch):
        n = len(s)
        return sum(ofd_partial_l2(conn(fs), ft, margin) / 2 ** (n - 1 - i)
                   for i, (conn, fs, ft, margin) in enumerate(zip(self.connectors, s, t, self.margins())))
