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
from kdexp.engine import domain
from kdexp.engine.checkpoint import atomic_json_dump, atomic_torch_save
from kdexp.engine.fit import fit
from kdexp.engine.hardware import SINGLE, Accelerator, NullRunLogger, apply_threads, init_distributed, shutdown_distributed
from kdexp.engine.logging import RunLogger
from kdexp.engine.resume import finished_value, load_checkpoint
from kdexp.engine.runinfo import write_run_info
from kdexp.engine.teacher import provide_teacher
from kdexp.engine.teacher_cache import wrap_teacher
from kdexp.errors import ConfigError, KdexpError
from kdexp.methods import get_method
from kdexp.models import get_model
from kdexp.seeding import derive_seed, seed_all

log = logging.getLogger("kdexp")
register_configs()


def select_device(hw, dist=SINGLE) -> torch.device:
    apply_threads(hw)  # hardware.threads, or cores / parallel processes (joblib, submitit, torchrun)
    if hw.device == "cpu":
        return torch.device("cpu")
    if hw.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"hardware=cuda but no GPU is available to torch {torch.__version__} "
                          f"(CUDA build: {torch.version.cuda}); use hardware=cpu or hardware=auto")
    if hw.device == "cuda" or torch.cuda.is_available():
        if hw.device_index >= torch.cuda.device_count():
            raise ConfigError(f"hardware.device_index={hw.device_index} but only "
                              f"{torch.cuda.device_count()} GPU(s) are visible")
        # DDP: one GPU per local rank (hardware.device_index offsets them)
        return torch.device("cuda", hw.device_index + (dist.local_rank if dist.active else 0))
    return torch.device("cpu")


def hparams_of(cfg: DictConfig) -> dict:
    """The run's knobs for the TensorBoard HParams tab: the method's keys and the main choices."""
    hp = {f"method.{k}": v for k, v in OmegaConf.to_container(cfg.method, resolve=True).items()}
    hp.update({"dataset.name": cfg.dataset.name, "teacher.arch": cfg.teacher.arch, "student.arch": cfg.student.arch,
               "seed": cfg.seed, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
               "optim.name": cfg.optim.name, "optim.lr": cfg.optim.lr})
    if cfg.get("domain") is not None and cfg.domain.get("transforms"):
        from kdexp.data.domain import describe, parse_transforms

        hp["domain"] = describe(parse_transforms(cfg.domain))
    if cfg.dataset.get("augment", "none") != "none":
        hp["dataset.augment"] = cfg.dataset.augment
        hp["dataset.augment_views"] = cfg.dataset.augment_views
    return hp


def run(cfg: DictConfig, run_dir: str, overrides=()) -> float:
    """One experiment in `run_dir`; returns the final val/acc. Usable without Hydra's main.
    A finished run directory is skipped (force=true reruns it); an interrupted one is
    continued from checkpoints/last.pt (resume=false starts over)."""
    dist = init_distributed(cfg.hardware)  # hardware=ddp under torchrun; else one process
    run_dir = dist.broadcast_object(run_dir)  # rank 0's run directory (timestamps may differ per rank)
    ckpt_path = os.path.join(run_dir, "checkpoints", "last.pt")
    done = finished_value(cfg, run_dir)
    if done is not None:
        return done
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
    if dist.is_main:  # DDP: only rank 0 writes the run directory
        write_run_info(run_dir, cfg)
    logger = (RunLogger if dist.is_main else NullRunLogger)(run_dir, hparams_of(cfg), overrides, record=record)
    try:
        seed_all(cfg.seed)
        device = select_device(cfg.hardware, dist)
        accel = Accelerator(device, cfg.hardware, dist)
        logger.record["hardware"] = {"device": str(device), "threads": torch.get_num_threads(), "processes": dist.world}
        data = accel.data_to_device(load_dataset(cfg.dataset, cfg.get("domain"), cfg.paths.cache_dir))
        log.info("dataset %s: %d train / %d val, input %s, %d classes%s", data.name, len(data.x_train),
                 len(data.x_val), data.in_shape, data.num_classes,
                 f", target domain {data.domain}" if data.domain else "")
        if data.augment is not None:  # what the student's draws are made of (kdexp.data.augment)
            logger.record["augment"] = {**data.augment.describe(), "seed": derive_seed(cfg.seed, "student/batches")}
        method_cls = get_method(cfg.method.name)
        domain.check_method(cfg, method_cls, data)
        teacher, tinfo = None, {"source": "none", "key": None, "val/acc": None}
        if method_cls.uses_teacher:
            teacher, tinfo = provide_teacher(cfg, data)
            if not cfg.teacher.get("classes"):  # domain shift: source/target accuracy, val/acc = target
                tinfo.update(domain.teacher_metrics(teacher, data, cfg.eval_batch_size))
            if "val/acc_target" in tinfo:
                tinfo["val/acc"] = tinfo["val/acc_target"]
                log.info("teacher: val/acc_source %.4f  val/acc_target %.4f", tinfo["val/acc_source"],
                         tinfo["val/acc_target"])
            logger.scalars({f"teacher/{k}": v for k, v in tinfo.items() if k.startswith("val/")}, 0)
        logger.record["teacher"] = tinfo
        if state is not None and state.get("teacher_key") != tinfo["key"]:
            raise ConfigError(f"cannot resume {run_dir}: its checkpoint was distilled from teacher "
                              f"{state.get('teacher_key')}, this config gives {tinfo['key']}; rerun with resume=false")
        torch.manual_seed(derive_seed(cfg.seed, "student/init"))  # independent of the teacher's source
        student = get_model(cfg.student.arch, data.in_shape, data.num_classes, **cfg.student.args)
        # domain shift: the view(s) the method trains on (kdexp.engine.domain); x_val* kept as they are
        data = domain.training_data(data, domain.train_view(method_cls, cfg.get("domain")))
        teacher, logger.record["teacher_cache"] = wrap_teacher(teacher, cfg, method_cls, data)
        method = method_cls(cfg.method, student, teacher).to(device)
        accel.prepare(method, teacher)
        if state is None:
            method.prepare(data, device)
        torch.manual_seed(derive_seed(cfg.seed, "train"))  # dropout and other in-training randomness

        resolved = OmegaConf.to_container(cfg, resolve=True)  # once: converting it every epoch costs ms

        def on_epoch(epoch, metrics, fit_state):
            logger.epoch(epoch, metrics)
            log.info("epoch %d/%d  train/loss %.4f  val/acc %.4f  val/loss %.4f%s  (%.2fs)", epoch + 1, cfg.epochs,
                     metrics["train/loss"], metrics["val/acc"], metrics["val/loss"],
                     "".join(f"  {k} {metrics[k]:.4f}" for k in ("val/acc_source", "val/acc_target") if k in metrics),
                     metrics["time/epoch_s"])
            if dist.is_main and ((epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs):
                atomic_torch_save({**fit_state, "teacher_key": tinfo["key"],
                                   "config": resolved}, ckpt_path)

        fit(method, data, optim_cfg=cfg.optim, epochs=cfg.epochs, batch_size=cfg.batch_size,
            seed=derive_seed(cfg.seed, "student/batches"), eval_batch_size=cfg.eval_batch_size,
            on_epoch=on_epoch, state=state, progress=cfg.progress and dist.is_main, desc="student", accel=accel)
        if hasattr(teacher, "summary"):
            logger.record["teacher_cache"] = teacher.summary()
        if tinfo["val/acc"] is not None:
            logger.record["final"].update({f"teacher/{k}": v for k, v in tinfo.items() if k.startswith("val/")})
        logger.finish("done")
    except BaseException as e:
        logger.finish("failed", error=f"{type(e).__name__}: {describe(e)}")
        raise
    finally:
        shutdown_distributed(dist)
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
