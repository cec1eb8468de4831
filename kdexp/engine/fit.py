"""The fit loop shared by students and teachers: in-memory tensors batched by slicing a
seeded permutation, evaluation every epoch, per-epoch metrics to a callback."""
import math
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from kdexp.data import Data
from kdexp.engine.hardware import CPU, Accelerator
from kdexp.engine.optim import build_optimizer, build_scheduler
from kdexp.engine.teacher_cache import register_view, take_fill_seconds
from kdexp.errors import KdexpError
from kdexp.methods import UNLABELED, Batch, Method


class DivergedError(KdexpError):
    pass


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> Dict[str, float]:
    """Accuracy and mean CE of `model` on (x, y), in eval mode; restores the previous mode."""
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(x), batch_size):
        logits = model(x[i:i + batch_size])
        yb = y[i:i + batch_size]
        correct += (logits.argmax(-1) == yb).sum().item()
        loss += F.cross_entropy(logits, yb, reduction="sum").item()
    model.train(was_training)
    return {"acc": correct / len(x), "loss": loss / len(x)}


def make_batch(data: Data, idx: torch.Tensor, views: Optional["EpochViews"] = None) -> Batch:
    """The training batch at positions `idx` of this epoch's inputs `views` (epoch_views; default:
    data.x_train itself); with a transfer set (data.labeled), samples without a label get
    y = UNLABELED so that no label-driven term can use them by accident."""
    views = views or epoch_views(data, None, 0, None)
    y = data.y_train.index_select(0, idx)  # index_select: several times faster than x[idx] for image batches
    x = views.x.index_select(0, idx)
    view = views.name  # the key of the teacher-output cache (kdexp.engine.teacher_cache)
    x_target = views.x_target.index_select(0, idx) if views.x_target is not None else None
    if data.labeled is None:
        return Batch(x, y, idx, view=view, x_target=x_target)
    labeled = data.labeled[idx]
    return Batch(x, y.masked_fill(~labeled, UNLABELED), idx, labeled, view=view, x_target=x_target)


@dataclass
class EpochViews:
    """One epoch's training inputs: data.x_train (and its target view), or an augmentation draw of them."""
    x: object  # a tensor or a kdexp.data.augment.AugmentedView
    x_target: object
    name: str  # the teacher-output cache's key: "train", or "train@aug<draw>" for an augmentation draw


def epoch_views(data: Data, augment, epoch: int, method: Method) -> EpochViews:
    """The epoch's inputs: data.x_train itself without augmentation, else the epoch's draw. With
    dataset.augment_views=K the K draws are registered as views of the teacher-output cache (so
    its outputs are cached per draw); fresh per-epoch draws are not, and the teacher runs online."""
    x_target, name = getattr(data, "x_train_target", None), getattr(data, "view", "train")
    if augment is None:
        return EpochViews(data.x_train, x_target, name)
    draw = augment.draw_of_epoch(epoch)
    views = EpochViews(augment.view(data.x_train, draw), None if x_target is None else augment.view(x_target, draw),
                       f"{name}@aug{draw}")
    if augment.views:
        register_view(method, views.name, views.x)
    return views


def epoch_batches(data: Data, method: Method, batch_size: int, steps: int, gen: torch.Generator) -> List[torch.Tensor]:
    """One epoch's `steps` index batches: slices of a seeded permutation of the training set. With
    a transfer set (dataset.label_fraction < 1) a method that only learns from labels
    (uses_unlabeled=False, e.g. ce) draws from the labeled samples alone, pass after pass, for
    the same number of steps as the others (equal step budgets), in batches of
    min(batch_size, number of labeled samples)."""
    device = data.x_train.device
    if data.labeled is None or method.uses_unlabeled:
        perm = torch.randperm(len(data.x_train), generator=gen).to(device)
        return [perm[i * batch_size:(i + 1) * batch_size] for i in range(steps)]
    pool = data.labeled.nonzero().squeeze(1).cpu()
    size = min(batch_size, len(pool))
    batches: List[torch.Tensor] = []
    while len(batches) < steps:
        perm = pool[torch.randperm(len(pool), generator=gen)]
        batches += [perm[i:i + size].to(device) for i in range(0, len(pool), size)]
    return batches[:steps]


def fit(method: Method, data: Data, *, optim_cfg, epochs: int, batch_size: int, seed: int,
        eval_batch_size: int = 1024, on_epoch: Optional[Callable[[int, Dict[str, float], dict], None]] = None,
        state: Optional[dict] = None, progress: bool = False, desc: str = "train",
        accel: Optional[Accelerator] = None) -> List[Dict[str, float]]:
    """Train `method.parameters()` for `epochs` epochs; returns the per-epoch metrics.

    Batch order comes from a generator seeded with `seed` alone, so it does not depend on
    what ran before in the process (e.g. whether a teacher was trained or loaded).
    `state` (from a checkpoint) resumes after its last finished epoch; `on_epoch(epoch,
    metrics, state)` gets the state to save after every epoch. `accel` (kdexp.engine.hardware)
    adds AMP, DDP sharding/all-reduce and GPU-friendly syncs; the default is the plain CPU loop.
    The one-off pass of a teacher-output cache is left out of `time/epoch_s` (teacher time).
    """
    accel = accel or CPU
    n = len(data.x_train)
    steps = math.ceil(n / batch_size)
    optimizer = build_optimizer(method.param_groups(optim_cfg), optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, epochs, steps)
    per_step = getattr(scheduler, "per_step", False)  # e.g. DANN's annealing: stepped every step
    gen = torch.Generator().manual_seed(seed)
    augment = getattr(data, "augment", None)
    if augment is not None:  # draws derive from this fit's seed: the same views on resume
        augment = replace(augment, seed=seed)
    history: List[Dict[str, float]] = []
    start = 0
    if state is not None:
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        accel.load_state_dict(state.get("accel", {}))
        history, start = list(state["history"]), state["epoch"]
    show = progress and sys.stdout.isatty()
    accel.dist.barrier()  # DDP: start the clock together (e.g. after one rank trained the teacher)
    method.train()
    for epoch in range(start, epochs):
        method.epoch = epoch
        t0, c0 = time.perf_counter(), time.process_time()
        batches = epoch_batches(data, method, batch_size, steps, gen)
        views = epoch_views(data, augment, epoch, method)
        total = sum(len(idx) for idx in batches)
        sums: Dict[str, float] = {}
        bar = tqdm(range(steps), desc=f"{desc} {epoch + 1}/{epochs}", leave=False, disable=not show)
        for step in bar:
            global_idx = batches[step]
            idx = accel.dist.shard(global_idx)  # DDP: this rank's part of the global batch
            share = len(idx) / len(global_idx)
            method.progress = (epoch * steps + step) / (epochs * steps)
            optimizer.zero_grad(set_to_none=True)
            terms, loss = {}, None
            if len(idx):
                with accel.autocast():
                    terms = method.losses(make_batch(data, idx, views))
                    loss = sum(terms.values())
                if (step + 1) % accel.sync_every == 0 or step + 1 == steps:
                    if not torch.isfinite(loss):
                        bad = [k for k, v in terms.items() if not torch.isfinite(v)]
                        at = f"step {step + 1}" if accel.sync_every == 1 else f"step {step + 1} or before"
                        raise DivergedError(f"{desc}: loss is {loss.item()} at epoch {epoch + 1}, {at} "
                                            f"(non-finite term(s): {bad}); lower the learning rate or check the inputs")
                accel.backward(loss)
            accel.reduce_gradients(optimizer, share)
            accel.step(optimizer)
            if per_step:
                scheduler.step()
            w = len(global_idx) / total * share  # epoch means weighted by batch size
            if loss is not None:
                sums["train/loss"] = sums.get("train/loss", 0.0) + accel.scalar(loss) * w
                for k, v in terms.items():
                    sums[f"train/loss_{k}"] = sums.get(f"train/loss_{k}", 0.0) + accel.scalar(v) * w
            if show and step % 10 == 0 and loss is not None:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        if not per_step:
            scheduler.step()
        sums = accel.reduce_sums(sums)
        fill_s, fill_cpu_s = take_fill_seconds(method)
        train_s = time.perf_counter() - t0 - fill_s
        cpu_s = time.process_time() - c0 - fill_cpu_s  # CPU time of this process: robust on shared machines
        # with a domain shift val/acc is the target view's; val/acc_source and val/acc_target both
        x_val = data.x_val if getattr(data, "x_val_target", None) is None else data.x_val_target
        val = accel.evaluate(method.student, x_val, data.y_val, eval_batch_size)
        if x_val is not data.x_val:
            sums["val/acc_source"] = accel.evaluate(method.student, data.x_val, data.y_val, eval_batch_size)["acc"]
            sums["val/acc_target"] = val["acc"]
        for name, model in method.eval_models().items():
            sums[f"val/acc_{name}"] = accel.evaluate(model, x_val, data.y_val, eval_batch_size)["acc"]
        sums.update(method.extra_metrics(data))
        metrics = {**sums, "val/acc": val["acc"], "val/loss": val["loss"], "lr": optimizer.param_groups[0]["lr"],
                   "time/epoch_s": train_s, "time/samples_per_s": n / train_s, "time/epoch_cpu_s": cpu_s}
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics, {
                "epoch": epoch + 1, "method": method.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(), "history": history, "accel": accel.state_dict()})
    method.eval()
    return history
