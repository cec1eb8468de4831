"""Datasets that need no download: scikit-learn's digits (the default) and user .npz files."""
import os

import numpy as np

from kdexp.data import as_images, register_dataset, stratified_split
from kdexp.errors import ConfigError, DataError


@register_dataset("digits")
def digits(cfg):
    """scikit-learn load_digits: 1,797 real 8x8 grayscale digits (values 0..16), 10 classes."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]  # (N,1,8,8) in [0,1]
    x_tr, x_va, y_tr, y_va = stratified_split(x, d.target, cfg.val_fraction, cfg.split_seed)
    return x_tr, y_tr, x_va, y_va, 10


@register_dataset("npz")
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
