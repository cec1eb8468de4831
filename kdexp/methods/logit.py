"""Methods on output logits: the CE baseline and Hinton's KD."""
from dataclasses import dataclass
from typing import Optional

import torch.nn.functional as F

from kdexp.config import MethodConfig
from kdexp.losses import kd_loss
from kdexp.methods import Method, register_method


@dataclass
class CEConfig(MethodConfig):
    name: str = "ce"
    w_ce: Optional[float] = 1.0


@register_method("ce", config=CEConfig)
class CE(Method):
    """The student alone on labels: w_ce * CE. Ignores temperature and alpha, so a sweep
    over them still has a baseline row per value."""
    uses_teacher = False

    def losses(self, batch):
        return {"ce": self.w_ce * F.cross_entropy(self.student(batch.x), batch.y)}


@dataclass
class KDConfig(MethodConfig):
    name: str = "kd"


@register_method("kd", config=KDConfig)
class KD(Method):
    """Hinton et al. 2015: w_ce * CE + alpha * T^2 * KL(p_t^T || p_s^T); w_ce defaults to 1 - alpha."""

    def losses(self, batch):
        s = self.student(batch.x)
        terms = self.ce(s, batch.y)
        if self.cfg.alpha:
            terms["kd"] = self.cfg.alpha * kd_loss(s, self.teacher.logits(batch), self.cfg.temperature)
        return terms
