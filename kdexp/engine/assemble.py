"""Assembly: from run plans to what the fit loop trains: the training data (the plan's view), the
teacher handle (provided once, wrapped per the plan's cache policy) and one method per plan.
Single runs pass one plan; a fused group passes its N plans (they differ only in the fusable
keys, so they share the data and the teacher). `pretrain` then runs the one-off work of a fresh
run: the method's `prepare` and its first stages, each stage an ordinary `fit`."""
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import torch

from kdexp.data import Data, load_dataset
from kdexp.engine.evaluate import teacher_metrics
from kdexp.engine.fit import fit
from kdexp.engine.plan import RunPlan
from kdexp.engine.source import limited, source_for, training_view, withheld_inputs
from kdexp.engine.steppers import StageStepper
from kdexp.engine.teacher import provide_teacher
from kdexp.engine.teacher_cache import cached_teacher, view_registrar
from kdexp.errors import ConfigError
from kdexp.models import get_model
from kdexp.seeding import derive_seed

log = logging.getLogger("kdexp")
NO_TEACHER = {"source": "none", "key": None, "val/acc": None}


@dataclass
class Assembly:
    data: Data  # the training data: x_train is the plan's view (withheld for a data-free method); validation as loaded
    teacher: object = None  # the handle the methods hold: a TeacherCache or the FrozenTeacher (None: no teacher)
    frozen: object = None  # the FrozenTeacher itself
    teacher_info: dict = field(default_factory=lambda: dict(NO_TEACHER))
    cache_info: dict = field(default_factory=dict)
    methods: List[torch.nn.Module] = field(default_factory=list)  # one per plan
    warnings: List[str] = field(default_factory=list)  # about the data, as loaded (one line each)


def assemble(plans: Sequence[RunPlan], accel) -> Assembly:
    """Load the data, provide the teacher, build one method per plan (on `accel`'s device)."""
    p0 = plans[0]
    cfg = p0.cfg
    data = accel.data_to_device(load_dataset(cfg.dataset, cfg.get("domain"), cfg.paths.cache_dir))
    log.info("dataset %s: %d train / %d val, input %s, %d classes%s", data.name, len(data.x_train), len(data.x_val),
             data.in_shape, data.num_classes, f", target domain {data.domain}" if data.domain else "")
    _check_signature(p0, data)
    asm = Assembly(data, warnings=list(data.warnings) + _pool_warnings(p0, data))
    if p0.requires.uses_teacher:
        asm.frozen, asm.teacher_info = _teacher(p0, data)
    asm.data = training_view(data, p0.train_view)
    if p0.train_inputs == "generated":  # data-free: the teacher above trained on the data, the method never sees it
        asm.data = withheld_inputs(asm.data)
    debug = cfg.get("debug")
    throwaway = debug is not None and debug.get("train_batches") is not None  # its teacher: never stored
    asm.teacher, asm.cache_info = cached_teacher(asm.frozen, p0.cache, asm.data, asm.teacher_info["key"],
                                                 None if throwaway else cfg.paths.cache_dir)
    for p in plans:
        torch.manual_seed(derive_seed(p.cfg.seed, "student/init"))  # independent of the teacher's source
        student = get_model(p.cfg.student.arch, data.in_shape, data.num_classes, **p.cfg.student.args)
        method = p.method_cls(p.cfg.method, student, asm.teacher).to(accel.device)
        accel.prepare(method, asm.frozen)
        asm.methods.append(method)
    return asm


def _check_signature(p: RunPlan, data: Data) -> None:
    """The plan checked the models at the dataset's declared shape: the loaded data must have it."""
    if p.in_shape is not None and tuple(p.in_shape) != tuple(data.in_shape):
        raise ConfigError(f"dataset={data.name}: the data has input shape {data.in_shape}, its declared "
                          f"signature {p.in_shape}")
    if p.num_classes is not None and p.num_classes != data.num_classes:
        raise ConfigError(f"dataset={data.name}: the data has {data.num_classes} classes, its declared "
                          f"signature {p.num_classes}")


def _pool_warnings(p: RunPlan, data: Data) -> List[str]:
    """A labeled pool smaller than a batch: every step sees the same few samples, in smaller batches."""
    if p.batch_pool != "labeled" or data.labeled is None:
        return []
    n = int(data.labeled.sum())
    if n >= p.cfg.batch_size:
        return []
    return [f"method={p.name} learns from labels only and dataset.label_fraction={p.cfg.dataset.label_fraction} "
            f"keeps {n} labeled samples ({n / data.num_classes:.1f} per class), fewer than batch_size="
            f"{p.cfg.batch_size}: its batches hold those {n} samples"]


def _teacher(p: RunPlan, data: Data):
    """The frozen teacher and its info; with a domain shift its source/target accuracies (val/acc is
    then the target's)."""
    frozen, info = provide_teacher(p, data)
    if not p.cfg.teacher.get("classes"):
        info.update(teacher_metrics(frozen, data, p.cfg.eval_batch_size))
    if "val/acc_target" in info:
        info["val/acc"] = info["val/acc_target"]
        log.info("teacher: val/acc_source %.4f  val/acc_target %.4f", info["val/acc_source"], info["val/acc_target"])
    return frozen, info


def pretrain(method, p: RunPlan, asm: Assembly, device) -> Dict[str, List[float]]:
    """A fresh run's one-off work before the main loop: `method.prepare`, then each of its stages
    (seeded batches, the stage's optimizer) as an ordinary fit. -> {stage name: loss per epoch}."""
    cfg = p.cfg
    method.prepare(asm.data, device)
    losses: Dict[str, List[float]] = {}
    for stage in method.stages():
        for m in stage.trainable:
            m.requires_grad_(True)
        log.info("%s %s: %d epochs", cfg.method.name, stage.name, stage.epochs)
        try:
            source = limited(source_for(asm.data, batch_size=stage.batch_size, min_batch=2,  # BatchNorm needs 2
                                            seed=derive_seed(cfg.seed, f"stage/{stage.name}"),
                                            register_view=view_registrar(asm.teacher)), cfg.get("debug"))
            stepper = StageStepper(method, stage, asm.data, hint="lower method.init_optim.lr")
            history = fit(stepper, source, optim_cfg=stage.optim, epochs=stage.epochs, progress=cfg.progress,
                          desc=f"{cfg.method.name} {stage.name}", on_epoch=_log_stage(cfg.method.name, stage))
        finally:
            for m in stage.trainable:
                m.requires_grad_(False)
        losses[stage.name] = [h["train/loss"] for h in history]
    return losses


def _log_stage(name: str, stage):
    def on_epoch(epoch, metrics, _state):
        log.info("%s %s: epoch %d/%d loss %.5f", name, stage.name, epoch + 1, stage.epochs, metrics["train/loss"])
    return on_epoch
