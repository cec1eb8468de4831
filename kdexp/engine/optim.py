"""Optimizer and LR schedule from an OptimConfig."""
import torch

from kdexp.engine.dot import DOT
from kdexp.engine.optimizers import SGD, Adam


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    """`params`: parameters or parameter groups (dicts; a group may set its own lr/weight_decay).
    dot: kdexp.engine.dot.DOT (momentum beta = cfg.momentum, cfg.delta); the fit loop then
    backwards the task and the distillation terms separately."""
    params = list(params)
    if cfg.name == "dot":
        return DOT(params, lr=cfg.lr, momentum=cfg.momentum, delta=cfg.delta, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    return Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, decoupled=cfg.name == "adamw")


def build_scheduler(optimizer, cfg, epochs: int, steps_per_epoch: int = 1):
    """Stepped once per epoch. none | cosine (to 0 over `epochs`) | step (x gamma at milestones)
    | dann: Ganin & Lempitsky's annealing lr0 / (1 + 10 p)^0.75 with p the training progress
    0 -> 1, stepped after every optimizer step (the scheduler's `per_step` is True)."""
    if cfg.schedule == "dann":
        total = max(1, epochs * steps_per_epoch)
        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: (1.0 + 10.0 * i / total) ** -0.75)
        sched.per_step = True
        return sched
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.milestones), gamma=cfg.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
