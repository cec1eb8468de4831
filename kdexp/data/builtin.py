"""Datasets that need no download: scikit-learn's digits (the default) and user .npz files."""
import importlib.util
import os
import zipfile
from typing import Optional, Tuple

import numpy as np

from kdexp.data.core import (as_images, as_images_shape, fraction_held_out, register_dataset, split_for_validation,
                              stratified_split)
from kdexp.data.sanity import DataContentError, checked_labels
from kdexp.errors import ConfigError


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


@register_dataset("digits", signature=lambda cfg: ((1, 8, 8), 10), held_out=fraction_held_out)
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


def npz_origin(cfg) -> str:
    """How messages name an npz dataset: by its file, the config value that points at it."""
    return f"dataset.path={cfg.path!r}"


def _corrupt(cfg, reason: str) -> DataContentError:
    return DataContentError(f"{npz_origin(cfg)}: the file is corrupt or not an .npz ({reason})")


def _why_not_an_archive(path: str, error: Exception) -> str:
    """Why np.load could not open `path` as an archive, in the user's terms: numpy reports a file
    that is not a zip as one that 'contains pickled data' (its last guess at the format)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "the file is empty"
    if head.startswith(b"PK"):  # a zip archive's signature: truncated or damaged
        return f"a truncated or damaged zip archive: {str(error) or type(error).__name__}"
    return "not a zip archive"


def _read_npz(cfg, path: str) -> dict:
    """The arrays of the npz file at `path`, by name. Every way the bytes can fail to be an npz
    (not a zip, truncated, a member that fails its CRC or does not decompress, a plain .npy file)
    is one DataContentError naming the file as corrupt; an array of Python objects is refused by
    name (loading it would run a pickle)."""
    try:
        f = np.load(path, allow_pickle=False)
    except Exception as e:
        raise _corrupt(cfg, _why_not_an_archive(path, e)) from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise _corrupt(cfg, "a single .npy array; save the arrays with np.savez(path, x=..., y=...)")
    with f:
        missing = [k for k in ("x", "y") if k not in f.files]
        if missing:
            raise ConfigError(f"{path} lacks array(s) {missing}; it has {f.files}. "
                              f"Save with np.savez(path, x=..., y=...)")
        arrays = {}
        for key in ("x", "y", "x_val", "y_val"):
            if key not in f.files:
                continue
            try:
                arrays[key] = f[key]
            except ValueError as e:
                if "allow_pickle" not in str(e):  # numpy's refusal of an object array names allow_pickle
                    raise _corrupt(cfg, f"array {key!r}: {e}") from None
                raise DataContentError(f"{npz_origin(cfg)}: array {key!r} holds Python objects (dtype object), "
                                       f"which are not loaded (that would run a pickle); save numeric arrays") from None
            except Exception as e:  # a member whose bytes fail their CRC, do not decompress or parse
                raise _corrupt(cfg, f"array {key!r}: {str(e) or type(e).__name__}") from None
    return arrays


def _inputs(arrays: dict, key: str, cfg) -> np.ndarray:
    """Array `key` as float32 model inputs (images laid out by as_images). Only real numbers (and
    booleans) are inputs: a cast from strings fails with numpy's error, and one from complex
    numbers drops the imaginary part silently."""
    a = arrays[key]
    real = np.issubdtype(a.dtype, np.number) and not np.issubdtype(a.dtype, np.complexfloating)
    if not (real or a.dtype == np.bool_):
        raise DataContentError(f"{npz_origin(cfg)}: array {key!r} must hold real numbers, got dtype {a.dtype}")
    return as_images(a.astype(np.float32))


@register_dataset("npz", signature=npz_signature, origin=npz_origin, held_out=fraction_held_out)
def npz(cfg):
    """A user file `dataset.path` with arrays x (N,...) and y (N,) of integer labels;
    optional x_val/y_val, else a stratified split of dataset.val_fraction. The class count is
    left to the labels (num_classes None: load_dataset takes the largest label + 1)."""
    if not cfg.path:
        raise ConfigError("dataset=npz needs dataset.path=/path/to/file.npz (arrays x and y)")
    path = os.path.abspath(os.path.expanduser(cfg.path))
    if not os.path.isfile(path):
        raise ConfigError(f"dataset.path={cfg.path!r}: no such file ({path})")
    arrays = _read_npz(cfg, path)
    if ("x_val" in arrays) != ("y_val" in arrays):
        has, lacks = ("x_val", "y_val") if "x_val" in arrays else ("y_val", "x_val")
        raise DataContentError(f"{npz_origin(cfg)}: the file has {has} but not {lacks}; save both "
                               f"(or neither, for a split of dataset.val_fraction)")
    x, y = _inputs(arrays, "x", cfg), arrays["y"]
    checked_labels(x, y, "training", npz_origin(cfg))  # before the split, which needs one class id per input
    if "x_val" in arrays:
        return x, y, _inputs(arrays, "x_val", cfg), arrays["y_val"], None
    x_tr, x_va, y_tr, y_va = split_for_validation(x, y, cfg, npz_origin(cfg), "samples",
                                                  "save x_val and y_val in the file,")
    return x_tr, y_tr, x_va, y_va, None
