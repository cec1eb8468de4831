"""Distillation/transfer methods, registered by name (= the conf/method option name).

A method is an nn.Module that owns the student (and any trainable parts of its own:
regressors, discriminators), so `method.parameters()` is exactly what the optimizer
trains. The frozen teacher is held outside the module tree. `losses(batch)` returns the
weighted loss terms by name; the engine sums them and logs each as train/loss_<name>.
"""
import abc
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdexp.registry import Registry

METHODS = Registry("method")
list_methods = METHODS.names


def register_method(name: str, config):
    """Register a Method subclass under `name` with its config dataclass (a MethodConfig)."""
    return METHODS.register(name, config=config)


def get_method(name: str):
    return METHODS.get(name)


@dataclass
class Batch:
    x: torch.Tensor  # inputs (B, ...)
    y: torch.Tensor  # labels (B,)
    idx: torch.Tensor  # positions of the samples in the training set (B,), for caches and memory banks


class Method(nn.Module, abc.ABC):
    uses_teacher: bool = True  # False: the runner never builds or trains a teacher

    def __init__(self, cfg, student: nn.Module, teacher: Optional["object"] = None):
        super().__init__()
        self.cfg = cfg
        self.student = student
        # The teacher is frozen and must stay out of parameters()/state_dict(): keep it
        # off the module tree.
        object.__setattr__(self, "teacher", teacher)
        self.w_ce = (1.0 - cfg.alpha) if cfg.w_ce is None else cfg.w_ce

    def param_groups(self, optim_cfg) -> List[dict]:
        """Optimizer parameter groups. Override to give a method-owned part (a discriminator,
        say) its own lr/weight_decay: return [{"params": [...]}, {"params": [...], "lr": ...}].
        Every trainable parameter of the module must be in exactly one group."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def prepare(self, data, device) -> None:
        """Runs once before the fit loop: pre-training stages (a hint stage, a paraphraser,
        an initialization) go here. Default: nothing."""

    def eval_models(self) -> Dict[str, nn.Module]:
        """Models evaluated every epoch besides the student, logged as val/acc_<name>
        (e.g. the other peers of mutual learning). Default: none."""
        return {}

    @abc.abstractmethod
    def losses(self, batch: Batch) -> Dict[str, torch.Tensor]:
        """Weighted loss terms of one training batch, by name; their sum is minimized."""

    def ce(self, student_logits: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The weighted CE-on-labels term, omitted when its weight is 0."""
        return {"ce": self.w_ce * F.cross_entropy(student_logits, y)} if self.w_ce else {}


from kdexp.methods import logit  # noqa: E402,F401  (register the methods)
