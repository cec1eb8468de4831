"""Entrypoint: compose the config -> build data, teacher, student, method -> fit -> report.

    python -m kdexp.train method=kd method.temperature=4
    python -m kdexp.train -m method=ce,kd method.temperature=2,8
"""
import logging
import os
import shutil
import sys

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kdexp import config_dir
from kdexp.config import register_configs, validate
from kdexp.data import load_dataset
from kdexp.engine.checkpoint import atomic_json_dump, atomic_torch_save
from kdexp.engine.fit import fit
from kdexp.engine.logging import RunLogger
from kdexp.engine.resume import load_checkpoint, read_metrics
from kdexp.engine.runinfo import write_run_info
from kdexp.engine.teacher import provide_teacher
from kdexp.errors import ConfigError, KdexpError
from kdexp.methods import get_method
from kdexp.models import get_model
from kdexp.seeding import derive_seed, seed_all

log = logging.getLogger("kdexp")
register_configs()


def select_device(hw) -> torch.device:
    if hw.threads > 0:
        torch.set_num_threads(hw.threads)
    if hw.device == "cpu":
        return torch.device("cpu")
    if hw.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"hardware=cuda but no GPU is available to torch {torch.__version__} "
                          f"(CUDA build: {torch.version.cuda}); use hardware=cpu or hardware=auto")
    if hw.device == "cuda" or torch.cuda.is_available():
        if hw.device_index >= torch.cuda.device_count():
            raise ConfigError(f"hardware.device_index={hw.device_index} but only "
                              f"{torch.cuda.device_count()} GPU(s) are visible")
        return torch.device("cuda", hw.device_index)
    return torch.device("cpu")


def hparams_of(cfg: DictConfig) -> dict:
    """The run's knobs for the TensorBoard HParams tab: the method's keys and the main choices."""
    hp = {f"method.{k}": v for k, v in OmegaConf.to_container(cfg.method, resolve=True).items()}
    hp.update({"dataset.name": cfg.dataset.name, "teacher.arch": cfg.teacher.arch, "student.arch": cfg.student.arch,
               "seed": cfg.seed, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
               "optim.name": cfg.optim.name, "optim.lr": cfg.optim.lr})
    return hp


def run(cfg: DictConfig, run_dir: str, overrides=()) -> float:
    """One experiment in `run_dir`; returns the final val/acc. Usable without Hydra's main.
    A finished run directory is skipped (force=true reruns it); an interrupted one is
    continued from checkpoints/last.pt (resume=false starts over)."""
    ckpt_path = os.path.join(run_dir, "checkpoints", "last.pt")
    previous = read_metrics(run_dir)
    if (previous and previous.get("status") == "done" and not cfg.force
            and len(previous.get("history", [])) >= cfg.epochs):  # more epochs than before: continue it
        log.info("%s is already done (val/acc %.4f); skipping it (force=true reruns it)", run_dir,
                 previous["final"]["val/acc"])
        return float(previous["final"]["val/acc"])
    try:
        validate(cfg)
        state, record = load_checkpoint(cfg, run_dir)
    except KdexpError as e:  # record it, so that a sweep's summary shows the failed job
        os.makedirs(run_dir, exist_ok=True)
        atomic_json_dump({"status": "failed", "error": f"{type(e).__name__}: {e}", "overrides": list(overrides)},
                         os.path.join(run_dir, "metrics.json"))
        raise
    if state is None and os.path.isdir(os.path.join(run_dir, "tb")):
        shutil.rmtree(os.path.join(run_dir, "tb"))  # starting over: old curves would mix with the new ones
    write_run_info(run_dir, cfg)
    logger = RunLogger(run_dir, hparams_of(cfg), overrides, record)
    try:
        seed_all(cfg.seed)
        device = select_device(cfg.hardware)
        data = load_dataset(cfg.dataset).to(device)
        log.info("dataset %s: %d train / %d val, input %s, %d classes", data.name, len(data.x_train),
                 len(data.x_val), data.in_shape, data.num_classes)
        method_cls = get_method(cfg.method.name)
        teacher, tinfo = None, {"source": "none", "key": None, "val/acc": None}
        if method_cls.uses_teacher:
            teacher, tinfo = provide_teacher(cfg, data)
            logger.scalars({"teacher/val/acc": tinfo["val/acc"]}, 0)
        logger.record["teacher"] = tinfo
        if state is not None and state.get("teacher_key") != tinfo["key"]:
            raise ConfigError(f"cannot resume {run_dir}: its checkpoint was distilled from teacher "
                              f"{state.get('teacher_key')}, this config gives {tinfo['key']}; rerun with resume=false")
        torch.manual_seed(derive_seed(cfg.seed, "student/init"))  # independent of the teacher's source
        student = get_model(cfg.student.arch, data.in_shape, data.num_classes, **cfg.student.args)
        method = method_cls(cfg.method, student, teacher).to(device)
        if state is None:
            method.prepare(data, device)
        torch.manual_seed(derive_seed(cfg.seed, "train"))  # dropout and other in-training randomness

        def on_epoch(epoch, metrics, fit_state):
            logger.epoch(epoch, metrics)
            log.info("epoch %d/%d  train/loss %.4f  val/acc %.4f  val/loss %.4f  (%.2fs)", epoch + 1, cfg.epochs,
                     metrics["train/loss"], metrics["val/acc"], metrics["val/loss"], metrics["time/epoch_s"])
            if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
                atomic_torch_save({**fit_state, "teacher_key": tinfo["key"],
                                   "config": OmegaConf.to_container(cfg, resolve=True)}, ckpt_path)

        fit(method, data, optim_cfg=cfg.optim, epochs=cfg.epochs, batch_size=cfg.batch_size,
            seed=derive_seed(cfg.seed, "student/batches"), eval_batch_size=cfg.eval_batch_size,
            on_epoch=on_epoch, state=state, progress=cfg.progress, desc="student")
        if tinfo["val/acc"] is not None:
            logger.record["final"]["teacher/val/acc"] = tinfo["val/acc"]
        logger.finish("done")
    except BaseException as e:
        logger.finish("failed", error=f"{type(e).__name__}: {describe(e)}")
        raise
    final = logger.record["final"]["val/acc"]
    log.info("done: val/acc %.4f (best %.4f at epoch %d), teacher %s -> %s", final, logger.record["best"]["val/acc"],
             logger.record["best"]["epoch"], tinfo["source"], run_dir)
    return float(final)


def describe(e: BaseException) -> str:
    """One clear line for errors a user can fix; writing errors name the path and reason."""
    if isinstance(e, OSError) and not isinstance(e, KdexpError):
        return f"cannot write the run outputs: {e.strerror or e}" + (f": {e.filename}" if e.filename else "")
    return str(e)


@hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        return run(cfg, hc.runtime.output_dir, hc.overrides.task)
    except (KdexpError, OSError) as e:
        log.error("%s", describe(e))
        if multirun:
            return float("nan")  # recorded in metrics.json; the sweep goes on and exits 1 at its end
        sys.exit(1)
    except Exception:
        if not multirun:
            raise  # an unexpected error: keep the traceback
        log.exception("job failed")  # traceback into this job's log; the other jobs still run
        return float("nan")


def cli() -> None:
    """Console script `kdexp-train`."""
    main()


if __name__ == "__main__":
    main()
