"""The run lifecycle of a single run: plan -> record -> assemble -> pretrain -> fit -> report.

`run` is the wrapper (DDP set-up and teardown, one process per run directory, skipping a finished
run, recording any failure, SIGINT/SIGTERM as an interruption that resumes); `train` names the steps. Fused groups (kdexp.engine.fused) go through
the same plan, assembly, recorder and fit loop with their own stepper."""
import logging
from typing import Optional

import torch

from kdexp.config import apply_group_schemas
from kdexp.data.stream import close_loaders
from kdexp.engine.assemble import assemble, pretrain
from kdexp.engine.fit import fit
from kdexp.engine.hardware import Accelerator, init_distributed, select_device, shutdown_distributed
from kdexp.engine.plan import RunPlan, plan
from kdexp.engine.record import Recorder, hparams_of, interruptible, interruption, run_dir_lock
from kdexp.engine.evaluate import limit_validation, test_metrics
from kdexp.engine.profile import profiled
from kdexp.engine.source import limited, source_for
from kdexp.engine.steppers import MethodStepper
from kdexp.engine.teacher_cache import view_registrar
from kdexp.errors import ConfigError, KdexpError, RunInterrupted
from kdexp.seeding import derive_seed, seed_all

log = logging.getLogger("kdexp")


def run(cfg, run_dir: str, overrides=()) -> float:
    """One experiment in `run_dir`; returns the final val/acc. Usable without Hydra's main.
    A finished run directory is skipped (force=true reruns it); an interrupted one is
    continued from checkpoints/last.pt (resume=false starts over)."""
    dist = init_distributed(cfg.hardware)  # hardware=ddp under torchrun; else one process
    try:
        run_dir = dist.broadcast_object(run_dir)  # rank 0's run directory (timestamps may differ per rank)
        with run_dir_lock(run_dir, dist.is_main), interruptible():
            value = _run(cfg, run_dir, overrides, dist)
            # DDP: every rank finished before any tears the process group down; a rank done first
            # (rank 0 still writes its record) would otherwise abort in gloo ("terminate called ...")
            dist.barrier()
            return value
    except (KeyboardInterrupt, RunInterrupted) as e:  # training records its own; this names the run for the rest
        if isinstance(e, RunInterrupted) and e.run_dir:
            raise
        raise interruption(e, run_dir, overrides) from None
    finally:
        close_loaders()  # streamed data: the DataLoader workers end with the run
        shutdown_distributed(dist)


def _run(cfg, run_dir: str, overrides, dist) -> float:
    try:  # before the run directory is compared with the config: the recorded config is the typed one
        apply_group_schemas(cfg)
    except KdexpError as e:
        Recorder(run_dir, cfg, overrides, main=dist.is_main).fail_early(e)
        raise
    recorder = Recorder(run_dir, cfg, overrides, main=dist.is_main)
    done = recorder.finished_value()
    if done is not None:
        return done
    try:
        run_plan = plan(cfg, overrides)  # every config mistake it can see fails here, before data or a teacher
        state = recorder.resume_state()
    except KdexpError as e:  # record it, so that a sweep's summary shows the failed job
        recorder.fail_early(e)
        raise
    recorder.start(hparams_of(cfg, overrides), fresh=state is None)
    with recorder.failure_recorded():
        return train(run_plan, recorder, state, dist)


def train(p: RunPlan, recorder: Recorder, state: Optional[dict], dist) -> float:
    cfg = p.cfg
    seed_all(cfg.seed)
    device = select_device(cfg.hardware, dist)
    accel = Accelerator(device, cfg.hardware, dist)
    recorder.record["hardware"] = {"device": str(device), "threads": torch.get_num_threads(), "processes": dist.world}
    recorder.record["plan"] = p.describe()
    recorder.warn(p.warnings)
    asm = assemble([p], accel)
    recorder.record["splits"] = asm.data.splits  # what val/acc (and test/acc) are measured on
    recorder.warn(asm.warnings)
    if asm.data.augment is not None:  # what the student's draws are made of (kdexp.data.augment)
        recorder.record["augment"] = {**asm.data.augment.describe(), "seed": derive_seed(cfg.seed, "student/batches")}
    recorder.teacher(asm.teacher_info)
    if state is not None and state.get("teacher_key") != asm.teacher_info["key"]:
        raise ConfigError(f"cannot resume {recorder.run_dir}: its checkpoint was distilled from teacher "
                          f"{state.get('teacher_key')}, this config gives {asm.teacher_info['key']}; rerun with "
                          f"resume=false")
    recorder.record["teacher_cache"] = asm.cache_info
    method = asm.methods[0]
    if state is None:
        stages = pretrain(method, p, asm, device)
        if stages:
            recorder.record["stages"] = stages
    torch.manual_seed(derive_seed(cfg.seed, "train"))  # dropout and other in-training randomness
    source = source_for(asm.data, batch_size=cfg.batch_size, seed=derive_seed(cfg.seed, "student/batches"),
                            pool=p.batch_pool, dist=dist, register_view=view_registrar(asm.teacher))
    debug = cfg.get("debug")
    val_data = limit_validation(asm.data, debug and debug.get("val_batches"), cfg.eval_batch_size)
    with profiled(debug, recorder.run_dir, dist.is_main) as profiler:
        fit(MethodStepper(method, val_data, cfg.eval_batch_size), limited(source, debug, overfit=True),
            optim_cfg=cfg.optim, epochs=cfg.epochs, on_epoch=recorder.epoch, state=state,
            progress=cfg.progress and dist.is_main, desc="student", accel=accel, profiler=profiler)
    if asm.data.x_test is not None:  # dataset.val_from_train: the held-out split, once, at the end
        recorder.test(test_metrics(method, asm.data, accel, cfg.eval_batch_size))
    if hasattr(asm.teacher, "summary"):
        recorder.record["teacher_cache"] = asm.teacher.summary()
    return recorder.done()
