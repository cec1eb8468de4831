"""Weighted soft labels (WSLD, Zhou et al. ICLR 2021): KD whose per-sample weight grows with the
ratio of the student's to the teacher's cross-entropy on the label."""
from dataclasses import dataclass
from typing import Optional

import torch

from kdexp.losses import weighted_kd_loss, wsld_weights
from kdexp.methods.base import LogitMethod, Requirements, SofteningConfig, UNLABELED, register_method


@dataclass
class WSLDConfig(SofteningConfig):
    name: str = "wsld"
    temperature: float = 4.0
    alpha: float = 2.25  # weight of the weighted soft-label term
    w_ce: Optional[float] = 1.0  # explicit: alpha > 1, so not 1 - alpha


@register_method("wsld", config=WSLDConfig)
class WSLD(LogitMethod):
    """Zhou et al. ICLR 2021: the teacher's softened outputs, samples weighted by their CE ratio (KL)

    WSLD (Zhou et al. ICLR 2021, arXiv 2102.00650; authors' code
    bellymonster/Weighted-Soft-Label-Distillation): w_ce * CE + alpha * T^2 * mean_b w_b KL_b with
    w_b = 1 - exp(-CE_s,b / CE_t,b) from the student's and the teacher's CE on the label at T=1,
    without gradient (`kdexp.losses.wsld_weights`, `weighted_kd_loss`).

    Defaults: the CIFAR-100 setting T=4, alpha=2.25, CE weight 1 (as in the cls_KD reimplementation's
    CIFAR-100 config; the authors' released code is for ImageNet: T=2, alpha=2.5). The soft term is a
    KL, not the authors' cross-entropy (same gradient; see `weighted_kd_loss`). With
    method.logit_standardize=true the soft term takes the z-scored logits; the weights keep the raw
    ones (they are CE on labels).

    The weights need a label: with a transfer set (dataset.label_fraction < 1) an unlabeled sample's
    label is the teacher's top class, so its weight compares the student with the teacher on the
    teacher's own prediction (CE on labels still sees the labeled samples only)."""
    requires = Requirements(fusable=True, ignores=("beta",))
    term_weights = {"ce": "w_ce", "wsl": "alpha"}

    def logit_terms(self, s, t, y, hp):
        weights = wsld_weights(s, t, torch.where(y == UNLABELED, t.argmax(-1), y))
        s_soft, t_soft = self.soft_inputs(s, t)
        return {"ce": self.ce_term(s, y, hp), "wsl": hp["alpha"] * weighted_kd_loss(s_soft, t_soft, hp["temperature"],
                                                                                     weights)}
