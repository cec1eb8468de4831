"""Domain shifts: the target view of every sample, as pure deterministic tensor functions.

A `domain` config (conf/domain/) lists transforms applied in order to the RAW images (before
normalization), giving for every sample a source view (the image as loaded) and a target view
(the transformed image): parallel data, sample i of one view is sample i of the other. Both
views are then standardized with the SOURCE training statistics (one preprocessing for the
model, as when it is deployed on shifted inputs), see `kdexp.data.load_dataset`.

Images are float tensors (N, C, H, W); `noise` and `invert` also take vectors (N, D).

    x_t = apply_transforms(x, parse_transforms(cfg.domain), split="train")
    domain=vflip | hflip | rotate (angle) | lowres (factor) | blur (blur_sigma) | noise (noise_sigma)
           | invert | shift (dx, dy) | none
    'domain.transforms=[rotate,{name: noise, sigma: 0.2}]'   # composed, in this order

A transform given by name takes its parameters from the domain config's keys (`angle`,
`factor`, `blur_sigma`, ...); a mapping `{name: ..., <param>: value}` overrides them with the
function's own parameter names.
"""
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from kdexp.errors import ConfigError
from kdexp.seeding import derive_seed


def _images(x: torch.Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ConfigError(f"domain transform {name!r} needs images (N, C, H, W); this dataset gives "
                          f"inputs of shape {tuple(x.shape[1:])}")


def vflip(x: torch.Tensor) -> torch.Tensor:
    """Upside down: row r becomes row H-1-r (a 6 becomes a mirrored 9)."""
    _images(x, "vflip")
    return x.flip(-2)


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror: column c becomes column W-1-c."""
    _images(x, "hflip")
    return x.flip(-1)


def rotate(x: torch.Tensor, angle: float, fill: float = 0.0) -> torch.Tensor:
    """Rotate counter-clockwise (as displayed, row 0 on top) by `angle` degrees about the image
    centre, keeping the size. Multiples of 180 (and of 90 on square images) are exact pixel
    permutations (torch.rot90); other angles sample bilinearly, pixels from outside the image
    get `fill`."""
    _images(x, "rotate")
    h, w = x.shape[-2:]
    quarter = angle / 90.0
    if float(quarter).is_integer() and (int(quarter) % 2 == 0 or h == w):
        return torch.rot90(x, int(quarter) % 4, dims=(-2, -1))
    return _rotate_bilinear(x, angle, fill)


def _rotate_bilinear(x: torch.Tensor, angle: float, fill: float = 0.0) -> torch.Tensor:
    """Output pixel p samples the input at R^-1 p (pixel coordinates about the centre, x right,
    y down; R turns counter-clockwise on screen), written in grid_sample's [-1, 1] coordinates."""
    h, w = x.shape[-2:]
    t = math.radians(angle)
    c, s = math.cos(t), math.sin(t)
    # R^-1 = [[c, -s], [s, c]] in pixels; normalized coordinates scale x by 2/W and y by 2/H
    theta = torch.tensor([[c, -s * h / w, 0.0], [s * w / h, c, 0.0]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    out = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + fill


def shift(x: torch.Tensor, dx: int = 0, dy: int = 0, fill: float = 0.0) -> torch.Tensor:
    """Translate by whole pixels: dx > 0 moves the content right, dy > 0 down; the uncovered
    border gets `fill`."""
    _images(x, "shift")
    h, w = x.shape[-2:]
    out = torch.full_like(x, fill)
    if abs(dx) >= w or abs(dy) >= h:
        return out
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[..., yd, xd] = x[..., ys, xs]
    return out


def lowres(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Low resolution at the same size: average over factor x factor blocks (area downsampling to
    ceil(H/f) x ceil(W/f)), then nearest upsampling back to H x W. With H, W divisible by f every
    block holds its mean."""
    _images(x, "lowres")
    if factor == 1:
        return x.clone()
    h, w = x.shape[-2:]
    small = F.adaptive_avg_pool2d(x, (math.ceil(h / factor), math.ceil(w / factor)))
    return F.interpolate(small, size=(h, w), mode="nearest")


def gaussian_kernel1d(sigma: float, kernel_size: int, dtype=torch.float32) -> torch.Tensor:
    """Normalized 1-D Gaussian of odd length `kernel_size`."""
    r = torch.arange(kernel_size, dtype=dtype) - (kernel_size - 1) / 2
    k = torch.exp(-r ** 2 / (2 * sigma ** 2))
    return k / k.sum()


def blur(x: torch.Tensor, sigma: float, kernel_size: int = 0) -> torch.Tensor:
    """Gaussian blur with standard deviation `sigma` pixels, per channel, separable, borders
    replicated (a constant image stays constant). kernel_size 0: 2*ceil(3 sigma) + 1, capped at
    the image size (odd)."""
    _images(x, "blur")
    h, w = x.shape[-2:]
    if kernel_size <= 0:
        kernel_size = 2 * math.ceil(3 * sigma) + 1
        kernel_size = min(kernel_size, 2 * ((min(h, w) - 1) // 2) + 1)
    k = gaussian_kernel1d(sigma, kernel_size, x.dtype).to(x.device)
    c, pad = x.shape[1], kernel_size // 2
    out = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, kernel_size), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, kernel_size, 1), groups=c)


def noise(x: torch.Tensor, sigma: float, seed: int = 0, split: str = "train") -> torch.Tensor:
    """Additive Gaussian noise N(0, sigma^2), drawn from a generator seeded by (seed, split): the
    same sample of a split always gets the same noise (a deterministic view, cacheable), the
    train and val splits get independent draws. No clipping."""
    gen = torch.Generator().manual_seed(derive_seed(seed, f"domain/noise/{split}"))
    return x + sigma * torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)


def invert(x: torch.Tensor, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Negative image lo + hi - x: [lo, hi] is the value range (black and white swap)."""
    return lo + hi - x


# name -> (function, {function parameter: domain config key that gives its default})
TRANSFORMS: Dict[str, Tuple[Callable, Dict[str, str]]] = {
    "vflip": (vflip, {}),
    "hflip": (hflip, {}),
    "rotate": (rotate, {"angle": "angle"}),
    "shift": (shift, {"dx": "dx", "dy": "dy"}),
    "lowres": (lowres, {"factor": "factor"}),
    "blur": (blur, {"sigma": "blur_sigma", "kernel_size": "blur_kernel"}),
    "noise": (noise, {"sigma": "noise_sigma", "seed": "noise_seed"}),
    "invert": (invert, {}),
}
# parameters filled from the data, not from the config (a mapping may still set them)
_CONTEXT = {"rotate": ("fill",), "shift": ("fill",), "invert": ("lo", "hi"), "noise": ("split",)}
_RANGES = {  # parameter -> (check, allowed)
    "factor": (lambda v: int(v) == v and v >= 1, "an integer >= 1"),
    "sigma": (lambda v: v > 0, "> 0"),
    "kernel_size": (lambda v: int(v) == v and (v == 0 or (v >= 1 and v % 2 == 1)), "0 (auto) or an odd integer >= 1"),
    "dx": (lambda v: int(v) == v, "an integer"),
    "dy": (lambda v: int(v) == v, "an integer"),
    "seed": (lambda v: int(v) == v, "an integer"),
}
Step = Tuple[str, Dict[str, Any]]


def _plain(value):
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value


def parse_transforms(domain_cfg, key: str = "domain.transforms") -> List[Step]:
    """The domain config's `transforms` -> [(name, params)], validated (unknown names, unknown
    parameters and out-of-range values raise a ConfigError naming them). A config of None or an
    empty list: no shift."""
    if domain_cfg is None:
        return []
    cfg = _plain(domain_cfg)
    return parse_steps(cfg.get("transforms") or [], cfg, key)


def parse_steps(items: Sequence[Any], defaults: Optional[dict] = None, key: str = "transforms") -> List[Step]:
    """Transform specs (names or {name: ..., param: value} mappings) -> [(name, params)];
    parameters missing from a mapping come from `defaults` (the domain config's keys)."""
    defaults = dict(defaults or {})
    steps: List[Step] = []
    for i, item in enumerate([_plain(it) for it in _plain(items)]):
        where = f"{key}[{i}]"
        if isinstance(item, str):
            name, given = item, {}
        elif isinstance(item, dict) and "name" in item:
            given = dict(item)
            name = given.pop("name")
        else:
            raise ConfigError(f"{where}={item!r}: give a transform name or a mapping {{name: NAME, param: value}}")
        if name in ("none", "identity"):
            continue
        if name not in TRANSFORMS:
            raise ConfigError(f"{where}: unknown domain transform {name!r}; one of: {', '.join(TRANSFORMS)}")
        fn, from_cfg = TRANSFORMS[name]
        allowed = set(from_cfg) | set(_CONTEXT.get(name, ())) - {"split"}
        unknown = sorted(set(given) - allowed)
        if unknown:
            raise ConfigError(f"{where}: transform {name!r} has no parameter(s) {unknown}; "
                              f"valid: {sorted(allowed) or 'none'}")
        params = {p: defaults[k] for p, k in from_cfg.items() if k in defaults and defaults[k] is not None}
        params.update(given)
        for p, v in params.items():
            check = _RANGES.get(p)
            if check is not None and not (isinstance(v, (int, float)) and check[0](v)):
                cfg_key = from_cfg.get(p, p)
                raise ConfigError(f"{where}: {name} {p}={v!r} (domain.{cfg_key}) is out of range: {check[1]}")
        steps.append((name, params))
    return steps


def apply_transforms(x: torch.Tensor, steps: Sequence[Step], split: str = "train",
                     value_range: Optional[Tuple[float, float]] = None) -> torch.Tensor:
    """The target view of `x`: the steps applied in order. `split` seeds `noise` per split;
    `value_range` (lo, hi) of the raw data is `invert`'s range and the `fill` of rotate/shift
    (lo: the background of dark-background images) unless a step sets them. Default (0, 1)."""
    lo, hi = value_range if value_range is not None else (0.0, 1.0)
    for name, params in steps:
        fn, _ = TRANSFORMS[name]
        context = {"fill": lo, "lo": lo, "hi": hi, "split": split}
        kwargs = {p: context[p] for p in _CONTEXT.get(name, ())}
        kwargs.update(params)
        for p in ("factor", "kernel_size", "dx", "dy", "seed"):
            if p in kwargs:
                kwargs[p] = int(kwargs[p])
        x = fn(x, **kwargs)
    return x


def target_shape(in_shape: Sequence[int], steps: Sequence[Step]) -> Tuple[int, ...]:
    """The target view's shape (without batch) for source inputs of shape `in_shape`, without data:
    the steps run on a meta tensor (shapes only; `noise` draws one sample's noise on CPU), so it is
    by construction what `apply_transforms` gives, and a transform that needs images raises the
    same ConfigError on vector inputs. Every current transform keeps the shape (the target view
    feeds the same model), tests/test_signatures.py checks each one."""
    x = torch.empty(1, *in_shape, device="meta")
    return tuple(apply_transforms(x, steps).shape[1:])


def describe(steps: Sequence[Step]) -> str:
    """'vflip', 'rotate(angle=45)+noise(sigma=0.2, seed=0)', or 'none'."""
    parts = [name + (f"({', '.join(f'{k}={v}' for k, v in params.items())})" if params else "")
             for name, params in steps]
    return "+".join(parts) or "none"


VIEWS = ("source", "target")


def check_train_view(value) -> None:
    if value is not None and value not in VIEWS:
        raise ConfigError(f"domain.train_view={value!r} is out of range: one of source, target (or null: the "
                          f"method's default)")


def validate_domain(domain_cfg) -> None:
    """Config-time checks of a domain config (transforms, ranges, train_view)."""
    if domain_cfg is None:
        return
    parse_transforms(domain_cfg)
    check_train_view(_plain(domain_cfg).get("train_view"))
