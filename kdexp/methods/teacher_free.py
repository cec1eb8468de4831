"""The teacher-free family of "Revisiting Knowledge Distillation via Label Smoothing
Regularization" (Yuan et al. CVPR 2020, arXiv 1909.11723): label smoothing (LSR), Tf-KD_self
(the student's own architecture, pretrained, as the teacher) and Tf-KD_reg (a manually
designed virtual teacher, no trained teacher at all).

Reversed KD and defective KD are not losses: they are `kd` with a weak teacher, see the
presets experiment=tfkd_reversed and experiment=tfkd_defective.
"""
from dataclasses import dataclass
from typing import Optional

from kdexp.errors import ConfigError
from kdexp.losses import lsr_loss, tfkd_reg_loss
from kdexp.methods.base import LogitMethod, MethodConfig, Requirements, SofteningConfig, register_method
from kdexp.methods.logit import KD

# LSR and Tf-KD_reg read a label in every term (requires labels="required"): with a transfer set
# their batches come from the labeled samples only (kdexp.engine.plan), so every y here is a label.


@dataclass
class LSRConfig(MethodConfig):
    name: str = "lsr"
    epsilon: float = 0.1  # smoothing mass, spread uniformly over all classes
    w_ce: Optional[float] = 1.0  # weight of the smoothed-label CE (it replaces the plain CE)


@register_method("lsr", config=LSRConfig)
class LSR(LogitMethod):
    """Szegedy et al. 2016, no teacher: labels smoothed towards the uniform distribution (CE)

    Label smoothing regularization (Szegedy et al. 2016): w_ce * H((1 - eps) * one_hot + eps / C,
    softmax(s)). No teacher; temperature and alpha are accepted and ignored. LSR is KD from a
    uniform virtual teacher at T=1 with weight eps (Yuan et al. 2020, eq. 6)."""
    requires = Requirements(teacher="none", labels="required", fusable=True, ignores=("temperature", "alpha", "beta"))
    term_weights = {"lsr": "w_ce"}

    def __init__(self, cfg, student, teacher=None):
        super().__init__(cfg, student, teacher)
        if not 0.0 <= cfg.epsilon < 1.0:
            raise ConfigError(f"method.epsilon={cfg.epsilon} is out of range: must be in [0, 1)")
        if not self.w_ce:
            raise ConfigError("method=lsr with method.w_ce=0 has nothing to train; set method.w_ce > 0")

    def hparams(self):
        return {**super().hparams(), "epsilon": float(self.cfg.epsilon)}

    def logit_terms(self, s, t, y, hp):
        return {"lsr": hp["w_ce"] * lsr_loss(s, y, hp["epsilon"])}


@dataclass
class TfKDSelfConfig(SofteningConfig):
    name: str = "tfkd_self"
    temperature: float = 20.0  # the authors' CIFAR-100 self-training runs (MobileNetV2, ShuffleNetV2)
    alpha: float = 0.95


@register_method("tfkd_self", config=TfKDSelfConfig)
class TfKDSelf(KD):
    """Yuan et al. CVPR 2020: a pretrained model of the student's own architecture (KD)

    Tf-KD_self: KD (w_ce * CE + alpha * T^2 * KL) from a pretrained model of the student's own
    architecture (student.arch + student.args), trained beforehand "in the normal way": with
    the student's recipe (optim, epochs, batch_size) and teacher.seed. The teacher provider
    trains and caches it under its own key; teacher.checkpoint loads one instead and
    teacher.stop_at_acc stops it early. teacher.arch/args/optim/epochs are not used."""
    requires = Requirements(teacher="self", fusable=True, ignores=("beta",))


@dataclass
class TfKDRegConfig(MethodConfig):
    name: str = "tfkd_reg"
    temperature: float = 20.0  # the authors' ResNet18 / CIFAR-100 run
    alpha: float = 0.1
    correct_prob: float = 0.9  # "a": the virtual teacher's probability on the true class


@register_method("tfkd_reg", config=TfKDRegConfig)
class TfKDReg(LogitMethod):
    """Yuan et al. CVPR 2020, no teacher: a hand-made virtual teacher's softened outputs (KL)

    Tf-KD_reg: (1 - alpha) * CE + alpha * T^2 * KL(p^d_T || softmax(s/T)) with the virtual
    teacher p^d = a on the true class and (1 - a)/(C - 1) elsewhere, softened as the paper
    describes (p^d^(1/T), renormalized), never by a softmax of the probabilities (see
    `kdexp.losses.tfkd_reg_loss`). No trained teacher."""
    requires = Requirements(teacher="none", labels="required", fusable=True)
    term_weights = {"ce": "w_ce", "reg": "alpha"}

    def __init__(self, cfg, student, teacher=None):
        super().__init__(cfg, student, teacher)
        if not 0.0 < cfg.correct_prob < 1.0:
            raise ConfigError(f"method.correct_prob={cfg.correct_prob} is out of range: must be in (0, 1)")

    def logit_terms(self, s, t, y, hp):
        return {"ce": self.ce_term(s, y, hp),
                "reg": hp["alpha"] * tfkd_reg_loss(s, y, self.cfg.correct_prob, hp["temperature"])}
