"""dataset=custom: any map-style torch.utils.data.Dataset by import path, dataset.train._target_ (its
constructor's keyword arguments beside it, e.g. +dataset.train.root=...), and the same for
dataset.val (no dataset.val._target_: a stratified split of train, dataset.val_fraction). Each dataset is read fully
into memory once, or streamed item by item (dataset.in_memory; kdexp.data.stream): item i is (x, y); x a tensor,
numpy array or PIL image, y an integer class id.

Its signature is unknown (None, None): the run plan does not construct the user's class, which may
download or scan a disk; the shape is checked when the data is loaded."""
import importlib
import sys
from typing import Any, Dict, Tuple

import numpy as np

from kdexp.data.core import as_images, fraction_held_out, register_dataset, split_for_validation
from kdexp.data.images import channels_of, pil_to_array
from kdexp.data.sanity import DataContentError
from kdexp.data.stream import PROGRESS_ABOVE, DatasetReader, Listing
from kdexp.errors import ConfigError



def custom_origin(cfg) -> str:
    """How messages name a custom dataset: its class, the config value that chose it."""
    node = cfg.get("train") or {}
    return f"dataset.train._target_={node.get('_target_')!r}"


def _locate(key: str, target) -> type:
    """The class (or factory) named `target` ('pkg.mod.Name'), or one line saying why not."""
    if not isinstance(target, str) or "." not in target:
        raise ConfigError(f"{key}._target_={target!r}: name a Dataset class by import path, e.g. "
                          f"{key}._target_=mypkg.data.MyDataset")
    module, _, name = target.rpartition(".")
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # ModuleNotFoundError, or an error raised while the module runs
        raise ConfigError(f"{key}._target_={target!r}: cannot import module {module!r} ({type(e).__name__}: "
                          f"{_line(e)}); check the name and that its folder is on PYTHONPATH") from None
    if not hasattr(mod, name):
        raise ConfigError(f"{key}._target_={target!r}: module {module!r} ({getattr(mod, '__file__', '?')}) has "
                          f"no attribute {name!r}")
    return getattr(mod, name)


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _kwargs(node) -> Dict[str, Any]:
    """The constructor's keyword arguments: every key of the node but _target_, resolved."""
    from omegaconf import DictConfig, OmegaConf

    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    return {k: v for k, v in plain.items() if k != "_target_"}


def instantiate(node, key: str):
    """The user's dataset: its class located, then called with the node's other keys."""
    if node is None or not node.get("_target_"):
        raise ConfigError(f"dataset=custom needs {key}._target_=pkg.module.MyDataset (a torch Dataset by import path; "
                          f"its constructor arguments as +{key}.NAME=VALUE)")
    cls = _locate(key, node.get("_target_"))
    kwargs = _kwargs(node)
    try:
        dataset = cls(**kwargs)
    except Exception as e:
        raise ConfigError(f"{key}._target_={node.get('_target_')!r}: constructing it with {kwargs} failed "
                          f"({type(e).__name__}: {_line(e)})") from None
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise ConfigError(f"{key}._target_={node.get('_target_')!r} gave a {type(dataset).__name__} without __len__ "
                          f"and __getitem__; kdexp reads map-style datasets (torch.utils.data.Dataset)")
    return dataset


def _as_array(x, where: str, i: int) -> np.ndarray:
    """One input as float32: PIL images as imagefolder reads them ((C, H, W) in [0, 1]), uint8
    tensors and arrays / 255, everything numeric else as it is."""
    if hasattr(x, "mode") and hasattr(x, "convert"):  # a PIL image
        return pil_to_array(x, channels_of(x.mode), None)
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_) or np.issubdtype(a.dtype, np.complexfloating):
        raise DataContentError(f"{where}: item {i} has an input of type {type(x).__name__} (dtype {a.dtype}); return "
                               f"a tensor, a numeric numpy array or a PIL image")
    return a.astype(np.float32)


def _as_sample(x, where: str, i: int) -> np.ndarray:
    """One input laid out as read_all lays out the stacked inputs (as_images)."""
    return as_images(_as_array(x, where, i)[None])[0]


def _as_label(y, where: str, i: int) -> int:
    """One label as an int class id: a Python/numpy int or a one-element tensor/array."""
    a = np.asarray(y.detach().cpu().numpy() if hasattr(y, "detach") else y)
    if a.size != 1 or not (np.issubdtype(a.dtype, np.integer) or (np.issubdtype(a.dtype, np.floating)
                                                                   and float(a.ravel()[0]).is_integer())):
        raise DataContentError(f"{where}: item {i} has label {y!r}; labels must be integer class ids 0..C-1")
    return int(a.ravel()[0])


def _items(dataset, where: str):
    """Indices 0..N-1, with a tqdm bar on a terminal for more than PROGRESS_ABOVE samples."""
    n = len(dataset)
    if n == 0:
        raise DataContentError(f"{where}: the dataset has no samples (len 0)")
    if n > PROGRESS_ABOVE and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(range(n), desc=f"reading {type(dataset).__name__}", unit="sample")
    return range(n)


def read_all(dataset, where: str) -> Tuple[np.ndarray, np.ndarray]:
    """Every item of `dataset` -> (x float32 (N, ...), y int64 (N,)); all inputs one shape."""
    xs, ys = [], []
    for i in _items(dataset, where):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DataContentError(f"{where}: item {i} is a {type(item).__name__}, not an (input, label) pair")
        xs.append(_as_array(item[0], where, i))
        ys.append(_as_label(item[1], where, i))
        if xs[-1].shape != xs[0].shape:
            raise DataContentError(f"{where}: item {i} has input shape {xs[-1].shape}, item 0 {xs[0].shape}; every "
                                   f"input needs one shape (resize them in the dataset, e.g. a transform)")
    return as_images(np.stack(xs)), np.asarray(ys, dtype=np.int64)


def _read(cfg, dataset, where: str):
    """(inputs, labels) of a user's dataset: every item read into memory (read_all), or, when the data
    streams (dataset.in_memory, kdexp.data.core.in_memory), a Listing of its items and the labels alone:
    its `targets` (torchvision's convention) or a pass over the items' labels."""
    from kdexp.data.core import in_memory

    listing = Listing(DatasetReader(dataset, where, _as_sample))
    if in_memory(cfg, listing)[0]:
        return read_all(dataset, where)
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == len(dataset):
        labels = [_as_label(y, where, i) for i, y in enumerate(targets)]
    else:
        labels = [_as_label(dataset[i][1], where, i) for i in _items(dataset, where)]
    return listing, np.asarray(labels, dtype=np.int64)


def _num_classes(dataset):
    """len(dataset.classes) when the dataset names its classes (torchvision's do), else None:
    load_dataset then takes the largest label + 1 and rejects classes without samples."""
    classes = getattr(dataset, "classes", None)
    return len(classes) if isinstance(classes, (list, tuple)) and len(classes) >= 2 else None


@register_dataset("custom", signature=lambda cfg: (None, None), origin=custom_origin, streams=True,
                  held_out=lambda cfg: "dataset.val" if (cfg.get("val") or {}).get("_target_") else fraction_held_out(cfg))
def custom(cfg):
    """dataset.train (and dataset.val, else a stratified split) instantiated, read into memory or streamed (dataset.in_memory)."""
    where = custom_origin(cfg)
    train = instantiate(cfg.get("train"), "dataset.train")
    num_classes = _num_classes(train)
    x_tr, y_tr = _read(cfg, train, where)
    if cfg.get("val") is not None and cfg.val.get("_target_"):
        x_va, y_va = _read(cfg, instantiate(cfg.val, "dataset.val"), f"dataset.val._target_={cfg.val.get('_target_')!r}")
        return x_tr, y_tr, x_va, y_va, num_classes
    x_tr, x_va, y_tr, y_va = split_for_validation(x_tr, y_tr, cfg, where, "samples", "set dataset.val._target_")
    return x_tr, y_tr, x_va, y_va, num_classes
