"""Jacobian matching (Srinivas & Fleuret ICML 2018): the student matches the teacher's input
gradients as well as its outputs."""
from dataclasses import dataclass

import torch

from kdexp.errors import ConfigError
from kdexp.losses import jacobian_loss, kd_loss
from kdexp.methods.base import Method, Requirements, SofteningConfig, register_method, UNLABELED


@dataclass
class JacobianConfig(SofteningConfig):
    name: str = "jacobian"
    alpha: float = 0.9  # KD, as method=kd: Jacobian matching is added to distillation
    beta: float = 1.0  # weight of the Jacobian term


def teacher_input_gradient(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Gradient of the frozen teacher's logit of class y w.r.t. its input (its parameters need
    no gradient) -> (teacher logits, gradient (B, ...)). y == UNLABELED (a transfer-set sample)
    takes the teacher's predicted class."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x)
        y = torch.where(y == UNLABELED, logits.argmax(1), y)
        (grad,) = torch.autograd.grad(logits.gather(1, y.unsqueeze(1)).sum(), x)
    return logits.detach(), grad, y


@register_method("jacobian", config=JacobianConfig)
class Jacobian(Method):
    """Srinivas & Fleuret ICML 2018: KD plus the teacher's input gradients (Jacobian matching)

    w_ce * CE + alpha * KD + beta * || J_s/||J_s|| - J_t/||J_t|| ||^2, where J is the gradient
    of the true-class logit w.r.t. the input, per sample (the paper's cheap variant: one output
    instead of the full Jacobian). The student's gradient is built with create_graph=True, so
    its training step backpropagates through it (double backward); the teacher's is computed
    w.r.t. the input only. With BatchNorm in training mode the student's gradient of a sample
    also carries the (small) batch-statistics coupling to the others."""
    requires = Requirements(cacheable=False)

    def __init__(self, cfg, student, teacher=None):
        super().__init__(cfg, student, teacher)
        if not (self.w_ce or cfg.alpha or cfg.beta):
            raise ConfigError("method=jacobian: method.w_ce, method.alpha and method.beta are all 0; nothing to train")

    def losses(self, batch):
        cfg = self.cfg
        t_logits, g_t, y = teacher_input_gradient(self.teacher.model, batch.x, batch.y)
        x = batch.x.detach().requires_grad_(cfg.beta > 0)
        s_logits = self.student(x)
        terms = self.ce(s_logits, batch.y)
        if cfg.alpha:
            terms["kd"] = cfg.alpha * kd_loss(*self.soft_inputs(s_logits, t_logits), cfg.temperature)
        if cfg.beta:
            (g_s,) = torch.autograd.grad(s_logits.gather(1, y.unsqueeze(1)).sum(), x, create_graph=True)
            terms["jacobian"] = cfg.beta * jacobian_loss(g_s, g_t)
        return terms
