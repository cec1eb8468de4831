"""Data-free distillation: the student never sees a training input. A generator owned by the method
(kdexp.models.generators; in `parameters()`, so checkpoints and resume keep it) synthesizes inputs
from the frozen teacher, which was trained on the data with its own recipe (the pretrained teacher
these papers start from), and the student learns from the teacher's outputs on them alone.

The requirements say inputs="generated": the run plan withholds the training set from the batches
(x NaN, y UNLABELED, kdexp.engine.source.withheld_inputs: they count the steps of an epoch over the
training set and nothing else; each step generates one batch of the batch's size), turns the
teacher-output cache off (every input is new) and validates on the real validation split. The
latent draws z come from torch's global CPU generator, whose state the fit loop checkpoints, so a
resumed run draws what an uninterrupted one would.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from kdexp.errors import ConfigError
from kdexp.losses import activation_loss, attention_mse_loss, information_entropy_loss, kd_loss, one_hot_loss
from kdexp.methods.base import Batch, Method, Requirements, SofteningConfig, register_method
from kdexp.methods.feature import FeatureMethod
from kdexp.models.connectors import match_spatial
from kdexp.models.generators import DAFL_BN_EPS, DAFLGenerator
from kdexp.models.taps import default_layers, feature_shapes, run_with_features


@dataclass
class DataFreeConfig(SofteningConfig):
    """Keys of the generator-based data-free methods."""
    alpha: float = 1.0  # weight of the student's KL term (there is no label term: w_ce must be 0)
    w_ce: Optional[float] = 0.0
    latent_dim: int = 100  # z ~ N(0, I) of this size
    generator_width: int = 128  # channels of the generator's first maps (the authors' 128)
    generator_lr: float = 0.02  # the generator's own lr (its param group; no weight decay)


class Generating:
    """Mixin for a Method (first in the bases): the generator for the data's input shape (teacher.in_shape),
    its own param group, one generated batch per step, the common config checks."""
    tanh: bool = True  # the generator's tanh before its output BatchNorm
    hidden_bn_eps: float = DAFL_BN_EPS  # eps of its hidden BatchNorms (the authors' 0.8)

    def __init__(self, cfg, student: nn.Module, teacher):
        super().__init__(cfg, student, teacher)
        in_shape = getattr(teacher, "in_shape", None)
        if in_shape is None:
            raise ConfigError(f"method={cfg.name} generates inputs of the data's shape: build the teacher as "
                              f"FrozenTeacher(model, in_shape=data.in_shape)")
        if self.w_ce:
            raise ConfigError(f"method.w_ce={cfg.w_ce}: method={cfg.name} learns without training data or labels; "
                              f"set method.w_ce=0")
        if not cfg.alpha:
            raise ConfigError(f"method.alpha=0: nothing trains the student of method={cfg.name}; set method.alpha > 0")
        if cfg.generator_lr <= 0:
            raise ConfigError(f"method.generator_lr={cfg.generator_lr}: must be > 0")
        self.in_shape = tuple(in_shape)
        self.alpha, self.temperature = float(cfg.alpha), float(cfg.temperature)
        self.generator = DAFLGenerator(cfg.latent_dim, self.in_shape, cfg.generator_width, tanh=self.tanh,
                                       hidden_bn_eps=self.hidden_bn_eps)

    def param_groups(self, optim_cfg) -> List[dict]:
        g_ids = {id(p) for p in self.generator.parameters()}
        return [{"params": [p for p in self.parameters() if p.requires_grad and id(p) not in g_ids]},
                {"params": list(self.generator.parameters()), "lr": self.cfg.generator_lr, "weight_decay": 0.0}]

    @classmethod
    def config_warnings(cls, cfg) -> List[str]:
        if cfg.optim.name == "adam":
            return []
        return [f"method={cfg.method.name} trains its generator with the run's optimizer, optim.name={cfg.optim.name}, "
                f"at method.generator_lr={cfg.method.generator_lr} (and optim.schedule scales it too); the authors "
                f"train it with Adam"]

    @staticmethod
    def batch_size(batch: Batch) -> int:
        """The generated batch's size: the step's (at least 2: the generator's BatchNorms train on batch statistics)."""
        return max(2, len(batch.idx))

    def draw(self, n: int) -> torch.Tensor:
        """z (n, latent_dim) from torch's global CPU generator (the fit loop checkpoints its state, not a GPU's)."""
        return torch.randn(n, self.generator.latent_dim)

    def generate(self, batch: Batch) -> torch.Tensor:
        """One generated batch of the step's size from fresh z."""
        return self.run_generator(self.draw(self.batch_size(batch)))

    def run_generator(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z.to(self.generator.l1.weight.device, non_blocking=True))


# ------------------------------------------------------------------------------------- DAFL

@dataclass
class DAFLConfig(DataFreeConfig):
    name: str = "dafl"
    temperature: float = 1.0  # the authors' KD is KL of the plain softmaxes
    w_oh: float = 1.0  # one-hot loss
    w_act: float = 0.1  # activation loss (a)
    w_ie: float = 5.0  # information-entropy loss (beta in the paper)
    # the teacher features of the activation loss (one module name); null: its penultimate embedding
    teacher_layers: Optional[List[str]] = None


@register_method("dafl", config=DAFLConfig)
class DAFL(Generating, Method):
    """Chen et al. ICCV 2019, data-free: the teacher's outputs on a generator's inputs (KL)

    DAFL (Chen et al. ICCV 2019, arXiv 1904.01186). Each step: x = G(z); the generator minimizes
    w_oh * one_hot(t) + w_act * activation(f_t) + w_ie * information_entropy(t) of the frozen teacher's
    logits t and penultimate features f_t on x (gradients reach G through the teacher, whose weights
    get none); the student minimizes alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) on x.detach()
    with t detached, so the generator's terms train only G and the KD term only the student. One
    summed loss and one optimizer step update both from the same batch, as the authors' code does.
    Defaults: the authors' MNIST settings (latent 100, oh 1, a 0.1, ie 5, T = 1, Adam) with their
    CIFAR generator lr 0.02: their MNIST lr_G 0.2 goes with batches of 512 and collapsed the generator
    at kdexp's batch 64 on digits. Their CIFAR-10 run: latent 1000, oh 0.05, ie 5, a 0.01, lr_G 0.02,
    student SGD lr 0.1, batch 1024."""
    requires = Requirements(inputs="generated", features="any", ignores=("beta",))

    def __init__(self, cfg, student: nn.Module, teacher):
        super().__init__(cfg, student, teacher)
        for key in ("w_oh", "w_act", "w_ie"):
            if getattr(cfg, key) < 0:
                raise ConfigError(f"method.{key}={getattr(cfg, key)}: must be >= 0")
        layers = list(cfg.teacher_layers) if cfg.teacher_layers else default_layers(teacher.model, "embedding",
                                                                                    "teacher")
        if len(layers) != 1:
            raise ConfigError(f"method.teacher_layers={layers}: method=dafl's activation loss reads one layer")
        self.t_layer = layers[0]
        shape = feature_shapes(teacher.model, layers, self.in_shape, "teacher")[0]
        self._tapped = {"teacher": [(self.t_layer, shape)]}
        self.weights = {"oh": float(cfg.w_oh), "act": float(cfg.w_act), "ie": float(cfg.w_ie)}

    def tapped_features(self):
        return self._tapped

    def generator_terms(self, t_logits: torch.Tensor, t_features: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The generator's weighted terms (omitted at weight 0)."""
        fns = {"oh": lambda: one_hot_loss(t_logits), "act": lambda: activation_loss(t_features),
               "ie": lambda: information_entropy_loss(t_logits)}
        return {k: w * fns[k]() for k, w in self.weights.items() if w}

    def losses(self, batch: Batch) -> Dict[str, torch.Tensor]:
        x = self.generate(batch)
        # the frozen teacher with autograd on: the generator learns through it (its weights need no grad)
        t_logits, feats = run_with_features(self.teacher.model, x, [self.t_layer], "teacher")
        terms = self.generator_terms(t_logits, feats[self.t_layer])
        s, t = self.soft_inputs(self.student(x.detach()), t_logits.detach())
        terms["kd"] = self.alpha * kd_loss(s, t, self.temperature)
        return terms


# ------------------------------------------------------------------------------------- Zero-Shot KT

@dataclass
class ZSKTConfig(DataFreeConfig):
    name: str = "zskt"
    temperature: float = 1.0  # the authors' KL_temperature
    # AT weight. The authors' 250 multiplies their AT against F.kl_div's element mean over the B x C
    # logits; kdexp's KL is the batch mean (kd_loss), C times larger, so 2500 = 250 x their 10 classes
    # (CIFAR-10, SVHN) keeps their balance; use 250 x C elsewhere
    beta: float = 2500.0
    generator_lr: float = 1e-3
    generator_steps: int = 1  # n_G: generator steps per generated batch
    student_steps: int = 10  # n_S: student steps on it after them (the paper's CIFAR-10 runs; the code's default is 7)
    student_layers: Optional[List[str]] = None  # AT layers; null: the end of every stage
    teacher_layers: Optional[List[str]] = None


@register_method("zskt", config=ZSKTConfig)
class ZSKT(Generating, FeatureMethod):
    """Micaelli & Storkey NeurIPS 2019, data-free: the teacher's outputs on adversarial inputs (KL)

    Zero-shot KT (Micaelli & Storkey NeurIPS 2019, arXiv 1905.09768): adversarial belief matching.
    One z batch serves a cycle of generator_steps + student_steps fit-loop steps (the authors' n_G
    and n_S: each of kdexp's steps is one of their iterations). On the first n_G the generator
    maximizes the student-teacher KL: term adv = -alpha * T^2 * KL(p_t || p_s) of G(z), with the
    student's weights frozen for the step (no gradient, so the optimizer leaves them alone). On the
    next n_S the student minimizes alpha * T^2 * KL + beta * sum_l attention_mse(s_l, t_l) at every
    stage end on G(z) computed without gradient (the generator stays as it is). Each step logs the
    three terms (0 where inactive). The cycle position and its z are method state (extra_state), so a
    resumed run continues the cycle. A step whose batch size differs from the cycle's (an epoch's last
    batch) draws a new z. Not the authors': gradient clipping at norm 5 and per-step cosine schedules
    (optim.schedule=cosine is per epoch); the generator's first map is H/4 (theirs 10x10 for 32x32)."""
    requires = Requirements(inputs="generated", features="maps")
    tanh, hidden_bn_eps = False, 1e-5  # their generator: no tanh, PyTorch's BatchNorm eps
    role, pick, term = "stages", "all", "at"

    def __init__(self, cfg, student: nn.Module, teacher):
        super().__init__(cfg, student, teacher)
        if cfg.generator_steps < 1 or cfg.student_steps < 1:
            raise ConfigError(f"method.generator_steps={cfg.generator_steps}, method.student_steps="
                              f"{cfg.student_steps}: both must be >= 1")
        self.cycle = int(cfg.generator_steps) + int(cfg.student_steps)
        self.step_index = 0  # fit-loop steps taken (the position in the cycle)
        self.z = None  # the cycle's latent batch (CPU)

    def get_extra_state(self):
        return {"step_index": self.step_index, "z": self.z}

    def set_extra_state(self, state) -> None:
        self.step_index, self.z = int(state["step_index"]), state["z"]

    def feature_loss(self, s, t, batch):
        return sum(attention_mse_loss(*match_spatial(a, b)) for a, b in zip(s, t))

    def losses(self, batch: Batch) -> Dict[str, torch.Tensor]:
        n, position = self.batch_size(batch), self.step_index % self.cycle
        if position == 0 or self.z is None or len(self.z) != n:
            self.z = self.draw(n)
        self.step_index += 1
        zero = torch.zeros((), device=self.generator.l1.weight.device)
        if position < self.cfg.generator_steps:
            return {"adv": self.generator_term(self.run_generator(self.z)), "kd": zero, "at": zero}
        with torch.no_grad():
            x = self.run_generator(self.z)
        s_logits, s_f = run_with_features(self.student, x, self.s_layers, "student")
        with torch.no_grad():
            t_logits, t_f = run_with_features(self.teacher.model, x, self.t_layers, "teacher")
        s, t = self.soft_inputs(s_logits, t_logits)
        at = self.feature_loss([s_f[k] for k in self.s_layers], [t_f[k] for k in self.t_layers], batch)
        return {"adv": zero, "kd": self.alpha * kd_loss(s, t, self.temperature), "at": self.cfg.beta * at}

    def generator_term(self, x: torch.Tensor) -> torch.Tensor:
        """-alpha * T^2 * KL(p_t || p_s) on the generated x: gradients reach the generator only."""
        frozen = [p for p in self.student.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            s, t = self.soft_inputs(self.student(x), self.teacher.model(x))
        finally:
            for p in frozen:
                p.requires_grad_(True)
        return -self.alpha * kd_loss(s, t, self.temperature)
