"""Random augmentation of training images that can be replayed exactly.

Each augmentation *draw* is a parameter per sample and nothing else: a crop offset (dy, dx) into
the image zero-padded by `pad` pixels, and a horizontal-flip bit. A draw's parameters come from a
seed derived from (run seed, draw number), so the augmented input of sample i in draw d is a pure
function of them: the student and the teacher-output cache see the very same view, a resumed run
continues with the same draws, and `metrics.json` records what was drawn (kind, pad, views, seed).

    dataset.augment=crop_flip        random crop (padding 4) + horizontal flip, the CIFAR recipe
    dataset.augment=rrc_flip         RandomResizedCrop (dataset.augment_scale) + flip, the ImageNet
                                     recipe: streamed data only (kdexp.data.stream), each image
                                     cropped at its own size
    dataset.augment_views=0          a fresh draw every epoch: the teacher runs online on it
    dataset.augment_views=K          K fixed draws cycled over the epochs (epoch e uses draw e % K):
                                     the teacher's outputs are cached per draw (view "train@aug<k>")

The in-memory data source (kdexp.engine.source) asks `Augment.view(x, draw)` for an
`AugmentedView` per epoch and gathers its batches from it; validation data is never augmented."""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from kdexp.errors import ConfigError
from kdexp.seeding import derive_seed

KINDS = ("none", "flip", "crop", "crop_flip", "rrc_flip")


@dataclass(frozen=True)
class Augment:
    kind: str  # flip | crop | crop_flip
    pad: int  # crop: zero padding on every side; offsets are drawn in [0, 2 * pad]
    views: int  # 0: a fresh draw per epoch; K > 0: K fixed draws, epoch e uses draw e % K
    seed: int = 0  # the batches' seed (set by the data source); draws derive their seeds from it

    @staticmethod
    def from_config(cfg, in_shape: Tuple[int, ...]) -> Optional["Augment"]:
        """The augmentation that `cfg` (a dataset config) asks for, or None."""
        kind = cfg.get("augment", "none")
        if kind not in KINDS:
            raise ConfigError(f"dataset.augment={kind!r} is not one of {', '.join(KINDS)}")
        if kind == "none":
            return None
        pad, views = int(cfg.get("augment_pad", 4)), int(cfg.get("augment_views", 0))
        if pad < 0:
            raise ConfigError(f"dataset.augment_pad={pad} is out of range: must be >= 0")
        if views < 0:
            raise ConfigError(f"dataset.augment_views={views} is out of range: must be >= 0 (0: a fresh draw per epoch)")
        if len(in_shape) != 3:
            raise ConfigError(f"dataset.augment={kind} needs image inputs (C, H, W); dataset {cfg.name} has inputs of "
                              f"shape {tuple(in_shape)}: use dataset.augment=none")
        return Augment(kind, pad if kind in ("crop", "crop_flip") else 0, views)

    def draw_of_epoch(self, epoch: int) -> int:
        return epoch % self.views if self.views else epoch

    def params(self, draw: int, n: int, size: Tuple[int, int], device=None) -> torch.Tensor:
        """(n, 3) long: (dy, dx, flip) of every sample in `draw`, from its own seed."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, f"augment/{self.kind}/{self.pad}/{draw}"))
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=gen)
        if "crop" not in self.kind:
            offsets.fill_(self.pad)  # pad 0: the identity crop
        flip = torch.randint(0, 2, (n, 1), generator=gen) if "flip" in self.kind else torch.zeros(n, 1, dtype=torch.long)
        return torch.cat([offsets, flip], 1).to(device)

    def view(self, x: torch.Tensor, draw: int) -> "AugmentedView":
        """x under draw `draw`: an AugmentedView of a tensor; streamed inputs (kdexp.data.stream.LazyInputs)
        give their own drawn view, read sample by sample by the loader's workers."""
        if hasattr(x, "drawn"):
            return x.drawn(self, draw)
        return AugmentedView(x, self.params(draw, len(x), tuple(x.shape[-2:]), x.device), self.pad)

    def describe(self) -> dict:
        return {"kind": self.kind, "pad": self.pad, "views": self.views, "seed": self.seed}


def augment_batch(x: torch.Tensor, params: torch.Tensor, pad: int) -> torch.Tensor:
    """Crop + flip images x (B, C, H, W) with params (B, 3) = (dy, dx, flip) -> (B, C, H, W).

    out[b, :, i, j] = padded[b, :, dy + i, dx + j'] with j' = W - 1 - j when flipped, j otherwise,
    where padded is x zero-padded by `pad` on every side: one gather for the whole batch."""
    b, _, h, w = x.shape
    if pad:
        x = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy, dx, flip = params.unbind(1)
    cols = torch.arange(w, device=x.device)
    cols = torch.where(flip.bool().unsqueeze(1), w - 1 - cols, cols) + dx.unsqueeze(1)  # (B, W)
    rows = torch.arange(h, device=x.device) + dy.unsqueeze(1)  # (B, H)
    out = x[torch.arange(b, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


class AugmentedView:
    """The training inputs under one augmentation draw, computed on demand: sample i is
    augment_batch(x[i], params[i]). Indexes like the tensor it stands for (slices, index_select),
    so the teacher-output cache can register it as a view."""

    def __init__(self, x: torch.Tensor, params: torch.Tensor, pad: int):
        self.x, self.params, self.pad = x, params, pad

    def __len__(self) -> int:
        return len(self.x)

    @property
    def device(self) -> torch.device:
        return self.x.device

    def __getitem__(self, s: slice) -> torch.Tensor:
        return augment_batch(self.x[s], self.params[s], self.pad)

    def index_select(self, dim: int, idx: torch.Tensor) -> torch.Tensor:
        assert dim == 0
        return augment_batch(self.x.index_select(0, idx), self.params.index_select(0, idx), self.pad)
