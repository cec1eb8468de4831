"""Domain adaptation on parallel data (conf/domain): batch.x is the source view of each sample and
batch.x_target its target view. The teacher is trained on the source view and is always called
on it (through its public API, so the teacher-output cache stays valid); the student sees the
target view.

- ts_adapt: the student starts from the teacher's weights and learns to give, on the target
  view, the teacher's outputs on the source view (Li et al. 2017); no labels.
- ts_adapter: a learnable input adapter in front of a frozen copy of the teacher, same targets.
- cqd: cross-quality distillation (Su & Maji 2016): CE on the low-quality view + soft CE to the
  teacher on the high-quality view.
- dann: domain-adversarial training (Ganin & Lempitsky 2015) on labeled source + unlabeled target.
"""
import copy
import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from kdexp.errors import ConfigError
from kdexp.losses import (dann_lambda, domain_classification_loss, gradient_reversal, soft_cross_entropy,
                          ts_adapt_loss)
from kdexp.methods.base import Method, MethodConfig, Requirements, register_method
from kdexp.methods.transfer import _embedding_layer, freeze, load_teacher_weights
from kdexp.models.taps import probing, run_with_features

log = logging.getLogger(__name__)
MATCHES = ("logits", "soft")


def _check_match(cfg) -> None:
    if cfg.match not in MATCHES:
        raise ConfigError(f"method.match={cfg.match!r} is out of range: one of {', '.join(MATCHES)}")


def _label_free(cfg) -> None:
    if cfg.w_ce:
        raise ConfigError(f"method={cfg.name} learns from the teacher alone, without labels; method.w_ce must be 0 "
                          f"(got {cfg.w_ce}). For a labeled variant use method=cqd")


# -- T/S adaptation -----------------------------------------------------------------------------
@dataclass
class TSAdaptConfig(MethodConfig):
    name: str = "ts_adapt"
    match: str = "logits"  # logits: 1/2 * sum (s - t)^2 | soft: T^2 * KL(softmax(t/T) || softmax(s/T))
    temperature: float = 1.0  # match=soft only
    alpha: float = 1.0  # weight of the T/S term on the target view
    beta: float = 0.0  # weight of the same term on the source view (keeps the source domain; 0: Li et al.)
    w_ce: Optional[float] = 0.0  # no labels: must be 0


class _TSBase(Method):
    requires = Requirements(views="paired")

    def __init__(self, cfg, student, teacher):
        super().__init__(cfg, student, teacher)
        _check_match(cfg)
        _label_free(cfg)

    def losses(self, batch):
        t = self.teacher.logits(batch)  # the teacher on the SOURCE view (cached per sample)
        cfg = self.cfg
        terms = {}
        if cfg.alpha:
            terms["ts"] = cfg.alpha * ts_adapt_loss(self.student(batch.x_target), t, cfg.match, cfg.temperature)
        if cfg.beta:
            terms["ts_source"] = cfg.beta * ts_adapt_loss(self.student(batch.x), t, cfg.match, cfg.temperature)
        if not terms:
            raise ConfigError(f"method={cfg.name}: alpha and beta are both 0, nothing to train")
        return terms


@register_method("ts_adapt", config=TSAdaptConfig)
class TSAdapt(_TSBase):
    """Li et al. Interspeech 2017: the teacher's outputs on the source view, on the target view

    Teacher/student domain adaptation (Li et al. Interspeech 2017, arXiv 1708.05466): the student,
    initialized with the teacher's weights (same architecture), minimizes alpha * L(s(x_target),
    t(x_source)) over parallel samples, L = logit MSE or T-softened KL (`kdexp.losses.ts_adapt_loss`);
    no labels are used. beta > 0 adds the same match on the source view (s(x_source) vs
    t(x_source)), a label-free way to keep the source domain."""

    def __init__(self, cfg, student, teacher):
        super().__init__(cfg, student, teacher)
        load_teacher_weights(student, teacher, "ts_adapt")


class IdentityLinear(nn.Module):
    """x -> W flatten(x) + b reshaped back, W = I and b = 0 at the start (a D x D linear map)."""

    def __init__(self, in_shape):
        super().__init__()
        self.in_shape = tuple(in_shape)
        d = 1
        for s in self.in_shape:
            d *= s
        self.linear = nn.Linear(d, d)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(d))
            self.linear.bias.zero_()

    def forward(self, x):
        return self.linear(x.flatten(1)).view(len(x), *self.in_shape)


def identity_conv(channels: int, kernel_size: int) -> nn.Conv2d:
    """A C -> C convolution that starts as the identity (centre tap 1 on its own channel)."""
    conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
    with torch.no_grad():
        conv.weight.zero_()
        for c in range(channels):
            conv.weight[c, c, kernel_size // 2, kernel_size // 2] = 1.0
        conv.bias.zero_()
    return conv


ADAPTERS = ("linear", "conv1x1", "conv3x3")


def build_adapter(kind: str, in_shape) -> nn.Module:
    if kind == "linear":
        return IdentityLinear(in_shape)
    if kind in ("conv1x1", "conv3x3"):
        if len(in_shape) != 3:
            raise ConfigError(f"method.adapter={kind} needs image inputs (C,H,W); this dataset gives {tuple(in_shape)}")
        return identity_conv(in_shape[0], 1 if kind == "conv1x1" else 3)
    raise ConfigError(f"method.adapter={kind!r} is out of range: one of {', '.join(ADAPTERS)}")


class AdaptedModel(nn.Module):
    """adapter -> frozen model (the frozen part stays in eval mode and gets no gradient)."""

    def __init__(self, adapter: nn.Module, frozen: nn.Module):
        super().__init__()
        self.adapter = adapter
        self.frozen = freeze(frozen)

    def forward(self, x):
        return self.frozen(self.adapter(x))


@dataclass
class TSAdapterConfig(TSAdaptConfig):
    name: str = "ts_adapter"
    adapter: str = "linear"  # linear (D x D on the flattened input) | conv1x1 | conv3x3; identity at the start


@register_method("ts_adapter", config=TSAdapterConfig)
class TSAdapter(_TSBase):
    """Li et al. Interspeech 2017, via an input adapter in front of a frozen copy of the teacher

    T/S adaptation through an input adapter: the student is a learnable adapter (identity-
    initialized linear map on the flattened input, or a 1x1/3x3 convolution) in front of a frozen
    copy of the teacher; only the adapter trains, with ts_adapt's targets. The configured student
    architecture is not used."""

    def __init__(self, cfg, student, teacher):
        super().__init__(cfg, student, teacher)
        in_shape = getattr(teacher, "in_shape", None)
        if in_shape is None:
            raise ConfigError("method=ts_adapter needs the teacher's input shape (FrozenTeacher(model, in_shape))")
        self.student = AdaptedModel(build_adapter(cfg.adapter, in_shape), copy.deepcopy(teacher.model))
        log.info("ts_adapter: %s adapter with %d trainable parameters in front of the frozen teacher", cfg.adapter,
                 sum(p.numel() for p in self.student.adapter.parameters()))


# -- cross-quality distillation --------------------------------------------------------------------
@dataclass
class CQDConfig(MethodConfig):
    name: str = "cqd"
    temperature: float = 4.0
    alpha: float = 1.0  # lambda: weight of the soft cross-entropy to the teacher
    w_ce: Optional[float] = 1.0  # CE on the labels of the low-quality (target) view


@register_method("cqd", config=CQDConfig)
class CQD(Method):
    """Su & Maji 2016: the teacher's softened outputs on the high-quality view, on the degraded one (KL)

    Cross-quality distillation (Su & Maji 2016, arXiv 1604.00433): the teacher sees the
    high-quality view (source), the student the degraded one (target, e.g. domain=lowres):
    w_ce * CE(s(x_target), y) + alpha * T^2 * H(softmax(t(x_source)/T), softmax(s(x_target)/T))."""
    requires = Requirements(views="paired", ignores=("beta",))

    def losses(self, batch):
        s = self.student(batch.x_target)
        terms = self.ce(s, batch.y)
        if self.cfg.alpha:
            terms["cqd"] = self.cfg.alpha * soft_cross_entropy(s, self.teacher.logits(batch), self.cfg.temperature)
        return terms


# -- DANN -------------------------------------------------------------------------------------
@dataclass
class DANNConfig(MethodConfig):
    name: str = "dann"
    w_ce: Optional[float] = 1.0  # CE on the labeled source view
    alpha: float = 0.0  # no distillation term
    beta: float = 1.0  # weight of the domain classification loss (through the gradient reversal layer)
    layer: Optional[str] = None  # the feature layer the domain classifier reads; null: the student's embedding
    disc_hidden: int = 100  # domain classifier: Linear(features, disc_hidden) -> ReLU -> Linear(disc_hidden, 1)
    lambda_max: float = 1.0  # scale of the gradient reversal factor
    lambda_schedule: str = "paper"  # paper: lambda_max * (2 / (1 + exp(-gamma p)) - 1) | constant: lambda_max
    gamma: float = 10.0


@register_method("dann", config=DANNConfig)
class DANN(Method):
    """Ganin & Lempitsky ICML 2015, no teacher: source labels, domain-invariant features (grad. reversal)

    Domain-adversarial neural network (Ganin & Lempitsky ICML 2015, arXiv 1409.7495; Ganin et al.
    JMLR 2016): the student's features at `layer` feed, through a gradient reversal layer, a domain
    classifier that tells the source view (0) from the target view (1); the student learns the
    labels of the source view only (the target view is unlabeled): w_ce * CE(s(x_source), y) +
    beta * BCE_domain, with the reversal factor lambda_p = 2 / (1 + exp(-gamma p)) - 1 rising with
    the training progress p. The paper's LR annealing mu0 / (1 + 10 p)^0.75 is optim.schedule=dann
    (with optim.name=sgd, momentum 0.9). No teacher."""
    requires = Requirements(teacher="none", views="paired", ignores=("temperature", "alpha"))

    def __init__(self, cfg, student, teacher=None):
        super().__init__(cfg, student, teacher)
        if cfg.lambda_schedule not in ("paper", "constant"):
            raise ConfigError(f"method.lambda_schedule={cfg.lambda_schedule!r} is out of range: one of paper, constant")
        if cfg.disc_hidden < 1:
            raise ConfigError(f"method.disc_hidden={cfg.disc_hidden} is out of range: must be >= 1")
        self.layer = _embedding_layer(student, cfg.layer, "method.layer")
        # input size = the feature size, known at the first forward (prepare runs one)
        self.discriminator = nn.Sequential(nn.Flatten(), nn.LazyLinear(cfg.disc_hidden), nn.ReLU(),
                                           nn.Linear(cfg.disc_hidden, 1))

    def reversal_factor(self) -> float:
        if self.cfg.lambda_schedule == "constant":
            return self.cfg.lambda_max
        return self.cfg.lambda_max * dann_lambda(self.progress, self.cfg.gamma)

    def prepare(self, data, device):
        with probing(self):  # materializes the discriminator; the student's BatchNorm statistics stay untouched
            _, feats = run_with_features(self.student, data.x_train[:2], [self.layer], "student")
            self.discriminator(feats[self.layer])

    def losses(self, batch):
        b = len(batch.x)
        logits, feats = run_with_features(self.student, torch.cat([batch.x, batch.x_target]), [self.layer], "student")
        terms = self.ce(logits[:b], batch.y)
        if self.cfg.beta:
            d = self.discriminator(gradient_reversal(feats[self.layer], self.reversal_factor()))
            terms["domain"] = self.cfg.beta * domain_classification_loss(d[:b], d[b:])
        return terms
