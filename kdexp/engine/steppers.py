"""Steppers: what one step of the fit loop computes for one kind of training.

A stepper has `param_groups(optim_cfg)`, `train(mode)`, `at(epoch, progress)` (the training
position before a step), `losses(batch) -> terms`, `total(terms) -> loss` (what is minimized),
`check(loss, terms, where) -> loss` (non-finite losses), `logged(loss, terms)` (the values
summed into the epoch's train/* means), `take_teacher_seconds()`, `epoch_metrics(sums, timing,
lr, accel)` and `state_dict()` (and `load_state_dict()` when it can resume: a fused group never
does, its runs with a checkpoint run separately).

- `MethodStepper`: a method's step (students and teachers alike): its weighted loss terms.
- `StageStepper`: a method's first stage (kdexp.methods.base.Stage): one loss, no evaluation.
- `kdexp.engine.fused.FusedStepper`: N students under vmap.
"""
from typing import Dict

import torch

from kdexp.engine.evaluate import validation_metrics
from kdexp.engine.teacher_cache import take_fill_seconds
from kdexp.errors import KdexpError


class DivergedError(KdexpError):
    pass


_METRIC: Dict[str, str] = {}  # loss term -> its metric name


class MethodStepper:
    """One method's training step: the sum of `method.losses(batch)`, each term logged as
    train/loss_<name>; evaluated on the validation set after every epoch."""

    def __init__(self, method, data, eval_batch_size: int = 1024, desc: str = "student"):
        self.method, self.data, self.eval_batch_size, self.desc = method, data, eval_batch_size, desc

    def param_groups(self, optim_cfg):
        return self.method.param_groups(optim_cfg)

    def train(self, mode: bool) -> None:
        self.method.train(mode)

    def at(self, epoch: int, progress: float) -> None:
        self.method.epoch, self.method.progress = epoch, progress

    def losses(self, batch) -> Dict[str, torch.Tensor]:
        return self.method.losses(batch)

    def total(self, terms: Dict[str, torch.Tensor]) -> torch.Tensor:
        loss = None
        for v in terms.values():  # from the first term: sum() would start from 0, one more add per step
            loss = v if loss is None else loss + v
        return loss

    def check(self, loss: torch.Tensor, terms: Dict[str, torch.Tensor], where: str) -> torch.Tensor:
        if not torch.isfinite(loss):
            bad = [k for k, v in terms.items() if not torch.isfinite(v)]
            raise DivergedError(f"{self.desc}: loss is {loss.item()} at {where} (non-finite term(s): {bad}); "
                                f"lower the learning rate or check the inputs")
        return loss

    def logged(self, loss: torch.Tensor, terms: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        out = {"train/loss": loss}
        for k, v in terms.items():
            out[_METRIC.get(k) or _METRIC.setdefault(k, f"train/loss_{k}")] = v  # names built once, not every step
        return out

    def take_teacher_seconds(self):
        return take_fill_seconds(self.method.teacher)

    def epoch_metrics(self, sums: dict, timing: dict, lr: float, accel) -> dict:
        val = validation_metrics(self.method, self.data, accel, self.eval_batch_size)
        n = len(self.data.x_train)
        return {**sums, **val, "lr": lr, "time/epoch_s": timing["time/epoch_s"],
                "time/samples_per_s": n / timing["time/epoch_s"], "time/epoch_cpu_s": timing["time/epoch_cpu_s"]}

    def state_dict(self) -> dict:
        return self.method.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.method.load_state_dict(state)


class StageStepper(MethodStepper):
    """A method's first stage: `stage.params` on `stage.loss(batch)` alone (labels unused), the
    method in training mode; no validation (the stage trains parts, not the deployed student)."""

    def __init__(self, method, stage, data, hint: str):
        super().__init__(method, data, desc=f"{method.cfg.name} {stage.name}")
        self.stage, self.hint = stage, hint

    def param_groups(self, optim_cfg):
        return [{"params": [p for p in self.stage.params if p.requires_grad]}]

    def losses(self, batch) -> Dict[str, torch.Tensor]:
        return {"stage": self.stage.loss(batch)}

    def check(self, loss, terms, where):
        if not torch.isfinite(loss):
            raise DivergedError(f"{self.desc}: loss is {loss.item()} at {where}; {self.hint}")
        return loss

    def logged(self, loss, terms):
        return {"train/loss": loss}

    def epoch_metrics(self, sums: dict, timing: dict, lr: float, accel) -> dict:
        return {**sums, "lr": lr, **timing}
