"""MEAL V2 (Shen & Savvides 2020, arXiv 2009.08453): a student distilled from the averaged
softmax of a teacher ensemble, without hard labels, plus a small discriminator on the outputs
trained adversarially. The ensemble itself comes from the teacher provider (`teachers=[...]`,
see kdexp.engine.teacher); any teacher-based method accepts it."""
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn

from kdexp.errors import ConfigError
from kdexp.losses import discriminator_loss, gradient_reversal, kd_loss, soften
from kdexp.methods.base import Method, MethodConfig, register_method


def output_discriminator(num_classes: int, hidden: int) -> nn.Module:
    """A small MLP on a probability vector -> one real/fake logit."""
    return nn.Sequential(nn.Linear(num_classes, hidden), nn.LeakyReLU(0.2),
                         nn.Linear(hidden, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))


def classifier_width(model: nn.Module) -> int:
    """Number of logits of a classifier: out_features of its last nn.Linear (in module order)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("meal_v2 sizes its discriminator from the student's last nn.Linear layer; "
                          f"this student ({type(model).__name__}) has none")
    return linears[-1].out_features


@dataclass
class MEALV2Config(MethodConfig):
    name: str = "meal_v2"
    temperature: float = 1.0  # soft labels at T=1, as in the paper
    alpha: float = 1.0  # weight of the KL to the ensemble's soft labels
    w_ce: Optional[float] = 0.0  # MEAL V2 uses no hard labels
    beta: float = 1.0  # weight of the adversarial (discriminator) term
    disc_hidden: int = 64  # width of the discriminator's two hidden layers
    disc_lr: float = 1e-4  # the discriminator's own learning rate (the paper's d_lr)
    disc_weight_decay: float = 0.0


@register_method("meal_v2", config=MEALV2Config)
class MEALV2(Method):
    """Shen & Savvides 2020: a teacher ensemble's averaged outputs (KL) and a discriminator

    alpha * T^2 * KL(p_ens^T || p_s^T) + beta * adversarial term (+ w_ce * CE, 0 by default).

    p_ens is the teacher's output: with `teachers=[a,b,c]` the average of the members' softmax
    outputs (a single teacher works too). The discriminator D sees probability vectors,
    softmax(t/T) of the ensemble as real and softmax(s/T) of the student as fake, and minimizes
    the binary cross-entropy `discriminator_loss`. The student gets the opposite gradient
    through a gradient reversal layer on its input to D: one backward pass gives D the
    gradient that lowers its loss and the student the gradient that raises it (the minimax
    game), so a single optimizer step trains both without a second forward pass. D's
    parameters form their own optimizer group (disc_lr, disc_weight_decay).

    Deliberate differences from the authors' code: it feeds D the raw logits (the teachers'
    averaged logits as real) and adds D's loss to the student's without reversal, so there
    the student helps D instead of fooling it; here D sees probabilities (what is being
    matched) and the game is adversarial, as the paper describes."""

    def __init__(self, cfg, student, teacher=None):
        super().__init__(cfg, student, teacher)
        if cfg.disc_hidden < 1 or cfg.disc_lr <= 0 or cfg.disc_weight_decay < 0:
            raise ConfigError(f"meal_v2: method.disc_hidden={cfg.disc_hidden} must be >= 1, method.disc_lr="
                              f"{cfg.disc_lr} > 0 and method.disc_weight_decay={cfg.disc_weight_decay} >= 0")
        self.num_classes = classifier_width(student)
        self.discriminator = output_discriminator(self.num_classes, cfg.disc_hidden)

    def param_groups(self, optim_cfg) -> List[dict]:
        d_ids = {id(p) for p in self.discriminator.parameters()}
        return [{"params": [p for p in self.parameters() if p.requires_grad and id(p) not in d_ids]},
                {"params": list(self.discriminator.parameters()), "lr": self.cfg.disc_lr,
                 "weight_decay": self.cfg.disc_weight_decay}]

    def losses(self, batch):
        s = self.student(batch.x)
        t = self.teacher.logits(batch)
        if s.shape[-1] != self.num_classes:
            raise ConfigError(f"meal_v2: the student outputs {s.shape[-1]} logits but its last linear layer has "
                              f"{self.num_classes} outputs; the discriminator's input size is taken from it")
        T = self.cfg.temperature
        terms = self.ce(s, batch.y)
        if self.cfg.alpha:
            terms["kd"] = self.cfg.alpha * kd_loss(s, t, T)
        if self.cfg.beta:
            real = self.discriminator(soften(t, T).exp())
            fake = self.discriminator(gradient_reversal(soften(s, T).exp()))
            terms["adv"] = self.cfg.beta * discriminator_loss(real, fake)
        return terms
