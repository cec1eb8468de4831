"""Fused sweeps: N runs that differ only in method.temperature / alpha / beta / w_ce / seed are
trained in one process, as N students with stacked parameters sharing one teacher output per
sample (the teacher-output cache), one forward of all students per step
(`torch.func.functional_call` under `vmap`) and one optimizer over the stacked weights.

Each student is its separate run, to numerical tolerance:
- the same init (`derive_seed(seed, "student/init")`) and batch order (`derive_seed(seed,
  "student/batches")`); students with different seeds see different batches (their inputs are
  gathered per student; the teacher's outputs come from the cache, so it still runs once per sample);
- the per-student losses are SUMMED (a mean would divide each student's learning rate by N);
  the KL is written out (F.kl_div has no vmap rule) with the teacher's softened probabilities
  and their negative entropy cached per temperature: KL(p||q) = sum p log p - sum p log q;
- optimizers and LR schedules are elementwise/per-epoch (adam, adamw, sgd; none, cosine, step),
  so one optimizer over stacked weights equals N optimizers; no global grad clipping;
- weights are copied back into each student before evaluating and checkpointing; each run
  directory gets the same metrics.json, TensorBoard run, checkpoints/last.pt (a separate run
  can resume from it) and run_info as a separate run. `time/epoch_s` of a fused run is the
  group's epoch time / N (its share); metrics.json's `fused` names the group.

What fuses: methods `ce` and `kd` with students without BatchNorm and without active dropout
(MLP, CNN, LeNet-5 of kdexp's zoo), one process on CPU or one GPU in float32. Anything else
(other methods, BatchNorm/dropout students, DDP, AMP/compile, teacher.cache=false, a run to
resume from a checkpoint) runs as separate runs, with a log line saying why.
"""
import copy
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from kdexp.data import load_dataset
from kdexp.engine.checkpoint import atomic_torch_save
from kdexp.engine.fit import epoch_batches, evaluate
from kdexp.engine.hardware import Accelerator
from kdexp.engine.logging import RunLogger
from kdexp.engine.optim import build_optimizer, build_scheduler
from kdexp.engine.resume import finished_value, flatten
from kdexp.engine.runinfo import write_run_info
from kdexp.engine.teacher import provide_teacher
from kdexp.engine.teacher_cache import TeacherCache
from kdexp.errors import KdexpError
from kdexp.methods import UNLABELED, get_method
from kdexp.models import get_model
from kdexp.seeding import derive_seed, seed_all

log = logging.getLogger("kdexp")

FUSABLE_KEYS = ("method.temperature", "method.alpha", "method.beta", "method.w_ce", "seed")
FUSABLE_METHODS = ("ce", "kd")


class NotFusable(Exception):
    """The group cannot be fused (the message says why); nothing was written for it."""


@dataclass
class Job:
    cfg: object  # the composed task config (no hydra node)
    run_dir: str
    overrides: Sequence[str] = ()
    index: int = 0  # position in the sweep (log lines)


@dataclass
class Outcome:
    job: Job
    value: Optional[float] = None  # final val/acc (nan: failed)
    separate: Optional[str] = None  # set: run it as a separate run, for this reason
    status: str = "done"  # done | skipped | failed | separate


# ------------------------------------------------------------------------------- grouping
def group_key(cfg) -> str:
    """Everything in the resolved config except the keys a fused group may vary."""
    flat = flatten(OmegaConf.to_container(cfg, resolve=True))
    return json.dumps({k: v for k, v in flat.items() if k not in FUSABLE_KEYS}, sort_keys=True, default=str)


def config_reason(cfg) -> Optional[str]:
    """Why runs of this config cannot be fused (from the config alone), or None."""
    name = cfg.method.name
    if name not in FUSABLE_METHODS:
        return f"method={name} (fused sweeps train {' and '.join(FUSABLE_METHODS)} students)"
    domain = cfg.get("domain")
    if domain is not None and domain.get("transforms"):
        return "a domain shift (dataset views) is set"
    if cfg.dataset.get("augment", "none") != "none":
        return f"dataset.augment={cfg.dataset.augment} (fused students share unaugmented batches)"
    hw = cfg.hardware
    if hw.get("distributed", False):
        return "hardware=ddp"
    if hw.get("amp", "none") != "none" or hw.get("compile", False) or hw.get("channels_last", False):
        return "hardware.amp/compile/channels_last (fused students train in float32, uncompiled)"
    if name != "ce" and not cfg.teacher.get("cache", True):
        return "teacher.cache=false (fused students share the cached teacher outputs)"
    m = cfg.method
    w_ce = (1.0 - m.alpha) if m.get("w_ce") is None else m.w_ce
    if not w_ce and (name == "ce" or not m.alpha):
        return "nothing to train (w_ce and alpha are 0): the separate run reports it"
    return None


def run_labels(cfgs) -> List[str]:
    """Short names of the runs of a group: the fusable keys that vary in it (e.g. 'method.temperature=2 seed=1')."""
    flats = [flatten(OmegaConf.to_container(c, resolve=True)) for c in cfgs]
    varying = [k for k in FUSABLE_KEYS if len({json.dumps(f.get(k)) for f in flats}) > 1]
    return [" ".join(f"{k}={f.get(k)}" for k in varying) or "(identical)" for f in flats]


def student_reason(student: nn.Module) -> Optional[str]:
    """Why this student architecture cannot be fused, or None."""
    for name, mod in student.named_modules():
        if isinstance(mod, nn.modules.batchnorm._NormBase):
            return f"the student has {type(mod).__name__} ({name}): batch statistics are not fused"
        if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p > 0:
            return f"the student has active dropout ({name}, p={mod.p}): separate runs' masks cannot be reproduced"
    return None


def plan(jobs: Sequence[Job]) -> List[Outcome]:
    """Per job: already done (skipped, as a separate run would), to be fused, or separate (why)."""
    out = []
    for job in jobs:
        cfg = job.cfg
        done = finished_value(cfg, job.run_dir)
        if done is not None:
            out.append(Outcome(job, done, status="skipped"))
            continue
        reason = config_reason(cfg)
        if reason is None and cfg.resume and not cfg.force and os.path.isfile(
                os.path.join(job.run_dir, "checkpoints", "last.pt")):
            reason = "it continues from its checkpoint (resume)"
        if reason is None:
            try:
                from kdexp.config import validate

                validate(cfg)
            except KdexpError as e:
                reason = f"invalid config ({e}); the separate run records the error"
        out.append(Outcome(job, separate=reason, status="separate" if reason else "fuse"))
    return out


# ------------------------------------------------------------------------------- training
@dataclass
class _Student:
    job: Job
    method: nn.Module
    label: str = ""
    logger: object = None
    gen: torch.Generator = None
    history: List[dict] = field(default_factory=list)
    active: bool = True
    value: float = float("nan")
    config: Optional[dict] = None  # the resolved config for checkpoints, converted once (not every epoch)


def _hparams_and_describe():
    from kdexp.train import describe, hparams_of  # the entrypoint's helpers (imported late: no cycle)

    return hparams_of, describe


def _slice_optimizer_state(sd: dict, i: int, shapes: List[torch.Size]) -> dict:
    """Student i's optimizer state_dict from the stacked optimizer's (same param order/ids)."""
    state = {}
    for pid, st in sd["state"].items():
        state[pid] = {k: (v[i].clone() if torch.is_tensor(v) and v.dim() > 0 and v.shape == shapes[pid] else
                          (v.clone() if torch.is_tensor(v) else copy.deepcopy(v))) for k, v in st.items()}
    return {"state": state, "param_groups": copy.deepcopy(sd["param_groups"])}


def train_group(jobs: Sequence[Job]) -> List[float]:
    """Train the jobs (same config up to FUSABLE_KEYS; `plan` said "fuse") as one fused group;
    returns each run's final val/acc (nan for a run that failed). Raises NotFusable before
    writing anything when the student architecture cannot be fused."""
    if len(jobs) < 2:
        raise NotFusable("a group of one")
    hparams_of, describe = _hparams_and_describe()
    from kdexp.train import select_device

    cfg0 = jobs[0].cfg
    seed_all(cfg0.seed)
    device = select_device(cfg0.hardware)
    if device.type not in ("cpu", "cuda"):
        raise NotFusable(f"device {device}")
    accel = Accelerator(device, cfg0.hardware)
    data = accel.data_to_device(load_dataset(cfg0.dataset, cache_dir=cfg0.paths.cache_dir))
    method_cls = get_method(cfg0.method.name)

    # students first (no files yet): the architecture decides whether the group fuses
    students = []
    for job in jobs:
        torch.manual_seed(derive_seed(job.cfg.seed, "student/init"))
        students.append(get_model(job.cfg.student.arch, data.in_shape, data.num_classes, **job.cfg.student.args))
    reason = student_reason(students[0])
    if reason:
        raise NotFusable(reason)

    labels = run_labels([j.cfg for j in jobs])
    log.info("fused group of %d %s students (%s -> %s on %s): %s", len(jobs), cfg0.method.name, cfg0.teacher.arch,
             cfg0.student.arch, data.name, "; ".join(labels))
    teacher, tinfo = None, {"source": "none", "key": None, "val/acc": None}
    if method_cls.uses_teacher:
        frozen, tinfo = provide_teacher(cfg0, data)
        teacher = TeacherCache(frozen).add_view(getattr(data, "view", "train"), data.x_train)

    runs: List[_Student] = []
    for k, (job, student) in enumerate(zip(jobs, students)):
        method = method_cls(job.cfg.method, student, teacher).to(device)
        gen = torch.Generator().manual_seed(derive_seed(job.cfg.seed, "student/batches"))
        runs.append(_Student(job, method, label=labels[k], gen=gen,
                             config=OmegaConf.to_container(job.cfg, resolve=True)))
    group = {"group_size": len(jobs), "runs": [os.path.basename(os.path.normpath(j.run_dir)) for j in jobs]}
    for k, r in enumerate(runs):
        d = r.job.run_dir
        if os.path.isdir(os.path.join(d, "tb")):
            shutil.rmtree(os.path.join(d, "tb"))  # starting over: old curves would mix with the new ones
        write_run_info(d, r.job.cfg)
        r.logger = RunLogger(d, hparams_of(r.job.cfg), r.job.overrides)
        # the teacher was obtained once for the group: the other runs got it from the cache
        info = dict(tinfo) if k == 0 or tinfo["source"] != "trained" else {**tinfo, "source": "cache"}
        r.logger.record["teacher"] = info
        r.logger.record["fused"] = group
        r.logger.record["teacher_cache"] = {"enabled": teacher is not None, "shared_by": len(jobs)}
        if tinfo["val/acc"] is not None:
            r.logger.scalars({"teacher/val/acc": tinfo["val/acc"]}, 0)
    try:
        _fit_fused(runs, data, teacher, tinfo, cfg0, accel, describe)
    except BaseException as e:
        for r in runs:
            if r.active:
                r.logger.finish("failed", error=f"{type(e).__name__}: {describe(e)}")
                r.active = False
        if not isinstance(e, Exception):
            raise
        log.exception("fused group failed")
    return [r.value for r in runs]


def _soft_tables(teacher: TeacherCache, view: str, temperatures: Sequence[float]):
    """Per student: the teacher's softened probabilities p (N_data, C) and sum p log p (N_data,)."""
    from kdexp.methods import Batch

    x = teacher._views[view]
    everything = Batch(x, None, torch.arange(len(x), device=x.device), view=view)
    tables = {T: teacher.soft_targets(everything, T) for T in sorted(set(temperatures))}
    p = torch.stack([tables[T][0] for T in temperatures])
    neg_h = torch.stack([tables[T][1] for T in temperatures])
    return p, neg_h


def _fit_fused(runs: List[_Student], data, teacher, tinfo, cfg0, accel, describe) -> None:
    from torch.func import functional_call, vmap

    n_students = len(runs)
    device = accel.device
    template = runs[0].method.student
    names = [n for n, _ in template.named_parameters()]
    buffer_names = [n for n, _ in template.named_buffers()]
    stacked = {n: torch.stack([dict(r.method.student.named_parameters())[n].detach() for r in runs]).clone()
               .requires_grad_(True) for n in names}
    buffers = {n: torch.stack([dict(r.method.student.named_buffers())[n] for r in runs]) for n in buffer_names}
    shapes = [stacked[n].shape for n in names]
    optimizer = build_optimizer([{"params": [stacked[n] for n in names]}], cfg0.optim)
    scheduler = build_scheduler(optimizer, cfg0.optim, cfg0.epochs)

    cfgs = [r.job.cfg for r in runs]
    is_kd = cfg0.method.name == "kd"
    w_ce = torch.tensor([float(r.method.w_ce or 0.0) for r in runs], device=device)
    alpha = torch.tensor([float(c.method.alpha) if is_kd else 0.0 for c in cfgs], device=device)
    temps = [float(c.method.temperature) for c in cfgs]
    T = torch.tensor(temps, device=device)
    has_ce = [bool(r.method.w_ce) for r in runs]
    has_kd = [is_kd and bool(c.method.alpha) for c in cfgs]
    view = getattr(data, "view", "train")
    ce_on = torch.tensor(has_ce, device=device)
    kd_on = torch.tensor(has_kd, device=device)
    zero = torch.zeros((), device=device)
    if is_kd:
        p_table, negh_table = _soft_tables(teacher, view, temps)
        fill_s = teacher.take_fill_seconds()[0]  # teacher time, before the first epoch
        for r in runs:
            r.logger.record["teacher_cache"]["fill_s"] = round(fill_s, 4)
    shared_batches = len({c.seed for c in cfgs}) == 1
    rows = torch.arange(n_students, device=device).unsqueeze(1)

    def forward(params, bufs, x):
        return functional_call(template, (params, bufs), (x,))

    batched = vmap(forward, in_dims=(0, 0, None if shared_batches else 0))
    n = len(data.x_train)
    steps = math.ceil(n / cfg0.batch_size)
    for r in runs:
        r.method.train()
    for epoch in range(cfg0.epochs):
        t0, c0 = time.perf_counter(), time.process_time()
        for r in runs:
            r.method.epoch = epoch
        per = [epoch_batches(data, r.method, cfg0.batch_size, steps, r.gen) for r in runs]
        if shared_batches:
            per = [per[0]] * n_students
        total = sum(len(i) for i in per[0])
        sums = {"loss": torch.zeros(n_students, dtype=torch.float64, device=device)}
        sums["ce"], sums["kd"] = torch.zeros_like(sums["loss"]), torch.zeros_like(sums["loss"])
        for step in range(steps):
            idx = torch.stack([b[step] for b in per])  # (N, B)
            y = data.y_train[idx]
            if data.labeled is not None:
                y = y.masked_fill(~data.labeled[idx], UNLABELED)
            x = data.x_train[idx[0]] if shared_batches else data.x_train[idx]
            logits = batched(stacked, buffers, x)  # (N, B, C)
            s_len, c = logits.shape[1], logits.shape[2]
            ce = F.cross_entropy(logits.reshape(-1, c), y.reshape(-1), ignore_index=UNLABELED,
                                 reduction="none").view(n_students, s_len).sum(1)
            ce = w_ce * ce / (y != UNLABELED).sum(1).clamp_min(1)
            kd = torch.zeros_like(ce)
            if is_kd:
                p, neg_h = p_table[rows, idx], negh_table[rows, idx]  # (N, B, C), (N, B)
                log_q = torch.log_softmax(logits / T.view(-1, 1, 1), dim=-1)
                kd = alpha * T ** 2 * (neg_h - (p * log_q).sum(-1)).mean(1)  # T^2 KL(p || q), batchmean
            # a term with weight 0 is left out, as in the separate run (0 * inf would be nan)
            loss = torch.where(ce_on, ce, zero) + torch.where(kd_on, kd, zero)
            active = torch.tensor([r.active for r in runs], device=device)
            finite = torch.isfinite(loss)
            if not bool((finite | ~active).all()):
                for i in (~finite & active).nonzero().flatten().tolist():
                    r = runs[i]
                    bad = [k for k, v, on in (("ce", ce[i], has_ce[i]), ("kd", kd[i], has_kd[i]))
                           if on and not torch.isfinite(v)]
                    msg = (f"student: loss is {loss[i].item()} at epoch {epoch + 1}, step {step + 1} (non-finite "
                           f"term(s): {bad}); lower the learning rate or check the inputs")
                    log.error("%s: %s", r.job.run_dir, msg)
                    r.logger.finish("failed", error=f"DivergedError: {msg}")
                    r.active, r.value = False, float("nan")
                active = torch.tensor([r.active for r in runs], device=device)
                if not bool(active.any()):
                    return
            optimizer.zero_grad(set_to_none=True)
            torch.where(active, loss, torch.zeros_like(loss)).sum().backward()  # SUM: each student its own lr
            optimizer.step()
            w = len(idx[0]) / total
            sums["loss"] += loss.detach().double() * w
            sums["ce"] += ce.detach().double() * w
            sums["kd"] += kd.detach().double() * w
        scheduler.step()
        fill_s, fill_cpu_s = teacher.take_fill_seconds() if teacher is not None else (0.0, 0.0)
        train_s = time.perf_counter() - t0 - fill_s
        share, cpu_share = train_s / n_students, (time.process_time() - c0 - fill_cpu_s) / n_students
        loss_sum, ce_sum, kd_sum = (sums[k].tolist() for k in ("loss", "ce", "kd"))
        opt_sd = optimizer.state_dict()
        with torch.no_grad():
            for i, r in enumerate(runs):
                if not r.active:
                    continue
                for name, p in r.method.student.named_parameters():
                    p.copy_(stacked[name][i])
                for name, b in r.method.student.named_buffers():
                    b.copy_(buffers[name][i])
        for i, r in enumerate(runs):
            if not r.active:
                continue
            cfg = r.job.cfg
            metrics = {"train/loss": loss_sum[i]}
            if has_ce[i]:
                metrics["train/loss_ce"] = ce_sum[i]
            if has_kd[i]:
                metrics["train/loss_kd"] = kd_sum[i]
            val = evaluate(r.method.student, data.x_val, data.y_val, cfg.eval_batch_size)
            metrics.update({"val/acc": val["acc"], "val/loss": val["loss"], "lr": optimizer.param_groups[0]["lr"],
                            "time/epoch_s": share, "time/samples_per_s": n / share, "time/epoch_cpu_s": cpu_share})
            r.history.append(metrics)
            r.logger.epoch(epoch, metrics)
            log.info("epoch %d/%d  train/loss %.4f  val/acc %.4f  val/loss %.4f  (%.2fs, fused %d: %s)", epoch + 1,
                     cfg.epochs, metrics["train/loss"], metrics["val/acc"], metrics["val/loss"], share, n_students,
                     r.label, extra={"fused_run": r.job.index})
            if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
                rng = torch.Generator().manual_seed(derive_seed(cfg.seed, "train")).get_state()
                atomic_torch_save({
                    "epoch": epoch + 1, "method": r.method.state_dict(),
                    "optimizer": _slice_optimizer_state(opt_sd, i, shapes), "scheduler": scheduler.state_dict(),
                    "generator": r.gen.get_state(), "torch_rng": rng, "history": r.history, "accel": {},
                    "teacher_key": tinfo["key"], "config": r.config,
                }, os.path.join(r.job.run_dir, "checkpoints", "last.pt"))
    for r in runs:
        if not r.active:
            continue
        r.method.eval()
        if tinfo["val/acc"] is not None:
            r.logger.record["final"]["teacher/val/acc"] = tinfo["val/acc"]
        r.logger.finish("done")
        r.value = float(r.logger.record["final"]["val/acc"])
        log.info("done: val/acc %.4f (best %.4f at epoch %d), fused -> %s", r.value, r.logger.record["best"]["val/acc"],
                 r.logger.record["best"]["epoch"], r.job.run_dir, extra={"fused_run": r.job.index})
