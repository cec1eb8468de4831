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
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch

from kdexp.data.augment import AugmentedView
from kdexp.data.stream import LazyInputs, batches_of
from kdexp.engine.output_store import OutputStore
from kdexp.methods import Batch

log = logging.getLogger(__name__)

CHUNK = 128  # chunks of 128 were faster than 1024 for the one-off pass on these CPUs (notes/performance.md)


@dataclass(frozen=True)
class DiskOutputs:
    """Where and how the logits go to disk (kdexp.engine.output_store): under `root`, keyed by the
    teacher's key and each view's fingerprint (`output_key`); `topk`: teacher.cache_topk."""
    root: str
    teacher_key: str
    num_classes: int
    topk: Optional[int] = None


class TeacherCache:
    def __init__(self, teacher, chunk_size: int = CHUNK, max_bytes: Optional[int] = None,
                 disk: Optional[DiskOutputs] = None):
        self.teacher = teacher
        self.chunk_size = int(chunk_size)
        self.max_bytes = max_bytes  # budget for cached features (logits always fit: N x classes)
        self.disk = disk  # None: the logits stay in memory
        self._views: Dict[str, torch.Tensor] = {}
        self._logits: Dict[str, torch.Tensor] = {}
        self._stores: Dict[str, OutputStore] = {}  # view -> its logits on disk, gathered per batch (with self.disk)
        self._loaded: Dict[str, OutputStore] = {}  # view -> its store on disk, read whole into memory (fits the budget)
        self.disk_hits = 0  # samples whose logits were read from disk
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
        self._stores.pop(view, None)
        self._loaded.pop(view, None)
        for key in [k for k in self._features if k[0] == view]:
            del self._features[key]
        for key in [k for k in self._soft if k[0] == view]:
            del self._soft[key]

    def _cached_view(self, batch: Batch) -> Optional[str]:
        view = getattr(batch, "view", None)
        return view if view is not None and view in self._views else None

    # the per-step lookups run without torch.no_grad(): the tables never require grad (the teacher's
    # passes run under it), and entering it every step costs more than the lookup (~5-10 us on the CPU)
    def logits(self, batch: Batch) -> torch.Tensor:
        view = self._cached_view(batch)
        if view is None:
            self.online_calls += 1
            return self.teacher.logits(batch)
        if view not in self._logits and view not in self._stores:
            self._fill(view, ())
        self.hits += 1
        return self._table(view, batch.idx)

    def _table(self, view: str, idx: torch.Tensor) -> torch.Tensor:
        """The cached logits of samples idx of view: read from its store on disk, or gathered in memory."""
        store = self._stores.get(view)
        if store is not None:
            self.disk_hits += len(idx)
            return store.logits(idx)
        return self._logits[view].index_select(0, idx)

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
        return self._table(view, idx), {n: self._features[(view, n)].index_select(0, idx) for n in names}

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
        if view not in self._logits and view not in self._stores:
            self._fill(view, ())
        if view in self._stores:  # on disk: softened per batch (a table per T would be N x C in memory)
            return _soft(self.logits(batch), temperature)
        key = (view, float(temperature))
        if key not in self._soft:
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

    def _pass(self, x, names: Sequence[str]) -> Iterator[Tuple[int, torch.Tensor, Dict[str, torch.Tensor]]]:
        """The teacher over every sample of x in chunks: (first position, logits, {name: feature})."""
        device = self._home(x)
        for idx, xb in batches_of(x, self.chunk_size):  # streamed views: read by the loader's workers
            xb, idx = xb.to(device, non_blocking=True), idx.to(device)
            batch = Batch(xb, torch.zeros(len(xb), dtype=torch.long, device=device), idx)
            if names:
                out, f = self.teacher.features(batch, list(names))
                yield int(idx[0]), out, f
            else:
                yield int(idx[0]), self.teacher.logits(batch), {}

    @torch.no_grad()
    def _fill(self, view: str, names: Sequence[str]) -> None:
        """One pass of the teacher over all samples of `view` in chunks: logits (and `names`); with
        self.disk and no features, the logits go to (or come from) the view's store on disk."""
        t0, c0 = time.perf_counter(), time.process_time()
        x = self._views[view]
        n = len(x)
        if not names and self.disk is not None:
            d = self.disk
            key = output_key(d.teacher_key, x)
            store = self._stores[view] = OutputStore.provide(
                d.root, key, n, d.num_classes, lambda: ((i, out) for i, out, _ in self._pass(x, ())), topk=d.topk,
                describe={"teacher": d.teacher_key, "view": view})
            if self.max_bytes is None or n * d.num_classes * 4 <= self.max_bytes:
                # within teacher.cache_max_gb: read whole into memory, served as an in-memory view is (KD's
                # softened table per T included); above it, every batch is gathered from the memory map
                self._logits[view] = store.logits(torch.arange(n), self._home(x))
                self.disk_hits += n
                del self._stores[view]
                self._loaded[view] = store
            self._add_time(time.perf_counter() - t0, time.process_time() - c0)
            return
        logits, feats = [], {name: [] for name in names}
        for _, out, f in self._pass(x, names):
            logits.append(out)
            for name in names:
                feats[name].append(f[name])
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
        out = {"enabled": True, "views": sorted(self._views), "fill_s": round(self.fill_s, 4),
               "MB": round(self.nbytes() / 2 ** 20, 3), "hits": self.hits, "online_calls": self.online_calls,
               "online_features": sorted(self._online_names)}
        if self.disk is not None:  # which views were read from disk, which this run computed
            stores = {**{v: (st, "memory") for v, st in self._loaded.items()},
                      **{v: (st, "memory map") for v, st in self._stores.items()}}
            out["disk"] = {"root": self.disk.root, "topk": self.disk.topk, "samples_read": self.disk_hits,
                           "views": {v: {"path": st.path, "computed": st.computed, "samples": len(st), "served_from": how,
                                         "MB": round(st.nbytes() / 2 ** 20, 3)} for v, (st, how) in sorted(stores.items())},
                           "computed": sum(st.computed for st, _ in stores.values()),
                           "opened": sum(not st.computed for st, _ in stores.values())}
        return out


def _soft(logits: torch.Tensor, temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    p = log_p.exp()
    return p, (p * log_p).sum(-1)


def cached_teacher(teacher, policy, data, key: Optional[str] = None, cache_dir: Optional[str] = None):
    """The teacher handle a method gets under the plan's cache policy (kdexp.engine.plan.CachePolicy):
    the cached wrapper serving view `data.view` (data.x_train), or `teacher` itself (online) -> (handle,
    info for metrics.json). The logits go to disk under `cache_dir` (paths.cache_dir; None: never,
    e.g. for a debug run's throw-away teacher) keyed by the teacher's `key` when the policy says so:
    teacher.cache_disk=true, or auto and the data streams."""
    if teacher is None:
        return None, policy.describe()
    if not policy.enabled:
        log.info("teacher outputs are computed online (%s)", policy.reason)
        return teacher, policy.describe()
    disk = None
    if policy.disk is True or (policy.disk == "auto" and isinstance(data.x_train, LazyInputs)):
        if cache_dir is None or key is None:
            log.info("teacher outputs are cached in memory only (no on-disk cache for this teacher)")
        else:
            disk = DiskOutputs(os.path.join(os.path.expanduser(cache_dir), "teacher_outputs"), _stamped(key),
                               data.num_classes, policy.topk)
    cache = TeacherCache(teacher, max_bytes=policy.max_bytes, disk=disk).add_view(data.view, data.x_train)
    return cache, policy.describe()


def _stamped(key: str) -> str:
    """A teacher's key for its stored outputs: a checkpoint's (its path) with the file's size and
    time, so that a replaced file never serves the outputs of the old one."""
    if os.path.isfile(key):
        st = os.stat(key)
        return f"{key}/{st.st_size}/{st.st_mtime_ns}"
    return key


def output_key(teacher_key: str, x) -> str:
    """The on-disk key of the outputs of teacher `teacher_key` on view x: its key and x's content
    (view_fingerprint), and whether autocast is on (bf16/fp16 outputs are not float32's)."""
    blob = json.dumps([teacher_key, view_fingerprint(x), torch.is_autocast_enabled()])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def view_fingerprint(x) -> str:
    """What determines the inputs of a view: streamed inputs' fingerprint (files, transforms, draw),
    an augmentation draw's images and parameters, or a tensor's bytes."""
    if isinstance(x, LazyInputs):
        return x.fingerprint()
    h = hashlib.sha256()
    if isinstance(x, AugmentedView):
        h.update(x.params.cpu().numpy().tobytes() + str(x.pad).encode())
        x = x.x
    h.update(x.detach().cpu().contiguous().numpy().tobytes() + str(tuple(x.shape)).encode())
    return h.hexdigest()[:24]


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
