"""Teacher provider: for each teacher recipe of the run plan (kdexp.engine.plan), load
`teacher.checkpoint`, or train the teacher once with its own recipe (the one fit loop) and cache
it under paths.cache_dir, keyed by a hash of everything that determines it. Writes are atomic
and under a file lock, so parallel sweep jobs train it once. An ensemble's members (`teachers=
[...]`) are provided the same way and their softmax outputs averaged."""
import argparse
import contextlib
import hashlib
import json
import logging
import os
import pickletools
import re
import tempfile
import time
import zipfile
from dataclasses import replace
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
from filelock import FileLock
from omegaconf import OmegaConf

from kdexp.data import Data, load_dataset
from kdexp.data.stream import LazyInputs, subset
from kdexp.engine.evaluate import evaluate
from kdexp.engine.fit import fit
from kdexp.engine.record import epoch_summary, student_weights
from kdexp.engine.source import limited, source_for
from kdexp.engine.stopping import Threshold
from kdexp.engine.steppers import MethodStepper
from kdexp.errors import ConfigError
from kdexp.io import atomic_json_dump, atomic_torch_save
from kdexp.losses import ensemble_log_probs
from kdexp.methods import Batch, get_method
from kdexp.models import builder_fingerprint, get_model
from kdexp.models.taps import run_with_features
from kdexp.seeding import derive_seed

log = logging.getLogger(__name__)
CACHE_VERSION = 3  # bump when the teacher training code changes what a recipe produces
# 2: CIFAR ResNets moved to kdexp/models/cifar.py with RepDistiller's parameter names


class FrozenTeacher:
    """A frozen teacher in eval mode (deliberately not an nn.Module, so that no method or
    optimizer picks up its parameters). `logits(batch)` is what methods call."""

    def __init__(self, model: torch.nn.Module, in_shape=None):
        self.model = model.eval()
        # input shape (C,H,W) of the data: feature methods probe feature shapes with it
        self.in_shape = tuple(in_shape) if in_shape is not None else None
        for p in self.model.parameters():
            p.requires_grad_(False)
            p.grad = None  # a freshly trained teacher keeps its last gradients otherwise

    @torch.no_grad()
    def logits(self, batch: Batch) -> torch.Tensor:
        return self.model(batch.x)

    @torch.no_grad()
    def features(self, batch: Batch, names) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(logits, {name: tapped feature}) from one forward; names as in kdexp.models.taps."""
        return run_with_features(self.model, batch.x, names, "teacher")


class EnsembleModel(nn.Module):
    """Teacher ensemble as one model: its logits are log(mean_m softmax(z_m)), the log of the
    members' averaged softmax outputs (`kdexp.losses.ensemble_log_probs`). Softening them with T
    gives p_bar^(1/T) renormalized (T=1: exactly the average). Convention: the average is taken
    at T=1 and then softened, not the average of the members' softened outputs, so that every
    method (and the teacher-output cache) sees an ensemble as one model with logits."""

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        return ensemble_log_probs([m(x) for m in self.members])


def data_fingerprint(data: Data) -> str:
    """Cheap content hash of the training set (a strided sample of x, all of y)."""
    h = hashlib.sha256()
    if isinstance(data.x_train, LazyInputs):  # streamed: its files (names, sizes, times) and transforms
        h.update(data.x_train.fingerprint().encode())
        h.update(data.y_train.cpu().numpy().tobytes())
        return h.hexdigest()
    stride = max(1, len(data.x_train) // 2048)
    for t in (data.x_train[::stride], data.y_train, torch.tensor(data.x_train.shape)):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# dataset keys that say how the data is read, not what it is: not part of the teacher's key
LOADING_KEYS = ("in_memory", "memory_budget_gb", "workers")
# dataset keys that change the data, left out of the key at these defaults (keys made before they existed stay valid)
STREAM_DEFAULTS = {"mean": None, "std": None, "augment_scale": [0.08, 1.0], "crop_size": None, "resize": None}


def teacher_key(tcfg, dataset_cfg, data: Data) -> str:
    t = OmegaConf.to_container(tcfg, resolve=True)
    recipe = {k: t[k] for k in ("arch", "args", "epochs", "batch_size", "seed", "optim")}
    if recipe["optim"].get("name") != "dot":  # optim.delta is DOT's alone: keys of the others stay as they were
        recipe["optim"] = {k: v for k, v in recipe["optim"].items() if k != "delta"}
    if t.get("stop_at_acc") is not None:  # only when set, so that existing cache keys stay valid
        recipe["stop_at_acc"] = t["stop_at_acc"]
    if t.get("labeled_only"):  # only when set: trained on the labeled part alone
        recipe["labeled_only"] = True
    code = builder_fingerprint(t["arch"])  # a user's model (import path): its source file, so edits retrain
    if code is not None:
        recipe["code"] = code
    # label_fraction is left out: the teacher is trained on every label whatever the student keeps
    # (unless teacher.labeled_only). teacher.classes enters through dataset_cfg (see _provide_one).
    ds = {k: v for k, v in OmegaConf.to_container(dataset_cfg, resolve=True).items()
          if k not in ("root", "download", "augment_views") + LOADING_KEYS and (k != "label_fraction" or t.get("labeled_only"))}
    for k, default in STREAM_DEFAULTS.items():  # keys of runs that leave them at their defaults stay as they were
        if ds.get(k, default) == default:
            ds.pop(k, None)
    if ds.get("augment", "none") == "none":  # keys of runs without augmentation stay as they were
        for k in ("augment", "augment_pad"):
            ds.pop(k, None)
    blob = json.dumps({"v": CACHE_VERSION, "teacher": recipe, "dataset": ds, "data": data_fingerprint(data)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _train(tcfg, data: Data, eval_batch_size: int, progress: bool, debug=None) -> Tuple[nn.Module, List[dict]]:
    """Train a teacher on labels (ce) with its own recipe -> (model in eval mode, its history: one
    dict of train/* and val/* metrics per epoch, logged as it goes)."""
    torch.manual_seed(derive_seed(tcfg.seed, "teacher/init"))
    model = get_model(tcfg.arch, data.in_shape, data.num_classes, **tcfg.args).to(data.y_train.device)
    ce = get_method("ce")(OmegaConf.create({"w_ce": 1.0, "alpha": 0.0, "temperature": 1.0}), model)
    stop = tcfg.get("stop_at_acc")
    reached = Threshold("val/acc", stop, "max", "teacher.stop_at_acc") if stop is not None else None
    log.info("training teacher %s for %d epochs%s (cached afterwards)", tcfg.arch, tcfg.epochs,
             "" if stop is None else f", or until val/acc >= {stop}")

    def on_epoch(epoch, metrics, _state):
        log.info("teacher epoch %d/%d  %s", epoch + 1, tcfg.epochs, epoch_summary(metrics))
        why = reached(epoch + 1, metrics) if reached is not None else None
        if why:
            log.info("teacher: %s after epoch %d: stopped", why, epoch + 1)
        return bool(why)

    # labeled=None: the teacher learns from every training label (a transfer set only hides labels
    # from the student, as in Hinton et al.'s 3 % experiment)
    train_data = replace(data, labeled=None)
    if tcfg.get("labeled_only") and data.labeled is not None:  # data distillation's teacher
        train_data = replace(data, x_train=subset(data.x_train, data.labeled), y_train=data.y_train[data.labeled],
                             labeled=None)
    if data.augment is not None:  # fresh draws every epoch (augment_views is the student's setting)
        train_data = replace(train_data, augment=replace(data.augment, views=0))
    source = limited(source_for(train_data, batch_size=tcfg.batch_size, seed=derive_seed(tcfg.seed, "teacher/batches")),
                     debug)
    history = fit(MethodStepper(ce, train_data, eval_batch_size, desc="teacher"), source, optim_cfg=tcfg.optim,
                  epochs=tcfg.epochs, on_epoch=on_epoch, progress=progress, desc="teacher")
    return model.eval(), [{"epoch": epoch, **{k: v for k, v in metrics.items() if k.startswith(("train/", "val/"))}}
                          for epoch, metrics in enumerate(history, 1)]


def _reason(e: Exception) -> str:
    """One line for why torch.load failed: the specific part of its (long, multi-line) message."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    specific = [ln for ln in lines if "error" in ln.lower() or "unsupported" in ln.lower() or "invalid" in ln.lower()]
    return f"{type(e).__name__}: {(specific or lines or [''])[-1][:200]}"


# -- reading teacher.checkpoint ------------------------------------------------------------------
# Wrappers around a state_dict, tried in this order: a generic "state_dict" (kdexp's teacher cache,
# Lightning), "model_state_dict" (the PyTorch tutorials' layout), "model" (RepDistiller: {"epoch",
# "model", "accuracy" | "best_acc", "optimizer"[, "opt"]}), "net" (pytorch-cifar style scripts).
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
# Key prefixes of a model saved through a wrapper: DataParallel/DDP ("module."), a LightningModule
# holding the network as self.model ("model.").
WRAPPER_PREFIXES = ("module.", "model.")
# Harmless plain-data classes allowed in a weights_only read: RepDistiller's *_last.pth stores its
# argparse options under "opt".
SAFE_GLOBALS = [argparse.Namespace]


def _checkpoint_file(path: str, what: str) -> str:
    """The file to read: a kdexp run directory stands for its student (student.pt, or the
    student in checkpoints/last.pt of a run made before student.pt existed)."""
    if os.path.isdir(path):
        for name in ("student.pt", os.path.join("checkpoints", "last.pt")):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise ConfigError(f"{what}={path!r} is a directory without student.pt or checkpoints/last.pt "
                          f"(not a kdexp run directory?)")
    if not os.path.isfile(path):
        raise ConfigError(f"{what}={path!r}: no such file")
    return path


def _pickles_a_module(path: str) -> bool:
    """Whether the file is a whole pickled nn.Module (torch.save(model)). Decided by scanning the
    pickle's opcodes, which executes nothing: every module's pickled __dict__ names its
    `_parameters` and `_modules`."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith("data.pkl"))
            ops = pickletools.genops(z.read(name))
            return {"_parameters", "_modules"} <= {arg for _, arg, _ in ops if isinstance(arg, str)}
    except Exception:  # not torch's zip format, or no pickle in it: then not a module we can name
        return False


def _read(path: str, where: str):
    """torch.load with weights_only=True (tensors and plain containers: a checkpoint runs no code)."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if _pickles_a_module(path):
            raise ConfigError(f"{where} is a whole pickled model (torch.save(model)), which loads only by "
                              f"running its code (weights_only=False); save its weights instead, "
                              f"torch.save(model.state_dict(), path), and pass that file") from None
        raise ConfigError(f"{where} is not a readable PyTorch checkpoint of tensors ({_reason(e)})") from None


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and torch.is_tensor(v)
                                                       for k, v in obj.items())


def _found(obj) -> str:
    """What a file holds, in a few words (for the one-line error)."""
    if isinstance(obj, dict):
        keys = [str(k) for k in list(obj)[:8]]
        return f"a dict with keys {keys}{' ...' if len(obj) > 8 else ''}" if obj else "an empty dict"
    if torch.is_tensor(obj):
        return f"a single tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


def _unwrap(obj, where: str) -> dict:
    """The state_dict inside any accepted layout: a kdexp checkpoint (last.pt / best.pt: the
    "student." keys of its "method" entry), a plain state_dict, or one inside WRAPPER_KEYS
    (nested wrappers too)."""
    if isinstance(obj, dict) and isinstance(obj.get("method"), dict) and "epoch" in obj:
        student = student_weights(obj["method"])
        if student:
            return student
    top = obj
    for _ in range(4):
        if _is_state_dict(obj):
            return dict(obj)
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    raise ConfigError(f"{where} holds {_found(top)}: no state_dict of this architecture")


def _strip_prefixes(state: dict, expected: dict, where: str) -> dict:
    """Drop a wrapper's key prefix (WRAPPER_PREFIXES) while every key carries it and none already
    names a tensor of the model; says so in one log line."""
    stripped = ""
    while not set(state) & set(expected):
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
        stripped += prefix
    if stripped:
        log.info("%s: stripped the key prefix %r (saved through DataParallel/DDP or Lightning)", where, stripped)
    return state


def _fill_counters(state: dict, expected: dict) -> dict:
    """BatchNorm's num_batches_tracked is a step counter, not a weight, and torchvision checkpoints
    saved before it existed lack it: the model's own value stands in."""
    return {**{k: v for k, v in expected.items() if k.endswith("num_batches_tracked") and k not in state}, **state}


def _check_fit(state: dict, expected: dict, where: str) -> None:
    """Missing/unexpected keys, then shapes (with the class-count hint for the output layer)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConfigError(f"{where} does not fit this teacher architecture: missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]} (a checkpoint of another architecture?)")
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
             if hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        last = list(expected)[-2:]  # weight and bias of the output layer
        classes = [(k, h, w) for k, h, w in wrong if k in last and h[0] != w[0]]
        k, have, want = classes[0] if classes else wrong[0]
        hint = (f"for {have[0]} classes, this dataset has {want[0]}" if classes
                else "for a different input size/channels or model width")
        raise ConfigError(f"{where} does not fit this teacher for this dataset: {k} has shape {have} in "
                          f"the checkpoint but {want} here ({len(wrong)} tensor(s) differ; trained {hint}?)")


def read_state_dict(path: str, model: torch.nn.Module, what: str = "teacher.checkpoint") -> dict:
    """The state_dict for `model` in `path` (a file in any accepted layout, or a kdexp run
    directory), checked against the model; anything else is one ConfigError line naming the file."""
    file = _checkpoint_file(path, what)
    where = f"{what}={path!r}" + ("" if file == path else f" ({file})")
    expected = model.state_dict()
    state = _strip_prefixes(_unwrap(_read(file, where), where), expected, where)
    state = _fill_counters(state, expected)
    _check_fit(state, expected, where)
    return state


def _load_state(path: str, model: torch.nn.Module, what: str) -> None:
    model.load_state_dict(read_state_dict(path, model, what))


def provide_teacher(plan, data: Data) -> Tuple[FrozenTeacher, dict]:
    """The teacher of a run plan -> (frozen teacher, info {source: trained|cache|checkpoint, key,
    val/acc}); an ensemble's info adds `members` (one such dict per member, with its arch) and its
    source is the members' common source (or e.g. "cache+trained"). With a domain shift the teacher
    is trained and evaluated on the source views (the key is then that of the unshifted data)."""
    data = data.source_only()
    if plan.ensemble:
        return _provide_ensemble(plan.cfg, data, plan.teachers)
    model, info = _provide_one(plan.teachers[0], plan.cfg, data)
    return FrozenTeacher(model, data.in_shape), info


def _provide_ensemble(cfg, data: Data, member_cfgs) -> Tuple[FrozenTeacher, dict]:
    models, infos = [], []
    for tcfg in member_cfgs:
        model, info = _provide_one(tcfg, cfg, data)
        models.append(model)
        infos.append({"arch": tcfg.arch, **info})
    ensemble = EnsembleModel(models).to(data.y_train.device)
    acc = evaluate(ensemble, data.x_val, data.y_val, cfg.eval_batch_size)["acc"]
    sources = sorted({i["source"] for i in infos})
    key = hashlib.sha256(json.dumps([i["key"] for i in infos]).encode()).hexdigest()[:20]
    log.info("teacher ensemble of %d (%s): val/acc %.4f", len(models), ", ".join(i["arch"] for i in infos), acc)
    info = {"source": "+".join(sources), "key": f"ensemble-{key}", "val/acc": acc, "members": infos}
    return FrozenTeacher(ensemble, data.in_shape), info


def _provide_one(tcfg, cfg, data: Data) -> Tuple[torch.nn.Module, dict]:
    """One teacher model (eval mode, on the data's device) and its info."""
    device = data.y_train.device
    dataset_cfg = cfg.dataset
    if tcfg.get("classes"):  # pretrained on another class subset (layer transfer)
        dataset_cfg = OmegaConf.merge(cfg.dataset, {"classes": list(tcfg.classes)})
        data = load_dataset(dataset_cfg, cache_dir=cfg.paths.cache_dir).to(device)
    model = get_model(tcfg.arch, data.in_shape, data.num_classes, **tcfg.args)
    history: List[dict] = []
    if tcfg.checkpoint:
        _load_state(os.path.expanduser(tcfg.checkpoint), model, "teacher.checkpoint")
        source, key = "checkpoint", os.path.abspath(tcfg.checkpoint)
    else:
        key = teacher_key(tcfg, dataset_cfg, data)
        debug = cfg.get("debug")
        throwaway = debug is not None and debug.get("train_batches") is not None
        with _cache_folder(cfg, throwaway) as folder:
            path = os.path.join(folder, f"{re.sub(r'[^A-Za-z0-9_.-]', '_', tcfg.arch)}-{key}.pt")  # mymodels:Net
            with FileLock(path + ".lock"):  # concurrent jobs wait here while one trains
                if os.path.isfile(path):
                    _load_state(path, model, "teacher cache file")
                    history = _read_history(path)
                    source = "cache"
                else:
                    t0 = time.perf_counter()
                    model, history = _train(tcfg, data, cfg.eval_batch_size, cfg.progress, debug)
                    atomic_json_dump(history, path + HISTORY)  # before the weights: a cached teacher has its curves
                    atomic_torch_save({"state_dict": model.state_dict(), "arch": tcfg.arch,
                                       "config": OmegaConf.to_container(tcfg, resolve=True)}, path)
                    log.info("teacher trained in %.1fs, %s", time.perf_counter() - t0,
                             f"not cached: debug.train_batches={debug.train_batches} (a throw-away cache)"
                             if throwaway else f"cached at {path}")
                    source = "trained"
    model = model.to(device).eval()
    acc = evaluate(model, data.x_val, data.y_val, cfg.eval_batch_size)["acc"]
    log.info("teacher %s (%s): val/acc %.4f", tcfg.arch, source, acc)
    info = {"source": source, "key": key, "val/acc": acc}
    if history:
        info["history"] = history
    return model, info


HISTORY = ".history.json"  # beside a cached teacher's weights: its per-epoch metrics


def _read_history(path: str) -> List[dict]:
    """A cached teacher's training curves (none for a cache file written before they were kept)."""
    try:
        with open(path + HISTORY) as f:
            return json.load(f)
    except (OSError, ValueError):
        return []


@contextlib.contextmanager
def _cache_folder(cfg, throwaway: bool):
    """<paths.cache_dir>/teachers, or a temporary folder removed afterwards when the teacher trains
    on fewer batches than its recipe (debug.train_batches): its key does not say so, and it must
    never stand in for the real teacher of a later run."""
    if throwaway:
        with tempfile.TemporaryDirectory(prefix="kdexp-debug-teachers-") as folder:
            yield folder
        return
    folder = os.path.join(os.path.expanduser(cfg.paths.cache_dir), "teachers")
    os.makedirs(folder, exist_ok=True)
    yield folder
