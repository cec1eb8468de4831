"""What every method is built on: the `Method` base class, the `Batch` it trains on, its config
schema `MethodConfig`, the `Requirements` it declares, the `Stage`s it may train before the main
loop, and the method registry. Method files import from here (not from the package
`kdexp.methods`, whose __init__ imports every method file).

A method is an nn.Module that owns the student (and any trainable parts of its own: regressors,
discriminators), so `method.parameters()` is exactly what the optimizer trains. The frozen
teacher is held outside the module tree. `losses(batch)` returns the weighted loss terms by
name; the engine sums them and logs each as train/loss_<name>.
"""
import abc
from dataclasses import dataclass, field, fields
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from omegaconf import MISSING

from kdexp.errors import ConfigError
from kdexp.losses import ce_loss, standardize_logits
from kdexp.registry import Registry, doc_summary

METHODS = Registry("method")
list_methods = METHODS.names

UNLABELED = -1  # the label of a transfer-set sample without one (Batch.y)


@dataclass
class OptimConfig:
    """An optimizer and LR schedule (kdexp.engine.optim): the student's (`optim`), a teacher's
    recipe (`teacher.optim`) and a method's first stage (`method.init_optim`)."""
    name: str = "adam"  # adam | adamw | sgd | dot (SGD with task/distillation momenta, kdexp.engine.dot)
    lr: float = 1e-3
    momentum: float = 0.9  # sgd; dot: beta, the mean of its two momenta
    nesterov: bool = False  # sgd only
    # dot only (Zhao et al. ICCV 2023): the task ("ce") gradient's momentum is momentum - delta, the
    # distillation terms' momentum + delta; 0.075 is the authors' default
    delta: float = 0.075
    weight_decay: float = 0.0
    schedule: str = "none"  # none | cosine | step | dann (per step: lr / (1 + 10 p)^0.75, Ganin & Lempitsky)
    milestones: List[int] = field(default_factory=list)  # step: epochs where lr *= gamma
    gamma: float = 0.1


@dataclass
class MethodConfig:
    """Keys every method has, so one `-m` sweep can span methods. A method that does not
    use one ignores it (`ce` ignores temperature and alpha)."""
    name: str = MISSING
    temperature: float = 4.0  # softening temperature T of every soft-target term
    alpha: float = 0.9  # weight of the KD term
    beta: float = 0.0  # weight of the method's own term
    w_ce: Optional[float] = None  # weight of CE on labels; null -> 1 - alpha


@dataclass
class SofteningConfig(MethodConfig):
    """Keys of the methods whose loss softens logits with a temperature."""
    # Sun et al. CVPR 2024: z-score student and teacher logits per sample before every soft term
    # (`kdexp.losses.standardize_logits`); temperature is then the paper's base temperature. The
    # CE on labels keeps the raw logits.
    logit_standardize: bool = False


@dataclass(frozen=True)
class Requirements:
    """What a method needs from the run, declared once per method class (`requires`). The run
    plan (kdexp.engine.plan) reads it to decide the teacher, the batches, the views, the cache
    and fusing, and to reject configs the method cannot honour before anything is trained."""
    # none: no teacher is built or trained | outputs: the teacher's logits/features per class |
    # weights: it starts from the teacher's weights only (the teacher may be pretrained on other
    # classes, teacher.classes) | self: a teacher of the student's own architecture and recipe
    teacher: str = "outputs"
    # required: every term needs a label, so with a transfer set (dataset.label_fraction < 1) the
    # batches come from the labeled samples only | optional: unlabeled samples feed its other terms |
    # partial: it needs a transfer set (it learns from the unlabeled samples, e.g. pseudo-labels them)
    labels: str = "optional"
    # With a domain shift (conf/domain): source | target: the single view it trains on by default
    # (domain.train_view overrides) | paired: batch.x is the source view and batch.x_target the
    # target view of the same samples (the method needs a domain shift)
    views: str = "source"
    # Feature kinds its term reads at the tapped layers (student and teacher): none (logits only) |
    # maps: spatial (C,H,W) maps with H*W > 1 | vectors | any
    features: str = "none"
    # False: the teacher must run online every step (e.g. its gradient w.r.t. the input is needed)
    cacheable: bool = True
    # True: N runs differing only in temperature/alpha/beta/w_ce/seed can train fused (engine.fused)
    fusable: bool = False
    # The common keys (MethodConfig: temperature, alpha, beta, w_ce) its loss never reads: a run that
    # sets one of them gets a warning (a sweep over it gives rows that differ only by name)
    ignores: Tuple[str, ...] = ()
    # data: its batches are samples of the training set | generated: data-free distillation, it
    # synthesizes its own training inputs (e.g. a generator trained against the teacher): its batches
    # withhold the training inputs and labels (x all NaN, y UNLABELED: they only count the steps of an
    # epoch and carry positions), the teacher runs online (no output cache) and still trains on the
    # training data with its own recipe; validation is on the real validation split
    inputs: str = "data"

    TEACHER = ("none", "outputs", "weights", "self")
    LABELS = ("required", "optional", "partial")
    VIEWS = ("source", "target", "paired")
    FEATURES = ("none", "maps", "vectors", "any")
    INPUTS = ("data", "generated")

    def __post_init__(self):
        common = {f.name for f in fields(MethodConfig)} - {"name"}
        if not set(self.ignores) <= common:
            raise ValueError(f"Requirements.ignores={self.ignores}: only the common keys {sorted(common)}")
        for key, allowed in (("teacher", self.TEACHER), ("labels", self.LABELS), ("views", self.VIEWS),
                             ("features", self.FEATURES), ("inputs", self.INPUTS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"Requirements.{key}={getattr(self, key)!r}: one of {', '.join(allowed)}")
        if self.generated and (self.teacher != "outputs" or self.labels != "optional" or self.views == "paired"):
            raise ValueError(f"Requirements(inputs='generated') learns from a teacher's outputs on its own inputs: it "
                             f"takes teacher='outputs', labels='optional' and no paired views (got teacher="
                             f"{self.teacher!r}, labels={self.labels!r}, views={self.views!r})")

    @property
    def uses_teacher(self) -> bool:
        return self.teacher != "none"

    @property
    def generated(self) -> bool:
        """Data-free: the method generates its training inputs (the batches withhold the data's)."""
        return self.inputs == "generated"


@dataclass
class Batch:
    x: torch.Tensor  # inputs (B, ...)
    y: torch.Tensor  # labels (B,)
    idx: torch.Tensor  # positions of the samples in the training set (B,), for caches and memory banks
    # dataset.label_fraction < 1: True where the sample keeps its label; the others carry
    # y == UNLABELED and only feed label-free (teacher/peer-driven) terms. None: all labeled.
    labeled: Optional[torch.Tensor] = None
    # Domain shift (conf/domain): the target view of the same samples (x is then the source view),
    # set by the sampler for methods whose requirements say views="paired"; None otherwise.
    x_target: Optional[torch.Tensor] = None
    # The teacher-output cache's key: the name of the deterministic view x was gathered from at
    # positions idx. Only the sampler sets it (`Batch.sampled`); it is not an __init__ argument, so
    # a Batch a method derives (dataclasses.replace(batch, x=...)) or builds has view None and its
    # teacher outputs are computed live, never served from the cache of other inputs.
    view: Optional[str] = field(default=None, init=False)

    @classmethod
    def sampled(cls, view: str, x, y, idx, labeled=None, x_target=None) -> "Batch":
        """A batch gathered from view `view` at positions `idx` (the sampler's constructor)."""
        batch = cls(x, y, idx, labeled, x_target)
        batch.view = view
        return batch


@dataclass
class Stage:
    """A training stage a method runs before the main loop (a hint stage, an initialization, a
    paraphraser's pre-training). The engine trains it with the one fit loop: `params` on
    `loss(batch)` for `epochs` epochs, optimizer `optim` (an OptimConfig node), seeded batches of
    `batch_size`. `trainable` modules are made trainable for the stage and frozen again after."""
    name: str
    params: Sequence[torch.Tensor]
    loss: Callable[[Batch], torch.Tensor]
    epochs: int
    optim: object
    batch_size: int
    trainable: Sequence[nn.Module] = ()


def register_method(name: str, config):
    """Register a Method subclass under `name` with its config dataclass (a MethodConfig); its
    `requires` (Requirements) and its description (the one-line paragraph that opens its docstring,
    kdexp.registry.doc_summary; shown by --help and kdexp.catalog) are kept as registry metadata."""
    def decorator(cls):
        if not isinstance(getattr(cls, "requires", None), Requirements):
            raise TypeError(f"method {name!r}: {cls.__name__}.requires must be a Requirements")
        if not cls.__doc__:  # its own docstring: a subclass would otherwise show its parent's description
            raise TypeError(f"method {name!r}: {cls.__name__} needs a docstring whose first line describes it")
        return METHODS.register(name, config=config, requires=cls.requires, description=doc_summary(cls))(cls)

    return decorator


def get_method(name: str, key: str = ""):
    return METHODS.get(name, key=key)


def requirements(name: str) -> Requirements:
    return METHODS.meta(name)["requires"]


# ---- linear warm-up of a method's terms (DKD, ReviewKD): config key method.warmup_epochs

def warmup_ramp(epoch: int, warmup_epochs: int) -> float:
    """The weight min((epoch + 1) / warmup_epochs, 1) of a warmed-up term at the 0-based `epoch`:
    epochs count from 1 as in mdistiller's trainer (the first epoch already has 1 / warmup_epochs);
    1 when warmup_epochs is 0 (no warm-up)."""
    return 1.0 if warmup_epochs <= 0 else min((epoch + 1) / warmup_epochs, 1.0)


def check_warmup(cfg) -> None:
    """method.warmup_epochs must be >= 0 (0: no warm-up)."""
    if cfg.warmup_epochs < 0:
        raise ConfigError(f"method.warmup_epochs={cfg.warmup_epochs} is out of range: must be >= 0")


def warmup_warnings(run_cfg, terms: str) -> List[str]:
    """A warm-up longer than the run (`run_cfg`: the whole run config; `terms` names what ramps up)."""
    w = run_cfg.method.warmup_epochs
    if w > run_cfg.epochs:
        return [f"method.warmup_epochs={w} is longer than the run (epochs={run_cfg.epochs}): {terms} never reach "
                f"their full weight (at most {run_cfg.epochs}/{w}); set method.warmup_epochs <= epochs"]
    return []


class Method(nn.Module, abc.ABC):
    requires: Requirements = Requirements()
    # The training position, set by the stepper before each step (kdexp.engine.steppers): the
    # 0-based epoch and the fraction of training done, in [0, 1) (warm-ups, schedules).
    epoch: int = 0
    progress: float = 0.0

    def __init__(self, cfg, student: nn.Module, teacher: Optional["object"] = None):
        super().__init__()
        self.cfg = cfg
        self.student = student
        # The teacher is frozen and must stay out of parameters()/state_dict(): keep it
        # off the module tree.
        object.__setattr__(self, "teacher", teacher)
        self.w_ce = (1.0 - cfg.alpha) if cfg.w_ce is None else cfg.w_ce
        self.logit_standardize = bool(getattr(cfg, "logit_standardize", False))  # SofteningConfig

    def param_groups(self, optim_cfg) -> List[dict]:
        """Optimizer parameter groups. Override to give a method-owned part (a discriminator,
        say) its own lr/weight_decay: return [{"params": [...]}, {"params": [...], "lr": ...}].
        Every trainable parameter of the module must be in exactly one group."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def prepare(self, data, device) -> None:
        """Runs once before any training of a fresh run (not on resume: the checkpoint holds its
        result): allocate per-sample state, materialize lazy layers. Default: nothing."""

    @classmethod
    def config_warnings(cls, cfg) -> List[str]:
        """Valid run configs (`cfg`: the whole run config) that are probably not meant, one line each
        (e.g. a warm-up longer than the run). Default: none."""
        return []

    def stages(self) -> List[Stage]:
        """Training stages before the main loop, run in order after `prepare` (fresh runs only).
        Default: none."""
        return []

    def tapped_features(self) -> Dict[str, List[Tuple[str, Tuple[int, ...]]]]:
        """The features the method reads: {"student": [(layer, shape)], "teacher": [...]} (module
        names as in kdexp.models.taps, shapes without the batch). The run plan checks their kinds
        against `requires.features`. Default: none."""
        return {}

    def eval_models(self) -> Dict[str, nn.Module]:
        """Models evaluated every epoch besides the student, logged as val/acc_<name>
        (e.g. the other peers of mutual learning). Default: none."""
        return {}

    def extra_metrics(self, data) -> Dict[str, float]:
        """Metrics of the method's own, computed after each epoch's evaluation and logged with the
        epoch's metrics (e.g. the accuracy of an auxiliary task's head). Default: none."""
        return {}

    @abc.abstractmethod
    def losses(self, batch: Batch) -> Dict[str, torch.Tensor]:
        """Weighted loss terms of one training batch, by name; their sum is minimized."""

    def soft_inputs(self, *logits: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The logits as the method's soft (temperature) terms take them: z-scored per sample
        (`standardize_logits`) when method.logit_standardize is set, else unchanged."""
        if not self.logit_standardize:
            return logits
        return tuple(standardize_logits(z) for z in logits)

    def ce(self, student_logits: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The weighted CE-on-labels term, omitted when its weight is 0. Samples without a label
        (y == UNLABELED, see dataset.label_fraction) are left out: the mean runs over the labeled
        samples of the batch, and the term is 0 when the batch has none."""
        if not self.w_ce:
            return {}
        return {"ce": ce_loss(student_logits, y, self.w_ce, UNLABELED)}


class LogitMethod(Method):
    """A method whose loss reads nothing but logits and labels: the student's, the teacher's (None
    without a teacher) and y. `logit_terms(s, t, y, hp)` is its loss, and it serves two callers:

    - the separate run (`losses`): one student's (B, C) logits, `hp` the run's floats (`hparams`);
    - a fused sweep (kdexp.engine.fused): the same function under torch.func.vmap, one student per
      row, `hp` each student's values as 0-d tensors.

    So `logit_terms` computes every term, each multiplied by its weight, with no Python branch on an
    `hp` value and no data-dependent shapes (a boolean mask, an in-place op on an unbatched tensor).
    Every term has a weight named in `term_weights`; a term whose weight is 0 is left out afterwards,
    in both callers (its value is not logged and an inf in it, 0 * inf, does not make the loss NaN)."""
    requires = Requirements(fusable=True)
    term_weights: Dict[str, str] = {"ce": "w_ce"}  # loss term -> the `hparams` key that weighs it

    def __init__(self, cfg, student: nn.Module, teacher: Optional["object"] = None):
        super().__init__(cfg, student, teacher)
        self.hp = self.hparams()  # plain floats: reading a DictConfig every step costs more than a logit term

    def hparams(self) -> Dict[str, float]:
        """The values its terms read that a fused sweep may vary per student (kdexp.engine.plan's
        FUSABLE_KEYS), plus any the loss reads as weights. w_ce is the resolved one (null -> 1 - alpha)."""
        c = self.cfg  # a method config, or a teacher recipe's (which may lack the keys its loss ignores)
        return {"temperature": float(getattr(c, "temperature", 1.0)), "alpha": float(getattr(c, "alpha", 0.0)),
                "beta": float(getattr(c, "beta", 0.0)), "w_ce": float(self.w_ce or 0.0)}

    @abc.abstractmethod
    def logit_terms(self, s: torch.Tensor, t: Optional[torch.Tensor], y: torch.Tensor,
                    hp: Dict[str, object]) -> Dict[str, torch.Tensor]:
        """Every weighted term (the keys of `term_weights`) from the student's logits s (B, C), the
        teacher's t (B, C) or None, the labels y (B,) (UNLABELED where a sample has none) and `hp`."""

    def losses(self, batch: Batch) -> Dict[str, torch.Tensor]:
        s = self.student(batch.x)
        t = self.teacher.logits(batch) if self.requires.uses_teacher else None
        return self.kept(self.logit_terms(s, t, batch.y, self.hp))

    def kept(self, terms: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The terms whose weight is not 0 (what the separate run minimizes and logs)."""
        return {k: v for k, v in terms.items() if self.hp[self.term_weights[k]]}

    def ce_term(self, s: torch.Tensor, y: torch.Tensor, hp: Dict[str, object]) -> torch.Tensor:
        """w_ce * CE on the labeled samples (`Method.ce`'s term, its weight from `hp`)."""
        return ce_loss(s, y, hp["w_ce"], UNLABELED)
