"""Sanity checks that every dataset passes in `load_dataset`, so that bad data stops a run with one
clear line instead of training something wrong: inputs and labels that do not pair up, labels that
are not class ids 0..C-1, a class count the labels do not fill, fewer than two classes, NaN or inf
inputs. Valid data that is probably not what was meant (a class without training or validation
samples) passes with a warning line.

Each check is a few vectorized operations on arrays already in memory (a sum, a bincount, a
min/max), so a valid dataset loads as fast as before and gives the very same tensors."""
from typing import List, Optional, Sequence

import numpy as np
import torch

from kdexp.errors import ConfigError, DataContentError, DataError


def compact(values: Sequence[int]) -> str:
    """[1,2,3]: a list as a command-line override takes it (no spaces), ready to paste."""
    return "[" + ",".join(str(int(v)) for v in values) + "]"


def _which(indices: Sequence[int], classes: Optional[Sequence[int]] = None, shown: int = 8) -> str:
    """'class 0', 'classes 3, 5', 'classes 40, ..., 47, ... (60 in all)'; with a class subset each
    class also names the label it was remapped from, the number the user knows it by."""
    def one(i):
        return f"{int(i)} (label {classes[int(i)]})" if classes else str(int(i))

    names = ", ".join(one(i) for i in indices[:shown])
    more = f", ... ({len(indices)} in all)" if len(indices) > shown else ""
    return f"class{'es' if len(indices) > 1 else ''} {names}{more}"


def _array_names(split: str):
    """The names of a split's arrays in an npz file (x/y, x_val/y_val): the words the messages use."""
    return ("x", "y") if split == "training" else ("x_val", "y_val")


def checked_labels(x, y, split: str, where: str) -> np.ndarray:
    """The labels of one split (`split`: training | validation) as int64 class ids, after checking
    that they pair with the inputs: one 1-D label per input, at least one sample. A length mismatch
    would otherwise fail deep in training, or pair inputs with the wrong labels. Integer labels are
    cast as before; floats that are all whole numbers (labels saved from a float array) are cast
    too; anything else is an error, because casting would truncate 0.5 to class 0 silently."""
    x_name, y_name = _array_names(split)
    y = np.asarray(y)
    if y.ndim != 1:
        hint = f"; save {y_name}.ravel()" if y.ndim == 2 and y.shape[1] == 1 else ""
        raise DataContentError(f"{where}: {y_name} must be a 1-D array of class ids, got shape {y.shape}{hint}")
    if len(x) != len(y):
        raise DataContentError(f"{where}: {x_name} has {len(x)} samples but {y_name} has {len(y)}; "
                               f"each input needs exactly one label")
    if len(y) == 0:
        raise DataContentError(f"{where}: the {split} split has no samples")
    if np.issubdtype(y.dtype, np.integer):
        return y.astype(np.int64)
    if np.issubdtype(y.dtype, np.floating):
        whole = np.isfinite(y) & (np.floor(y) == y)
        if whole.all():
            return y.astype(np.int64)
        i = int(np.argmin(whole))  # the first value that is not a whole number
        raise DataContentError(f"{where}: {split} labels {y_name} must be integer class ids, got dtype {y.dtype} "
                               f"with non-whole values (e.g. {y[i].item()!r} at index {i}); save integer labels 0..C-1")
    raise DataContentError(f"{where}: {split} labels {y_name} must be integer class ids, got dtype {y.dtype} "
                           f"(e.g. {y[0].item()!r}); save integer labels 0..C-1")


def labels_num_classes(y_tr: np.ndarray, y_va: np.ndarray) -> int:
    """The class count of a builder that has none of its own (npz): the largest label + 1."""
    return int(max(y_tr.max(), y_va.max())) + 1


def check_label_range(y_tr: np.ndarray, y_va: np.ndarray, num_classes: int, where: str) -> None:
    """Every label is a class id in 0..num_classes-1: a negative label or one past the last class
    would index outside the model's outputs (a crash on CPU, garbage or a device assert on GPU)."""
    for split, y in (("training", y_tr), ("validation", y_va)):
        lo, hi = int(y.min()), int(y.max())
        if lo < 0:
            raise DataContentError(f"{where}: {split} label {lo} is negative; labels must be class ids 0..C-1")
        if hi >= num_classes:
            raise DataContentError(f"{where}: {split} label {hi} is not a class id of the dataset's {num_classes} "
                                   f"classes; labels must be in 0..{num_classes - 1}")


def check_class_counts(y_tr: np.ndarray, y_va: np.ndarray, num_classes: int, where: str,
                       classes: Optional[Sequence[int]], derived: bool) -> List[str]:
    """Labels (after the class subset `classes`, None: all) that can train and evaluate a
    classifier: at least 2 classes in each split, and no class without any sample where the class
    count comes from the config or the labels (`derived`: max label + 1, where labels 1..10 give
    an empty class 0 that the model would have to predict). Returns the warning lines for data
    that is valid but probably not meant: a class without training or without validation samples."""
    subset = f"dataset.classes={compact(classes)}" if classes else None
    counts = {"training": np.bincount(y_tr, minlength=num_classes),
              "validation": np.bincount(y_va, minlength=num_classes)}
    for split, n in counts.items():
        present = np.flatnonzero(n)
        if len(present) < 2:
            label = classes[int(present[0])] if classes else int(present[0])
            if subset:
                raise ConfigError(f"{where}: {subset} leaves a single class in the {split} split (label {label}): "
                                  f"a classifier needs at least 2 classes")
            raise DataContentError(f"{where}: the {split} split has a single class (label {label}): "
                                   f"a classifier needs at least 2 classes")
    total = counts["training"] + counts["validation"]
    empty = np.flatnonzero(total == 0)
    if len(empty) and subset:
        raise ConfigError(f"{where}: {subset} selects label(s) {compact([classes[i] for i in empty])} that have no "
                          f"sample in train or val; drop them from dataset.classes")
    if len(empty) and derived:
        present = np.flatnonzero(total)
        raise DataContentError(
            f"{where}: the class count comes from the labels (largest label {num_classes - 1} + 1 = {num_classes}), "
            f"but {_which(empty)} {'has' if len(empty) == 1 else 'have'} no sample in train or val; remap the labels "
            f"present to 0..{len(present) - 1} with dataset.classes={compact(present)}, or save labels 0..C-1")
    warnings = []
    for split, n, effect in (("training", counts["training"], "the model cannot learn"),
                             ("validation", counts["validation"], "val/acc does not measure")):
        missing = np.flatnonzero(n == 0)
        if len(missing):
            them = "it" if len(missing) == 1 else "them"
            if subset:
                warnings.append(f"{where}: {subset} leaves {_which(missing, classes)} with no {split} sample: "
                                f"{effect} {them}")
            else:
                verb = "has" if len(missing) == 1 else "have"
                warnings.append(f"{where}: {_which(missing)} {verb} no {split} sample: {effect} {them}")
    return warnings


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every value of x is finite, from one sum: a NaN or inf makes the sum NaN or inf, so
    a finite sum proves every value finite without a boolean copy of the data. A non-finite sum is
    then counted exactly (a float32 sum of large finite values can overflow)."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def check_finite(x_tr: torch.Tensor, x_va: torch.Tensor, where: str) -> None:
    """No NaN or inf in the (float32, not yet standardized) inputs: one of them turns the training
    statistics, every standardized input and then the loss into NaN. Says how many and in how
    many samples of each split, so the user can tell a few bad rows from a broken file."""
    found = []
    for split, x in (("training", x_tr), ("validation", x_va)):
        if _all_finite(x):
            continue
        nan = torch.isnan(x)
        bad = nan | torch.isinf(x)
        n_nan, n_bad = int(nan.sum()), int(bad.sum())
        samples = int(bad.reshape(len(x), -1).any(1).sum())
        plural = "s" if samples != 1 else ""
        found.append(f"{n_nan} NaN and {n_bad - n_nan} inf values in {samples} {split} sample{plural}")
    if found:
        raise DataContentError(f"{where}: x has {', and '.join(found)}; fix or drop those samples")


def check_standardized(mean: torch.Tensor, std: torch.Tensor, tensors: Sequence[torch.Tensor], where: str) -> None:
    """The standardized inputs are finite. Finite inputs can still overflow float32 in the
    training statistics (the variance of values near 1e20) or in (x - mean) / std; an overflowing
    standard deviation would silently turn every input into 0. A constant feature cannot cause it:
    its std is clamped away from 0 before the division."""
    if bool(torch.isfinite(mean).all() and torch.isfinite(std).all()) and all(_all_finite(x) for x in tensors):
        return
    raise DataContentError(f"{where}: the inputs are too large to standardize in float32 (their mean or standard "
                           f"deviation overflows); rescale them (e.g. to [0, 1]) or set dataset.normalize=false")
