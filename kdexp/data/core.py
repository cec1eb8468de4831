"""Datasets as in-memory tensors (the package kdexp.data re-exports this module and registers the
built-in datasets). A dataset builder returns raw splits; `load_dataset`
applies the class subset, normalization and label remapping the same way for all.

Each builder also declares, as registry metadata, what it gives a model before any data is read:
`@register_dataset(name, signature=fn)` with fn(cfg) -> (in_shape or None, num_classes or None),
the builder's raw shape and class count (before dataset.classes). `dataset_signature` turns that
into the `Signature` that `load_dataset` would give, so a run can be checked without loading data.
A builder whose class count only its labels tell (npz) returns num_classes None: load_dataset then
takes the largest label + 1 and requires every class in between to have samples. Optional metadata
`origin=fn`, fn(cfg) -> str, names the data in error messages (npz: "dataset.path='...'"), and
`held_out=fn`, fn(cfg) -> str, says what its validation split is ("the official test split"): the
`splits` of metrics.json, so a reported number says which split it was measured on.

Every dataset passes the checks of kdexp.data.sanity in load_dataset, after the builder and after
the class subset: bad data is one DataError line, valid but suspicious data a line in Data.warnings."""
import hashlib
import logging
import os
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from kdexp.data.augment import Augment
from kdexp.data.domain import apply_transforms, describe, parse_transforms as domain_steps, target_shape
from kdexp.data.stream import (PROGRESS_ABOVE, RRC_SCALE, LazyInputs, as_listing, channel_stats, materialized,
                               nbytes_of, stats_sample)
from kdexp.data.sanity import (check_class_counts, check_finite, check_label_range, check_standardized, checked_labels,
                               labels_num_classes)
from kdexp.errors import ConfigError, DataContentError
from kdexp.registry import Registry

DATASETS = Registry("dataset")
register_dataset = DATASETS.register
list_datasets = DATASETS.names
log = logging.getLogger("kdexp")


@dataclass
class Data:
    """Train/val tensors. x: float (N, C, H, W) for images or (N, D) for vectors; y: long (N,)."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int
    name: str
    # dataset.label_fraction < 1: bool (N_train,), True where the training sample keeps its
    # label; the rest is an unlabeled transfer set. None: every training sample is labeled.
    labeled: Optional[torch.Tensor] = None
    # Domain shift (conf/domain, kdexp.data.domain): the target view of every sample, parallel to
    # x_train / x_val (same index = same sample; x_train / x_val are the source views). None: no shift.
    x_train_target: Optional[torch.Tensor] = None
    x_val_target: Optional[torch.Tensor] = None
    domain: Optional[str] = None  # the shift, e.g. "vflip" (kdexp.data.domain.describe)
    # Name of the view x_train holds, the key of the teacher-output cache: "train" (the source
    # view), "train_target" when a single-view method trains on the target view.
    view: str = "train"
    # dataset.augment: random crop/flip of the training images, replayable (kdexp.data.augment). None: off.
    augment: Optional["Augment"] = None
    # Lines about data that is valid but probably not what was meant (load_dataset also logs each):
    # e.g. a class with no validation sample, which val/acc then does not measure.
    warnings: List[str] = field(default_factory=list)
    # dataset.val_from_train: the dataset's held-out split, moved aside as the test split (x_val is then
    # carved from the training data), measured once after training. None: no test split.
    x_test: Optional[torch.Tensor] = None
    y_test: Optional[torch.Tensor] = None
    x_test_target: Optional[torch.Tensor] = None
    # What each split is, in words: {"val": "the official test split"} or, with a test split,
    # {"val": "dataset.val_from_train=0.1 of the training data ...", "test": "the official test split"}
    splits: Dict[str, str] = field(default_factory=dict)

    TENSORS = ("x_train", "y_train", "x_val", "y_val", "labeled", "x_train_target", "x_val_target", "x_test",
               "y_test", "x_test_target")

    @property
    def in_shape(self) -> Tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device) -> "Data":
        return replace(self, **{k: getattr(self, k).to(device) for k in self.TENSORS if getattr(self, k) is not None})

    def source_only(self) -> "Data":
        """The source views alone (no target view): what a teacher trains and is evaluated on."""
        return replace(self, x_train_target=None, x_val_target=None, x_test_target=None, domain=None)


# Where stratified_split keeps the index arrays it computed (set by load_dataset from paths.cache_dir):
# scikit-learn takes ~1.4 s to import, more than a default run's training, and is needed for nothing else.
_SPLIT_CACHE: Optional[str] = None


def stratified_split(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int):
    """Fixed-seed stratified split (scikit-learn's train_test_split) -> x_train, x_val, y_train, y_val.
    The split depends only on the labels, the fraction and the seed, so its index arrays are kept
    under <paths.cache_dir>/splits/ and reused by later runs without importing scikit-learn."""
    y = np.asarray(y)
    key = hashlib.sha256(np.ascontiguousarray(y).tobytes() + f"{y.dtype}/{val_fraction}/{seed}".encode()).hexdigest()[:20]
    path = os.path.join(_SPLIT_CACHE, "splits", f"{key}.npz") if _SPLIT_CACHE else None
    if path and os.path.isfile(path):
        with np.load(path) as f:
            tr, va = f["train"], f["val"]
    else:
        from sklearn.model_selection import train_test_split

        tr, va = train_test_split(np.arange(len(y)), test_size=val_fraction, random_state=seed, stratify=y)
        if path:
            from kdexp.io import atomic_write

            atomic_write(path, lambda f: np.savez(f, train=tr, val=va))
    return x[tr], x[va], y[tr], y[va]


def fraction_held_out(cfg) -> str:
    """The `held_out` metadata of a dataset without its own split (digits, npz): val_fraction of it."""
    return f"dataset.val_fraction={cfg.val_fraction:g} of the data, stratified (split_seed {cfg.split_seed})"


def split_for_validation(x: np.ndarray, y: np.ndarray, cfg, where: str, what: str, instead: str = "",
                         key: str = "val_fraction"):
    """A validation set split off (x, y): the fraction dataset.<key> of it (a builder's whose source has
    none: val_fraction; one carved from the training data: val_from_train), stratified
    (stratified_split) -> x_train, x_val, y_train, y_val; a split scikit-learn cannot make (a class
    with one sample, fewer validation samples than classes) is one line naming `where` (the
    dataset), the `what` it has ("samples", "training images") and the other way: `instead`."""
    fraction = cfg[key]
    try:
        return stratified_split(x, y, fraction, cfg.split_seed)
    except ValueError as e:
        raise DataContentError(f"{where}: no stratified train/val split of its {len(y)} {what} with "
                               f"dataset.{key}={fraction} ({e}); {instead + ' or ' if instead else ''}change "
                               f"dataset.{key}") from None


def labeled_mask(y: np.ndarray, fraction: float, seed: int) -> torch.Tensor:
    """Stratified choice of the training samples that keep their label (dataset.label_fraction):
    floor(fraction * N) samples, class proportions preserved, fixed by `seed` -> bool (N,)."""
    n = len(y)
    keep = int(fraction * n)
    classes = len(np.unique(y))
    if keep < classes:
        raise ConfigError(f"dataset.label_fraction={fraction} keeps {keep} of {n} training labels, fewer than the "
                          f"{classes} classes; use at least {classes / n:.4f}")
    if keep == n:
        return torch.ones(n, dtype=torch.bool)
    from sklearn.model_selection import train_test_split

    try:
        chosen, _ = train_test_split(np.arange(n), train_size=keep, random_state=seed, stratify=y)
    except ValueError as e:  # e.g. fewer unlabeled samples left than classes
        raise ConfigError(f"dataset.label_fraction={fraction}: no stratified split of {n} samples ({e})") from None
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.as_tensor(chosen)] = True
    return mask


def as_images(x: np.ndarray) -> np.ndarray:
    """(N,H,W) -> (N,1,H,W); channels-last (N,H,W,C) with C in {1,3,4} -> (N,C,H,W)."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        return x.transpose(0, 3, 1, 2)
    return x


def as_images_shape(shape: Sequence[int]) -> Tuple[int, ...]:
    """The shape `as_images` gives an array of `shape`, without the array: as_images runs on a
    broadcast view of one zero (all strides 0, no memory), so the rule lives in one place."""
    return tuple(as_images(np.broadcast_to(np.zeros((), np.float32), tuple(shape))).shape)


def check_classes(classes: Sequence[int], num_classes: Optional[int]) -> None:
    """dataset.classes must be unique and in 0..num_classes-1 (num_classes None: not known before
    the labels are read, so only uniqueness and >= 0 can be checked), and name at least 2 classes:
    a 1-class model predicts its only class and reaches val/acc 1.0 without learning anything."""
    bad = [c for c in classes if c < 0 or (num_classes is not None and c >= num_classes)]
    if bad or len(set(classes)) != len(classes):
        allowed = f"in 0..{num_classes - 1}" if num_classes is not None else ">= 0"
        raise ConfigError(f"dataset.classes={list(classes)}: each class must be unique and {allowed}")
    if len(classes) < 2:
        raise ConfigError(f"dataset.classes={list(classes)}: a classifier needs at least 2 classes; "
                          f"list two or more labels")


@dataclass(frozen=True)
class Signature:
    """What a dataset gives a model, known before any data is read: the input shape without the
    batch dimension ((1, 8, 8) for digits, (D,) for vectors) and the number of classes after
    dataset.classes. None where only the data can tell (an npz file's labels)."""
    in_shape: Optional[Tuple[int, ...]]
    num_classes: Optional[int]


def dataset_signature(cfg, domain=None) -> Signature:
    """The (in_shape, num_classes) that `load_dataset(cfg, domain)` would give, from the dataset's
    declared signature (registry metadata) and the config alone: no data is read, nothing is
    downloaded. dataset.classes sets num_classes to their number (and is checked as load_dataset
    checks it); a domain shift gives the target view's shape (every current transform keeps the
    shape). An unknown dataset name raises the registry's UnknownNameError, as load_dataset does."""
    declared = DATASETS.meta(cfg.name).get("signature")
    in_shape, num_classes = declared(cfg) if declared is not None else (None, None)
    if cfg.get("classes"):
        classes = [int(c) for c in cfg.classes]
        check_classes(classes, num_classes)
        num_classes = len(classes)
    steps = domain_steps(domain)
    if steps and in_shape is not None:
        in_shape = target_shape(in_shape, steps)
    return Signature(tuple(int(s) for s in in_shape) if in_shape is not None else None,
                     int(num_classes) if num_classes is not None else None)


def data_origin(cfg) -> str:
    """How error messages name a dataset's data: the builder's `origin` metadata (npz: its file,
    dataset.path='...'), else dataset=<name>."""
    origin = DATASETS.meta(cfg.name).get("origin")
    return origin(cfg) if origin is not None else f"dataset={cfg.name}"


def _select_classes(x, y, classes, split: str):
    keep = np.isin(y, classes)
    if not keep.any():
        raise ConfigError(f"dataset.classes={list(classes)} selects no {split} samples (labels present: "
                          f"{sorted(set(np.unique(y).tolist()))})")
    remap = {c: i for i, c in enumerate(classes)}
    return x[keep], np.array([remap[int(v)] for v in y[keep]], dtype=np.int64)


def load_dataset(cfg, domain=None, cache_dir: Optional[str] = None) -> Data:
    """Build the dataset named cfg.name -> Data (float32 inputs, int64 labels). `domain` (a
    conf/domain config) adds the target views: its transforms are applied to the raw images
    (after the class subset, before normalization), and both views are standardized with the
    source training statistics. `cache_dir` (paths.cache_dir): where splits are kept. Data that
    cannot train a classifier correctly raises one line (kdexp.data.sanity: a DataError for the
    data, a ConfigError for dataset.classes); Data.warnings lists what is valid but suspicious."""
    global _SPLIT_CACHE
    build = DATASETS.get(cfg.name)
    where = data_origin(cfg)
    _SPLIT_CACHE = os.path.expanduser(cache_dir) if cache_dir else None
    try:
        x_tr, y_tr, x_va, y_va, num_classes = build(cfg)
        y_tr, y_va = checked_labels(x_tr, y_tr, "training", where), checked_labels(x_va, y_va, "validation", where)
        x_tr, y_tr, x_va, y_va, x_te, y_te, splits = _carve_validation(cfg, x_tr, y_tr, x_va, y_va, where)
    finally:
        _SPLIT_CACHE = None
    derived = num_classes is None  # the builder leaves the class count to the labels
    if derived:
        num_classes = labels_num_classes(y_tr, y_va)
    check_label_range(y_tr, y_va, num_classes, where)
    classes = [int(c) for c in cfg.classes] if cfg.classes else None
    if classes:
        check_classes(classes, num_classes)
        x_tr, y_tr = _select_classes(x_tr, y_tr, classes, "train")
        x_va, y_va = _select_classes(x_va, y_va, classes, "val")
        if x_te is not None:
            x_te, y_te = _select_classes(x_te, y_te, classes, "test")
        num_classes = len(classes)
    warnings = check_class_counts(y_tr, y_va, num_classes, where, classes, derived)
    keep, why = in_memory(cfg, x_tr, x_va, x_te)
    if not keep:
        return _streamed(cfg, where, why, (x_tr, y_tr, x_va, y_va, x_te, y_te), num_classes, warnings, splits, domain)
    if cfg.get("augment") == "rrc_flip":
        raise ConfigError(f"dataset.augment=rrc_flip crops every image at its own size, which streamed data does "
                          f"({why}); set dataset.in_memory=false, or dataset.augment=crop_flip for data in memory")
    x_tr, x_va, x_te = materialized(x_tr), materialized(x_va), materialized(x_te) if x_te is not None else None
    if len(x_tr) > PROGRESS_ABOVE:
        log.info("%s: in memory (%s)", where, why)
    x_tr = torch.as_tensor(np.ascontiguousarray(x_tr), dtype=torch.float32)
    x_va = torch.as_tensor(np.ascontiguousarray(x_va), dtype=torch.float32)
    check_finite(x_tr, x_va, where)
    if x_te is not None:
        x_te = torch.as_tensor(np.ascontiguousarray(x_te), dtype=torch.float32)
        y_te = torch.as_tensor(y_te)
    steps = domain_steps(domain)
    x_tr_t = x_va_t = x_te_t = None
    if steps:  # the target views, from the raw images (kdexp.data.domain)
        value_range = (float(x_tr.min()), float(x_tr.max()))
        x_tr_t = apply_transforms(x_tr, steps, "train", value_range)
        x_va_t = apply_transforms(x_va, steps, "val", value_range)
        x_te_t = apply_transforms(x_te, steps, "test", value_range) if x_te is not None else None
    if cfg.normalize:
        mean, std = fixed_stats(cfg, x_tr.dim()) or channel_stats(x_tr)  # per channel (images) or feature (vectors)
        x_tr, x_va = (x_tr - mean) / std, (x_va - mean) / std
        if steps:  # the source statistics: one preprocessing for both views
            x_tr_t, x_va_t = (x_tr_t - mean) / std, (x_va_t - mean) / std
        if x_te is not None:
            x_te = (x_te - mean) / std
            x_te_t = (x_te_t - mean) / std if x_te_t is not None else None
        check_standardized(mean, std, [t for t in (x_tr, x_va, x_tr_t, x_va_t) if t is not None], where)
    fraction = cfg.get("label_fraction", 1.0)
    labeled = labeled_mask(y_tr, fraction, cfg.split_seed) if fraction < 1.0 else None
    for line in warnings:  # once the data has passed every check
        log.warning(line)
    return Data(x_tr, torch.as_tensor(y_tr), x_va, torch.as_tensor(y_va), num_classes, cfg.name, labeled,
                x_tr_t, x_va_t, describe(steps) if steps else None,
                augment=Augment.from_config(cfg, tuple(x_tr.shape[1:])), warnings=warnings,
                x_test=x_te, y_test=y_te, x_test_target=x_te_t, splits=splits)


def auto_bool(value, key: str):
    """A key that is auto, true or false as True, False or "auto" (the strings true/false from a YAML
    or an override too), or one line naming the key and the valid values."""
    choice = {"true": True, "false": False}.get(value, value) if isinstance(value, str) else value
    if choice is not True and choice is not False and choice != "auto":
        raise ConfigError(f"{key}={value!r}: one of auto, true, false")
    return choice


def in_memory_choice(cfg):
    """dataset.in_memory: True, False or "auto"."""
    return auto_bool(cfg.get("in_memory", "auto"), "dataset.in_memory")


def in_memory(cfg, *parts) -> Tuple[bool, str]:
    """Whether the splits (arrays or kdexp.data.stream Listings; None: absent) are read into memory,
    and why in words: dataset.in_memory true | false, or auto (their float32 size within
    dataset.memory_budget_gb; streamed for dataset.augment=rrc_flip)."""
    choice = in_memory_choice(cfg)
    if choice != "auto":
        return choice, f"dataset.in_memory={str(choice).lower()}"
    if cfg.get("augment") == "rrc_flip":
        return False, "dataset.in_memory=auto with dataset.augment=rrc_flip, which crops every image at its own size"
    need = sum(nbytes_of(p) for p in parts if p is not None) / 2 ** 30
    budget = cfg.get("memory_budget_gb", 8.0)
    keep = need <= budget
    return keep, (f"dataset.in_memory=auto: {need:.2f} GB as float32, {'within' if keep else 'above'} "
                  f"dataset.memory_budget_gb={budget:g}")


def fixed_stats(cfg, dim: int):
    """dataset.mean / dataset.std as (1, C, 1, 1) tensors (for inputs of `dim` dimensions), or None."""
    if cfg.get("mean") is None and cfg.get("std") is None:
        return None
    if cfg.get("mean") is None or cfg.get("std") is None or len(cfg.mean) != len(cfg.std):
        raise ConfigError(f"dataset.mean={cfg.get('mean')} and dataset.std={cfg.get('std')}: give both, one value per "
                          f"channel (or neither: the training set's statistics)")
    shape = (1, len(cfg.mean)) + (1,) * (dim - 2)
    return (torch.tensor(list(cfg.mean), dtype=torch.float32).view(shape),
            torch.tensor(list(cfg.std), dtype=torch.float32).view(shape))


def _streamed(cfg, where: str, why: str, splits_xy, num_classes: int, warnings: List[str], splits, domain) -> Data:
    """The Data of streamed splits: LazyInputs over their listings, normalized with the training
    statistics (those of a sample, kdexp.data.stream.stats_sample) or dataset.mean/std."""
    x_tr, y_tr, x_va, y_va, x_te, y_te = splits_xy
    if domain_steps(domain):
        raise ConfigError(f"domain={describe(domain_steps(domain))}: a domain shift transforms the data in memory; "
                          f"{where} streams ({why}): set dataset.in_memory=true")
    listings = [as_listing(x) if x is not None else None for x in (x_tr, x_va, x_te)]
    shape = listings[0].sample_shape
    mean = std = None
    if cfg.normalize:
        mean, std = fixed_stats(cfg, 1 + len(shape)) or channel_stats(stats_sample(listings[0]))
    log.info("%s: streamed by %d DataLoader workers (%s): %d train / %d val samples of shape %s", where,
             cfg.get("workers", 2), why, len(x_tr), len(x_va), shape)
    lazy = [LazyInputs(l, mean, std, cfg.get("workers", 2), scale=cfg.get("augment_scale", RRC_SCALE))
            if l is not None else None for l in listings]
    fraction = cfg.get("label_fraction", 1.0)
    labeled = labeled_mask(y_tr, fraction, cfg.split_seed) if fraction < 1.0 else None
    for line in warnings:
        log.warning(line)
    return Data(lazy[0], torch.as_tensor(y_tr), lazy[1], torch.as_tensor(y_va), num_classes, cfg.name, labeled,
                augment=Augment.from_config(cfg, tuple(shape)), warnings=warnings, x_test=lazy[2],
                y_test=torch.as_tensor(y_te) if y_te is not None else None, splits=splits)


def _carve_validation(cfg, x_tr, y_tr, x_va, y_va, where: str):
    """dataset.val_from_train: the builder's validation split becomes the test split and a stratified
    fraction of the training data the validation split -> (x_tr, y_tr, x_va, y_va, x_te, y_te,
    splits); unset: the builder's splits as they are (no test split)."""
    held_out = DATASETS.meta(cfg.name).get("held_out")
    theirs = held_out(cfg) if held_out is not None else "the dataset's validation split"
    fraction = cfg.get("val_from_train")
    if not fraction:
        return x_tr, y_tr, x_va, y_va, None, None, {"val": theirs}
    x_tr, x_new, y_tr, y_new = split_for_validation(x_tr, y_tr, cfg, where, "training samples", key="val_from_train")
    return x_tr, y_tr, x_new, y_new, x_va, y_va, {
        "val": f"dataset.val_from_train={fraction:g} of the training data, stratified (split_seed {cfg.split_seed})",
        "test": f"{theirs}, measured once after the last epoch"}
