"""Methods on output logits: the CE baseline and Hinton's KD."""
from dataclasses import dataclass
from typing import Optional

from kdexp.errors import ConfigError
from kdexp.losses import kd_ce_loss_soft, kd_loss
from kdexp.methods.base import LogitMethod, MethodConfig, Requirements, SofteningConfig, register_method, UNLABELED


@dataclass
class CEConfig(MethodConfig):
    name: str = "ce"
    w_ce: Optional[float] = 1.0


@register_method("ce", config=CEConfig)
class CE(LogitMethod):
    """Baseline, no teacher: the labels alone (cross-entropy)

    The student alone on labels: w_ce * CE. Ignores temperature and alpha, so a sweep
    over them still has a baseline row per value."""
    requires = Requirements(teacher="none", labels="required", fusable=True, ignores=("temperature", "alpha", "beta"))

    def __init__(self, cfg, student, teacher=None):
        super().__init__(cfg, student, teacher)
        if not self.w_ce:
            raise ConfigError("method=ce with method.w_ce=0 has nothing to train; set method.w_ce > 0")

    def logit_terms(self, s, t, y, hp):
        return {"ce": self.ce_term(s, y, hp)}


@dataclass
class KDConfig(SofteningConfig):
    name: str = "kd"


@register_method("kd", config=KDConfig)
class KD(LogitMethod):
    """Hinton et al. 2015: the teacher's temperature-softened outputs (KL)

    Hinton et al. 2015: w_ce * CE + alpha * T^2 * KL(p_t^T || p_s^T); w_ce defaults to 1 - alpha.
    With method.logit_standardize the KL compares the z-scored logits (Sun et al. CVPR 2024)."""
    requires = Requirements(fusable=True, ignores=("beta",))
    term_weights = {"ce": "w_ce", "kd": "alpha"}

    def __init__(self, cfg, student, teacher=None):
        super().__init__(cfg, student, teacher)
        # the teacher-output cache's softened probabilities per T, if any (standardized logits have
        # none: their teacher logits come from the cache)
        soft = getattr(teacher, "soft_targets", None)
        self.soft_targets = None if self.logit_standardize else soft

    def losses(self, batch):
        hp = self.hp
        if not (hp["alpha"] and self.soft_targets is not None):
            return super().losses(batch)
        # teacher-output cache: softened probabilities cached per T; both terms in one autograd
        # node (same values and gradients as `logit_terms`)
        s = self.student(batch.x)
        p, neg_entropy = self.soft_targets(batch, hp["temperature"])
        ce, kd = kd_ce_loss_soft(s, batch.y, p, neg_entropy, hp["temperature"], hp["w_ce"], hp["alpha"],
                                 UNLABELED, all_labeled=batch.labeled is None)
        return {"ce": ce, "kd": kd} if self.w_ce else {"kd": kd}

    def logit_terms(self, s, t, y, hp):
        return {"ce": self.ce_term(s, y, hp), "kd": hp["alpha"] * kd_loss(*self.soft_inputs(s, t), hp["temperature"])}


@dataclass
class LSKDConfig(KDConfig):
    name: str = "lskd"
    logit_standardize: bool = True
    temperature: float = 2.0  # the paper's base temperature on CIFAR-100
    alpha: float = 9.0  # KD weight (the authors' CIFAR-100 KD+LS runs)
    w_ce: Optional[float] = 0.1


@register_method("lskd", config=LSKDConfig)
class LSKD(KD):
    """Sun et al. CVPR 2024: the teacher's z-scored logits, temperature-softened (KL)

    KD with logit standardization (Sun et al. CVPR 2024, arXiv 2403.01427): method=kd with
    method.logit_standardize=true and the authors' CIFAR-100 weights, 0.1 * CE + 9 * T^2 *
    KL(softmax(z(t)/T) || softmax(z(s)/T)) at base temperature T=2, z the per-sample z-score
    (`kdexp.losses.standardize_logits`). The authors' code scales the KL by T^2 as mdistiller does."""
    requires = Requirements(fusable=True, ignores=("beta",))
