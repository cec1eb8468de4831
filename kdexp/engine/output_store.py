"""A frozen teacher's logits for one view of the training set, on disk and memory-mapped.

For data that does not fit in memory (kdexp.data.stream) the teacher-output cache keeps its logits
here: written once under paths.cache_dir/teacher_outputs/<key>/, shared by later runs and by every
job of a sweep, read back with np.load(mmap_mode="r") (the OS pages in what a batch gathers).
The key (kdexp.engine.teacher_cache.output_key) is the teacher's own key plus the view's
fingerprint (files, transforms, augmentation draw), so a stored output is never served for
another input.

    <key>/logits.npy    (N, C) float32                      every logit
    <key>/values.npy    (N, k) float32  \\
    <key>/indices.npy   (N, k) int32     > teacher.cache_topk=k: the k largest logits per sample
    <key>/fill.npy      (N,)   float32  /  and one value for the other classes
    <key>/meta.json     written last: a directory without it is incomplete

With top-k, the logits served are z_hat[c] = z[c] for the sample's k largest, fill elsewhere, with
fill = log(mean of exp(z_c) over the other C - k classes). softmax(z_hat) then equals softmax(z)
on the top k classes exactly and spreads the remaining probability mass evenly over the others:
FKD's top-k soft labels (Shen & Xing, ECCV 2022). The top-k raw logits themselves are exact.
That exactness is at temperature 1: a method that softens the served logits by T != 1 softens the
one fill value too, so its targets approximate softmax(z / T) on every class.

Writes go to a temporary directory beside the final one, renamed when complete, under a file lock:
concurrent jobs compute once, the others wait and open it."""
import json
import logging
import math
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from typing import Callable, Iterator, Optional, Tuple

import numpy as np
import torch
from filelock import FileLock

from kdexp.errors import ConfigError

log = logging.getLogger(__name__)
VERSION = 1


def topk_logits(logits: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (B, C) -> values (B, k) and indices (B, k) of the k largest, and fill (B,): the log of
    the mean of exp(z) over the other C - k classes (logsumexp over them minus log(C - k))."""
    z = logits.float()
    values, indices = z.topk(k, dim=-1)
    rest = z.scatter(-1, indices, float("-inf"))
    fill = torch.logsumexp(rest, dim=-1) - math.log(z.shape[-1] - k)
    return values, indices, fill


def expand_topk(values: torch.Tensor, indices: torch.Tensor, fill: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, C) logits: `values` at `indices`, `fill` at every other class (the inverse of topk_logits's spread)."""
    out = fill[:, None].expand(len(fill), num_classes).clone()
    return out.scatter_(1, indices.long(), values)


def check_topk(topk: Optional[int], num_classes: int) -> None:
    if topk is not None and not 1 <= topk < num_classes:
        raise ConfigError(f"teacher.cache_topk={topk} is out of range: 1..{num_classes - 1} for {num_classes} "
                          f"classes (null: every logit)")


class OutputStore:
    """Teacher logits of one view on disk: see the module docstring."""

    def __init__(self, path: str, meta: dict, computed: bool):
        self.path, self.computed = path, computed
        self.n, self.num_classes, self.topk = meta["n"], meta["num_classes"], meta["topk"]
        names = ("values", "indices", "fill") if self.topk else ("logits",)
        self._arrays = [np.load(os.path.join(path, f"{name}.npy"), mmap_mode="r") for name in names]

    @classmethod
    def provide(cls, root: str, key: str, n: int, num_classes: int,
                compute: Callable[[], Iterator[Tuple[int, torch.Tensor]]], topk: Optional[int] = None,
                describe: Optional[dict] = None) -> "OutputStore":
        """The store for `key`: opened when <root>/<key>/ is complete, else computed and written.
        compute() yields (start, logits (b, C)) chunks covering samples 0..n-1 in order. A stored
        directory made for other n / classes / topk is an error naming both (never served)."""
        check_topk(topk, num_classes)
        os.makedirs(root, exist_ok=True)
        path = os.path.join(root, key)
        want = {"version": VERSION, "n": n, "num_classes": num_classes, "topk": topk}
        with FileLock(path + ".lock"):  # concurrent jobs wait here while one computes
            if os.path.isfile(os.path.join(path, "meta.json")):
                with open(os.path.join(path, "meta.json")) as f:
                    meta = json.load(f)
                differ = [f"{k}={meta.get(k)} on disk, {v} requested" for k, v in want.items() if meta.get(k) != v]
                if differ:
                    raise ConfigError(f"teacher outputs at {path} do not match this run ({'; '.join(differ)}); "
                                      f"delete the folder to compute them again")
                store = cls(path, meta, computed=False)
                log.info("teacher outputs of %d samples read from %s (%.1f MB on disk)", n, path, store.nbytes() / 2 ** 20)
                return store
            if os.path.isdir(path):  # no meta.json: not a complete store (none is renamed in before it is)
                shutil.rmtree(path)
            t0 = time.perf_counter()
            meta = {**want, "dtype": "float32", "describe": describe or {},
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            _write(root, key, path, meta, compute)
            store = cls(path, meta, computed=True)
            log.info("teacher outputs of %d samples computed in %.1fs and stored at %s (%.1f MB)", n,
                     time.perf_counter() - t0, path, store.nbytes() / 2 ** 20)
            return store

    def __len__(self) -> int:
        return self.n

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays)

    def logits(self, idx: torch.Tensor, device=None) -> torch.Tensor:
        """(B, C) float32 logits of the samples at positions idx, on `device` (default idx.device)."""
        device = idx.device if device is None else device
        pos = idx.cpu().numpy()
        if len(pos) and (pos.min() < 0 or pos.max() >= self.n):  # numpy would wrap -1 round to the last sample
            raise IndexError(f"positions {pos.min()}..{pos.max()} outside the {self.n} stored samples of {self.path}")
        order = np.argsort(pos, kind="stable")  # sequential reads of the memory map
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        rows = [torch.from_numpy(np.ascontiguousarray(a[pos[order]][back])) for a in self._arrays]
        out = expand_topk(*rows, self.num_classes) if self.topk else rows[0]
        return out.to(device, non_blocking=True)


def _write(root: str, key: str, path: str, meta: dict, compute) -> None:
    """Every chunk of compute() into .npy files of a temporary directory, meta.json last, then the
    rename that makes it visible; a failure (or Ctrl-C) leaves no directory behind."""
    n, c, k = meta["n"], meta["num_classes"], meta["topk"]
    tmp = tempfile.mkdtemp(dir=root, prefix=f".tmp-{key}-")
    try:
        if k:
            arrays = {"values": ((n, k), np.float32), "indices": ((n, k), np.int32), "fill": ((n,), np.float32)}
        else:
            arrays = {"logits": ((n, c), np.float32)}
        maps = {name: np.lib.format.open_memmap(os.path.join(tmp, f"{name}.npy"), mode="w+", dtype=dt, shape=shape)
                for name, (shape, dt) in arrays.items()}
        done = 0
        for start, chunk in compute():
            chunk = chunk.detach().float().cpu()
            if start != done or chunk.shape[-1] != c or start + len(chunk) > n:
                raise ValueError(f"teacher output chunk at {start} of shape {tuple(chunk.shape)}: expected samples "
                                 f"from {done} (of {n}) with {c} classes")
            parts = dict(zip(("values", "indices", "fill"), topk_logits(chunk, k))) if k else {"logits": chunk}
            for name, part in parts.items():
                maps[name][start:start + len(chunk)] = part.numpy()
            done += len(chunk)
        if done != n:
            raise ValueError(f"teacher outputs: {done} samples computed, {n} expected")
        for m in maps.values():
            m.flush()
        del maps
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
