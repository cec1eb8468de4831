"""Fused sweeps: N runs that differ only in method.temperature / alpha / beta / w_ce / seed are
trained in one process, as N students with stacked parameters sharing one teacher output per
sample (the teacher-output cache), one forward of all students per step
(kdexp.engine.stacked: explicit matrix products for MLP students, `functional_call` under `vmap`
for the others) and one optimizer over the stacked weights.

A fused group goes through the same lifecycle as a single run: its plans (kdexp.engine.plan say
whether it can fuse), one assembly for the group (kdexp.engine.assemble), a recorder per run and
the one fit loop, with `FusedStepper` as the stepper. Each student is its separate run, to
numerical tolerance:
- the same init (`derive_seed(seed, "student/init")`) and batch order (`derive_seed(seed,
  "student/batches")`); students with different seeds see different batches (their inputs are
  gathered per student; the teacher's outputs come from the cache, so it still runs once per sample);
- the per-student losses are SUMMED (a mean would divide each student's learning rate by N), each
  computed by the kdexp.losses functions the methods use, on (N, B, C) logits;
- optimizers and LR schedules are elementwise/per-epoch (adam, adamw, sgd; none, cosine, step),
  so one optimizer over stacked weights equals N optimizers; no global grad clipping;
- weights are copied back into each student before evaluating and checkpointing; each run
  directory gets the same metrics.json, TensorBoard run, checkpoints/last.pt (a separate run
  can resume from it) and run_info as a separate run. `time/epoch_s` of a fused run is the
  group's epoch time / N (its share); metrics.json's `fused` names the group.

What fuses: the logit methods (kdexp.methods.base.LogitMethod: ce, kd, lskd, logit_mse, lsr, tfkd_self,
tfkd_reg, dkd, dist, mlkd, nkd, wsld) with students without BatchNorm and without active dropout, one
process on CPU or one GPU in float32 (`kdexp.engine.plan.fuse_reason`). Methods with trainable parts
of their own (CTKD's learned temperature, regressors, discriminators) or feature taps run separately.
Anything else, and a run to resume from a checkpoint, runs as a separate run, with a log line
saying why.
"""
import contextlib
import copy
import json
import logging
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kdexp.data.stream import batches_of
from kdexp.engine.assemble import assemble
from kdexp.engine.evaluate import validation_metrics
from kdexp.engine.fit import fit
from kdexp.engine.hardware import Accelerator, select_device
from kdexp.engine.plan import FUSABLE_KEYS, plan
from kdexp.engine.record import Recorder, hparams_of, interruptible, run_dir_lock
from kdexp.engine.resume import finished_value, flatten
from kdexp.engine.source import InMemorySource, StackedSource
from kdexp.engine.stacked import stacked_forward
from kdexp.engine.steppers import DivergedError
from kdexp.engine.teacher_cache import take_fill_seconds
from kdexp.errors import KdexpError
from kdexp.losses import kd_ce_loss_soft
from kdexp.methods import UNLABELED, Batch, Method
from kdexp.seeding import derive_seed, seed_all

log = logging.getLogger("kdexp")


class NotFusable(Exception):
    """The group cannot be fused (the message says why); nothing was written for it."""


class GroupDiverged(KdexpError):
    """Every student of a fused group diverged (each run recorded its own error)."""


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
    """Why runs of this config cannot be fused (the run plan's decision), or None."""
    try:
        return plan(cfg).fuse_reason
    except KdexpError as e:
        return f"invalid config ({e}); the separate run records the error"


def run_labels(cfgs) -> List[str]:
    """Short names of the runs of a group: the fusable keys that vary in it (e.g. 'method.temperature=2 seed=1')."""
    flats = [flatten(OmegaConf.to_container(c, resolve=True)) for c in cfgs]
    varying = [k for k in FUSABLE_KEYS if len({json.dumps(f.get(k)) for f in flats}) > 1]
    return [" ".join(f"{k}={f.get(k)}" for k in varying) or "(identical)" for f in flats]


def triage(jobs: Sequence[Job]) -> List[Outcome]:
    """Per job: already done (skipped, as a separate run would), to be fused, or separate (why)."""
    out = []
    for job in jobs:
        cfg = job.cfg
        try:
            done = finished_value(cfg, job.run_dir)
        except KdexpError as e:  # e.g. a finished directory of another config: the separate run says so
            out.append(Outcome(job, separate=str(e), status="separate"))
            continue
        if done is not None:
            out.append(Outcome(job, done, status="skipped"))
            continue
        reason = config_reason(cfg)
        if reason is None and cfg.resume and not cfg.force and os.path.isfile(
                os.path.join(job.run_dir, "checkpoints", "last.pt")):
            reason = "it continues from its checkpoint (resume)"
        out.append(Outcome(job, separate=reason, status="separate" if reason else "fuse"))
    return out


# ------------------------------------------------------------------------------- training
def train_group(jobs: Sequence[Job]) -> List[float]:
    """Train the jobs (same config up to FUSABLE_KEYS; `triage` said "fuse") as one fused group;
    returns each run's final val/acc (nan for a run that failed). Raises NotFusable before
    writing anything when the group cannot be fused."""
    if len(jobs) < 2:
        raise NotFusable("a group of one")
    plans = [plan(j.cfg, j.overrides) for j in jobs]
    reason = next((p.fuse_reason for p in plans if p.fuse_reason), None)
    if reason:
        raise NotFusable(reason)
    with contextlib.ExitStack() as stack:
        for job in jobs:  # one process per run directory, as for separate runs
            stack.enter_context(run_dir_lock(job.run_dir))
        stack.enter_context(interruptible())
        try:
            return _train_locked(jobs, plans, stack)
        except GroupDiverged:  # each run recorded its own error
            return [float("nan")] * len(jobs)
        except Exception:
            log.exception("fused group failed")
            return [float("nan")] * len(jobs)


def _train_locked(jobs: Sequence[Job], plans, stack: contextlib.ExitStack) -> List[float]:
    cfg0 = plans[0].cfg
    seed_all(cfg0.seed)
    device = select_device(cfg0.hardware)
    accel = Accelerator(device, cfg0.hardware)
    asm = assemble(plans, accel)
    labels = run_labels([j.cfg for j in jobs])
    log.info("fused group of %d %s students (%s -> %s on %s): %s", len(jobs), cfg0.method.name, cfg0.teacher.arch,
             cfg0.student.arch, asm.data.name, "; ".join(labels))
    recorders = [_open(j, k, jobs, p, asm, device) for k, (j, p) in enumerate(zip(jobs, plans))]
    for r in recorders:  # a failure, a divergence of all or an interruption is recorded in every active run
        stack.enter_context(r.failure_recorded())
    stepper = FusedStepper(asm, plans, recorders, labels, [j.index for j in jobs])
    seeds = [p.cfg.seed for p in plans]
    sources = [InMemorySource(asm.data, batch_size=cfg0.batch_size, seed=derive_seed(s, "student/batches"))
               for s in (seeds[:1] if len(set(seeds)) == 1 else seeds)]
    fit(stepper, sources[0] if len(sources) == 1 else StackedSource(sources), optim_cfg=cfg0.optim,
        epochs=cfg0.epochs, on_epoch=stepper.record_epoch, desc="fused", accel=accel)
    return stepper.finish()


def _open(job: Job, k: int, jobs: Sequence[Job], p, asm, device) -> Recorder:
    """Run k's recorder, started as a fresh run; the teacher was obtained once for the group: the
    other runs got it from the cache."""
    r = Recorder(job.run_dir, job.cfg, job.overrides)
    r.start(hparams_of(job.cfg, job.overrides), fresh=True)
    r.record["hardware"] = {"device": str(device), "threads": torch.get_num_threads(), "processes": 1}
    r.record["plan"] = p.describe()
    r.warn(p.warnings + asm.warnings)
    info = asm.teacher_info
    r.teacher(dict(info) if k == 0 or info["source"] != "trained" else {**info, "source": "cache"})
    r.record["fused"] = {"group_size": len(jobs), "runs": [os.path.basename(os.path.normpath(j.run_dir)) for j in jobs]}
    r.record["teacher_cache"] = {"enabled": asm.teacher is not None, "shared_by": len(jobs)}
    return r


class FusedStepper:
    """N students of one logit method (kdexp.methods.base.LogitMethod) at once: losses (N,) per
    term, one optimizer over the stacked weights, per-student divergence (a diverged run is recorded
    failed; the others go on), metrics and checkpoints per run (weights copied back into each
    student first).

    The terms are the method's own `logit_terms` under vmap, each student's hyperparameters a 0-d
    tensor, the teacher's logits gathered from the cache's table of every training sample; a term
    whose weight is 0 for a student is left out of its loss and its metrics, as in its separate run.
    KD with the teacher-output cache (kd, tfkd_self) takes the cache's softened probabilities per T
    instead (`kd_ce_loss_soft` on (N, B, C): no teacher softmax per step), as its separate run does."""

    def __init__(self, asm, plans, recorders: List[Recorder], labels: List[str], indices: List[int]):
        from torch.func import vmap

        self.asm, self.plans, self.recorders, self.labels, self.indices = asm, plans, recorders, labels, indices
        self.methods = asm.methods
        self.n = len(plans)
        self.active = [True] * self.n
        template = self.methods[0].student
        self.names = [n for n, _ in template.named_parameters()]
        self.stacked = {n: torch.stack([dict(m.student.named_parameters())[n].detach() for m in self.methods]).clone()
                        .requires_grad_(True) for n in self.names}
        self.buffers = {n: torch.stack([dict(m.student.named_buffers())[n] for m in self.methods])
                        for n, _ in template.named_buffers()}
        self.shapes = [self.stacked[n].shape for n in self.names]
        device = asm.data.x_train.device
        method = self.methods[0]
        self.hp = {k: torch.tensor([float(m.hp[k]) for m in self.methods], device=device) for k in method.hp}
        self.on = {k: self.hp[w] != 0 for k, w in method.term_weights.items()}  # (N,): the term is in run i's loss
        self.rows = torch.arange(self.n, device=device).unsqueeze(1)
        self.soft = getattr(method, "soft_targets", None) is not None  # KD from the cache's softened targets
        # validation is the students' val/acc and val/loss alone (one vmapped pass for all) unless the
        # method evaluates more (kdexp.engine.evaluate.validation_metrics, per student)
        self.plain_validation = (type(method).eval_models is Method.eval_models and
                                 type(method).extra_metrics is Method.extra_metrics)
        self.t_table = None
        if self.soft:  # the cache's one-off pass: teacher time, before the first epoch
            self.p_table, self.negh_table = self._soft_tables([m.hp["temperature"] for m in self.methods])
        elif method.requires.uses_teacher:
            self.t_table = self._teacher_logits()
        if method.requires.uses_teacher:
            fill_s = take_fill_seconds(asm.teacher)[0]
            for r in recorders:
                r.record["teacher_cache"]["fill_s"] = round(fill_s, 4)

        self._forward = stacked_forward(template, asm.data.in_shape)
        self._terms = {(shared, self.t_table is not None): vmap(
            method.logit_terms, in_dims=(0, None if shared or self.t_table is None else 0, None if shared else 0, 0))
            for shared in (True, False)}

    def _everything(self):
        x = self.asm.data.x_train
        return Batch.sampled(self.asm.data.view, x, None, torch.arange(len(x), device=x.device))

    def _teacher_logits(self) -> torch.Tensor:
        """The teacher's logits on every training sample (N_data, C), from the cache."""
        return self.asm.teacher.logits(self._everything())

    def _soft_tables(self, temperatures: Sequence[float]):
        """Per student: the teacher's softened probabilities p (N_data, C) and sum p log p (N_data,)."""
        everything = self._everything()
        tables = {T: self.asm.teacher.soft_targets(everything, T) for T in sorted(set(temperatures))}
        return (torch.stack([tables[T][0] for T in temperatures]), torch.stack([tables[T][1] for T in temperatures]))

    # -- the stepper API -------------------------------------------------------------------------
    def param_groups(self, optim_cfg):
        return [{"params": [self.stacked[n] for n in self.names]}]

    def train(self, mode: bool) -> None:
        for m in self.methods:
            m.train(mode)

    def at(self, epoch: int, progress: float) -> None:
        for m in self.methods:
            m.epoch, m.progress = epoch, progress

    def losses(self, batch):
        shared = batch.idx.dim() == 1  # one batch for all students (they share a seed)
        logits = self._forward(self.stacked, self.buffers, batch.x, shared)  # (N, B, C)
        if not self.soft:
            t = None if self.t_table is None else self.t_table[batch.idx]  # (B, C), or (N, B, C) per student
            return self._terms[shared, t is not None](logits, t, batch.y, self.hp)
        if shared:  # (N, B, C), (N, B)
            p, neg_h = self.p_table.index_select(1, batch.idx), self.negh_table.index_select(1, batch.idx)
        else:
            p, neg_h = self.p_table[self.rows, batch.idx], self.negh_table[self.rows, batch.idx]
        y = batch.y.expand(self.n, -1) if shared else batch.y
        ce, kd = kd_ce_loss_soft(logits, y, p, neg_h, self.hp["temperature"], self.hp["w_ce"], self.hp["alpha"],
                                 UNLABELED, all_labeled=batch.labeled is None)
        return {"ce": ce, "kd": kd}

    def _per_student(self, terms):
        # a term with weight 0 is left out, as in the separate run (0 * inf would be nan)
        zero = torch.zeros((), device=self.rows.device)
        per = None
        for k, v in terms.items():
            v = torch.where(self.on[k], v, zero)
            per = v if per is None else per + v
        return per

    def total(self, terms):
        active = torch.tensor(self.active, device=self.rows.device)
        per = self._per_student(terms)
        return torch.where(active, per, torch.zeros_like(per)).sum()  # SUM: each student its own lr

    def check(self, loss, terms, where):
        if torch.isfinite(loss):
            return loss
        per = self._per_student(terms)
        for i in (~torch.isfinite(per)).nonzero().flatten().tolist():
            if not self.active[i]:
                continue
            bad = [k for k, v in terms.items() if self.on[k][i] and not torch.isfinite(v[i])]
            msg = (f"student: loss is {per[i].item()} at {where} (non-finite term(s): {bad}); lower the learning "
                   f"rate or check the inputs")
            log.error("%s: %s", self.recorders[i].run_dir, msg)
            self.recorders[i].finish("failed", error=f"{DivergedError.__name__}: {msg}")
            self.active[i] = False
        if not any(self.active):
            raise GroupDiverged("every student of the fused group diverged")
        return self.total(terms)

    def logged(self, loss, terms):
        return {"train/loss": self._per_student(terms), **{f"train/loss_{k}": v for k, v in terms.items()}}

    def take_teacher_seconds(self):
        return take_fill_seconds(self.asm.teacher)

    def epoch_metrics(self, sums, timing, lr, accel) -> List[Optional[dict]]:
        """One metrics dict per student (None for a diverged one), after copying its weights back."""
        self._copy_back()
        val = self._validation(self.plans[0].cfg.eval_batch_size) if self.plain_validation else None
        share = {k: v / self.n for k, v in timing.items()}  # each run's share of the group's time
        out: List[Optional[dict]] = []
        for i in range(self.n):
            if not self.active[i]:
                out.append(None)
                continue
            metrics = {"train/loss": sums["train/loss"][i]}
            for k, on in self.on.items():
                if bool(on[i]):
                    metrics[f"train/loss_{k}"] = sums[f"train/loss_{k}"][i]
            metrics.update(val[i] if val is not None else
                           validation_metrics(self.methods[i], self.asm.data, accel, self.plans[i].cfg.eval_batch_size))
            metrics.update({"lr": lr, "time/epoch_s": share["time/epoch_s"],
                            "time/samples_per_s": len(self.asm.data.x_train) / share["time/epoch_s"],
                            "time/epoch_cpu_s": share["time/epoch_cpu_s"]})
            out.append(metrics)
        return out

    @torch.no_grad()
    def _validation(self, batch_size: int) -> List[dict]:
        """Every student's val/acc and val/loss (what `validation_metrics` gives a logit method's
        separate run: it has no eval_models, extra_metrics or domain views), from one stacked forward
        per validation batch instead of one per student."""
        data, template = self.asm.data, self.methods[0].student
        was_training = template.training
        template.eval()
        correct, loss = [0] * self.n, [0.0] * self.n
        for sel, xb in batches_of(data.x_val, batch_size):
            yb = data.y_val[sel]
            logits = self._forward(self.stacked, self.buffers, xb.to(yb.device), True)  # (N, b, C)
            per = F.cross_entropy(logits.transpose(1, 2), yb.expand(self.n, -1), reduction="none").sum(-1)
            hits = (logits.argmax(-1) == yb).sum(-1)
            correct = [c + h for c, h in zip(correct, hits.tolist())]
            loss = [v + x for v, x in zip(loss, per.tolist())]
        template.train(was_training)
        n = len(data.x_val)
        return [{"val/acc": c / n, "val/loss": v / n} for c, v in zip(correct, loss)]

    @torch.no_grad()
    def _copy_back(self) -> None:
        for i, m in enumerate(self.methods):
            if self.active[i]:
                for name, p in m.student.named_parameters():
                    p.copy_(self.stacked[name][i])
                for name, b in m.student.named_buffers():
                    b.copy_(self.buffers[name][i])

    def state_dict(self) -> dict:
        return {n: t.detach().clone() for n, t in self.stacked.items()}

    # -- per run ------------------------------------------------------------------------------
    def record_epoch(self, epoch: int, metrics: List[Optional[dict]], state: dict) -> None:
        """Each active run's epoch: its recorder writes metrics, the log line and its own checkpoint
        (what a separate run would have saved: its weights, its slice of the optimizer state, its
        batch generator), so that a separate run can resume it."""
        for i, m in enumerate(metrics):
            if m is None or not self.active[i]:
                continue
            generator = state["generator"][i] if isinstance(state["generator"], list) else state["generator"]
            rng = torch.Generator().manual_seed(derive_seed(self.plans[i].cfg.seed, "train")).get_state()
            run_state = {**state, "method": self.methods[i].state_dict(),
                         "optimizer": _slice_optimizer_state(state["optimizer"], i, self.shapes),
                         "generator": generator, "torch_rng": rng, "accel": {},
                         "history": [h[i] for h in state["history"]]}
            self.recorders[i].epoch(epoch, m, run_state, note=f", fused {self.n}: {self.labels[i]}",
                                    extra={"fused_run": self.indices[i]})

    def finish(self) -> List[float]:
        values = []
        for i, r in enumerate(self.recorders):
            values.append(r.done(extra={"fused_run": self.indices[i]}) if self.active[i] else float("nan"))
        return values


def _slice_optimizer_state(sd: dict, i: int, shapes: List[torch.Size]) -> dict:
    """Student i's optimizer state_dict from the stacked optimizer's (same param order/ids)."""
    state = {}
    for pid, st in sd["state"].items():
        state[pid] = {k: (v[i].clone() if torch.is_tensor(v) and v.dim() > 0 and v.shape == shapes[pid] else
                          (v.clone() if torch.is_tensor(v) else copy.deepcopy(v))) for k, v in st.items()}
    return {"state": state, "param_groups": copy.deepcopy(sd["param_groups"])}
