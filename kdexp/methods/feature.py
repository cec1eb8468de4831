"""Feature-based distillation: the student matches the teacher's intermediate features,
taken by module name (kdexp.models.taps), through connectors trained with the student
(kdexp.models.connectors). FitNets, AT, NST, AB, FT, FSP, VID.

Every method here: w_ce * CE + alpha * KD + beta * <method term>, with the papers' (or the
reference code's, where stated) defaults; alpha defaults to 0 as in the published feature-
distillation tables (RepDistiller's `-a 0`), so KD is added with method.alpha > 0.
Layers: method.student_layers / method.teacher_layers (module names, ':in' for a module's
input); null takes the architecture's defaults (the end of each stage, its pre-activation,
or the penultimate embedding, see kdexp.models.taps). Two-stage methods (fitnet's hint
stage, ab, ft, fsp) run their first stage in `prepare` for method.init_epochs epochs.
"""
import abc
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdexp.errors import ConfigError
from kdexp.losses import (ab_loss, at_loss, factor_transfer_loss, fitnet_loss, fsp_loss, kd_loss, nst_loss,
                          vid_loss)
from kdexp.methods.base import Batch, Method, OptimConfig, Requirements, SofteningConfig, Stage, register_method
from kdexp.models.connectors import Connector, Paraphraser, Translator, as_map, map_channels, match_spatial
from kdexp.models.taps import default_layers, feature_shapes, run_with_features

log = logging.getLogger(__name__)


@dataclass
class FeatureConfig(SofteningConfig):
    """Keys shared by the feature- and relation-based methods."""
    alpha: float = 0.0  # KD on top of the method's own term (0: CE + beta * term, as in the papers' tables)
    student_layers: Optional[List[str]] = None  # module names to tap; null: the architecture's defaults
    teacher_layers: Optional[List[str]] = None


@dataclass
class StagedConfig(FeatureConfig):
    """Methods with a first training stage before the main one (their `stages`)."""
    init_epochs: int = 30  # epochs of the first stage (RepDistiller: 30); 0 skips it
    # Its optimizer. Adam (lr 1e-3, no weight decay) is the default because it is insensitive to the
    # scale of the stage loss, which depends on each loss's normalization convention (see
    # kdexp.losses); RepDistiller's init stage is sgd with lr 0.05, momentum 0.9, weight_decay 5e-4.
    init_optim: OptimConfig = field(default_factory=OptimConfig)
    init_batch_size: int = 64


class FeatureMethod(Method):
    """Base: resolves the layers, probes their shapes on the data's input shape, builds the
    method's connectors (`build`), and combines CE, KD and the method's term (`feature_loss`)."""
    requires = Requirements(features="any")
    role: str = "stages"  # default taps: stem | stages | preact | embedding
    pick: str = "all"  # all | last | hint (the middle stage, FitNets) | stem+stages (FSP)
    term: str = "feat"  # name of the method's loss term (train/loss_<term>)

    def __init__(self, cfg, student: nn.Module, teacher):
        super().__init__(cfg, student, teacher)
        if not (self.w_ce or cfg.alpha or cfg.beta):
            raise ConfigError(f"method={cfg.name}: method.w_ce, method.alpha and method.beta are all 0; "
                              f"nothing to train")
        in_shape = getattr(teacher, "in_shape", None)
        if in_shape is None:
            raise ConfigError(f"method={cfg.name} probes feature shapes: build the teacher as "
                              f"FrozenTeacher(model, in_shape=data.in_shape)")
        self.s_layers, self.t_layers = self._layers(cfg, student, teacher.model)
        s_shapes = feature_shapes(student, self.s_layers, in_shape, "student")
        t_shapes = feature_shapes(teacher.model, self.t_layers, in_shape, "teacher")
        self._tapped = {"student": list(zip(self.s_layers, s_shapes)), "teacher": list(zip(self.t_layers, t_shapes))}
        log.info("%s: student %s -> teacher %s", cfg.name,
                 ", ".join(f"{n} {s}" for n, s in zip(self.s_layers, s_shapes)),
                 ", ".join(f"{n} {s}" for n, s in zip(self.t_layers, t_shapes)))
        self.build(s_shapes, t_shapes)

    def tapped_features(self):
        return self._tapped

    # -- layers ----------------------------------------------------------------------------
    def _defaults(self, model: nn.Module, what: str) -> List[str]:
        if self.pick == "stem+stages":
            table = getattr(model, "feature_layers", None) or {}
            return ([table["stem"]] if table.get("stem") else []) + default_layers(model, "stages", what)
        names = default_layers(model, self.role, what)
        if self.pick == "last":
            return names[-1:]
        if self.pick == "hint":  # RepDistiller's hint_layer=2: the end of the second stage
            return [names[1] if len(names) > 1 else names[0]]
        return names

    def _layers(self, cfg, student: nn.Module, teacher: nn.Module) -> Tuple[List[str], List[str]]:
        s = list(cfg.student_layers) if cfg.student_layers else self._defaults(student, "student")
        t = list(cfg.teacher_layers) if cfg.teacher_layers else self._defaults(teacher, "teacher")
        single = self.pick in ("last", "hint") or self.role == "embedding"
        for names, key in ((s, "student_layers"), (t, "teacher_layers")):
            if single and len(names) != 1:
                raise ConfigError(f"method={cfg.name} matches one layer pair; method.{key}={names} has {len(names)}")
        if len(s) != len(t):
            if cfg.student_layers and cfg.teacher_layers:
                raise ConfigError(f"method={cfg.name}: method.student_layers ({len(s)}) and method.teacher_layers "
                                  f"({len(t)}) must pair up one to one")
            n = min(len(s), len(t))
            log.info("%s: student has %d default layers, teacher %d; pairing the last %d", cfg.name, len(s), len(t), n)
            s, t = s[len(s) - n:], t[len(t) - n:]
        if self.pick == "stem+stages" and len(s) < 2:
            raise ConfigError(f"method={cfg.name} needs at least 2 layers per model (got {s} and {t})")
        return s, t

    # -- hooks for subclasses ----------------------------------------------------------------
    def build(self, s_shapes: List[Tuple[int, ...]], t_shapes: List[Tuple[int, ...]]) -> None:
        """Create the connectors for these feature shapes (without batch). Default: none."""

    @abc.abstractmethod
    def feature_loss(self, s: List[torch.Tensor], t: List[torch.Tensor], batch: Batch) -> torch.Tensor:
        """The method's term from the paired student/teacher features (lists in layer order)."""

    # -- forward -------------------------------------------------------------------------------
    def features(self, batch: Batch):
        """(student logits, student features, teacher logits, teacher features), lists in layer order."""
        s_logits, s_f = run_with_features(self.student, batch.x, self.s_layers, "student")
        t_logits, t_f = self.teacher.features(batch, self.t_layers)
        return s_logits, [s_f[n] for n in self.s_layers], t_logits, [t_f[n] for n in self.t_layers]

    def losses(self, batch: Batch) -> Dict[str, torch.Tensor]:
        cfg = self.cfg
        if cfg.beta:
            s_logits, s_f, t_logits, t_f = self.features(batch)
        else:  # the method's term is off (e.g. ab/fsp after their first stage): logits only
            s_logits, s_f, t_f = self.student(batch.x), None, None
            t_logits = self.teacher.logits(batch) if cfg.alpha else None
        terms = self.ce(s_logits, batch.y)
        if cfg.alpha:
            terms["kd"] = cfg.alpha * kd_loss(*self.soft_inputs(s_logits, t_logits), cfg.temperature)
        if cfg.beta:
            terms[self.term] = cfg.beta * self.feature_loss(s_f, t_f, batch)
        return terms

    # -- first training stage ------------------------------------------------------------------
    def stage(self, name: str, modules: Sequence[nn.Module], loss: Callable[[Batch], torch.Tensor],
              trainable: Sequence[nn.Module] = ()) -> List[Stage]:
        """The method's first stage: the parameters of `modules` trained on `loss(batch)` for
        method.init_epochs epochs with method.init_optim and batches of method.init_batch_size
        (labels are not used); [] when init_epochs is 0."""
        cfg = self.cfg
        if cfg.init_epochs < 0 or cfg.init_batch_size < 1:
            raise ConfigError(f"method={cfg.name}: init_epochs >= 0 and init_batch_size >= 1 are required "
                              f"(got {cfg.init_epochs}, {cfg.init_batch_size})")
        if not cfg.init_epochs:
            return []
        params = [p for m in modules for p in m.parameters()]
        return [Stage(name, params, loss, cfg.init_epochs, cfg.init_optim, cfg.init_batch_size, tuple(trainable))]

    def stage_loss(self, batch: Batch) -> torch.Tensor:
        """The method's own term alone (the first stage of fitnet, ab and fsp)."""
        _, s, _, t = self.features(batch)
        return self.feature_loss(s, t, batch)


# ------------------------------------------------------------------------------------- FitNets

@dataclass
class FitNetConfig(StagedConfig):
    name: str = "fitnet"
    beta: float = 100.0  # weight of the hint loss (RepDistiller's -b 100 with element-mean MSE)
    init_epochs: int = 0  # > 0: the paper's hint-only first stage (student up to the guided layer + regressor)


@register_method("fitnet", config=FitNetConfig)
class FitNet(FeatureMethod):
    """Romero et al. ICLR 2015: the teacher's hint layer, through a regressor (MSE)

    FitNets (Romero et al. ICLR 2015): a regressor (Connector: resize + 1x1 conv + BN) maps the
    student's guided layer onto the teacher's hint layer (default: the end of the second stage,
    RepDistiller's hint_layer=2); term = beta * MSE. Optional first stage (init_epochs > 0):
    hint loss only, as the paper's stage 1; then CE (+ KD) + beta * hint."""
    pick = "hint"
    term = "hint"

    def build(self, s_shapes, t_shapes):
        self.regressor = Connector(s_shapes[0], t_shapes[0])

    def feature_loss(self, s, t, batch):
        return fitnet_loss(self.regressor(s[0]), t[0])

    def stages(self):
        return self.stage("hint stage", [self.student, self.regressor], self.stage_loss)


# ------------------------------------------------------------------------------------- AT

@dataclass
class ATConfig(FeatureConfig):
    name: str = "at"
    beta: float = 1000.0  # the paper's beta; per layer it is divided by 2 * H * W (see AT)
    p: float = 2.0  # attention map: sum over channels of |A|^p


@register_method("at", config=ATConfig)
class AT(FeatureMethod):
    """Zagoruyko & Komodakis ICLR 2017: the teacher's spatial attention maps at every stage end (L2)

    Attention transfer (Zagoruyko & Komodakis ICLR 2017): at every stage end, the L2 distance
    of the normalized spatial attention maps sum_c |A_c|^p; term = sum_l at_loss_l / (2 H_l W_l),
    times beta: the paper's 'beta/2 with beta = 1000 divided by the number of elements in the
    attention map and the batch size' (the batch mean is in at_loss). Maps of different sizes
    are matched by average-pooling the larger one. Convention (see `kdexp.losses.at_loss`): the
    paper's unsquared distance d_b, where the authors' code takes the mean of d_b^2 over B*H*W
    with the same beta: this term is mean_b(d_b) / (2 mean_b(d_b^2)) times theirs per layer, for
    any H*W and batch size (1/(2d) for equal distances), its gradient 1/(4 d_b) times theirs."""
    requires = Requirements(features="maps")
    term = "at"

    def feature_loss(self, s, t, batch):
        total = 0.0
        for fs, ft in zip(s, t):
            fs, ft = match_spatial(as_map(fs), as_map(ft))
            total = total + at_loss(fs, ft, self.cfg.p) / (2 * fs.shape[2] * fs.shape[3])
        return total


# ------------------------------------------------------------------------------------- NST

@dataclass
class NSTConfig(FeatureConfig):
    name: str = "nst"
    beta: float = 50.0  # the paper's lambda for the polynomial kernel (also RepDistiller's -b 50)


@register_method("nst", config=NSTConfig)
class NST(FeatureMethod):
    """Huang & Wang 2017: the teacher's neuron selectivity patterns at every stage end (MMD)

    Neuron selectivity transfer (Huang & Wang 2017): squared MMD with the polynomial kernel
    (d=2, c=0) between the student's and teacher's channel activation maps at every stage end
    (channel counts may differ; the larger map is average-pooled); summed over layers."""
    requires = Requirements(features="maps")
    term = "nst"

    def feature_loss(self, s, t, batch):
        return sum(nst_loss(*match_spatial(as_map(fs), as_map(ft))) for fs, ft in zip(s, t))


# ------------------------------------------------------------------------------------- AB

@dataclass
class ABConfig(StagedConfig):
    name: str = "ab"
    beta: float = 0.0  # the AB term after the initialization stage (0: the paper's init-only use)
    margin: float = 1.0  # mu of the alternative loss


@register_method("ab", config=ABConfig)
class AB(FeatureMethod):
    """Heo et al. AAAI 2019: where the teacher's neurons activate (activation boundaries, squared hinge)

    Activation-boundary transfer (Heo et al. AAAI 2019): connectors (1x1 conv + BN; none when
    the shapes match) map the student's pre-activations onto the teacher's at every stage end;
    the alternative squared-hinge loss (margin 1) teaches the student where the teacher's
    neurons are active. Layer l of n weighs 2^(l-n+1) (the authors' code) on the per-element mean
    of its loss, where the authors' code weighs per-layer sums over the N_l = C*H*W neurons (times
    3/1000): their layer l is 3 N_l / 1000 times this one (`kdexp.losses.ab_loss`), so layers of
    different sizes weigh differently relative to each other. `prepare` runs the initialization
    stage (AB loss only: student + connectors, init_epochs); the main stage is CE (+ KD) (+ beta * AB)."""
    role = "preact"
    term = "ab"

    def build(self, s_shapes, t_shapes):
        self.connectors = nn.ModuleList(Connector(s, t, identity_if_equal=True) for s, t in zip(s_shapes, t_shapes))

    def feature_loss(self, s, t, batch):
        n = len(s)
        return sum(2.0 ** (i - n + 1) * ab_loss(conn(fs), ft, self.cfg.margin)
                   for i, (conn, fs, ft) in enumerate(zip(self.connectors, s, t)))

    def stages(self):
        return self.stage("initialization stage", [self.student, self.connectors], self.stage_loss)


# ------------------------------------------------------------------------------------- FT

@dataclass
class FTConfig(StagedConfig):
    name: str = "ft"
    beta: float = 500.0  # the authors' code (with the element-mean loss)
    p: int = 1  # the norm of the factor distance
    rate: float = 0.5  # paraphrase rate k: factor channels = k * teacher channels
    init_epochs: int = 30  # paraphraser pre-training epochs


@register_method("ft", config=FTConfig)
class FT(FeatureMethod):
    """Kim et al. NeurIPS 2018: the teacher's factors from a paraphraser of its last stage (L1)

    Factor transfer (Kim et al. NeurIPS 2018): a paraphraser (conv autoencoder) is pre-trained
    in `prepare` to reconstruct the teacher's last stage output (MSE, init_epochs), then frozen;
    its encoder gives the teacher factor. A translator (3 convs) maps the student's last stage
    output to a student factor, trained with the student; term = beta * FT loss (p=1)."""
    pick = "last"
    term = "ft"

    def build(self, s_shapes, t_shapes):
        s_c, t_c = map_channels(s_shapes[0]), map_channels(t_shapes[0])
        self.paraphraser = Paraphraser(t_c, self.cfg.rate).requires_grad_(False)  # frozen after pre-training
        self.translator = Translator(s_c, t_c, self.cfg.rate)

    def teacher_factor(self, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.paraphraser.encoder(as_map(t))

    def feature_loss(self, s, t, batch):
        fs, ft = match_spatial(self.translator(as_map(s[0])), self.teacher_factor(t[0]))
        return factor_transfer_loss(fs, ft, self.cfg.p)

    def reconstruction_loss(self, batch: Batch) -> torch.Tensor:
        """The paraphraser's pre-training loss: MSE of its reconstruction of the teacher's feature."""
        _, feats = self.teacher.features(batch, self.t_layers)
        target = as_map(feats[self.t_layers[0]])
        return F.mse_loss(self.paraphraser(target), target)

    def stages(self):
        return self.stage("paraphraser pre-training", [self.paraphraser], self.reconstruction_loss,
                          trainable=[self.paraphraser])


# ------------------------------------------------------------------------------------- FSP

@dataclass
class FSPConfig(StagedConfig):
    name: str = "fsp"
    beta: float = 0.0  # the FSP term after the first stage (0: the paper's two-stage use)


@register_method("fsp", config=FSPConfig)
class FSP(FeatureMethod):
    """Yim et al. CVPR 2017: the teacher's flow between layers (FSP Gram matrices, L2)

    Flow of solution procedure (Yim et al. CVPR 2017): Gram matrices between consecutive
    tapped layers (default: the stem and every stage end, i.e. each stage's input and output);
    squared Frobenius distance to the teacher's. Student layers whose channel count differs
    from the teacher's go through a 1x1 conv + BN connector. `prepare` runs the paper's first
    stage (FSP loss only, init_epochs); the main stage is CE (+ KD) (+ beta * FSP)."""
    requires = Requirements(features="maps")
    pick = "stem+stages"
    term = "fsp"

    def build(self, s_shapes, t_shapes):
        conns = []
        for s, t in zip(s_shapes, t_shapes):
            if len(s) != 3 or len(t) != 3:
                raise ConfigError(f"method=fsp needs feature maps (C,H,W); got student {s} and teacher {t}")
            conns.append(Connector(s, (t[0],) + tuple(s[1:]), identity_if_equal=True))
        self.connectors = nn.ModuleList(conns)

    def feature_loss(self, s, t, batch):
        return fsp_loss([conn(fs) for conn, fs in zip(self.connectors, s)], t)

    def stages(self):
        return self.stage("first stage", [self.student, self.connectors], self.stage_loss)


# ------------------------------------------------------------------------------------- VID

@dataclass
class VIDConfig(FeatureConfig):
    name: str = "vid"
    beta: float = 1.0  # RepDistiller's -b 1 (element-mean NLL)
    init_pred_var: float = 5.0  # initial sigma^2 of every channel
    eps: float = 1e-5  # sigma^2 = softplus(log_scale) + eps


class VIDRegressor(nn.Module):
    """mu(s): 1x1 conv -> ReLU -> 1x1 conv -> ReLU -> 1x1 conv (no biases), and the learned
    per-channel variance sigma_c^2 = softplus(log_scale_c) + eps."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, init_pred_var: float, eps: float):
        super().__init__()
        self.mean = nn.Sequential(nn.Conv2d(c_in, c_mid, 1, bias=False), nn.ReLU(),
                                  nn.Conv2d(c_mid, c_mid, 1, bias=False), nn.ReLU(),
                                  nn.Conv2d(c_mid, c_out, 1, bias=False))
        self.eps = eps
        self.log_scale = nn.Parameter(torch.full((c_out,), math.log(math.expm1(init_pred_var - eps))))

    def variance(self) -> torch.Tensor:
        return F.softplus(self.log_scale) + self.eps


@register_method("vid", config=VIDConfig)
class VID(FeatureMethod):
    """Ahn et al. CVPR 2019: the teacher's stage features, by their likelihood under a Gaussian (NLL)

    Variational information distillation (Ahn et al. CVPR 2019): at every stage end, a
    Gaussian q(t | s) = N(mu(s), diag(sigma^2)) with mu a 3-layer 1x1-conv regressor and one
    learned variance per teacher channel (nn.Parameters, trained with the student); term =
    sum over layers of the negative log-likelihood (element mean). The larger map is pooled."""
    term = "vid"

    def build(self, s_shapes, t_shapes):
        if self.cfg.init_pred_var <= self.cfg.eps:
            raise ConfigError(f"method.init_pred_var={self.cfg.init_pred_var} must exceed method.eps={self.cfg.eps}")
        self.regressors = nn.ModuleList(
            VIDRegressor(map_channels(s), map_channels(t), map_channels(t), self.cfg.init_pred_var, self.cfg.eps)
            for s, t in zip(s_shapes, t_shapes))

    def feature_loss(self, s, t, batch):
        total = 0.0
        for reg, fs, ft in zip(self.regressors, s, t):
            fs, ft = match_spatial(as_map(fs), as_map(ft))
            total = total + vid_loss(reg.mean(fs), reg.variance(), ft)
        return total
