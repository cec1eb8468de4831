"""Datasets that need no download: scikit-learn's digits (the default) and user .npz files."""
import importlib.util
import os
import zipfile
from typing import Optional, Tuple

import numpy as np

from kdexp.data.core import as_images, as_images_shape, register_dataset, stratified_split
from kdexp.errors import ConfigError, DataError


def _digits_arrays():
    """(images (N,8,8) float64 in 0..16, labels (N,)): scikit-learn's load_digits. Its data file is
    read directly when it is where scikit-learn keeps it, which spares importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            data = np.loadtxt(path, delimiter=",")  # 64 pixels then the label per row, as load_digits reads it
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


@register_dataset("digits", signature=lambda cfg: ((1, 8, 8), 10))
def digits(cfg):
    """scikit-learn load_digits: 1,797 real 8x8 grayscale digits (values 0..16), 10 classes."""
    images, target = _digits_arrays()
    x = (images / 16.0).astype(np.float32)[:, None]  # (N,1,8,8) in [0,1]
    x_tr, x_va, y_tr, y_va = stratified_split(x, target, cfg.val_fraction, cfg.split_seed)
    return x_tr, y_tr, x_va, y_va, 10


_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _npy_shape(archive: zipfile.ZipFile, member: str) -> Optional[Tuple[int, ...]]:
    """Shape of one .npy member of an npz archive, from its header alone. np.load(mmap_mode=...)
    does not help here: it maps plain .npy files only and reads an npz member whole. A member is
    streamed, so the header costs a few KiB even when the archive is compressed (savez_compressed):
    the array itself is never read. None for a header numpy's public readers do not parse
    (version 3.0) or an object array (the loader refuses pickles)."""
    with archive.open(member) as f:
        read = _NPY_HEADERS.get(np.lib.format.read_magic(f))
        if read is None:
            return None
        shape, _, dtype = read(f)
    return None if dtype.hasobject else tuple(shape)


def npz_signature(cfg) -> Tuple[Optional[Tuple[int, ...]], None]:
    """dataset=npz: the input shape from the header of array x (as `as_images` lays it out); the
    class count is None (it needs the labels). A missing or unreadable file gives None too: the
    loader reports that error with its own message, the run plan must not raise for it."""
    if not cfg.path:
        return None, None
    try:
        with zipfile.ZipFile(os.path.abspath(os.path.expanduser(cfg.path))) as archive:
            names = set(archive.namelist())
            members = [k if k in names else f"{k}.npy" for k in ("x", "y")]  # np.load's key -> member rule
            if not set(members) <= names:
                return None, None
            shape = _npy_shape(archive, members[0])
    except Exception:  # any unreadable file (not a zip, truncated, corrupt): the loader says why
        return None, None
    return (as_images_shape(shape)[1:] if shape else None), None


@register_dataset("npz", signature=npz_signature)
def npz(cfg):
    """A user file `dataset.path` with arrays x (N,...) and y (N,) of integer labels;
    optional x_val/y_val, else a stratified split of dataset.val_fraction."""
    if not cfg.path:
        raise ConfigError("dataset=npz needs dataset.path=/path/to/file.npz (arrays x and y)")
    path = os.path.abspath(os.path.expanduser(cfg.path))
    if not os.path.isfile(path):
        raise ConfigError(f"dataset.path={cfg.path!r}: no such file ({path})")
    try:
        f = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ConfigError(f"dataset.path={cfg.path!r} is not a readable .npz file: {e}") from None
    missing = [k for k in ("x", "y") if k not in f.files]
    if missing:
        raise ConfigError(f"{path} lacks array(s) {missing}; it has {f.files}. Save with np.savez(path, x=..., y=...)")
    x, y = as_images(f["x"].astype(np.float32)), f["y"]
    if len(x) != len(y):
        raise ConfigError(f"{path}: x has {len(x)} samples but y has {len(y)}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise ConfigError(f"{path}: y must be a 1-D array of non-negative integer labels (got {y.dtype}, shape {y.shape})")
    if "x_val" in f.files and "y_val" in f.files:
        x_tr, y_tr, x_va, y_va = x, y, as_images(f["x_val"].astype(np.float32)), f["y_val"]
    else:
        x_tr, x_va, y_tr, y_va = stratified_split(x, y, cfg.val_fraction, cfg.split_seed)
    return x_tr, y_tr, x_va, y_va, int(max(y.max(), np.max(y_va)) + 1)
