"""dataset=imagefolder: a directory in torchvision's ImageFolder layout, DIR/train/<class>/* and
optionally DIR/val/<class>/* (without val/: a stratified split of train, dataset.val_fraction).
Class ids follow the sorted class folder names; every image is read with PIL (kdexp.data.images:
grayscale or RGB, dataset.image_size or crop_size, values in [0, 1]), once into memory or, when the
data streams (dataset.in_memory), by the loader's workers (kdexp.data.stream). dataset=imagenet is
the same reader on torchvision's ImageNet layout."""
import logging
import os
from typing import List, Optional, Tuple

import numpy as np

from kdexp.data.core import fraction_held_out, register_dataset, split_for_validation
from kdexp.data.images import channels_of, check_channels, parse_image_size, stack_same_size
from kdexp.data.stream import FileReader, Geometry, Listing
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


def _header(cfg, path: str) -> Tuple[str, Tuple[int, int]]:
    """(PIL mode, (height, width)) of the image at `path`, from its header (nothing decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.mode, (img.size[1], img.size[0])
    except Exception as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataContentError(f"{folder_origin(cfg)}: image {path} is corrupt or not an image ({why}); "
                               f"fix or remove it") from None


def _check_headers(cfg, files: List[str], n_train: int, channels: Optional[int], fixed) -> int:
    """The channel count (dataset.channels, or from the images: 1 when every training image is
    grayscale, else 3; files[:n_train] are the training images) after the checks that need only the
    headers: without a fixed size
    (dataset.image_size / crop_size), every image must have the first one's. The run plan's
    signature reads the first image alone, so a mix whose first image is grayscale would load with
    another shape than it declared: that mix needs dataset.channels set explicitly."""
    if channels is not None and fixed is not None:
        return channels
    headers = [_header(cfg, f) for f in files]
    if fixed is None:
        for f, (_, size) in zip(files, headers):
            if size != headers[0][1]:
                stack_same_size([np.empty(headers[0][1]), np.empty(size)], [files[0], f], folder_origin(cfg))
    if channels is not None:
        return channels
    modes = [channels_of(mode) for mode, _ in headers[:n_train]]
    if min(modes) == max(modes):
        return modes[0]
    if modes[0] == 1:
        colour = files[modes.index(3)]
        raise ConfigError(f"{folder_origin(cfg)}: the training images mix grayscale ({files[0]}) and colour "
                          f"({colour}); set dataset.channels=3 (or 1 for grayscale)")
    return 3


def geometry(cfg) -> Geometry:
    """How every image becomes an input: dataset.image_size, or dataset.crop_size (+ resize), or as it is."""
    size = parse_image_size(cfg.image_size)
    crop, resize = cfg.get("crop_size"), cfg.get("resize")
    if crop is not None and size is not None:
        raise ConfigError(f"dataset.image_size={cfg.image_size} and dataset.crop_size={crop}: give one (image_size "
                          f"resizes every image; crop_size resizes the shorter side, then takes the centre crop)")
    for key, value in (("crop_size", crop), ("resize", resize)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"dataset.{key}={value!r}: a positive number of pixels")
    if resize is not None and crop is None:
        raise ConfigError(f"dataset.resize={resize} sizes the image before its centre crop: set dataset.crop_size too")
    if crop is not None and resize is not None and resize < crop:
        raise ConfigError(f"dataset.resize={resize} is smaller than dataset.crop_size={crop}; the centre crop must fit")
    return Geometry(size, resize, crop)


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
    channels = check_channels(cfg.channels)
    try:
        root = _root(cfg)
        classes = _classes(cfg, os.path.join(root, "train"))
        first = _images(cfg, os.path.join(root, "train", classes[0]))[0]
        from PIL import Image

        with Image.open(first) as img:  # reads the header only
            w, h, mode = img.size[0], img.size[1], img.mode
    except Exception:
        return None, None
    h, w = geometry(cfg).fixed or (h, w)
    return (channels or channels_of(mode), h, w), len(classes)


def folder_held_out(cfg) -> str:
    """What imagefolder validates on: DIR/val/ when there is one, else val_fraction of DIR/train/."""
    try:
        return "the val/ folder" if os.path.isdir(os.path.join(_root(cfg), "val")) else fraction_held_out(cfg)
    except Exception:  # an unusable dataset.path: the loader reports it
        return fraction_held_out(cfg)


@register_dataset("imagefolder", signature=folder_signature, origin=folder_origin, held_out=folder_held_out,
                  streams=True)
def imagefolder(cfg):
    """Your images: DIR/train/<class>/* (and DIR/val/<class>/*, else a stratified split of train), in memory or streamed (dataset.in_memory); labels = index of the class folder in sorted order.

    Returns Listings of the files (kdexp.data.stream): read into float32 (N, C, H, W) in [0, 1]
    when kept in memory, else by the loader's workers."""
    channels, shape = check_channels(cfg.channels), geometry(cfg)
    root = _root(cfg)
    classes = _classes(cfg, os.path.join(root, "train"))
    files_tr, y_tr = _listing(cfg, os.path.join(root, "train"), classes)
    val = _val_split(cfg, root, classes)
    # one reader for train/ and val/: one size rule (the first training image's size, or the geometry's)
    files = files_tr + (val[0] if val is not None else [])
    channels = _check_headers(cfg, files, len(files_tr), channels, shape.fixed)
    x = Listing(FileReader(files, channels, shape, folder_origin(cfg), lambda path: _open(cfg, path)))
    log.info("dataset.path=%r: %d classes %s", cfg.path, len(classes), classes if len(classes) <= 20 else "")
    x_tr = x[:len(files_tr)]
    if val is not None:
        return x_tr, y_tr, x[len(files_tr):], val[1], len(classes)
    x_tr, x_va, y_tr, y_va = split_for_validation(x_tr, y_tr, cfg, folder_origin(cfg), "training images",
                                                  "add a val/ folder")
    return x_tr, y_tr, x_va, y_va, len(classes)


# -- dataset=imagenet: the same reader on torchvision's ImageNet layout ------------------------------
def imagenet_path(cfg) -> str:
    """The ImageNet folder: dataset.path, else dataset.root/imagenet, else dataset.root itself."""
    if cfg.get("path"):
        return cfg.path
    root = os.path.expanduser(cfg.root)
    nested = os.path.join(root, "imagenet")
    return nested if os.path.isdir(os.path.join(nested, "train")) else root


def _imagenet_cfg(cfg):
    from omegaconf import OmegaConf

    node = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    node.path = imagenet_path(cfg)
    return node


def imagenet_origin(cfg) -> str:
    return f"dataset=imagenet (dataset.path={imagenet_path(cfg)!r})"


@register_dataset("imagenet", signature=lambda cfg: folder_signature(_imagenet_cfg(cfg)), origin=imagenet_origin,
                  held_out=lambda cfg: "the val/ folder (ILSVRC-2012 validation set)", streams=True)
def imagenet(cfg):
    """ImageNet in torchvision's layout (what torchvision.datasets.ImageNet prepares from the official
    archives): train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, classes in sorted wnid order (torchvision's)."""
    node = _imagenet_cfg(cfg)
    if not os.path.isdir(os.path.join(os.path.expanduser(node.path), "val")):
        raise DataError(f"{imagenet_origin(cfg)}: no train/ and val/ folders; put torchvision's ImageNet layout there "
                        f"(train/<wnid>/*.JPEG, val/<wnid>/*.JPEG: torchvision.datasets.ImageNet(root, split) sorts the "
                        f"official archives into it) or set dataset.root / dataset.path to the folder that holds it")
    return imagefolder(node)
