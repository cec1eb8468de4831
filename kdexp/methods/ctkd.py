"""Curriculum Temperature for KD (CTKD, Li et al. AAAI 2023, arXiv 2211.16231): KD or DKD whose
temperature is learned adversarially. The temperature is a method-owned parameter behind a
gradient reversal layer, so the same optimizer step that lowers the student's distillation loss
moves the temperature to raise it; the reversal weight lambda ramps up on a cosine curriculum
(easy to hard). Defaults are the authors' CIFAR-100 ones (zhengli97/CTKD, scripts/run_cifar_distill.sh).
"""
import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn

from kdexp.errors import ConfigError
from kdexp.losses import ctkd_lambda, curriculum_temperature, dkd_terms, kd_loss
from kdexp.methods.base import (Method, Requirements, SofteningConfig, UNLABELED, check_warmup, register_method,
                                warmup_ramp, warmup_warnings)

BASES = ("kd", "dkd")


@dataclass
class CTKDConfig(SofteningConfig):
    name: str = "ctkd"
    base: str = "kd"  # kd | dkd: the distillation loss the learned temperature softens
    alpha: float = 0.9  # weight of the distillation term (KD, or DKD's dkd_alpha * TCKD + dkd_beta * NCKD)
    # w_ce null -> 1 - alpha: the authors' KD recipe is 0.1 CE + 0.9 KD; their DKD one is w_ce=1, alpha=1
    w_ce: Optional[float] = None
    # T = temperature_min + temperature_span * sigmoid(theta), theta learned from temperature_logit:
    # T in (1, 21), T0 = 1 + 20 sigmoid(1) = 15.6 (the authors' t_start, t_end, Global_T's init)
    temperature_min: float = 1.0
    temperature_span: float = 20.0
    temperature_logit: float = 1.0
    # reversal weight: cosine ramp lambda_min -> lambda_max over lambda_epochs epochs, then held
    # (the authors' decay_max 0, decay_min -1, decay_loops 10 on CIFAR; 5 on ImageNet)
    lambda_min: float = 0.0
    lambda_max: float = 1.0
    lambda_epochs: int = 10
    # base=dkd: TCKD and NCKD weights (the CTKD authors' CIFAR script: 1 and 2) and DKD's linear
    # warm-up (their code has none: 0 = off; DKD's own paper uses 20)
    dkd_alpha: float = 1.0
    dkd_beta: float = 2.0
    warmup_epochs: int = 0


class LearnedTemperature(nn.Module):
    """CTKD's global temperature: one learned scalar theta, T = t_min + t_span * sigmoid(theta),
    read through a gradient reversal of weight lambda (`kdexp.losses.curriculum_temperature`)."""

    def __init__(self, t_min: float, t_span: float, init_logit: float):
        super().__init__()
        self.t_min, self.t_span = float(t_min), float(t_span)
        self.theta = nn.Parameter(torch.tensor(float(init_logit)))

    def forward(self, lambd: float) -> torch.Tensor:
        return curriculum_temperature(self.theta, lambd, self.t_min, self.t_span)

    def value(self) -> float:
        return self.t_min + self.t_span * torch.sigmoid(self.theta.detach()).item()


def _check(cfg) -> None:
    if cfg.base not in BASES:
        raise ConfigError(f"method.base={cfg.base!r} is out of range: one of {', '.join(BASES)} (the loss CTKD's "
                          f"learned temperature softens)")
    checks = (("temperature_min", cfg.temperature_min > 0, "must be > 0"),
              ("temperature_span", cfg.temperature_span > 0, "must be > 0"),
              ("temperature_logit", math.isfinite(cfg.temperature_logit), "must be finite"),
              ("lambda_min", cfg.lambda_min >= 0, "must be >= 0"),
              ("lambda_max", cfg.lambda_max >= cfg.lambda_min, f"must be >= method.lambda_min ({cfg.lambda_min})"),
              ("lambda_epochs", cfg.lambda_epochs >= 0, "must be >= 0 (0: lambda_max from the start)"),
              ("dkd_alpha", cfg.dkd_alpha >= 0, "must be >= 0"), ("dkd_beta", cfg.dkd_beta >= 0, "must be >= 0"))
    for key, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"method.{key}={getattr(cfg, key)!r} is out of range: {allowed}")
    check_warmup(cfg)


@register_method("ctkd", config=CTKDConfig)
class CTKD(Method):
    """Li et al. AAAI 2023: KD or DKD at a temperature learned adversarially (curriculum temperature)

    CTKD on top of KD or DKD (`method.base`):
    w_ce * CE + alpha * KD(T)  or  w_ce * CE + alpha * warm-up * (dkd_alpha * TCKD(T) + dkd_beta * NCKD(T)),
    T = temperature_min + temperature_span * sigmoid(theta) learned by the student's optimizer with
    theta's gradient reversed and scaled by lambda = ctkd_lambda(epoch) (epochs counted from 1).
    The losses are `kdexp.losses.kd_loss` / `dkd_terms` with the learned T; method.logit_standardize
    z-scores both logits first. The temperature is logged per epoch as ctkd/temperature (and the
    epoch's lambda as ctkd/lambda). Global temperature only: the authors' instance-wise variant
    (an MLP predicting T per sample) is not implemented.

    Conventions vs the authors' code: theta is a 0-dim parameter (theirs has shape (1,)); it is
    in method.parameters(), so the student's optimizer (with its weight decay, as theirs) trains
    it and checkpoints keep it. method.temperature and method.beta are not read."""
    requires = Requirements(ignores=("temperature", "beta"))

    def __init__(self, cfg, student, teacher=None):
        super().__init__(cfg, student, teacher)
        _check(cfg)
        self.temperature = LearnedTemperature(cfg.temperature_min, cfg.temperature_span, cfg.temperature_logit)
        self.alpha = float(cfg.alpha)

    @classmethod
    def config_warnings(cls, cfg):
        out = warmup_warnings(cfg, "the DKD terms") if cfg.method.base == "dkd" else []
        if cfg.method.base == "dkd" and cfg.method.w_ce is None:
            out.append(f"method=ctkd method.base=dkd with method.w_ce=null trains {1 - cfg.method.alpha:g} * CE: the "
                       f"authors' DKD recipe is method.w_ce=1 method.alpha=1 (CE at full weight)")
        return out

    def reversal_weight(self) -> float:
        c = self.cfg
        return ctkd_lambda(self.epoch + 1, c.lambda_min, c.lambda_max, c.lambda_epochs)

    def losses(self, batch):
        s = self.student(batch.x)
        terms = self.ce(s, batch.y)
        if not self.alpha:
            return terms
        t = self.teacher.logits(batch)
        temp = self.temperature(self.reversal_weight())
        s_soft, t_soft = self.soft_inputs(s, t)
        if self.cfg.base == "kd":
            terms["kd"] = self.alpha * kd_loss(s_soft, t_soft, temp)
            return terms
        target = torch.where(batch.y == UNLABELED, t.argmax(-1), batch.y)  # unlabeled: the teacher's top class
        tckd, nckd = dkd_terms(s_soft, t_soft, target, temp)
        weight = self.alpha * warmup_ramp(self.epoch, self.cfg.warmup_epochs)
        if self.cfg.dkd_alpha:
            terms["tckd"] = weight * self.cfg.dkd_alpha * tckd
        if self.cfg.dkd_beta:
            terms["nckd"] = weight * self.cfg.dkd_beta * nckd
        return terms

    def extra_metrics(self, data) -> Dict[str, float]:
        return {"ctkd/temperature": self.temperature.value(), "ctkd/lambda": self.reversal_weight()}
