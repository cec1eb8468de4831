"""The training loop: the only one in kdexp. Students, teachers, a method's first stages and
fused groups of students all train here; what varies is the stepper (kdexp.engine.steppers,
kdexp.engine.fused: what one step computes, how it is checked, evaluated and saved) and the
data source (kdexp.engine.source: where the batches come from)."""
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
from tqdm import tqdm

from kdexp.engine.dot import DOT
from kdexp.engine.hardware import CPU, Accelerator
from kdexp.engine.optim import build_optimizer, build_scheduler


def fit(stepper, source, *, optim_cfg, epochs: int, on_epoch: Optional[Callable[[int, object, dict], Optional[bool]]] = None,
        state: Optional[dict] = None, progress: bool = False, desc: str = "train",
        accel: Optional[Accelerator] = None, profiler=None) -> List[object]:
    """Train `stepper.param_groups(optim_cfg)` for `epochs` epochs on batches of `source`; returns
    the per-epoch metrics (what `stepper.epoch_metrics` gives: a dict, or one per fused student).

    `state` (from a checkpoint) resumes after its last finished epoch; `on_epoch(epoch, metrics,
    state)` gets the state to save after every epoch, and returns True to make that epoch the last
    (kdexp.engine.stopping). `accel` (kdexp.engine.hardware) adds AMP,
    DDP all-reduce and GPU-friendly syncs; the default is the plain CPU loop. One-off teacher
    passes (the teacher-output cache's) are left out of `time/epoch_s`: they are teacher time.
    `profiler` (debug=profile: a torch.profiler.profile) is stepped after every optimizer step.
    """
    accel = accel or CPU
    steps = source.steps
    optimizer = build_optimizer(stepper.param_groups(optim_cfg), optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, epochs, steps)
    per_step = getattr(scheduler, "per_step", False)  # e.g. DANN's annealing: stepped every step
    history: List[object] = _restore(state, stepper, optimizer, scheduler, source, accel)
    show = progress and sys.stdout.isatty()
    accel.dist.barrier()  # DDP: start the clock together (e.g. after one rank trained the teacher)
    stepper.train(True)
    for epoch in range(len(history), epochs):
        t0, c0 = time.perf_counter(), time.process_time()
        total, batches = source.epoch(epoch)
        bar = tqdm(batches, total=steps, desc=f"{desc} {epoch + 1}/{epochs}", leave=False, disable=not show)
        sums: Dict[str, object] = {}
        for step, item in enumerate(bar):
            stepper.at(epoch, (epoch * steps + step) / (epochs * steps))
            optimizer.zero_grad(set_to_none=True)
            logged = _step(stepper, item, accel, sync=(step + 1) % accel.sync_every == 0 or step + 1 == steps,
                           where=f"epoch {epoch + 1}, step {step + 1}", optimizer=optimizer)
            accel.reduce_gradients(optimizer, item.share)
            accel.step(optimizer)
            if per_step:
                scheduler.step()
            if profiler is not None:
                profiler.step()
            for k, v in logged.items():  # epoch means, weighted by batch size
                sums[k] = sums.get(k, 0.0) + v * (item.size / total * item.share)
            if show and step % 10 == 0 and logged:
                bar.set_postfix(loss=f"{float(logged['train/loss']):.4f}")
        if not per_step:
            scheduler.step()
        fill_s, fill_cpu_s = stepper.take_teacher_seconds()
        timing = {"time/epoch_s": time.perf_counter() - t0 - fill_s,
                  "time/epoch_cpu_s": time.process_time() - c0 - fill_cpu_s}  # CPU time: robust on shared machines
        metrics = stepper.epoch_metrics(accel.reduce_sums(sums), timing, optimizer.param_groups[0]["lr"], accel)
        history.append(metrics)
        if on_epoch is not None and on_epoch(epoch, metrics, {
                "epoch": epoch + 1, "method": stepper.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "generator": source.state_dict(),
                "torch_rng": torch.get_rng_state(), "history": history, "accel": accel.state_dict()}):
            break  # on_epoch decided that this epoch is the last (early stopping, a threshold reached)
    stepper.train(False)
    return history


def _step(stepper, item, accel, sync: bool, where: str, optimizer=None) -> Dict[str, object]:
    """Forward and backward of one batch -> the values for the epoch's train/* means (nothing for
    a DDP rank whose shard is empty: it still joins the gradient all-reduce). `sync`: check the
    loss for NaN/inf (a host sync: every step on the CPU, every hardware.sync_every on a GPU).
    optim.name=dot: the task and distillation terms are backwarded separately (`DOT.backward`);
    train/loss stays their total."""
    if item.batch is None:
        return {}
    with accel.autocast():
        terms = stepper.losses(item.batch)
        loss = stepper.total(terms)
    if sync:
        loss = stepper.check(loss, terms, where + ("" if accel.sync_every == 1 else " or before"))
    if isinstance(optimizer, DOT):
        optimizer.backward(terms, accel.scaled)
    else:
        accel.backward(loss)
    return {k: accel.scalar(v) if v.dim() == 0 else v.detach().double() for k, v in stepper.logged(loss, terms).items()}


def _restore(state: Optional[dict], stepper, optimizer, scheduler, source, accel) -> List[object]:
    """Load a checkpoint's fit state (None: a fresh start) -> the history of its finished epochs."""
    if state is None:
        return []
    stepper.load_state_dict(state["method"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    source.load_state_dict(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    accel.load_state_dict(state.get("accel", {}))
    return list(state["history"])
