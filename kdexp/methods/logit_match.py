"""Methods that match the teacher's logits beyond Hinton's KD: logit regression (Ba & Caruana
2014), decoupled KD (DKD, Zhao et al. CVPR 2022) and DIST (Huang et al. NeurIPS 2022).

kdexp's key meanings hold here too: `temperature` softens every soft-target term, `alpha`
weighs the KD-like term, `beta` the method's own extra term, `w_ce` the CE on labels
(null -> 1 - alpha). Each config's defaults are its paper's.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from kdexp.losses import dist_terms, dkd_terms, logit_mse_loss
from kdexp.methods.base import (LogitMethod, MethodConfig, Requirements, SofteningConfig, UNLABELED, check_warmup,
                                register_method, warmup_ramp, warmup_warnings)


@dataclass
class LogitMSEConfig(MethodConfig):
    name: str = "logit_mse"
    alpha: float = 1.0  # the paper trains on the teacher's logits alone: w_ce null -> 1 - alpha = 0


@register_method("logit_mse", config=LogitMSEConfig)
class LogitMSE(LogitMethod):
    """Ba & Caruana 2014: the teacher's logits, regressed (MSE)

    Ba & Caruana 2014, "Do deep nets really need to be deep?": the student regresses the
    teacher's logits, alpha * 1/2 * sum_c (s_c - t_c)^2 (batch mean) + w_ce * CE. The paper uses
    no labels (alpha=1, w_ce=0). Temperature is accepted and ignored: logits are not softened."""
    requires = Requirements(fusable=True, ignores=("temperature", "beta"))
    term_weights = {"ce": "w_ce", "mse": "alpha"}

    def logit_terms(self, s, t, y, hp):
        return {"ce": self.ce_term(s, y, hp), "mse": hp["alpha"] * logit_mse_loss(s, t)}


@dataclass
class DKDConfig(SofteningConfig):
    name: str = "dkd"
    temperature: float = 4.0
    alpha: float = 1.0  # weight of TCKD (target vs. non-target), the KD-like part
    beta: float = 8.0  # weight of NCKD (among the non-target classes)
    w_ce: Optional[float] = 1.0
    warmup_epochs: int = 20  # the DKD terms' weight ramps as min(epoch / warmup_epochs, 1), epoch from 1; 0: off


@register_method("dkd", config=DKDConfig)
class DKD(LogitMethod):
    """Zhao et al. CVPR 2022: the teacher's target and non-target class outputs, decoupled (KL)

    Decoupled KD (Zhao et al. CVPR 2022, arXiv 2203.08679):
    w_ce * CE + min(epoch / warmup, 1) * (alpha * TCKD + beta * NCKD), both T^2-scaled KL
    computed in log space (`kdexp.losses.dkd_terms`). Defaults are the paper's CIFAR-100 ones
    (T=4, alpha=1, beta=8, 20 warm-up epochs, counted from 1 as in the authors' code).

    With a transfer set (dataset.label_fraction < 1) the target class of an unlabeled sample
    is the teacher's top class. With 2 classes NCKD is identically 0 and a warning says so."""
    requires = Requirements(fusable=True)
    term_weights = {"ce": "w_ce", "tckd": "alpha", "nckd": "beta"}

    def __init__(self, cfg, student, teacher=None):
        super().__init__(cfg, student, teacher)
        check_warmup(cfg)

    @classmethod
    def config_warnings(cls, cfg):
        return warmup_warnings(cfg, "the DKD terms")

    def warmup_factor(self) -> float:
        return warmup_ramp(self.epoch, self.cfg.warmup_epochs)

    def logit_terms(self, s, t, y, hp):
        target = torch.where(y == UNLABELED, t.argmax(-1), y)
        tckd, nckd = dkd_terms(*self.soft_inputs(s, t), target, hp["temperature"])
        ramp = self.warmup_factor()
        return {"ce": self.ce_term(s, y, hp), "tckd": ramp * hp["alpha"] * tckd, "nckd": ramp * hp["beta"] * nckd}


@dataclass
class DISTConfig(SofteningConfig):
    name: str = "dist"
    temperature: float = 1.0
    alpha: float = 1.0  # weight of the inter-class relation (per sample; the paper's beta)
    beta: float = 1.0  # weight of the intra-class relation (per class over the batch; the paper's gamma)
    w_ce: Optional[float] = 1.0


@register_method("dist", config=DISTConfig)
class DIST(LogitMethod):
    """Huang et al. NeurIPS 2022: the teacher's inter- and intra-class output relations (Pearson)

    DIST (Huang et al. NeurIPS 2022, arXiv 2205.10536): match relations instead of exact
    probabilities, w_ce * CE + alpha * T^2 (1 - pearson per sample) + beta * T^2 (1 - pearson
    per class over the batch) on softmax(logits / T). Defaults: the paper's ImageNet setting
    (T=1, both weights 1, CE weight 1). `alpha` is the paper's beta and `beta` its gamma, so
    that alpha keeps weighing the per-sample (KD-like) term as in every kdexp method."""
    requires = Requirements(fusable=True)
    term_weights = {"ce": "w_ce", "inter": "alpha", "intra": "beta"}

    def logit_terms(self, s, t, y, hp):
        inter, intra = dist_terms(*self.soft_inputs(s, t), hp["temperature"])
        return {"ce": self.ce_term(s, y, hp), "inter": hp["alpha"] * inter, "intra": hp["beta"] * intra}
