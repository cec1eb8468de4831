"""Teacher-output cache: a frozen teacher on a deterministic view gives the same output for a
sample every epoch, so run it once per sample and serve its outputs from memory.

`TeacherCache` wraps a `FrozenTeacher` and has the same API (`logits(batch)`,
`features(batch, names)`, `.model`, `.in_shape`). Outputs are keyed by (view, sample): a view
is a named input tensor of the whole training set (`add_view("train", data.x_train)`; the fit
loop's batches carry `Batch.view = "train"` and `Batch.idx`, the positions of their samples).
On the first request for a view the teacher runs over all of its samples in chunks and the
outputs stay on the training device; every later request is a gather by `Batch.idx`.
A Batch without a view (one that a method builds or derives itself, possibly from other inputs:
only a data source names a batch's view) or of a view the cache does not hold always runs the
teacher online, so a cached output is never
served for another input than the one it was computed from. Views with random augmentation
must not be registered (or must be registered per augmentation draw under their own name).

Features (the teacher's `features(batch, names)`) are cached per name on first request, within
a memory budget (`teacher.cache_max_gb`); names beyond it run online.

    teacher = TeacherCache(frozen).add_view("train", data.x_train)

Methods that need more than outputs of batch.x (the gradient w.r.t. the input, e.g.
`jacobian`) declare `cacheable=False` in their requirements and get the plain teacher
(`cached_teacher` follows the run plan's cache policy)."""
import logging
import time
from typing import Dict, Optional, Sequence, Tuple

import torch

from kdexp.data.stream import LazyInputs, batches_of
from kdexp.methods import Batch

log = logging.getLogger(__name__)

CHUNK = 128  # chunks of 128 were faster than 1024 for the one-off pass on these CPUs (notes/performance.md)


class TeacherCache:
    def __init__(self, teacher, chunk_size: int = CHUNK, max_bytes: Optional[int] = None):
        self.teacher = teacher
        self.chunk_size = int(chunk_size)
        self.max_bytes = max_bytes  # budget for cached features (logits always fit: N x classes)
        self._views: Dict[str, torch.Tensor] = {}
        self._logits: Dict[str, torch.Tensor] = {}
        self._features: Dict[Tuple[str, str], torch.Tensor] = {}
        self._soft: Dict[Tuple[str, float], Tuple[torch.Tensor, torch.Tensor]] = {}
        self._online_names = set()  # feature names over the budget: always computed online
        self.hits = 0
        self.online_calls = 0
        self.fill_s = 0.0  # seconds spent in the one-off passes (all of them)
        self._untaken = (0.0, 0.0)  # (wall, CPU) seconds not yet collected by `take_fill_seconds`

    # -- the FrozenTeacher API ---------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self.teacher.model

    @property
    def in_shape(self):
        return self.teacher.in_shape

    def _home(self, x) -> torch.device:
        """Where the outputs of view x are kept: its own device, or for streamed inputs (read on the
        host) the teacher's."""
        if not isinstance(x, LazyInputs):
            return x.device
        return next(self.teacher.model.parameters(), torch.empty(0)).device

    def add_view(self, name: str, x: torch.Tensor) -> "TeacherCache":
        """Register the inputs of a deterministic view: sample i of the view is x[i]. Re-registering
        a name with another tensor drops what was cached for it."""
        if name in self._views and self._views[name] is not x:
            self._drop(name)
        self._views[name] = x
        return self

    def _drop(self, view: str) -> None:
        self._logits.pop(view, None)
        for key in [k for k in self._features if k[0] == view]:
            del self._features[key]
        for key in [k for k in self._soft if k[0] == view]:
            del self._soft[key]

    def _cached_view(self, batch: Batch) -> Optional[str]:
        view = getattr(batch, "view", None)
        return view if view is not None and view in self._views else None

    @torch.no_grad()
    def logits(self, batch: Batch) -> torch.Tensor:
        view = self._cached_view(batch)
        if view is None:
            self.online_calls += 1
            return self.teacher.logits(batch)
        if view not in self._logits:
            self._fill(view, ())
        self.hits += 1
        return self._logits[view].index_select(0, batch.idx)

    @torch.no_grad()
    def features(self, batch: Batch, names: Sequence[str]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        names = list(names)
        view = self._cached_view(batch)
        if view is None or any(n in self._online_names for n in names):
            self.online_calls += 1
            return self.teacher.features(batch, names)
        missing = [n for n in names if (view, n) not in self._features]
        if missing:
            if not self._fits(view, missing):
                self._online_names.update(missing)
                self.online_calls += 1
                return self.teacher.features(batch, names)
            self._fill(view, missing)
        self.hits += 1
        idx = batch.idx
        return self._logits[view].index_select(0, idx), {n: self._features[(view, n)].index_select(0, idx) for n in names}

    @torch.no_grad()
    def soft_targets(self, batch: Batch, temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """(p, sum_c p log p) of the teacher's softened distribution p = softmax(t / T) for the
        batch: p (B, C) and its negative entropy (B,). Cached per (view, T) so that a KD step does
        no teacher-side softmax (KL(p || q) = sum p log p - sum p log q)."""
        entry = self._soft.get((batch.view, temperature))  # fast path: once per step in a KD run
        if entry is not None:
            self.hits += 1
            return entry[0].index_select(0, batch.idx), entry[1].index_select(0, batch.idx)
        view = self._cached_view(batch)
        if view is None:
            t = self.logits(batch)
            return _soft(t, temperature)
        key = (view, float(temperature))
        if key not in self._soft:
            if view not in self._logits:
                self._fill(view, ())
            t0, c0 = time.perf_counter(), time.process_time()
            self._soft[key] = _soft(self._logits[view], temperature)
            self._add_time(time.perf_counter() - t0, time.process_time() - c0)
        self.hits += 1
        p, neg_entropy = self._soft[key]
        return p.index_select(0, batch.idx), neg_entropy.index_select(0, batch.idx)

    # -- filling -------------------------------------------------------------------------------
    def _fits(self, view: str, names: Sequence[str]) -> bool:
        """Whether caching `names` for all samples of `view` stays within the budget (probed
        on one sample)."""
        if self.max_bytes is None:
            return True
        x = self._views[view]
        _, probe = self.teacher.features(Batch(x[:1].to(self._home(x)), torch.zeros(1, dtype=torch.long), torch.zeros(1)), names)
        need = sum(len(x) * v[0].numel() * v.element_size() for v in probe.values())
        have = sum(t.numel() * t.element_size() for t in self._features.values())
        if have + need > self.max_bytes:
            log.info("teacher cache: features %s of view %r need %.2f GB (budget teacher.cache_max_gb=%.2f, "
                     "%.2f GB used); computing them online instead", list(names), view, need / 2 ** 30,
                     self.max_bytes / 2 ** 30, have / 2 ** 30)
            return False
        return True

    def _fill(self, view: str, names: Sequence[str]) -> None:
        """One pass of the teacher over all samples of `view` in chunks: logits (and `names`)."""
        t0, c0 = time.perf_counter(), time.process_time()
        x = self._views[view]
        n = len(x)
        logits, feats = [], {name: [] for name in names}
        device = self._home(x)
        for idx, xb in batches_of(x, self.chunk_size):  # streamed views: read by the loader's workers
            xb, idx = xb.to(device, non_blocking=True), idx.to(device)
            batch = Batch(xb, torch.zeros(len(xb), dtype=torch.long, device=device), idx)
            if names:
                out, f = self.teacher.features(batch, list(names))
                for name in names:
                    feats[name].append(f[name])
            else:
                out = self.teacher.logits(batch)
            logits.append(out)
        table = torch.cat(logits)
        if view not in self._logits:
            self._logits[view] = table
        for name in names:
            self._features[(view, name)] = torch.cat(feats[name])
        dt = time.perf_counter() - t0
        self._add_time(dt, time.process_time() - c0)
        what = "logits" + (f" and features {list(names)}" if names else "")
        log.info("teacher cache: %s of %d samples of view %r computed in %.2fs (%.1f MB)", what, n, view, dt,
                 self.nbytes() / 2 ** 20)

    def _add_time(self, wall: float, cpu: float) -> None:
        self.fill_s += wall
        self._untaken = (self._untaken[0] + wall, self._untaken[1] + cpu)

    def take_fill_seconds(self) -> Tuple[float, float]:
        """(wall, CPU) seconds of one-off teacher passes since the last call: the fit loop leaves
        them out of the student's epoch time (they are teacher time, reported as fill_s)."""
        out, self._untaken = self._untaken, (0.0, 0.0)
        return out

    def nbytes(self) -> int:
        tensors = list(self._logits.values()) + list(self._features.values())
        tensors += [t for pair in self._soft.values() for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors)

    def summary(self) -> dict:
        return {"enabled": True, "views": sorted(self._views), "fill_s": round(self.fill_s, 4),
                "MB": round(self.nbytes() / 2 ** 20, 3), "hits": self.hits, "online_calls": self.online_calls,
                "online_features": sorted(self._online_names)}


def _soft(logits: torch.Tensor, temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    p = log_p.exp()
    return p, (p * log_p).sum(-1)


def cached_teacher(teacher, policy, data):
    """The teacher handle a method gets under the plan's cache policy (kdexp.engine.plan.CachePolicy):
    the cached wrapper serving view `data.view` (data.x_train), or `teacher` itself (online) -> (handle,
    info for metrics.json)."""
    if teacher is None:
        return None, policy.describe()
    if not policy.enabled:
        log.info("teacher outputs are computed online (%s)", policy.reason)
        return teacher, policy.describe()
    cache = TeacherCache(teacher, max_bytes=policy.max_bytes).add_view(data.view, data.x_train)
    return cache, policy.describe()


def view_registrar(teacher):
    """The sources' `register_view` for this teacher handle: a teacher-output cache serves view
    `name`, whose sample i is x[i] (a tensor or an AugmentedView); None for an online teacher. A name
    already registered keeps its cached outputs: augmentation draws are named by number, and a
    draw's inputs are fixed by its number."""
    if not isinstance(teacher, TeacherCache):
        return None

    def register(name: str, x) -> None:
        if name not in teacher._views:
            teacher.add_view(name, x)
    return register


def take_fill_seconds(teacher) -> Tuple[float, float]:
    """(wall, CPU) seconds the teacher-output cache spent on one-off passes since the last call."""
    take = getattr(teacher, "take_fill_seconds", None)
    return take() if callable(take) else (0.0, 0.0)
