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
    # dataset.label_fraction < 1: True where the sample keeps its label; the others carry
    # y == UNLABELED and only feed label-free (teacher/peer-driven) terms. None: all labeled.
    labeled: Optional[torch.Tensor] = None
    # Name of the deterministic view the inputs come from ("train": data.x_train[idx], set by the
    # fit loop). The teacher-output cache (kdexp.engine.teacher_cache) serves cached outputs only
    # for a named view it holds; None (a Batch a method builds itself) always runs the teacher.
    view: Optional[str] = None
    # Domain shift (conf/domain): the target view of the same samples (x is then the source view),
    # set by the fit loop for methods with train_view = "paired"; None otherwise.
    x_target: Optional[torch.Tensor] = None


UNLABELED = -1  # the label of a transfer-set sample without one (Batch.y)


class Method(nn.Module, abc.ABC):
    uses_teacher: bool = True  # False: the runner never builds or trains a teacher
    # True: the teacher is the student's architecture (arch + args) trained with the student's
    # recipe and teacher.seed, trained and cached like any teacher (Tf-KD self; see
    # kdexp.engine.teacher.student_teacher_config).
    teacher_from_student: bool = False
    # False: every term needs labels, so with dataset.label_fraction < 1 the fit loop draws this
    # method's batches from the labeled samples only (same number of steps per epoch as the others).
    uses_unlabeled: bool = True
    epoch: int = 0  # 0-based index of the epoch being trained; set by the fit loop (warm-ups)
    # False: the runner never wraps the teacher in the teacher-output cache (teacher.cache), e.g. a
    # method that needs the teacher's gradient w.r.t. its inputs or feeds it other inputs than batch.x.
    teacher_cacheable: bool = True
    # With a domain shift (conf/domain): the view the method trains on. "source" / "target": batch.x
    # is that view (domain.train_view overrides); "paired": batch.x is the source view and
    # batch.x_target the target view of the same samples (the method needs a domain set).
    train_view: str = "source"
    # False: the method takes the teacher's weights, not its outputs as per-class targets, so the
    # teacher may be pretrained on other classes (teacher.classes; finetune, progressive).
    teacher_outputs: bool = True
    progress: float = 0.0  # fraction of training done before this step, in [0, 1); set by the fit loop

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

    def extra_metrics(self, data) -> Dict[str, float]:
        """Metrics of the method's own, computed after each epoch's evaluation and logged with the
        epoch's metrics (e.g. the accuracy of an auxiliary task's head). Default: none."""
        return {}

    @abc.abstractmethod
    def losses(self, batch: Batch) -> Dict[str, torch.Tensor]:
        """Weighted loss terms of one training batch, by name; their sum is minimized."""

    def ce(self, student_logits: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The weighted CE-on-labels term, omitted when its weight is 0. Samples without a label
        (y == UNLABELED, see dataset.label_fraction) are left out: the mean runs over the labeled
        samples of the batch, and the term is 0 when the batch has none."""
        if not self.w_ce:
            return {}
        n = (y != UNLABELED).sum().clamp_min(1)
        return {"ce": self.w_ce * F.cross_entropy(student_logits, y, ignore_index=UNLABELED, reduction="sum") / n}


from kdexp.methods import logit  # noqa: E402,F401  (register the methods)
from kdexp.methods import logit_match, teacher_free, mutual, ensemble  # noqa: E402,F401  (issue 4)
from kdexp.methods import feature, relation, gradient  # noqa: E402,F401  (issue 5: feature/relation methods)
from kdexp.methods import transfer, domain  # noqa: E402,F401  (issue 6: transfer learning, domain adaptation)
