"""Structured configs: the schemas behind conf/. Each YAML option extends one of these
(`defaults: [/schema/<group>/<name>@_here_]`), so Hydra rejects a misspelled key or a
value of the wrong type. Value ranges (a negative temperature, say) are checked in
`validate`, which names the bad key and the allowed range."""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from kdexp.errors import ConfigError


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "none"  # none | cosine | step
    milestones: List[int] = field(default_factory=list)  # step: epochs where lr *= gamma
    gamma: float = 0.1


@dataclass
class PathsConfig:
    data_dir: str = "data"
    cache_dir: str = "outputs/cache"


@dataclass
class DatasetConfig:
    name: str = MISSING
    root: str = "${paths.data_dir}"
    path: Optional[str] = None  # npz: file with arrays x (N,...) and y (N,)
    classes: Optional[List[int]] = None  # subset; labels remapped to 0..k-1 in this order
    val_fraction: float = 0.2  # datasets without an official split (digits, npz)
    split_seed: int = 0
    normalize: bool = True  # per-channel standardization with training-set statistics
    download: bool = True  # torchvision datasets: try to download when files are missing


@dataclass
class ModelConfig:
    arch: str = MISSING
    args: Dict[str, Any] = field(default_factory=dict)  # keyword arguments of the model builder


@dataclass
class TeacherConfig(ModelConfig):
    checkpoint: Optional[str] = None  # load this state dict instead of training
    epochs: int = 20
    batch_size: int = 64
    seed: int = 0  # the teacher's own seed: student seeds can vary while it stays fixed
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class MethodConfig:
    """Keys every method has, so one `-m` sweep can span methods. A method that does not
    use one ignores it (`ce` ignores temperature and alpha)."""
    name: str = MISSING
    temperature: float = 4.0  # softening temperature T of every soft-target term
    alpha: float = 0.9  # weight of the KD term
    beta: float = 0.0  # weight of the method's own term
    w_ce: Optional[float] = None  # weight of CE on labels; null -> 1 - alpha


@dataclass
class HardwareConfig:
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # CPU threads for torch; 0 keeps torch's default
    device_index: int = 0  # cuda only


@dataclass
class Config:
    dataset: Any = MISSING
    teacher: Any = MISSING
    student: Any = MISSING
    method: Any = MISSING
    hardware: Any = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 0
    epochs: int = 10
    batch_size: int = 64
    eval_batch_size: int = 1024
    optim: OptimConfig = field(default_factory=OptimConfig)
    resume: bool = True  # continue an interrupted run directory from checkpoints/last.pt
    force: bool = False  # rerun a run directory whose metrics.json says done
    checkpoint_every: int = 1  # epochs between checkpoints/last.pt writes
    progress: bool = True  # progress bar (only shown when stdout is a terminal)


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore. Method schemas come from the method
    registry, so importing kdexp.methods first registers them."""
    from kdexp.methods import METHODS

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="schema/dataset", name="base", node=DatasetConfig)
    cs.store(group="schema/model", name="base", node=ModelConfig)
    cs.store(group="schema/teacher", name="base", node=TeacherConfig)
    cs.store(group="schema/hardware", name="base", node=HardwareConfig)
    for name in METHODS.names():
        cs.store(group="schema/method", name=name, node=METHODS.meta(name)["config"])


def _check(cond: bool, key: str, value, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is out of range: {allowed}")


def validate(cfg) -> None:
    """Range checks that a type system cannot express."""
    m = cfg.method
    _check(m.temperature > 0, "method.temperature", m.temperature, "must be > 0")
    _check(0.0 <= m.alpha <= 1.0, "method.alpha", m.alpha, "must be in [0, 1]")
    _check(m.beta >= 0, "method.beta", m.beta, "must be >= 0")
    if m.w_ce is not None:
        _check(m.w_ce >= 0, "method.w_ce", m.w_ce, "must be >= 0 (or null for 1 - alpha)")
    _check(cfg.epochs >= 1, "epochs", cfg.epochs, "must be >= 1")
    _check(cfg.batch_size >= 1, "batch_size", cfg.batch_size, "must be >= 1")
    _check(cfg.teacher.epochs >= 1, "teacher.epochs", cfg.teacher.epochs, "must be >= 1")
    _check(cfg.teacher.batch_size >= 1, "teacher.batch_size", cfg.teacher.batch_size, "must be >= 1")
    for key, o in (("optim", cfg.optim), ("teacher.optim", cfg.teacher.optim)):
        _check(o.lr > 0, f"{key}.lr", o.lr, "must be > 0")
        _check(o.name in ("adam", "adamw", "sgd"), f"{key}.name", o.name, "one of adam, adamw, sgd")
        _check(o.schedule in ("none", "cosine", "step"), f"{key}.schedule", o.schedule,
               "one of none, cosine, step")
    _check(0.0 < cfg.dataset.val_fraction < 1.0, "dataset.val_fraction", cfg.dataset.val_fraction,
           "must be in (0, 1)")
    _check(cfg.hardware.device in ("auto", "cpu", "cuda"), "hardware.device", cfg.hardware.device,
           "one of auto, cpu, cuda")
