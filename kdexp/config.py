"""Structured configs: the schemas behind conf/. Each YAML option extends one of these
(`defaults: [/schema/<group>/<name>@_here_]`), so Hydra rejects a misspelled key or a
value of the wrong type. Keys added with `+`/`++` or by a config file get past Hydra's struct
check; `check_known_keys` (the first step of `validate`) rejects those that no schema knows.
Value ranges (a negative temperature, say) are checked in `validate`, which names the bad key and
the allowed range."""
import dataclasses
import difflib
import functools
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from kdexp.catalog import help_config
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
    # terms only. The teacher is trained on every label, except for methods that learn from the
    # unlabeled samples (data_distill; see teacher.labeled_only). 1.0: all labeled.
    label_fraction: float = 1.0
    # Random augmentation of the training images (kdexp.data.augment): none | flip | crop | crop_flip
    # (crop: random crop of the image zero-padded by augment_pad pixels). augment_views: 0 = a fresh
    # draw every epoch (the teacher then runs online); K = K fixed draws cycled over the epochs, the
    # teacher's outputs cached per draw. Teachers train on fresh draws.
    augment: str = "none"
    augment_pad: int = 4
    augment_views: int = 0
    # Carve the validation set from the training data (this stratified fraction, fixed by split_seed):
    # val/acc then picks the best epoch and early-stops on it, while the dataset's own held-out split
    # (a torchvision dataset's official test split; dataset.val_fraction of digits or npz) becomes
    # the test split, evaluated once after the last epoch (test/acc). null: val/acc is measured on
    # that held-out split, as papers that report the test accuracy per epoch do.
    val_from_train: Optional[float] = None
    # Where the samples live (kdexp.data.stream): true: read once into memory as tensors and batched
    # by slicing (the fastest path); false: streamed, each batch read by `workers` DataLoader workers;
    # auto: in memory when the splits take at most memory_budget_gb as float32, else streamed.
    in_memory: Any = "auto"
    memory_budget_gb: float = 8.0
    workers: int = 2
    # Fixed per-channel normalization (e.g. ImageNet's); null: the training set's statistics
    # (streamed data: those of up to 2,048 evenly spaced training images).
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    augment_scale: List[float] = field(default_factory=lambda: [0.08, 1.0])  # rrc_flip: area fraction of the box


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
class ImageFolderDatasetConfig(DatasetConfig):
    """dataset=imagefolder: dataset.path=DIR with DIR/train/<class>/* and optional DIR/val/<class>/*."""
    name: str = "imagefolder"
    channels: Optional[int] = None  # 1 (grayscale) | 3 (RGB) | null: 1 if every training image is grayscale, else 3
    image_size: Optional[Any] = None  # resize every image to [H, W] (an int: square); null: one size required
    # ImageNet-style geometry instead of image_size: the shorter side resized to `resize` (null:
    # crop_size / 0.875), then the centre crop_size x crop_size; augment=rrc_flip crops crop_size boxes.
    crop_size: Optional[int] = None
    resize: Optional[int] = None


@dataclass
class ImageNetDatasetConfig(ImageFolderDatasetConfig):
    """dataset=imagenet: torchvision's ImageNet layout (train/<wnid>/*, val/<wnid>/*) in dataset.path
    (default: dataset.root/imagenet, else dataset.root itself when it holds train/)."""
    name: str = "imagenet"


@dataclass
class CustomDatasetConfig(DatasetConfig):
    """dataset=custom: a torch Dataset by import path, train._target_ plus its constructor's keyword
    arguments (free-form); val without _target_ (or null): a stratified split of train (val_fraction).
    Both nodes exist by default, so dataset.val._target_=... and +dataset.val.NAME=... are plain overrides."""
    name: str = "custom"
    train: Optional[Dict[str, Any]] = field(default_factory=lambda: {"_target_": None})
    val: Optional[Dict[str, Any]] = field(default_factory=lambda: {"_target_": None})


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
    # The cached logits on disk (kdexp.engine.output_store), memory-mapped under paths.cache_dir and
    # shared by later runs and every job of a sweep: auto: when the data streams; true | false.
    cache_disk: Any = "auto"
    # Keep only each sample's k largest logits on disk, the rest of the probability mass spread
    # evenly over the other classes (FKD's soft labels); null: every logit.
    cache_topk: Optional[int] = None
    # Pretrain the teacher on another class subset of the dataset (layer transfer: classes: [0,1,2,3,4]
    # while dataset.classes=[5,6,7,8,9]); for methods that start from its weights (finetune,
    # progressive). null: the run's classes. Part of the teacher cache key.
    classes: Optional[List[int]] = None
    # Train the teacher on the labeled part of a transfer set only (dataset.label_fraction < 1);
    # false: on every training label. Part of the cache key when true. null: the method's default
    # (kdexp.engine.plan): true for methods that learn from the unlabeled samples (data_distill), so
    # the teacher never sees the labels hidden from the student; false for the others (Hinton et
    # al.'s transfer set). false with such a method is an oracle teacher, and the run warns.
    labeled_only: Optional[bool] = None


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
class BornAgainConfig:
    """Born-again networks (Furlanello et al., ICML 2018; kdexp.engine.born_again): generation 0
    learns from labels (method=ce), generation k = 1..K is a student of the same architecture
    distilled (the configured method) from generation k-1; then the ensemble of generations
    ensemble_from..K (their averaged softmax) is evaluated."""
    generations: Optional[int] = None  # K >= 1: the born-again students after generation 0; null: no born-again
    ensemble_from: int = 1  # first generation in the ensemble: 1 = the students 1..K (the paper's BANE), 0 adds generation 0


@dataclass
class MonitorConfig:
    """The metric that picks checkpoints/best.pt and the reported best epoch (metrics.json `best`)."""
    metric: str = "val/acc"  # any metric of the run's epochs: val/acc, val/loss, train/loss, val/acc_target, ...
    mode: str = "auto"  # max | min | auto (min for a loss, max otherwise)


@dataclass
class EarlyStopConfig:
    """Stop a student's training after `patience` epochs without improvement of `metric`."""
    patience: Optional[int] = None  # epochs; null: off (train all epochs)
    metric: Optional[str] = None  # null: monitor.metric
    mode: str = "auto"  # max | min | auto, as monitor.mode
    min_delta: float = 0.0  # an improvement must exceed this


@dataclass
class DebugConfig:
    """conf/debug (lightning-hydra-template's debug group): quick checks of a config, not results.
    A run that trains on fewer batches than its recipe says trains its teacher into a throw-away
    cache, so a debug teacher never stands in for a real one."""
    name: str = "none"  # fast | overfit | limit | profile (the option's name); none: a normal run
    train_batches: Optional[int] = None  # per epoch, for every training (teacher, first stages, student)
    val_batches: Optional[int] = None  # validation batches (of eval_batch_size) per student epoch
    overfit_batches: int = 0  # > 0: the student trains on the same first batches every epoch ...
    overfit_loss: float = 0.01  # ... until its train/loss is below this
    checkpoints: bool = True  # false: no checkpoints/ and no student.pt
    profile_steps: int = 0  # > 0: a torch.profiler trace of this many student steps in <run dir>/profile/


@dataclass
class TensorBoardLoggerConfig:
    """logger=tensorboard: <run_dir>/tb/, scalars flushed every epoch, the HParams tab at the end."""


@dataclass
class CsvLoggerConfig:
    """logger=csv: <run_dir>/metrics.csv, a row per student epoch, a column per metric."""


@dataclass
class MlflowLoggerConfig:
    """logger=mlflow: a run per kdexp run (params: the resolved config, dotted; metrics per epoch)."""
    tracking_uri: str = "outputs/mlruns"  # a folder (a local file store), file:///abs/dir, or a server's http(s)://...
    experiment: str = "kdexp"


@dataclass
class WandbLoggerConfig:
    """logger=wandb: a run in <run_dir>/wandb/ (offline: `wandb sync <run_dir>/wandb/offline-run-*` uploads it)."""
    mode: str = "offline"  # offline | online | disabled
    project: str = "kdexp"
    entity: Optional[str] = None


LOGGER_SCHEMAS = {"tensorboard": TensorBoardLoggerConfig, "csv": CsvLoggerConfig, "mlflow": MlflowLoggerConfig,
                  "wandb": WandbLoggerConfig}


@dataclass
class LoggerConfig:
    """The `logger` node: one sub-node per chosen logger (conf/logger/<name>.yaml is `# @package
    logger.<name>`), null for the others, so that `logger=[tensorboard,csv]` keeps each logger's keys
    under its own name (logger.mlflow.tracking_uri). The flat keys are shorthands for the chosen
    loggers' keys of that name: `logger=mlflow logger.tracking_uri=file:///abs/dir`."""
    tensorboard: Optional[TensorBoardLoggerConfig] = None
    csv: Optional[CsvLoggerConfig] = None
    mlflow: Optional[MlflowLoggerConfig] = None
    wandb: Optional[WandbLoggerConfig] = None
    # Shorthands (null: not given): logger.KEY=V sets KEY of every chosen logger that has it.
    tracking_uri: Optional[str] = None
    experiment: Optional[str] = None
    mode: Optional[str] = None
    project: Optional[str] = None
    entity: Optional[str] = None


LOGGER_SHORTHANDS = tuple(f.name for f in dataclasses.fields(LoggerConfig) if f.name not in LOGGER_SCHEMAS)


@dataclass
class Config:
    dataset: Any = MISSING
    # Typed (not Any): an option file without `defaults: [/schema/...]` (a user's student/tiny.yaml on
    # hydra.searchpath, holding just arch and args) is merged onto the schema, so it gets the teacher
    # recipe's defaults and `teacher.epochs=3` on the command line finds its key.
    teacher: TeacherConfig = MISSING
    student: ModelConfig = MISSING
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
    # A multi-stage pipeline (kdexp.engine.chain, e.g. experiment=takd): stages {name, overrides: [...],
    # teacher: EARLIER_STAGE}, each a normal run under this run's directory. []: one run.
    chain: List[Any] = field(default_factory=list)
    # Born-again networks (experiment=born_again, or born_again.generations=K on any config): K+1
    # generations of one architecture, each the next one's teacher, expanded into a chain.
    born_again: BornAgainConfig = field(default_factory=BornAgainConfig)
    # Free-form labels of the run (tags=[baseline,ablation]): in metrics.json, the HParams tab and every logger.
    tags: List[str] = field(default_factory=list)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    # Where the run's metrics go besides metrics.json (conf/logger: tensorboard | csv | mlflow | wandb,
    # several as logger=[tensorboard,csv]); kdexp.engine.loggers.
    logger: LoggerConfig = field(default_factory=LoggerConfig)


# Datasets with a schema of their own (conf/dataset/<name>.yaml extends /schema/dataset/<name>);
# every other dataset uses DatasetConfig (/schema/dataset/base).
DATASET_SCHEMAS = {"fake": FakeDatasetConfig, "imagefolder": ImageFolderDatasetConfig, "imagenet": ImageNetDatasetConfig,
                   "custom": CustomDatasetConfig}


# Hydra copies its config repository for every composition (CachingConfigRepository), and with it
# the global ConfigStore that its structured-config source points to: every schema, every time.
# Nothing reads that copy's nodes without copying them again (ConfigStore.load returns a deep copy
# of the node it loads), so the one store can serve every copy. A third of each composition's time
# (about 176 -> 122 ms here), which a sweep pays per job and --help per config group.
ConfigStore.__deepcopy__ = lambda self, memo: self


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore. Method schemas come from the method
    registry. Also kdexp's --help (hydra/help=kdexp, selected in conf/config.yaml), built now from
    the registries and conf/ (kdexp.catalog)."""
    cs = ConfigStore.instance()
    cs.store(group="hydra/help", name="kdexp", node=help_config(Config))
    cs.store(name="base_config", node=Config)
    cs.store(group="schema/dataset", name="base", node=DatasetConfig)
    for name, schema in DATASET_SCHEMAS.items():
        cs.store(group="schema/dataset", name=name, node=schema)
    cs.store(group="schema/model", name="base", node=ModelConfig)
    cs.store(group="schema/teacher", name="base", node=TeacherConfig)
    cs.store(group="schema/hardware", name="base", node=HardwareConfig)
    cs.store(group="schema/domain", name="base", node=DomainConfig)
    for name in METHODS.names():
        cs.store(group="schema/method", name=name, node=METHODS.meta(name)["config"])


# ------------------------------------------------------------------------------ known keys
@functools.lru_cache(maxsize=None)
def _schema_fields(schema: type) -> Dict[str, Optional[type]]:
    """Field name -> the dataclass its value must follow (Optional[X] counts as X), or None for a
    leaf or a free-form container (Any, Dict[str, Any], List[...]: their keys are not checked here)."""
    hints = typing.get_type_hints(schema)
    out = {}
    for f in dataclasses.fields(schema):
        tp = hints.get(f.name, f.type)
        if typing.get_origin(tp) is typing.Union:
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = args[0] if len(args) == 1 else None
        out[f.name] = tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None
    return out


def _name(node) -> Optional[str]:
    """node.name (the registered name behind a method or dataset node), or None."""
    try:
        name = node.get("name")
    except Exception:  # an interpolation that does not resolve: reported where it is used
        return None
    return name if isinstance(name, str) else None


def _method_schema(node) -> Optional[type]:
    # an unknown method name is reported by the registry (with the registered names) elsewhere
    name = _name(node)
    return METHODS.meta(name)["config"] if name in METHODS else None


def _dataset_schema(node) -> type:
    return DATASET_SCHEMAS.get(_name(node), DatasetConfig)


# The nodes Config types as Any (Hydra fills them from a config group): how to find their schema.
# `teachers` (List[Any]) stays free-form: its members are resolved and validated by the run plan.
_GROUP_SCHEMAS = {
    "dataset": _dataset_schema,
    "teacher": lambda node: TeacherConfig,
    "student": lambda node: ModelConfig,
    "method": _method_schema,
    "hardware": lambda node: HardwareConfig,
    "domain": lambda node: DomainConfig,
}


def _unknown_keys(node, schema: type, path: str, found: list, group_schemas=None) -> None:
    """Append (dotted key, valid keys of its node, its node's path) for every key of `node` that
    `schema` has no field for; recurse into fields typed as dataclasses."""
    fields = _schema_fields(schema)
    for key in node.keys():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in fields:
            if not (path == "" and key == "hydra"):  # a config composed with its Hydra node
                found.append((dotted, sorted(fields), path))
            continue
        group = group_schemas is not None and key in group_schemas
        if fields[key] is None and not group:
            continue  # a leaf or a free-form container
        child = node._get_node(key)
        if not isinstance(child, DictConfig) or child._is_none() or child._is_missing() or child._is_interpolation():
            continue  # null, ???, ${...} (the node it points to is checked where it lives)
        sub = group_schemas[key](child) if group else fields[key]
        if sub is not None:
            _unknown_keys(child, sub, dotted, found)


@dataclass
class _RunSources:
    """What the run's Hydra config says about where its keys came from."""
    overrides: List[str]  # the task overrides (command line, or a sweep's job)
    choices: Dict[str, Optional[str]]  # the option chosen per config group (hydra.runtime.choices)
    dirs: List[str]  # the config search path's directories


def _run_sources(cfg) -> Optional[_RunSources]:
    """From the config's own Hydra node, else from the running Hydra app; None when unknown (the
    compose API without return_hydra_config, a config built by hand)."""
    try:
        hc = cfg.hydra if isinstance(cfg, DictConfig) and "hydra" in cfg else None
        if hc is None:
            from hydra.core.hydra_config import HydraConfig

            if not HydraConfig.initialized():
                return None
            hc = HydraConfig.get()
        dirs = [s.path for s in hc.runtime.config_sources if s.schema == "file" and s.path]
        return _RunSources(list(hc.overrides.task), dict(hc.runtime.choices), dirs)
    except Exception:  # a Hydra node without these keys
        return None


_NOT_SET = object()


def _set_in_file(path: str, group: str, dotted: str) -> bool:
    """Whether the config file `path` (an option of `group`) sets the key `dotted` (a full key)."""
    with open(path) as f:
        text = f.read()
    header = re.search(r"^#\s*@package\s+(\S+)", text, re.M)
    package = header.group(1) if header else group  # a group option's default package: its group
    package = "" if package == "_global_" else package.replace("_group_", group)
    if package and not dotted.startswith(package + "."):
        return False
    node = OmegaConf.create(text)
    return OmegaConf.select(node, dotted[len(package) + 1:] if package else dotted, default=_NOT_SET,
                            throw_on_resolution_failure=False) is not _NOT_SET


def _origin(dotted: str, top: str, sources: Optional[_RunSources]) -> str:
    """Where the unknown key `dotted` (under the top-level node `top`) probably came from."""
    if sources is None:
        return "added with +/++ or by a config file"
    for o in sources.overrides:
        name = o.split("=", 1)[0].lstrip("+~")
        if name in sources.choices or name.startswith("hydra.") or "@" in name:
            continue  # a config group choice (method=kd): its file is looked at below
        if dotted == name or dotted.startswith(name + ".") or name.startswith(dotted + "."):
            return f"added on the command line: {o}"
    groups = ([top] if top else []) + ["experiment", "hparams_search"]
    for group in groups:
        option = sources.choices.get(group)
        if not option:
            continue
        for d in sources.dirs:
            path = os.path.join(d, group, f"{option}.yaml")
            try:
                if os.path.isfile(path) and _set_in_file(path, group, dotted):
                    return f"set by {group}={option}: {path}"
            except Exception:  # an unreadable file: no attribution
                pass
    return "not on the command line: added by a config file"


def _model_hint(group: str) -> str:
    from kdexp.models import MODELS

    return (f"kdexp builds models by arch, not by Hydra's _target_: {group}.arch=NAME (registered: "
            f"{', '.join(MODELS.names())}) or an import path {group}.arch=package.module:Callable, with its keyword "
            f"arguments under {group}.args")


def check_known_keys(cfg) -> None:
    """Every key of the composed task config belongs to its node's schema (the dataclasses above and
    the registered method's schema); raises ConfigError naming each key that does not, where it came
    from when that is known, and the closest valid keys. Hydra's struct mode rejects a misspelled key
    in a plain override, but one added with `+`/`++` or by a config file (an experiment preset, a
    user's config) would otherwise be silently ignored. Free-form nodes (fields typed Any, Dict or
    List: student.args, method.tasks, teachers, ...) are checked by their consumers."""
    found: list = []
    _unknown_keys(cfg, Config, "", found, _GROUP_SCHEMAS)
    if not found:
        return
    sources = _run_sources(cfg)
    lines = []
    for dotted, valid, path in found:
        key = dotted[len(path) + 1:] if path else dotted
        top = path.split(".", 1)[0]
        if not path:
            where = "unknown top-level key"
        elif top in ("method", "dataset") and path == top:
            where = f"unknown key of {top}={_name(cfg[top])}"
        else:
            where = f"unknown key of {path}"
        line = f"{dotted}: {where} ({_origin(dotted, top, sources)})"
        if key.startswith("_") and key.endswith("_") and len(key) > 2:  # Hydra's _target_, _args_, ...
            line += ("; " + _model_hint(top) if top in ("student", "teacher") and path == top else
                     "; kdexp does not instantiate config nodes by _target_: options are registered names "
                     "(method=NAME, dataset=NAME, student.arch=NAME)")
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
        if close:
            line += f"; did you mean {' or '.join(f'{path}.{c}' if path else c for c in close)}?"
        lines.append(f"{line}{'' if close else '.'} Valid: {', '.join(valid)}")
    raise ConfigError(lines[0] if len(lines) == 1 else  # one line: each key's report after the count
                      f"{len(lines)} unknown config keys: " + " | ".join(lines))


def apply_group_schemas(cfg) -> None:
    """Type a group's node by its schema when its option file did not (a user's file on
    hydra.searchpath without `defaults: [/schema/...]`, e.g. student/tiny.yaml holding just arch and
    args): Hydra then merges it as a plain dict, with none of the schema's defaults (a teacher would
    lack its recipe: epochs, optim, ...) and no type checks. Merged onto the schema here, the node
    gets both. Nodes already typed are left alone; unknown keys are for check_known_keys to report."""
    from omegaconf import read_write
    from omegaconf.errors import OmegaConfBaseException

    for group, schema_of in _GROUP_SCHEMAS.items():
        node = cfg._get_node(group) if isinstance(cfg, DictConfig) and group in cfg else None
        if not isinstance(node, DictConfig) or node._is_none() or node._is_missing() or node._is_interpolation():
            continue
        if OmegaConf.get_type(node) is not dict:
            continue  # typed by its file's defaults line
        schema = schema_of(node)
        if schema is None or set(node.keys()) - set(_schema_fields(schema)):
            continue  # no schema known, or unknown keys: reported by check_known_keys
        try:
            typed = OmegaConf.merge(OmegaConf.structured(schema), node)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{group}: {str(e).splitlines()[0]} (the {group} option's file gives a value of the "
                              f"wrong type)") from None
        with read_write(cfg):
            cfg[group] = typed


def _check(cond: bool, key: str, value, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is out of range: {allowed}")


OPTIMIZERS = ("adam", "adamw", "sgd", "dot")


def validate_optim(o, key: str, one_loss: str = "") -> None:
    """`one_loss`: why this recipe trains a single loss (a teacher on labels, a method's first
    stage), where optim.name=dot has no distillation gradient to tell from the task gradient: it
    is then rejected (it would be SGD with momentum `momentum`, so the message says to use sgd)."""
    _check(o.lr > 0, f"{key}.lr", o.lr, "must be > 0")
    _check(o.name in OPTIMIZERS, f"{key}.name", o.name, "one of " + ", ".join(OPTIMIZERS))
    _check(o.schedule in ("none", "cosine", "step", "dann"), f"{key}.schedule", o.schedule,
           "one of none, cosine, step, dann")
    if o.name != "dot":
        return
    if one_loss:
        raise ConfigError(f"{key}.name=dot separates the distillation terms' gradient from the task (CE) gradient, "
                          f"and {one_loss}; use {key}.name=sgd (DOT with one kind of gradient is SGD with momentum "
                          f"{key}.momentum)")
    _check(not o.nesterov, f"{key}.nesterov", o.nesterov, "must be false with name=dot (DOT has no Nesterov variant)")
    _check(0.0 <= o.delta <= o.momentum, f"{key}.delta", o.delta,
           f"must be in [0, {key}.momentum={o.momentum}] (the task momentum momentum - delta is >= 0)")
    _check(o.momentum + o.delta < 1.0, f"{key}.momentum", o.momentum,
           f"must be < 1 - {key}.delta={o.delta} (the distillation momentum momentum + delta is < 1)")


def validate_teacher(t, key: str) -> None:
    """Range checks of one teacher recipe (`teacher`, or a member `teachers[i]` of an ensemble)."""
    _check(t.epochs >= 1, f"{key}.epochs", t.epochs, "must be >= 1")
    _check(t.batch_size >= 1, f"{key}.batch_size", t.batch_size, "must be >= 1")
    if t.get("stop_at_acc") is not None:
        _check(0.0 < t.stop_at_acc <= 1.0, f"{key}.stop_at_acc", t.stop_at_acc, "must be in (0, 1] (or null)")
    validate_optim(t.optim, f"{key}.optim", one_loss="a teacher trains on labels alone")


MODES = ("auto", "max", "min")


def debugging(cfg) -> bool:
    """Whether any debug key differs from DebugConfig's defaults (debug=..., or debug.KEY=... alone)."""
    d = cfg.get("debug")
    defaults = dataclasses.asdict(DebugConfig())
    return d is not None and any(d.get(k) != v for k, v in defaults.items())


def validate_reporting(cfg) -> None:
    """monitor, early_stop and debug: the values a type cannot restrict. Whether a monitored metric
    exists is known once the first epoch is measured (a method's own train/loss_<term>): the
    recorder says so then; here only the metric's family is checked."""
    for key in ("monitor", "early_stop"):
        node = cfg.get(key)
        if node is None:
            continue
        _check(node.mode in MODES, f"{key}.mode", node.mode, "one of " + ", ".join(MODES))
        metric = node.metric
        if metric is not None:
            _check(metric.startswith(("val/", "train/")), f"{key}.metric",
                   metric, "a per-epoch metric: val/acc, val/loss, train/loss, train/loss_<term>, val/acc_target, ... "
                   "(test/* is measured once, at the end)")
    es = cfg.get("early_stop")
    if es is not None and es.patience is not None:
        _check(es.patience >= 1, "early_stop.patience", es.patience, "must be >= 1 (or null: off)")
        _check(es.min_delta >= 0, "early_stop.min_delta", es.min_delta, "must be >= 0")
    d = cfg.get("debug")
    if d is None:
        return
    for key in ("train_batches", "val_batches"):
        if d.get(key) is not None:
            _check(d[key] >= 1, f"debug.{key}", d[key], "must be >= 1 (or null: all)")
    _check(d.overfit_batches >= 0, "debug.overfit_batches", d.overfit_batches, "must be >= 0 (0: off)")
    _check(d.profile_steps >= 0, "debug.profile_steps", d.profile_steps, "must be >= 0 (0: off)")


WANDB_MODES = ("offline", "online", "disabled")


def chosen_loggers(cfg) -> Dict[str, dict]:
    """The loggers a run writes to: name -> its keys, the `logger` node's shorthands applied (a
    shorthand no chosen logger has is an error naming the loggers that have it). A config without a
    `logger` node (built by hand, or composed before loggers were a group) logs to TensorBoard, as
    runs always did; `logger=[]` logs to none."""
    node = cfg.get("logger") if isinstance(cfg, DictConfig) else None
    if node is None:
        return {"tensorboard": {}}
    chosen = {str(name): dict(OmegaConf.to_container(node[name], resolve=True) or {})
              for name in node if name not in LOGGER_SHORTHANDS and node[name] is not None}
    for key in LOGGER_SHORTHANDS:
        value = node.get(key)
        if value is None:
            continue
        takers = [name for name, keys in chosen.items() if key in keys]
        if not takers:
            owners = [name for name, schema in LOGGER_SCHEMAS.items() if key in _schema_fields(schema)]
            raise ConfigError(f"logger.{key}={value!r}: no chosen logger has the key {key!r} (chosen: "
                              f"{', '.join(chosen) or 'none'}); it is a key of logger={' or logger='.join(owners)}")
        for name in takers:
            chosen[name][key] = value
    return chosen


def validate_loggers(cfg) -> None:
    loggers = chosen_loggers(cfg)
    if "wandb" in loggers:
        mode = loggers["wandb"].get("mode")
        _check(mode in WANDB_MODES, "logger.wandb.mode", mode, "one of " + ", ".join(WANDB_MODES))


def validate(cfg) -> None:
    """Unknown keys (`check_known_keys`), a group's schema where its file gave none
    (`apply_group_schemas`), then range checks that a type system cannot express."""
    check_known_keys(cfg)
    apply_group_schemas(cfg)
    validate_domain(cfg.get("domain"))
    validate_loggers(cfg)
    m = cfg.method
    _check(m.temperature > 0, "method.temperature", m.temperature, "must be > 0")
    _check(m.alpha >= 0, "method.alpha", m.alpha, "must be >= 0")
    # alpha is a free weight (dkd, dist, cqd; kd with w_ce=0.1 and alpha=9 as in the logit-standardization
    # paper) except where CE's weight is derived from it: w_ce null -> 1 - alpha, which must stay >= 0
    _check(m.alpha <= 1.0 or m.w_ce is not None, "method.alpha", m.alpha,
           "must be <= 1 while method.w_ce is null (w_ce = 1 - alpha must stay >= 0); set method.w_ce "
           "explicitly (e.g. method.w_ce=1.0) to weigh the KD term by alpha > 1")
    _check(m.beta >= 0, "method.beta", m.beta, "must be >= 0")
    if m.w_ce is not None:
        _check(m.w_ce >= 0, "method.w_ce", m.w_ce, "must be >= 0 (or null for 1 - alpha)")
    if m.get("init_optim") is not None:  # a method with a first stage (kdexp.methods.feature.StagedConfig)
        validate_optim(m.init_optim, "method.init_optim", one_loss="a method's first stage trains one loss")
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
    if cfg.dataset.get("val_from_train") is not None:
        _check(0.0 < cfg.dataset.val_from_train < 1.0, "dataset.val_from_train", cfg.dataset.val_from_train,
               "must be in (0, 1) (or null: validate on the dataset's held-out split)")
    validate_reporting(cfg)
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
