"""dataset=imagefolder: a directory in torchvision's ImageFolder layout, DIR/train/<class>/* and
optionally DIR/val/<class>/* (without val/: a stratified split of train, dataset.val_fraction).
Class ids follow the sorted class folder names; every image is read once with PIL into memory
(kdexp.data.images: grayscale or RGB, dataset.image_size, values in [0, 1])."""
import logging
import os
from typing import List, Optional, Tuple

import numpy as np

from kdexp.data.core import fraction_held_out, register_dataset, split_for_validation
from kdexp.data.images import channels_of, check_channels, parse_image_size, pil_to_array, stack_same_size
from kdexp.data.sanity import DataContentError
from kdexp.errors import ConfigError, DataError

log = logging.getLogger("kdexp")

# The file endings torchvision's ImageFolder reads (torchvision.datasets.folder.IMG_EXTENSIONS);
# kept here so that listing a folder does not import torchvision.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def folder_origin(cfg) -> str:
    """How messages name an image folder: the config value that points at it."""
    return f"dataset.path={cfg.path!r}"


def _root(cfg) -> str:
    """The dataset directory, after the checks that need no listing: set, exists, has train/."""
    if not cfg.path:
        raise ConfigError("dataset=imagefolder needs dataset.path=DIR (DIR/train/<class>/*.png, optional DIR/val/)")
    root = os.path.abspath(os.path.expanduser(cfg.path))
    if not os.path.isdir(root):
        raise DataError(f"{folder_origin(cfg)}: no such directory ({root})")
    if not os.path.isdir(os.path.join(root, "train")):
        raise DataError(f"{folder_origin(cfg)}: no train/ folder in {root}; put the images in "
                        f"{root}/train/<class>/ (and optionally {root}/val/<class>/)")
    return root


def _classes(cfg, split_dir: str) -> List[str]:
    """The sorted class folder names of train/ or val/ (hidden folders skipped), or an error."""
    names = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise DataContentError(f"{folder_origin(cfg)}: {split_dir} has no class folders; put each class's images "
                               f"in {split_dir}/<class>/")
    return names


def _images(cfg, class_dir: str) -> List[str]:
    """The image files of one class folder, sorted (the order of the samples), or an error."""
    files = sorted(os.path.join(class_dir, f) for f in os.listdir(class_dir)
                   if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith("."))
    if not files:
        raise DataContentError(f"{folder_origin(cfg)}: class folder {class_dir} has no images "
                               f"({', '.join(IMG_EXTENSIONS)}); add images or remove the folder")
    return files


def _listing(cfg, split_dir: str, classes: List[str]) -> Tuple[List[str], np.ndarray]:
    """(files, labels) of one split: label i for the files of classes[i]."""
    files, labels = [], []
    for i, name in enumerate(classes):
        found = _images(cfg, os.path.join(split_dir, name))
        files += found
        labels += [i] * len(found)
    return files, np.asarray(labels, dtype=np.int64)


def _open(cfg, path: str):
    """The decoded PIL image at `path`, or one line naming the file as corrupt."""
    from PIL import Image

    try:
        img = Image.open(path)
        img.load()
        return img
    except Exception as e:  # PIL's UnidentifiedImageError, a truncated file's OSError, ...
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataContentError(f"{folder_origin(cfg)}: image {path} is corrupt or not an image ({why}); "
                               f"fix or remove it") from None


def _auto_channels(cfg, images, files) -> int:
    """dataset.channels=null: 1 when every training image is grayscale, else 3. The run plan's
    signature reads the first image alone, so a mix whose first image is grayscale would load with
    another shape than it declared: that mix needs dataset.channels set explicitly."""
    modes = [channels_of(img.mode) for img in images]
    if min(modes) == max(modes):
        return modes[0]
    if modes[0] == 1:
        colour = files[modes.index(3)]
        raise ConfigError(f"{folder_origin(cfg)}: the training images mix grayscale ({files[0]}) and colour "
                          f"({colour}); set dataset.channels=3 (or 1 for grayscale)")
    return 3


def _read_split(cfg, files: List[str], channels: Optional[int], size) -> Tuple[np.ndarray, int]:
    """Every image of one split as float32 (N, C, H, W) in [0, 1], and the channel count used."""
    images = [_open(cfg, f) for f in files]
    if channels is None:
        channels = _auto_channels(cfg, images, files)
    arrays = [pil_to_array(img, channels, size) for img in images]
    return stack_same_size(arrays, files, folder_origin(cfg)), channels


def _val_split(cfg, root: str, classes: List[str]):
    """(files, labels) of val/, or None when there is no val/; its classes must be train/'s."""
    val_dir = os.path.join(root, "val")
    if not os.path.isdir(val_dir):
        return None
    val_classes = _classes(cfg, val_dir)
    if val_classes != classes:
        only_tr, only_va = sorted(set(classes) - set(val_classes)), sorted(set(val_classes) - set(classes))
        raise DataContentError(f"{folder_origin(cfg)}: val/ and train/ have different class folders (only in train/: "
                               f"{only_tr or 'none'}; only in val/: {only_va or 'none'}); give both the same classes")
    return _listing(cfg, val_dir, classes)


def folder_signature(cfg):
    """The input shape from the first training image alone (its size and mode, or dataset.image_size
    and dataset.channels) and the class count from the class folder names: no image is decoded.
    Anything the loader would reject gives (None, None): the loader reports it in its own words."""
    size, channels = parse_image_size(cfg.image_size), check_channels(cfg.channels)
    try:
        root = _root(cfg)
        classes = _classes(cfg, os.path.join(root, "train"))
        first = _images(cfg, os.path.join(root, "train", classes[0]))[0]
        from PIL import Image

        with Image.open(first) as img:  # reads the header only
            w, h, mode = img.size[0], img.size[1], img.mode
    except Exception:
        return None, None
    h, w = size if size is not None else (h, w)
    return (channels or channels_of(mode), h, w), len(classes)


def folder_held_out(cfg) -> str:
    """What imagefolder validates on: DIR/val/ when there is one, else val_fraction of DIR/train/."""
    try:
        return "the val/ folder" if os.path.isdir(os.path.join(_root(cfg), "val")) else fraction_held_out(cfg)
    except Exception:  # an unusable dataset.path: the loader reports it
        return fraction_held_out(cfg)


@register_dataset("imagefolder", signature=folder_signature, origin=folder_origin, held_out=folder_held_out)
def imagefolder(cfg):
    """DIR/train/<class>/* (and DIR/val/<class>/*, else a stratified split of train) -> float32
    (N, C, H, W) in [0, 1], labels = index of the class folder in sorted order."""
    size, channels = parse_image_size(cfg.image_size), check_channels(cfg.channels)
    root = _root(cfg)
    classes = _classes(cfg, os.path.join(root, "train"))
    files_tr, y_tr = _listing(cfg, os.path.join(root, "train"), classes)
    val = _val_split(cfg, root, classes)  # checked before the (slow) reading of the images
    x_tr, channels = _read_split(cfg, files_tr, channels, size)
    log.info("dataset.path=%r: %d classes %s", cfg.path, len(classes), classes)
    if val is not None:
        x_va, _ = _read_split(cfg, val[0], channels, size)
        if x_va.shape[1:] != x_tr.shape[1:]:  # one size for all images, train and val alike
            stack_same_size([x_tr[0], x_va[0]], [files_tr[0], val[0][0]], folder_origin(cfg))
        return x_tr, y_tr, x_va, val[1], len(classes)
    x_tr, x_va, y_tr, y_va = split_for_validation(x_tr, y_tr, cfg, folder_origin(cfg), "training images",
                                                  "add a val/ folder")
    return x_tr, y_tr, x_va, y_va, len(classes)
