"""Datasets as in-memory tensors. A dataset builder returns raw splits; `load_dataset`
applies the class subset, normalization and label remapping the same way for all."""
from dataclasses import dataclass, replace
from typing import Tuple

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from kdexp.errors import ConfigError, DataError
from kdexp.registry import Registry

DATASETS = Registry("dataset")
register_dataset = DATASETS.register
list_datasets = DATASETS.names


@dataclass
class Data:
    """Train/val tensors. x: float (N, C, H, W) for images or (N, D) for vectors; y: long (N,)."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int
    name: str

    @property
    def in_shape(self) -> Tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device) -> "Data":
        return replace(self, **{k: getattr(self, k).to(device) for k in ("x_train", "y_train", "x_val", "y_val")})


def stratified_split(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int):
    """Fixed-seed stratified split -> x_train, x_val, y_train, y_val."""
    return train_test_split(x, y, test_size=val_fraction, random_state=seed, stratify=y)


def as_images(x: np.ndarray) -> np.ndarray:
    """(N,H,W) -> (N,1,H,W); channels-last (N,H,W,C) with C in {1,3,4} -> (N,C,H,W)."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        return x.transpose(0, 3, 1, 2)
    return x


def _select_classes(x, y, classes, split: str):
    keep = np.isin(y, classes)
    if not keep.any():
        raise ConfigError(f"dataset.classes={list(classes)} selects no {split} samples (labels present: "
                          f"{sorted(set(np.unique(y).tolist()))})")
    remap = {c: i for i, c in enumerate(classes)}
    return x[keep], np.array([remap[int(v)] for v in y[keep]], dtype=np.int64)


def load_dataset(cfg) -> Data:
    """Build the dataset named cfg.name -> Data (float32 inputs, int64 labels)."""
    build = DATASETS.get(cfg.name)
    x_tr, y_tr, x_va, y_va, num_classes = build(cfg)
    y_tr, y_va = np.asarray(y_tr).astype(np.int64), np.asarray(y_va).astype(np.int64)
    if cfg.classes:
        classes = [int(c) for c in cfg.classes]
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad or len(set(classes)) != len(classes):
            raise ConfigError(f"dataset.classes={classes}: each class must be unique and in 0..{num_classes - 1}")
        x_tr, y_tr = _select_classes(x_tr, y_tr, classes, "train")
        x_va, y_va = _select_classes(x_va, y_va, classes, "val")
        num_classes = len(classes)
    x_tr = torch.as_tensor(np.ascontiguousarray(x_tr), dtype=torch.float32)
    x_va = torch.as_tensor(np.ascontiguousarray(x_va), dtype=torch.float32)
    if cfg.normalize:
        dims = [0] + list(range(2, x_tr.dim()))  # per channel for images, per feature for vectors
        mean, std = x_tr.mean(dims, keepdim=True), x_tr.std(dims, keepdim=True).clamp_min(1e-6)
        x_tr, x_va = (x_tr - mean) / std, (x_va - mean) / std
    return Data(x_tr, torch.as_tensor(y_tr), x_va, torch.as_tensor(y_va), num_classes, cfg.name)


from kdexp.data import builtin, vision  # noqa: E402,F401  (register the datasets)
