"""Data sources: what the fit loop draws its training batches from.

A source has `steps` (batches per epoch), `epoch(epoch) -> (total, iterator of Step)` and
`state_dict()` / `load_state_dict()` (what a checkpoint needs to replay the next epochs). The
in-memory source keeps the training tensors in memory (on the device) and each epoch's batches
are slices of a seeded permutation of the batch pool. The streaming source (data that does not fit,
kdexp.data.stream) draws the very same batches and reads them with a DataLoader's workers; the
loop, the steppers and the recorder do not change. `source_for` picks one by the data.

Only a source builds training Batches (`Batch.sampled`), so only it names the view a batch was
gathered from: the teacher-output cache's key (kdexp.engine.teacher_cache).
"""
import math
from dataclasses import dataclass, replace
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from kdexp.data import Data
from kdexp.data.stream import LazyInputs, Loader
from kdexp.engine.hardware import SINGLE, DistContext
from kdexp.methods import UNLABELED, Batch


@dataclass
class Step:
    batch: Optional[Batch]  # None: this DDP rank's shard of the global batch is empty
    size: int  # samples in the global batch (epoch means are weighted by it)
    share: float  # this rank's part of the global batch (DDP gradient weights); 1 in one process


def training_view(data: Data, view: str) -> Data:
    """The Data a method trains on under a domain shift: source (x_train as is, no target view in
    the batches), target (x_train := the target view, cached by the teacher cache under the view
    name "train_target") or paired (both). Validation views are kept: val/acc is the target's."""
    if data.x_train_target is None or view == "paired":
        return data
    if view == "target":
        return replace(data, x_train=data.x_train_target, x_train_target=None, view="train_target")
    return replace(data, x_train_target=None)


def withheld_inputs(data: Data) -> Data:
    """The Data a method that generates its own training inputs trains on (its requirements say
    inputs="generated": data-free distillation). The training inputs are NaN and the labels
    UNLABELED, as stride-0 expansions (no memory), so its batches still count the steps of an epoch
    over the training set and carry positions (Batch.idx) but hold nothing of the data: an input
    that leaked into a loss would make it NaN, which the fit loop reports. No target view, transfer
    set mask or augmentation; the validation views are kept (val/acc is measured on real data)."""
    x = data.x_train
    nan = torch.full((1,) * x.dim(), float("nan"), dtype=x.dtype, device=x.device).expand(x.shape)
    y = torch.full((1,), UNLABELED, dtype=data.y_train.dtype, device=data.y_train.device).expand(len(x))
    return replace(data, x_train=nan, y_train=y, labeled=None, x_train_target=None, augment=None, view="withheld")


@dataclass
class EpochViews:
    """One epoch's training inputs: data.x_train (and its target view), or an augmentation draw of them."""
    x: object  # a tensor or a kdexp.data.augment.AugmentedView
    x_target: object
    name: str  # the teacher-output cache's key: "train", or "train@aug<draw>" for an augmentation draw


def make_batch(data: Data, idx: torch.Tensor, views: Optional[EpochViews] = None, x: Optional[torch.Tensor] = None) -> Batch:
    """The training batch at positions `idx` of this epoch's inputs `views` (default: data.x_train
    itself; `x`: its inputs already read, by a streaming source's loader); with a transfer set
    (data.labeled), samples without a label get y = UNLABELED so that no label-driven term can use
    them by accident."""
    views = views or EpochViews(data.x_train, data.x_train_target, data.view)
    y = data.y_train.index_select(0, idx)  # index_select: several times faster than x[idx] for image batches
    x = views.x.index_select(0, idx) if x is None else x
    x_target = views.x_target.index_select(0, idx) if views.x_target is not None else None
    if data.labeled is None:
        return Batch.sampled(views.name, x, y, idx, x_target=x_target)
    labeled = data.labeled[idx]
    return Batch.sampled(views.name, x, y.masked_fill(~labeled, UNLABELED), idx, labeled, x_target=x_target)


class InMemorySource:
    """Batches of in-memory tensors: each epoch, slices of a seeded permutation of the batch pool.

    pool "all": every training sample. pool "labeled" (a method whose terms all need labels, with a
    transfer set): the labeled samples alone, pass after pass, for the same number of steps as the
    others (equal step budgets), in batches of min(batch_size, number of labeled samples).
    Batch order comes from a generator seeded with `seed` alone, so it does not depend on what ran
    before in the process (e.g. whether a teacher was trained or loaded). With dataset.augment the
    draws derive from the same seed (the same views on resume); with dataset.augment_views=K the
    K draws are handed to `register_view` so that a teacher-output cache serves them per draw.
    Batches smaller than `min_batch` are skipped (2 for stages of BatchNorm models)."""

    def __init__(self, data: Data, *, batch_size: int, seed: int, pool: str = "all", min_batch: int = 1,
                 dist: DistContext = SINGLE, register_view: Optional[Callable[[str, object], None]] = None):
        if pool not in ("all", "labeled"):
            raise ValueError(f"pool={pool!r}: one of all, labeled")
        self.data, self.batch_size, self.pool, self.min_batch = data, batch_size, pool, min_batch
        self.dist, self.register_view = dist, register_view
        self.gen = torch.Generator().manual_seed(seed)
        self.augment = replace(data.augment, seed=seed) if data.augment is not None else None
        self.steps = math.ceil(len(data.x_train) / batch_size)

    def state_dict(self) -> torch.Tensor:
        return self.gen.get_state()

    def load_state_dict(self, state: torch.Tensor) -> None:
        self.gen.set_state(state)

    def indices(self) -> List[torch.Tensor]:
        """One epoch's `steps` global index batches (advances the generator)."""
        data, size = self.data, self.batch_size
        device = data.y_train.device  # (streamed inputs stay on the host; their batches are read there)
        if data.labeled is None or self.pool == "all":
            perm = torch.randperm(len(data.x_train), generator=self.gen).to(device)
            return [perm[i * size:(i + 1) * size] for i in range(self.steps)]
        pool = data.labeled.nonzero().squeeze(1).cpu()
        size = min(size, len(pool))
        batches: List[torch.Tensor] = []
        while len(batches) < self.steps:
            perm = pool[torch.randperm(len(pool), generator=self.gen)]
            batches += [perm[i:i + size].to(device) for i in range(0, len(pool), size)]
        return batches[:self.steps]

    def views(self, epoch: int) -> EpochViews:
        """The epoch's inputs: data.x_train itself without augmentation, else the epoch's draw."""
        data = self.data
        if self.augment is None:
            return EpochViews(data.x_train, data.x_train_target, data.view)
        draw = self.augment.draw_of_epoch(epoch)
        x_target = None if data.x_train_target is None else self.augment.view(data.x_train_target, draw)
        views = EpochViews(self.augment.view(data.x_train, draw), x_target, f"{data.view}@aug{draw}")
        if self.augment.views and self.register_view is not None:
            self.register_view(views.name, views.x)
        return views

    def epoch(self, epoch: int) -> Tuple[int, Iterator[Step]]:
        batches = [b for b in self.indices() if len(b) >= self.min_batch]
        views = self.views(epoch)
        return sum(len(b) for b in batches), self._steps(batches, views)

    def _steps(self, batches: Sequence[torch.Tensor], views: EpochViews) -> Iterator[Step]:
        for global_idx in batches:
            idx = self.dist.shard(global_idx)  # DDP: this rank's part of the global batch
            batch = make_batch(self.data, idx, views) if len(idx) else None
            yield Step(batch, len(global_idx), len(idx) / len(global_idx))


class StreamingSource(InMemorySource):
    """Batches of streamed data (kdexp.data.stream.LazyInputs): the in-memory source's batches, the
    same seeded permutation, pools and DDP shards (each rank reads only its part of every global
    batch: per-rank sharding that keeps the global batches of one process, so DDP trains as one
    process does), read by a DataLoader whose workers decode and augment; pinned memory and
    non-blocking copies on a GPU. Its one DataLoader keeps its workers across epochs (the epoch's
    batches and augmentation draw travel with the keys it is handed), and its state is the
    generator's, so a resumed run replays the same batches and views."""

    def __init__(self, data: Data, **kwargs):
        super().__init__(data, **kwargs)
        self._loader = None

    def _steps(self, batches: Sequence[torch.Tensor], views: EpochViews) -> Iterator[Step]:
        shards = [self.dist.shard(b) for b in batches]
        draw = getattr(views.x, "draw", None)
        keys = [[(i, draw) for i in idx.tolist()] for idx in shards if len(idx)]
        if self._loader is None:
            base = self.data.x_train.drawn(self.augment, None) if self.augment is not None else self.data.x_train
            self._loader = Loader(base, base.workers, persistent=True)
        inputs = self._loader.read(keys)
        device = self.data.y_train.device
        for global_idx, idx in zip(batches, shards):
            batch = None
            if len(idx):
                x = next(inputs).to(device, non_blocking=True)
                batch = make_batch(self.data, idx, views, x=x)
            yield Step(batch, len(global_idx), len(idx) / len(global_idx))


def source_for(data: Data, **kwargs) -> InMemorySource:
    """The data source of `data`: streaming for LazyInputs (kdexp.data.stream), else in memory."""
    return (StreamingSource if isinstance(data.x_train, LazyInputs) else InMemorySource)(data, **kwargs)


class StackedSource:
    """N in-memory sources (one per fused student, each with its own seed) drawn in lockstep:
    each step is one Batch whose tensors have a leading student dimension (x (N, B, ...), y and
    idx (N, B)). Its state is the list of the sources' states."""

    def __init__(self, sources: Sequence[InMemorySource]):
        self.sources = list(sources)
        self.steps = self.sources[0].steps
        self.data = self.sources[0].data

    def state_dict(self) -> list:
        return [s.state_dict() for s in self.sources]

    def load_state_dict(self, state: list) -> None:
        for s, st in zip(self.sources, state):
            s.load_state_dict(st)

    def epoch(self, epoch: int) -> Tuple[int, Iterator[Step]]:
        per = [s.indices() for s in self.sources]
        return sum(len(b) for b in per[0]), self._steps(per)

    def _steps(self, per: List[List[torch.Tensor]]) -> Iterator[Step]:
        data = self.data
        for step in range(self.steps):
            idx = torch.stack([b[step] for b in per])  # (N, B)
            y = data.y_train[idx]
            labeled = data.labeled[idx] if data.labeled is not None else None
            if labeled is not None:
                y = y.masked_fill(~labeled, UNLABELED)
            yield Step(Batch.sampled(data.view, data.x_train[idx], y, idx, labeled), idx.shape[1], 1.0)


class LimitedSource:
    """The first `batches` batches of every epoch of `source` (debug.train_batches); with `repeat`
    the same ones every epoch, those of the first epoch (debug=overfit), so a student that learns
    drives their loss towards 0. The epoch's sample count is that of the batches kept."""

    def __init__(self, source, batches: int, repeat: bool = False):
        self.source, self.repeat = source, repeat
        self.steps = min(batches, source.steps)
        self.data = getattr(source, "data", None)
        self._first = _cloned(source.state_dict()) if repeat else None

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state) -> None:
        self.source.load_state_dict(state)

    def epoch(self, epoch: int) -> Tuple[int, Iterator[Step]]:
        if self.repeat:
            self.source.load_state_dict(_cloned(self._first))
        _, steps = self.source.epoch(0 if self.repeat else epoch)
        kept = [s for _, s in zip(range(self.steps), steps)]
        return sum(s.size for s in kept), iter(kept)


def _cloned(state):
    return [s.clone() for s in state] if isinstance(state, list) else state.clone()


def limited(source, debug, overfit: bool = False):
    """`source` as the debug config says (conf/debug): batches capped at debug.train_batches (every
    training: teachers, first stages, students); with `overfit` (the student's loop) and
    debug.overfit_batches, the first ones repeated every epoch. No debug node: `source` itself."""
    if debug is None:
        return source
    if overfit and debug.get("overfit_batches"):
        return LimitedSource(source, debug.overfit_batches, repeat=True)
    if debug.get("train_batches"):
        return LimitedSource(source, debug.train_batches)
    return source
