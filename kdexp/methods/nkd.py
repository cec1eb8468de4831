"""The normalized KD loss (NKD, Yang et al. ICCV 2023): the teacher's target probability weighs the
student's log-probability of the target, and the non-target probabilities, renormalized over the
non-target classes, are matched with a temperature."""
from dataclasses import dataclass
from typing import Optional

import torch

from kdexp.losses import nkd_terms
from kdexp.methods.base import LogitMethod, Requirements, SofteningConfig, UNLABELED, register_method


@dataclass
class NKDConfig(SofteningConfig):
    name: str = "nkd"
    temperature: float = 1.0  # softens the non-target term (the target term is at T=1)
    alpha: float = 1.0  # weight of the target term
    beta: float = 1.5  # weight of the non-target term (the paper's gamma)
    w_ce: Optional[float] = 1.0


@register_method("nkd", config=NKDConfig)
class NKD(LogitMethod):
    """Yang et al. ICCV 2023: the teacher's target output and normalized non-target outputs (CE)

    NKD (Yang et al. ICCV 2023, arXiv 2303.13005; authors' code yzd-v/cls_KD):
    w_ce * CE - alpha * mean p_t(y) log p_s(y) - beta * T^2 * mean sum_{j != y} q_t(j) log q_s(j)
    with q the renormalized non-target distributions (`kdexp.losses.nkd_terms`).

    Defaults: the authors' ImageNet setting (their loss's defaults and their ResNet-34 -> ResNet-18
    and ResNet-50 -> MobileNet configs: T=1, gamma=1.5, CE weight 1); their CIFAR-100 config
    (ResNet-34 -> ResNet-18) uses method.temperature=3 method.beta=3.5. `beta` is the paper's
    gamma, so that alpha keeps weighing the KD-like (target) term. With
    method.logit_standardize=true both terms take the z-scored logits.

    With a transfer set (dataset.label_fraction < 1) the target class of an unlabeled sample is the
    teacher's top class. With 2 classes the non-target term is identically 0 and a warning says so."""
    requires = Requirements(fusable=True)
    term_weights = {"ce": "w_ce", "target": "alpha", "non_target": "beta"}

    def logit_terms(self, s, t, y, hp):
        target = torch.where(y == UNLABELED, t.argmax(-1), y)
        target_term, non_target = nkd_terms(*self.soft_inputs(s, t), target, hp["temperature"])
        return {"ce": self.ce_term(s, y, hp), "target": hp["alpha"] * target_term,
                "non_target": hp["beta"] * non_target}
