"""Structured configs: the schemas behind conf/. Each YAML option extends one of these
(`defaults: [/schema/<group>/<name>@_here_]`), so Hydra rejects a misspelled key or a
value of the wrong type. Value ranges (a negative temperature, say) are checked in
`validate`, which names the bad key and the allowed range."""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from kdexp.data.domain import validate_domain
from kdexp.errors import ConfigError
from kdexp.methods import METHODS, MethodConfig, OptimConfig  # noqa: F401  (the method schemas; re-exported)


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
    # Transfer set (Hinton et al. 2015): keep labels for this stratified fraction of the training
    # set (fixed by split_seed); the other training inputs stay in, unlabeled, for teacher-driven
    # terms only. The teacher is still trained on every label. 1.0: all labeled.
    label_fraction: float = 1.0
    # Random augmentation of the training images (kdexp.data.augment): none | flip | crop | crop_flip
    # (crop: random crop of the image zero-padded by augment_pad pixels). augment_views: 0 = a fresh
    # draw every epoch (the teacher then runs online); K = K fixed draws cycled over the epochs, the
    # teacher's outputs cached per draw. Teachers train on fresh draws.
    augment: str = "none"
    augment_pad: int = 4
    augment_views: int = 0


@dataclass
class FakeDatasetConfig(DatasetConfig):
    """dataset=fake: random tensors for smoke tests at a real dataset's shape (default CIFAR-100)."""
    name: str = "fake"
    shape: List[int] = field(default_factory=lambda: [3, 32, 32])
    num_classes: int = 100
    train_size: int = 128  # 2 steps of batch 64
    val_size: int = 128
    seed: int = 0


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
    # Stop training once val/acc (checked after each epoch) reaches this value: a deliberately
    # weak teacher (defective KD). Part of the teacher cache key. null: train all epochs.
    stop_at_acc: Optional[float] = None
    # Teacher-output cache (kdexp.engine.teacher_cache): run the frozen teacher once per training
    # sample and serve its logits/features from memory every epoch. Same results as online (the
    # data views are deterministic); not part of the teacher cache key. false: online every step.
    cache: bool = True
    cache_max_gb: Optional[float] = 4.0  # budget for cached features (logits always); null: no limit
    # Pretrain the teacher on another class subset of the dataset (layer transfer: classes: [0,1,2,3,4]
    # while dataset.classes=[5,6,7,8,9]); for methods that start from its weights (finetune,
    # progressive). null: the run's classes. Part of the teacher cache key.
    classes: Optional[List[int]] = None
    # Train the teacher on the labeled part of a transfer set only (dataset.label_fraction < 1),
    # as in data distillation; false: on every training label. Part of the cache key when true.
    labeled_only: bool = False


@dataclass
class DomainConfig:
    """A domain shift (kdexp.data.domain): `transforms` applied in order to the raw images give
    every sample's target view; the source view is the image as loaded. Parameters of a transform
    given by name come from the keys below; a mapping {name: rotate, angle: 30} sets its own."""
    name: str = "none"
    transforms: List[Any] = field(default_factory=list)  # [] (none) | [vflip] | [rotate, noise] | ...
    angle: float = 90.0  # rotate: degrees, counter-clockwise
    dx: int = 1  # shift: pixels right
    dy: int = 0  # shift: pixels down
    factor: int = 2  # lowres: block size of the downsampling
    blur_sigma: float = 1.0  # blur: Gaussian standard deviation in pixels
    blur_kernel: int = 0  # blur: odd kernel size; 0: 2*ceil(3 sigma)+1
    noise_sigma: float = 0.3  # noise: standard deviation (raw pixel units)
    noise_seed: int = 0  # noise: fixes the draw of every sample
    # The view single-view methods (ce, kd, finetune, ...) train on when a shift is set: source |
    # target | null (the method's default: source; finetune and progressive: target). Methods built
    # for parallel data (ts_adapt, ts_adapter, cqd, dann) see both views and ignore it.
    train_view: Optional[str] = None


@dataclass
class HardwareConfig:
    device: str = "auto"  # auto | cpu | cuda
    # CPU threads per process for torch; 0 = auto: cores / processes sharing them (joblib n_jobs,
    # submitit cpus_per_task, SLURM_CPUS_PER_TASK, torchrun local ranks), torch's default when alone
    threads: int = 0
    device_index: int = 0  # cuda only (DDP: first GPU; local rank r uses device_index + r)
    # GPU options (kdexp.engine.hardware), ignored on the CPU:
    amp: str = "none"  # none | bf16 | fp16 (autocast; fp16 with a GradScaler)
    channels_last: bool = False  # conv models and image inputs in channels-last memory format
    compile: bool = False  # torch.compile the student (in place: checkpoints keep their keys)
    non_blocking: bool = True  # dataset copied once to the GPU from pinned memory, asynchronously
    sync_every: int = 50  # GPU: check the loss for NaN/inf (a host sync) every N steps
    # DDP (hardware=ddp): one run across processes started by torchrun
    distributed: bool = False
    backend: str = "auto"  # auto (nccl on GPUs, gloo on CPUs) | gloo | nccl


@dataclass
class Config:
    dataset: Any = MISSING
    teacher: Any = MISSING
    student: Any = MISSING
    method: Any = MISSING
    hardware: Any = MISSING
    domain: Any = None  # conf/domain: the target-domain shift (none: no shift)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 0
    epochs: int = 10
    batch_size: int = 64
    eval_batch_size: int = 1024
    optim: OptimConfig = field(default_factory=OptimConfig)
    # A teacher ensemble (softmax outputs averaged) instead of `teacher`: teacher option names
    # (teachers=[cnn,lenet5]) and/or mappings {base: NAME, key: value, ...} or full teacher configs.
    teachers: List[Any] = field(default_factory=list)
    resume: bool = True  # continue an interrupted run directory from checkpoints/last.pt
    force: bool = False  # rerun a run directory whose metrics.json says done
    checkpoint_every: int = 1  # epochs between checkpoints/last.pt writes
    progress: bool = True  # progress bar (only shown when stdout is a terminal)
    # Set by kdexp's sweeper: overrides of a sweep across methods that this job's method has no key for
    # (e.g. method.warmup_epochs=5 for kd in -m method=dkd,kd method.warmup_epochs=5); recorded, not applied.
    not_applied: List[str] = field(default_factory=list)


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore. Method schemas come from the method
    registry."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="schema/dataset", name="base", node=DatasetConfig)
    cs.store(group="schema/dataset", name="fake", node=FakeDatasetConfig)
    cs.store(group="schema/model", name="base", node=ModelConfig)
    cs.store(group="schema/teacher", name="base", node=TeacherConfig)
    cs.store(group="schema/hardware", name="base", node=HardwareConfig)
    cs.store(group="schema/domain", name="base", node=DomainConfig)
    for name in METHODS.names():
        cs.store(group="schema/method", name=name, node=METHODS.meta(name)["config"])


def _check(cond: bool, key: str, value, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is out of range: {allowed}")


def validate_optim(o, key: str) -> None:
    _check(o.lr > 0, f"{key}.lr", o.lr, "must be > 0")
    _check(o.name in ("adam", "adamw", "sgd"), f"{key}.name", o.name, "one of adam, adamw, sgd")
    _check(o.schedule in ("none", "cosine", "step", "dann"), f"{key}.schedule", o.schedule,
           "one of none, cosine, step, dann")


def validate_teacher(t, key: str) -> None:
    """Range checks of one teacher recipe (`teacher`, or a member `teachers[i]` of an ensemble)."""
    _check(t.epochs >= 1, f"{key}.epochs", t.epochs, "must be >= 1")
    _check(t.batch_size >= 1, f"{key}.batch_size", t.batch_size, "must be >= 1")
    if t.get("stop_at_acc") is not None:
        _check(0.0 < t.stop_at_acc <= 1.0, f"{key}.stop_at_acc", t.stop_at_acc, "must be in (0, 1] (or null)")
    validate_optim(t.optim, f"{key}.optim")


def validate(cfg) -> None:
    """Range checks that a type system cannot express."""
    validate_domain(cfg.get("domain"))
    m = cfg.method
    _check(m.temperature > 0, "method.temperature", m.temperature, "must be > 0")
    _check(0.0 <= m.alpha <= 1.0, "method.alpha", m.alpha, "must be in [0, 1]")
    _check(m.beta >= 0, "method.beta", m.beta, "must be >= 0")
    if m.w_ce is not None:
        _check(m.w_ce >= 0, "method.w_ce", m.w_ce, "must be >= 0 (or null for 1 - alpha)")
    if m.get("init_optim") is not None:  # a method with a first stage (kdexp.methods.feature.StagedConfig)
        validate_optim(m.init_optim, "method.init_optim")
        _check(m.init_epochs >= 0, "method.init_epochs", m.init_epochs, "must be >= 0 (0: no first stage)")
        _check(m.init_batch_size >= 1, "method.init_batch_size", m.init_batch_size, "must be >= 1")
    _check(cfg.epochs >= 1, "epochs", cfg.epochs, "must be >= 1")
    _check(cfg.batch_size >= 1, "batch_size", cfg.batch_size, "must be >= 1")
    validate_teacher(cfg.teacher, "teacher")
    validate_optim(cfg.optim, "optim")
    _check(0.0 < cfg.dataset.get("label_fraction", 1.0) <= 1.0, "dataset.label_fraction",
           cfg.dataset.get("label_fraction", 1.0), "must be in (0, 1]")
    _check(0.0 < cfg.dataset.val_fraction < 1.0, "dataset.val_fraction", cfg.dataset.val_fraction,
           "must be in (0, 1)")
    _check(cfg.hardware.device in ("auto", "cpu", "cuda"), "hardware.device", cfg.hardware.device,
           "one of auto, cpu, cuda")
    hw = cfg.hardware
    _check(hw.get("threads", 0) >= 0, "hardware.threads", hw.get("threads"), "must be >= 0 (0: auto)")
    _check(hw.get("amp", "none") in ("none", "bf16", "fp16"), "hardware.amp", hw.get("amp"), "one of none, bf16, fp16")
    _check(hw.get("backend", "auto") in ("auto", "gloo", "nccl"), "hardware.backend", hw.get("backend"),
           "one of auto, gloo, nccl")
    _check(hw.get("sync_every", 1) >= 1, "hardware.sync_every", hw.get("sync_every"), "must be >= 1")
    if cfg.teacher.get("cache_max_gb") is not None:
        _check(cfg.teacher.cache_max_gb >= 0, "teacher.cache_max_gb", cfg.teacher.cache_max_gb, "must be >= 0 (or null)")
