"""PIL images as model inputs, shared by dataset=imagefolder and dataset=custom: one rule for
channels (grayscale L -> 1, anything else RGB -> 3), size (resize to dataset.image_size) and pixel
values (uint8 / 255 -> float32 in [0, 1]), so the same pictures give the same tensors either way."""
from typing import Optional, Sequence, Tuple

import numpy as np

from kdexp.errors import ConfigError

# PIL modes whose pixels are one gray value (with alpha for LA): converted to L, one channel.
# Everything else (RGB, RGBA, P palettes, CMYK, ...) is converted to RGB, three channels.
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


def channels_of(mode: str) -> int:
    """The channel count an image of PIL `mode` gets when dataset.channels is auto."""
    return 1 if mode in GRAY_MODES else 3


def parse_image_size(value, key: str = "dataset.image_size") -> Optional[Tuple[int, int]]:
    """dataset.image_size as (H, W): an int for square images, [H, W], or None (keep the size)."""
    if value is None:
        return None
    sizes = [value] * 2 if isinstance(value, int) else list(value)
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or not all(isinstance(s, int) and s >= 1 for s in sizes):
        raise ConfigError(f"{key}={value!r}: give one positive size (28) or [height,width] (e.g. [28,28])")
    return int(sizes[0]), int(sizes[1])


def check_channels(value, key: str = "dataset.channels") -> Optional[int]:
    """dataset.channels: 1 (grayscale), 3 (RGB) or None (from the images)."""
    if value not in (None, 1, 3):
        raise ConfigError(f"{key}={value!r}: must be 1 (grayscale), 3 (RGB) or null (from the images)")
    return value


def pil_to_array(img, channels: int, size: Optional[Tuple[int, int]]) -> np.ndarray:
    """One PIL image -> float32 (C, H, W) in [0, 1]: converted to L or RGB, resized (bilinear) to
    size=(H, W) when given. 16-bit and float modes go through PIL's 8-bit conversion (clipped)."""
    from PIL import Image

    img = img.convert("L" if channels == 1 else "RGB")
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    a = np.asarray(img, dtype=np.uint8)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return a.astype(np.float32) / 255.0


def stack_same_size(arrays: Sequence[np.ndarray], names: Sequence[str], where: str) -> np.ndarray:
    """Stack per-sample arrays, or one line naming two samples of different shapes and the fix:
    images of several sizes need dataset.image_size."""
    first = arrays[0].shape
    for a, name in zip(arrays, names):
        if a.shape != first:
            raise ConfigError(f"{where}: the images have different sizes ({_hw(first)} in {names[0]}, {_hw(a.shape)} "
                              f"in {name}); set dataset.image_size=[H,W] (e.g. {compact_hw(first)}) to resize them all")
    return np.stack(arrays)


def _hw(shape) -> str:
    return "x".join(str(s) for s in shape[-2:]) if len(shape) >= 2 else str(tuple(shape))


def compact_hw(shape) -> str:
    return "[" + ",".join(str(s) for s in shape[-2:]) + "]"
