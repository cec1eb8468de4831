"""The run plan: everything a run will do, decided from the config alone.

`plan(cfg) -> RunPlan` loads no data and trains nothing. It reads what the method requires (its
`requires`, kdexp.methods.base.Requirements) and decides the training view, the batch pool, the
teacher recipe(s), the teacher-output cache policy, and whether the run can be fused (and why
not). Every mistake it can see fails here, in one line naming the key, the value and the valid
choices: range checks, unknown architectures and model arguments, a method/domain mismatch, and,
by building the method on skeletons of the models (the meta device: no memory, no compute),
layer names, feature shapes and feature kinds a method cannot use.
"""
import logging
import os
from dataclasses import dataclass, field, fields
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdexp import config_dir, group_options
from kdexp.config import ModelConfig, TeacherConfig, debugging, validate, validate_teacher
from kdexp.data import DATASETS, dataset_signature, in_memory_choice
from kdexp.data.core import auto_bool
from kdexp.engine.loggers import check_loggers
from kdexp.engine.output_store import check_topk
from kdexp.engine.teacher import EnsembleModel, FrozenTeacher
from kdexp.errors import ConfigError
from kdexp.methods import METHODS, Requirements, get_method
from kdexp.models import check_model_args, feature_kind, resolve_builder, skeleton

log = logging.getLogger(__name__)

FUSABLE_KEYS = ("method.temperature", "method.alpha", "method.beta", "method.w_ce", "seed")


@dataclass(frozen=True)
class CachePolicy:
    """Whether the frozen teacher's outputs are cached per sample (kdexp.engine.teacher_cache)."""
    enabled: bool
    reason: str = ""  # why not, when disabled
    max_bytes: Optional[int] = None  # budget for cached features (teacher.cache_max_gb)
    # the logits on disk (kdexp.engine.output_store): True | False | "auto" (when the data streams)
    disk: object = "auto"
    topk: Optional[int] = None  # teacher.cache_topk: the k largest logits per sample on disk

    def describe(self) -> dict:
        if not self.enabled:
            return {"enabled": False, "reason": self.reason}
        return {"enabled": True, "disk": self.disk, "topk": self.topk}


@dataclass
class RunPlan:
    cfg: DictConfig
    method_cls: type
    requires: Requirements
    train_view: str  # source | target | paired (source without a domain shift)
    batch_pool: str  # all | labeled (a transfer set and a method whose terms all need labels)
    # data | generated: the batches hold the training inputs, or withhold them (a data-free method
    # generates its own; kdexp.engine.source.withheld_inputs)
    train_inputs: str = "data"
    teachers: List[DictConfig] = field(default_factory=list)  # recipes: none, one, or an ensemble's members
    ensemble: bool = False
    cache: CachePolicy = CachePolicy(False, "no teacher")
    fuse_reason: Optional[str] = None  # None: N runs of this config that differ in FUSABLE_KEYS can fuse
    in_shape: Optional[Tuple[int, ...]] = None  # None: unknown before the data is read (e.g. an npz)
    num_classes: Optional[int] = None
    warnings: List[str] = field(default_factory=list)  # valid, but probably not meant: one line each

    @property
    def name(self) -> str:
        return self.cfg.method.name

    def describe(self) -> dict:
        """What the plan decided, for metrics.json (`plan`)."""
        return {"train_view": self.train_view, "batch_pool": self.batch_pool, "train_inputs": self.train_inputs,
                "teachers": [t.arch for t in self.teachers], "ensemble": self.ensemble,
                "teacher_cache": self.cache.describe(), "fusable": self.fuse_reason is None,
                "fuse_reason": self.fuse_reason, "ignores": list(self.requires.ignores)}


def plan(cfg, overrides=()) -> RunPlan:
    """The plan of one run of `cfg` (a composed config; `overrides`: the command-line overrides it
    was composed with, for the warnings); raises ConfigError for what cannot run."""
    validate(cfg)
    check_loggers(cfg)
    method_cls = get_method(cfg.method.name, key="method.name")
    _check_method_node(cfg)
    requires = method_cls.requires
    p = RunPlan(cfg, method_cls, requires, train_view=_train_view(cfg, requires), batch_pool=_batch_pool(cfg, requires),
                train_inputs=requires.inputs)
    if cfg.teacher.get("classes") and requires.teacher != "weights":
        raise ConfigError(f"teacher.classes={list(cfg.teacher.classes)} pretrains the teacher on other classes; only "
                          f"methods that start from its weights take that (finetune, progressive), method={p.name} "
                          f"compares its outputs class by class")
    if requires.generated and cfg.hardware.get("distributed", False):
        raise ConfigError(f"hardware=ddp: method={p.name} generates its inputs from torch's seeded generator, the same "
                          f"on every rank (the ranks would train on identical batches); run it in one process "
                          f"(hardware=cpu or hardware=cuda)")
    p.teachers, p.ensemble = _teacher_recipes(cfg, requires)
    p.teachers, label_warnings = _resolve_labeled_only(p)
    p.cache = _cache_policy(cfg, requires)
    _check_placement(cfg)
    signature = dataset_signature(cfg.dataset, cfg.get("domain"))
    p.in_shape, p.num_classes = signature.in_shape, signature.num_classes
    _check_models(p)
    if p.num_classes is not None:
        check_topk(p.cache.topk, p.num_classes)
    student = _dry_build(p) if p.in_shape is not None and p.num_classes is not None else None
    p.fuse_reason = fuse_reason(cfg, requires, student)
    p.warnings = _warnings(cfg, method_cls, overrides) + label_warnings
    return p


def _warnings(cfg, method_cls, overrides) -> List[str]:
    """Valid configs that are probably not meant: an override of a key the method ignores (a sweep
    over it gives rows that differ only by name), an ensemble of one, the method's own."""
    out = []
    for key in method_cls.requires.ignores:
        set_by = [o for o in overrides if o.lstrip("+").split("=", 1)[0] == f"method.{key}"]
        if set_by:
            out.append(f"method={cfg.method.name} ignores method.{key} ({set_by[0]} changes nothing in this run)")
    for o in cfg.get("not_applied") or []:
        out.append(f"{o} does not apply to method={cfg.method.name}, which has no such key (a sweep across methods "
                   f"set it for the others)")
    if len(cfg.get("teachers") or []) == 1:
        out.append("teachers=[...] has one member: an ensemble of one is that teacher (use teacher=NAME)")
    return out + _data_free_warnings(cfg, method_cls.requires) + method_cls.config_warnings(cfg)


def _data_free_warnings(cfg, requires: Requirements) -> List[str]:
    """Keys about the student's training data that a method generating its own inputs never meets."""
    if not requires.generated:
        return []
    name, out = cfg.method.name, []
    if cfg.dataset.get("augment", "none") != "none":
        out.append(f"dataset.augment={cfg.dataset.augment} does not reach the student of method={name}, which "
                   f"learns from generated inputs only (the teacher still trains with it)")
    if cfg.dataset.get("label_fraction", 1.0) < 1.0:
        out.append(f"dataset.label_fraction={cfg.dataset.label_fraction} changes nothing for the student of "
                   f"method={name}, which sees no training labels")
    return out


def _check_method_node(cfg) -> None:
    """`method.name=dkd` on kd's config node names one method with another's keys: the group
    (method=dkd) picks a method, its name key only records it."""
    name = cfg.method.name
    missing = sorted({f.name for f in fields(METHODS.meta(name)["config"])} - set(cfg.method.keys()))
    if missing:
        raise ConfigError(f"method.name={name} does not match the method's config (it lacks {', '.join(missing[:4])}); "
                          f"choose the method with method={name} (the config group), not method.name")


# ----------------------------------------------------------------------------------- decisions
def _train_view(cfg, requires: Requirements) -> str:
    """source | target | paired: the view the method trains on (kdexp.engine.source.training_view)."""
    domain = cfg.get("domain")
    shifted = bool(domain is not None and domain.get("transforms"))
    if requires.views == "paired":
        if not shifted:
            raise ConfigError(f"method={cfg.method.name} learns from parallel source/target views and needs a domain "
                              f"shift: set domain=vflip (or rotate, lowres, blur, noise, invert, hflip, shift)")
        return "paired"
    if not shifted:
        return "source"
    return domain.get("train_view") or requires.views


def _batch_pool(cfg, requires: Requirements) -> str:
    """labeled: with a transfer set, a method whose every term needs a label trains on the labeled
    samples alone (for as many steps as the others); all: every training sample."""
    transfer_set = cfg.dataset.get("label_fraction", 1.0) < 1.0
    if requires.labels == "partial" and not transfer_set:
        raise ConfigError(f"method={cfg.method.name} learns from unlabeled samples: set dataset.label_fraction < 1 "
                          f"(now {cfg.dataset.get('label_fraction', 1.0)}; the other training samples become the "
                          f"unlabeled set)")
    return "labeled" if transfer_set and requires.labels == "required" else "all"


def _cache_policy(cfg, requires: Requirements) -> CachePolicy:
    if not requires.uses_teacher:
        return CachePolicy(False, "no teacher")
    if requires.generated:  # each step's inputs are new: nothing to cache per training sample
        return CachePolicy(False, f"method={cfg.method.name} learns from generated inputs, new every step")
    if not cfg.teacher.get("cache", True):
        return CachePolicy(False, "teacher.cache=false")
    if not requires.cacheable:
        return CachePolicy(False, f"method={cfg.method.name} needs the teacher online (its requirements: "
                                  f"cacheable=False)")
    gb = cfg.teacher.get("cache_max_gb", None)
    disk = auto_bool(cfg.teacher.get("cache_disk", "auto"), "teacher.cache_disk")
    topk = cfg.teacher.get("cache_topk")
    if topk is not None and disk is False:
        raise ConfigError(f"teacher.cache_topk={topk} keeps the top-k logits in the on-disk cache, which "
                          f"teacher.cache_disk=false turns off: set teacher.cache_disk=auto (or true)")
    return CachePolicy(True, max_bytes=None if gb is None else int(gb * 2 ** 30), disk=True if topk else disk,
                       topk=topk)


def _check_placement(cfg) -> None:
    """Streamed data (kdexp.data.stream) cannot take what transforms the data in memory: a domain shift."""
    choice = in_memory_choice(cfg.dataset)
    domain = cfg.get("domain")
    if choice is False and domain is not None and domain.get("transforms"):
        raise ConfigError(f"domain={domain.get('name')}: a domain shift transforms the data in memory; "
                          f"dataset.in_memory=false streams it: set dataset.in_memory=true (or auto)")
    if cfg.dataset.get("augment") == "rrc_flip" and choice is True:
        raise ConfigError("dataset.augment=rrc_flip crops every image at its own size, which streamed data does; "
                          "set dataset.in_memory=false (or auto), or dataset.augment=crop_flip for data in memory")
    if cfg.dataset.get("workers", 2) < 0:
        raise ConfigError(f"dataset.workers={cfg.dataset.workers}: the number of DataLoader workers, >= 0")


def fuse_reason(cfg, requires: Requirements, student: Optional[nn.Module] = None) -> Optional[str]:
    """Why runs of this config cannot be fused (from the config and the student's skeleton), or None."""
    name = cfg.method.name
    if cfg.get("chain") or cfg.get("born_again", {}).get("generations") is not None:
        return "a chain (or born_again): its stages run one after the other, each as a separate run"
    if not requires.fusable:
        fusable = ", ".join(n for n in METHODS.names() if METHODS.meta(n)["requires"].fusable)
        return f"method={name} (fused sweeps train the logit methods whose requirements say fusable: {fusable})"
    if (cfg.get("early_stop") or {}).get("patience") is not None:
        return "early_stop.patience (the students of a fused group train for the same epochs)"
    if debugging(cfg):
        return "a debug setting (debug runs run alone)"
    if cfg.dataset.get("val_from_train") is not None:
        return "dataset.val_from_train (the test split is measured by the separate run)"
    if cfg.optim.name == "dot":
        return "optim.name=dot (fused students step adam/adamw/sgd; DOT's two backward passes run separately)"
    placement = in_memory_choice(cfg.dataset)
    if placement is False:
        return "dataset.in_memory=false (fused students gather their batches from tensors in memory)"
    if placement == "auto" and DATASETS.meta(cfg.dataset.name).get("streams"):
        return (f"dataset.in_memory=auto may stream dataset={cfg.dataset.name} (fused students gather their batches "
                f"from tensors in memory; dataset.in_memory=true fuses them)")
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
    if requires.uses_teacher and not cfg.teacher.get("cache", True):
        return "teacher.cache=false (fused students share the cached teacher outputs)"
    if cfg.get("teachers"):
        return "a teachers=[...] ensemble"
    m = cfg.method
    w_ce = (1.0 - m.alpha) if m.get("w_ce") is None else m.w_ce
    weights = getattr(get_method(name), "term_weights", {}).values()  # the hparams weighing its terms
    if not any(w_ce if key == "w_ce" else m.get(key, 0.0) for key in weights):
        return "nothing to train (every term's weight is 0): the separate run reports it"
    return student_reason(student) if student is not None else None


def student_reason(student: nn.Module) -> Optional[str]:
    """Why this student architecture cannot be fused, or None."""
    for name, mod in student.named_modules():
        if isinstance(mod, nn.modules.batchnorm._NormBase):
            return f"the student has {type(mod).__name__} ({name}): batch statistics are not fused"
        if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p > 0:
            return f"the student has active dropout ({name}, p={mod.p}): separate runs' masks cannot be reproduced"
    return None


# ----------------------------------------------------------------------------------- teachers
def _teacher_recipes(cfg, requires: Requirements) -> Tuple[List[DictConfig], bool]:
    """(the teacher recipes, ensemble?): none; the student's own architecture (teacher "self");
    the members of `teachers=[...]`; or `teacher`."""
    members = list(cfg.get("teachers") or [])
    if requires.teacher == "none":
        return [], False
    if requires.teacher == "self":
        if members:
            raise ConfigError(f"method={cfg.method.name} distils from a teacher with the student's own architecture; "
                              f"it takes no teachers=[...] ensemble")
        return [student_teacher_config(cfg)], False
    if members:
        return resolve_teachers(members), True
    return [cfg.teacher], False


def _resolve_labeled_only(p: RunPlan) -> Tuple[List[DictConfig], List[str]]:
    """teacher.labeled_only null -> the method's default: true for a method that learns from the
    unlabeled part of a transfer set (requirements labels="partial", e.g. data_distill's
    pseudo-labels), whose teacher must not learn the labels hidden from the student; false for the
    others (Hinton et al.'s transfer set: the teacher was trained on every label). -> (the recipes,
    copies where resolved; a warning per recipe set explicitly to false for such a method)."""
    fraction = p.cfg.dataset.get("label_fraction", 1.0)
    hides = p.requires.labels == "partial" and fraction < 1.0
    out, warnings = [], []
    for key, recipe in zip(_teacher_keys(p), p.teachers):
        if recipe.get("labeled_only") is None:
            recipe = recipe.copy()
            recipe.labeled_only = hides
        elif hides and not recipe.labeled_only and not recipe.get("checkpoint"):
            warnings.append(f"{key}.labeled_only=false: the teacher of method={p.name} is trained on every training "
                            f"label, including the {1 - fraction:.0%} that dataset.label_fraction={fraction} hides "
                            f"from the student (an oracle teacher: its pseudo-labels carry the hidden labels); the "
                            f"default (null) trains it on the labeled part alone")
        out.append(recipe)
    return out, warnings


def student_teacher_config(cfg) -> DictConfig:
    """The teacher of a method whose requirements say teacher "self" (Tf-KD self: "train the student
    in the normal way, then use it as the teacher"): the student's arch and args trained with the
    student's recipe (optim, epochs, batch_size), with the teacher's own seed (fixed while student
    seeds vary), teacher.stop_at_acc and teacher.checkpoint. optim.name=dot trains it as sgd: on
    labels alone DOT is SGD with momentum optim.momentum, and the teacher is then the one of the same
    run with optim.name=sgd (one cache entry)."""
    t = OmegaConf.to_container(cfg.teacher, resolve=True)
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    if optim["name"] == "dot":
        optim["name"] = "sgd"
    t.update(arch=cfg.student.arch, args=OmegaConf.to_container(cfg.student.args, resolve=True),
             optim=optim, epochs=cfg.epochs, batch_size=cfg.batch_size)
    return OmegaConf.merge(OmegaConf.structured(TeacherConfig), t)


def _load_option(group: str, name: str, where: str):
    """conf/<group>/<name>.yaml (teacher or student) on its schema (its defaults list dropped)."""
    folder = os.path.join(config_dir(), group)
    path = os.path.join(folder, f"{name}.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: unknown {group} option {name!r}; options: {', '.join(group_options(config_dir(), group))}")
    node = OmegaConf.load(path)
    node.pop("defaults", None)
    return OmegaConf.merge(OmegaConf.structured(TeacherConfig if group == "teacher" else ModelConfig), node)


def resolve_teachers(items) -> List[DictConfig]:
    """`teachers=[...]` -> one validated teacher config per member. A member is a teacher option
    name (its conf/teacher/<name>.yaml, own recipe included), a mapping {base: NAME, ...}
    that overrides keys of that option (e.g. {base: cnn, seed: 1}), or a full teacher config."""
    out = []
    for i, item in enumerate(items):
        where = f"teachers[{i}]"
        if isinstance(item, str):
            base, extra = item, {}
        elif isinstance(item, (dict, DictConfig)):
            extra = OmegaConf.to_container(item, resolve=True) if isinstance(item, DictConfig) else dict(item)
            base = extra.pop("base", None)
        else:
            raise ConfigError(f"{where}={item!r}: give a teacher option name or a mapping such as "
                              f"{{base: cnn, seed: 1}}")
        node = OmegaConf.structured(TeacherConfig)
        try:
            if base is not None:
                node = OmegaConf.merge(node, _load_option("teacher", str(base), where))
            node = OmegaConf.merge(node, extra)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{where}: {str(e).splitlines()[0]}") from None
        if OmegaConf.is_missing(node, "arch"):
            raise ConfigError(f"{where}: no arch; give a teacher option name or base: NAME")
        validate_teacher(node, where)
        out.append(node)
    return out


# ----------------------------------------------------------------------------------- skeletons
def _teacher_keys(p: RunPlan) -> List[str]:
    if p.requires.teacher == "self":
        return ["student"]
    return [f"teachers[{i}]" for i in range(len(p.teachers))] if p.ensemble else ["teacher"]


def _check_models(p: RunPlan) -> None:
    """Unknown architectures and builder arguments, before anything is built or trained."""
    models = [("student", p.cfg.student)] + list(zip(_teacher_keys(p), p.teachers))
    for key, node in models:
        if OmegaConf.is_missing(node, "arch"):
            raise ConfigError(f"{key}.arch is not set (???): give your model's import path, "
                              f"{key}.arch=package.module:Callable (e.g. mymodels:TinyNet), a zoo model "
                              f"(torchvision:resnet18) or a registered name")
        resolve_builder(node.arch, key=f"{key}.arch")  # raises, naming the key: the registered models, or the import
        check_model_args(node.arch, OmegaConf.to_container(node.args, resolve=True), key=f"{key}.args")


def _teacher_classes(p: RunPlan, tcfg) -> int:
    return len(tcfg.classes) if tcfg.get("classes") else p.num_classes


def _skeleton(node, in_shape, num_classes, key: str = "") -> nn.Module:
    """The model of config `node` on the meta device; a builder that rejects its arguments' values
    (e.g. a string for a width) is a ConfigError naming them."""
    args = OmegaConf.to_container(node.args, resolve=True)
    try:
        return skeleton(node.arch, in_shape, num_classes, **args)
    except ConfigError as e:  # get_model's own ("arch 'x' returned ..."): name the config key
        if key and str(e).startswith("arch "):
            raise ConfigError(f"{key}.{e}") from None
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key + '.args' if key else 'args'}={args}: model {node.arch!r} cannot be built for "
                          f"input {tuple(in_shape)} and {num_classes} classes: {e}") from None


def _dry_build(p: RunPlan) -> nn.Module:
    """Build the method on skeletons of the student and teacher: its constructor's checks (layer
    names, feature shapes, its own config) run as they will at assembly; then the feature kinds
    are checked against the method's requirements. -> the student skeleton."""
    student = _skeleton(p.cfg.student, p.in_shape, p.num_classes, "student")
    teacher = _teacher_skeleton(p)
    method = _construct(p, p.cfg.method, student, teacher)
    if method is not None:
        _check_feature_kinds(p, method)
    return student


def _teacher_skeleton(p: RunPlan):
    if not p.teachers:
        return None
    with torch.device("meta"):
        models = [_skeleton(t, p.in_shape, _teacher_classes(p, t), key) for key, t in zip(_teacher_keys(p), p.teachers)]
        model = EnsembleModel(models) if p.ensemble else models[0]
    return FrozenTeacher(model, p.in_shape)


def _construct(p: RunPlan, method_cfg, student, teacher):
    """The method built on meta-device skeletons, its INFO lines muted (assembly logs them); None
    when a constructor needs real tensors (then assembly is where its checks run)."""
    logger = logging.getLogger("kdexp.methods")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with torch.device("meta"):
            return p.method_cls(method_cfg, student, teacher)
    except ConfigError:
        raise
    except Exception as e:  # not a config mistake: e.g. an op without a meta kernel
        log.debug("plan: method=%s cannot be built on skeletons (%s: %s); its checks run at assembly",
                  p.name, type(e).__name__, e)
        return None
    finally:
        logger.setLevel(level)


def _mismatch(want: str, features) -> List[Tuple[str, tuple]]:
    """The tapped (layer, shape) pairs whose kind is not `want` (maps | vectors)."""
    kind = {"maps": "map", "vectors": "vector"}[want]
    return [(n, s) for n, s in features if feature_kind(s) != kind]


def _check_feature_kinds(p: RunPlan, method) -> None:
    want = p.requires.features
    if want in ("none", "any"):
        return
    what = {"maps": "spatial feature maps (C,H,W with H*W > 1)", "vectors": "feature vectors"}[want]
    tapped = method.tapped_features()
    for side, node in (("student", p.cfg.student), ("teacher", p.teachers[0] if p.teachers else None)):
        bad = _mismatch(want, tapped.get(side, []))
        if not bad:
            continue
        layers = ", ".join(f"{n} {tuple(s)}" for n, s in bad)
        fitting = _fitting_students(p) if side == "student" else _fitting_teachers(p)
        hint = (f"{side} options that fit: {', '.join(fitting)} (e.g. {side}={fitting[0]})" if fitting
                else f"no {side} option of conf/{side} fits")
        got = "vectors (no spatial extent)" if want == "maps" else "spatial maps"
        raise ConfigError(f"method={p.name} compares {what}, but {side}.arch={node.arch} gives {got} at the tapped "
                          f"layers {layers}: its term would carry no signal; {hint}; or set method.{side}_layers")


def _fits(p: RunPlan, student_node, teacher) -> bool:
    """Whether the method's student features fit its requirements with this student option."""
    try:
        student = _skeleton(student_node, p.in_shape, p.num_classes)
        method = _construct(p, p.cfg.method, student, teacher)
    except ConfigError:
        return False
    return method is not None and not _mismatch(p.requires.features, method.tapped_features().get("student", []))


def _model_options(group: str):
    """(name, node) of the options of `group` that name a model: not custom (arch=???, the user's own)."""
    nodes = ((name, _load_option(group, name, group)) for name in group_options(config_dir(), group))
    return [(name, node) for name, node in nodes if not OmegaConf.is_missing(node, "arch")]


def _fitting_students(p: RunPlan) -> List[str]:
    teacher = _teacher_skeleton(p)
    return [name for name, node in _model_options("student") if _fits(p, node, teacher)]


def _fitting_teachers(p: RunPlan) -> List[str]:
    out = []
    for name, node in _model_options("teacher"):
        with torch.device("meta"):
            model = _skeleton(node, p.in_shape, p.num_classes)
        try:
            method = _construct(p, p.cfg.method, _skeleton(p.cfg.student, p.in_shape, p.num_classes),
                                FrozenTeacher(model, p.in_shape))
        except ConfigError:
            continue
        if method is not None and not _mismatch(p.requires.features, method.tapped_features().get("teacher", [])):
            out.append(name)
    return out
