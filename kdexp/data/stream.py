"""Data that does not fit in memory: samples read one at a time, by DataLoader workers.

Two stages, as in kdexp.data.core's load_dataset:

- a `Listing` is the builder's view of samples not read yet (image files, a uint8 array, a user's
  Dataset): it indexes like a numpy array (a class subset's mask, a split's index array) and gives
  another Listing, so load_dataset's class subset and splits apply to it unchanged; `materialize`
  reads it into one array (the in-memory path, dataset.in_memory=true).
- `LazyInputs` stands where Data.x_train / x_val hold a tensor when the data streams
  (dataset.in_memory=false, or auto above dataset.memory_budget_gb): it has the tensor's `len`,
  `shape`, `dtype`, `device` and indexing (a slice or an index tensor -> the stacked, normalized
  samples), so code that reads a few samples (a method's probe of x_train[:2]) works as on a tensor;
  whole passes go through `batches_of`, which reads with workers.

Sample i of an augmentation draw is a pure function of (the augmentation's seed, the draw, i): the
crop/flip kinds take row i of the same parameter table as the in-memory source (kdexp.data.augment),
so a streamed run sees exactly the views of an in-memory one; rrc_flip (RandomResizedCrop + flip,
the ImageNet recipe) draws each sample's box from a generator seeded by (seed, draw, i). Workers
therefore need no state from the main process but the (position, draw) keys they are handed, and a
resumed run reads the same views. The teacher-output cache registers a draw (`drawn`) as a view."""
import copy
import hashlib
import logging
import math
import os
import sys
import weakref
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from kdexp.errors import DataContentError, KdexpError

log = logging.getLogger("kdexp")

STATS_SAMPLES = 2048  # training images read for the normalization statistics of streamed data
PROGRESS_ABOVE = 10_000  # samples: a progress bar (on a terminal) when reading more than this
RRC_SCALE, RRC_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop defaults


# -- geometry: how a sample of any size becomes the model's input ----------------------------------
class Geometry:
    """The eval-time size rule of image samples and the train-time crop size.

    image_size (H, W): every image resized to it (imagefolder's rule). resize + crop: the shorter
    side resized to `resize`, then the centre `crop` x `crop` (ImageNet's eval transform). Neither:
    images keep their size (one size required). A RandomResizedCrop box is resized to `train_size`."""

    def __init__(self, image_size: Optional[Tuple[int, int]] = None, resize: Optional[int] = None,
                 crop: Optional[int] = None):
        self.image_size, self.resize, self.crop = image_size, resize, crop

    @property
    def fixed(self) -> Optional[Tuple[int, int]]:
        """The (H, W) every sample gets, or None (the images' own size)."""
        if self.crop:
            return self.crop, self.crop
        return self.image_size

    def describe(self) -> dict:
        return {"image_size": self.image_size, "resize": self.resize, "crop": self.crop}

    def eval_image(self, img):
        """A PIL image (or a (C, H, W) tensor) in its eval form: resized, centre-cropped."""
        if self.crop:
            import torchvision.transforms.v2.functional as TF

            img = TF.resize(img, self.resize or round(self.crop / 0.875), antialias=True)
            return TF.center_crop(img, [self.crop, self.crop])
        return img  # image_size: resized by pil_to_array (imagefolder's in-memory rule, kept bit for bit)

    def train_crop(self, img, box: Tuple[int, int, int, int], size: Tuple[int, int]):
        import torchvision.transforms.v2.functional as TF

        top, left, h, w = box
        return TF.resized_crop(img, top, left, h, w, list(size), antialias=True)


def rrc_box(gen: torch.Generator, height: int, width: int, scale=RRC_SCALE, ratio=RRC_RATIO) -> Tuple[int, int, int, int]:
    """(top, left, h, w) of a RandomResizedCrop box, torchvision's rule with our generator: ten
    tries of an area fraction in `scale` and a log-uniform aspect ratio in `ratio`; else the
    largest centre crop within the ratio range."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# -- readers: where the samples come from --------------------------------------------------------
class ArrayReader:
    """Samples of an array already in memory (N, C, H, W) or (N, D): uint8 values / 255 (the
    torchvision sets keep their uint8 pixels, a quarter of the float32 size), others as float32."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.sample_shape = tuple(array.shape[1:])

    def __len__(self) -> int:
        return len(self.array)

    def _float(self, a: np.ndarray) -> np.ndarray:
        return a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)

    def image(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self._float(self.array[i])))

    def read_many(self, index: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self._float(self.array[index]))

    def fingerprint(self) -> bytes:
        stride = max(1, len(self.array) // 2048)
        return self.array[::stride].tobytes() + f"{self.array.shape}/{self.array.dtype}".encode()


class FileReader:
    """Image files read with PIL: converted to `channels` (1: L, 3: RGB), in `geometry`'s eval form."""

    def __init__(self, paths: Sequence[str], channels: int, geometry: Geometry, where: str, open_image: Callable):
        self.paths, self.channels, self.geometry, self.where = list(paths), channels, geometry, where
        self.open_image = open_image  # path -> decoded PIL image, or one line naming the file as corrupt
        self._shape = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def sample_shape(self) -> Tuple[int, ...]:
        if self._shape is None:
            fixed = self.geometry.fixed
            if fixed is None:  # the first image's own size: every other must have it
                from PIL import Image

                with Image.open(self.paths[0]) as img:
                    fixed = (img.size[1], img.size[0])
            self._shape = (self.channels, *fixed)
        return self._shape

    def pil(self, i: int):
        return self.open_image(self.paths[i]).convert("L" if self.channels == 1 else "RGB")

    def image(self, i: int) -> torch.Tensor:
        from kdexp.data.images import pil_to_array

        img = self.geometry.eval_image(self.pil(i))
        a = torch.from_numpy(pil_to_array(img, self.channels, self.geometry.image_size))
        if tuple(a.shape) != self.sample_shape:  # one size for all: the first training image's
            from kdexp.data.images import stack_same_size

            stack_same_size([np.empty(self.sample_shape), a.numpy()], [self.paths[0], self.paths[i]], self.where)
        return a

    def read_many(self, index: np.ndarray) -> np.ndarray:
        out = np.empty((len(index), *self.sample_shape), np.float32)
        for j, i in enumerate(_progress(index, f"reading {len(index)} images")):
            out[j] = self.image(int(i)).numpy()
        return out

    def fingerprint(self) -> bytes:
        h = hashlib.sha256()
        for p in self.paths:  # names, sizes and times: a replaced file changes the key
            st = os.stat(p)
            h.update(f"{p}/{st.st_size}/{st.st_mtime_ns}".encode())
        return h.digest() + repr((self.channels, self.geometry.describe())).encode()


class DatasetReader:
    """Inputs of a user's map-style Dataset, item i = (x, y), converted as dataset=custom reads them."""

    def __init__(self, dataset, where: str, convert: Callable):
        self.dataset, self.where, self.convert = dataset, where, convert  # convert(x, where, i) -> float32 (C, H, W) | (D,)
        self._shape = None

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def sample_shape(self) -> Tuple[int, ...]:
        if self._shape is None:
            self._shape = tuple(self.image(0).shape)
        return self._shape

    def image(self, i: int) -> torch.Tensor:
        a = self.convert(self.dataset[i][0], self.where, i)
        if self._shape is not None and tuple(a.shape) != self._shape:
            raise DataContentError(f"{self.where}: item {i} has input shape {a.shape}, item 0 {self._shape}; every "
                                    f"input needs one shape (resize them in the dataset, e.g. a transform)")
        return torch.from_numpy(np.ascontiguousarray(a))

    def read_many(self, index: np.ndarray) -> np.ndarray:
        return np.stack([self.image(int(i)).numpy() for i in _progress(index, f"reading {type(self.dataset).__name__}")])

    def fingerprint(self) -> bytes:
        return f"{type(self.dataset).__module__}.{type(self.dataset).__qualname__}/{len(self.dataset)}".encode()


def _progress(items, desc: str):
    if len(items) > PROGRESS_ABOVE and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(items, desc=desc, unit="sample")
    return items


class Listing:
    """Samples not read yet: a reader and the positions of its samples this listing holds. Indexing
    it (a bool mask, an index array, a slice) gives the sub-listing, as numpy indexing gives a
    sub-array, so splits and class subsets need no special case."""

    def __init__(self, reader, index: Optional[np.ndarray] = None):
        self.reader = reader
        self.index = np.arange(len(reader)) if index is None else np.asarray(index)
        self._fingerprint = None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key) -> "Listing":
        return Listing(self.reader, self.index[key])

    @property
    def sample_shape(self) -> Tuple[int, ...]:
        return tuple(self.reader.sample_shape)

    def image(self, i: int) -> torch.Tensor:
        return self.reader.image(int(self.index[i]))

    def materialize(self) -> np.ndarray:
        """Every sample read, in order: float32 (N, *sample_shape), the in-memory path's array."""
        return self.reader.read_many(self.index)

    def fingerprint(self) -> str:
        """A hash of what the samples are (the reader's files or array, and the positions), once per listing."""
        if self._fingerprint is None:  # a million files' stat calls: not once per use
            self._fingerprint = hashlib.sha256(self.reader.fingerprint() + self.index.astype(np.int64).tobytes()).hexdigest()[:20]
        return self._fingerprint


def nbytes_of(x) -> int:
    """Bytes of float32 inputs an array or a Listing takes in memory."""
    shape = x.sample_shape if isinstance(x, Listing) else x.shape[1:]
    return len(x) * int(np.prod(shape)) * 4


def materialized(x):
    """An array as it is, a Listing read into one."""
    return x.materialize() if isinstance(x, Listing) else x


def as_listing(x) -> "Listing":
    return x if isinstance(x, Listing) else Listing(ArrayReader(np.asarray(x)))


# -- the torch stage -------------------------------------------------------------------------------
class LazyInputs:
    """Training or validation inputs that stream: sample i is the listing's sample i, normalized
    ((x - mean) / std, the training statistics) and, in a drawn view, augmented by draw `draw`.
    Behaves as the (N, *shape) float32 tensor it stands for where code reads a few samples;
    `batches_of` reads whole passes with `workers` DataLoader workers."""

    def __init__(self, listing: Listing, mean: Optional[torch.Tensor] = None, std: Optional[torch.Tensor] = None,
                 workers: int = 0, augment=None, draw: Optional[int] = None, scale=RRC_SCALE, _tables=None):
        self.listing, self.mean, self.std, self.workers = listing, mean, std, int(workers)
        self.augment, self.draw, self.scale = augment, draw, tuple(scale)
        self._tables = {} if _tables is None else _tables  # draw -> crop/flip parameters (per process)
        self._loader = None

    # -- what a tensor has ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.listing)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.listing.sample_shape))

    dtype = torch.float32
    device = torch.device("cpu")
    is_cuda = False

    def dim(self) -> int:
        return 1 + len(self.listing.sample_shape)

    def to(self, *args, **kwargs) -> "LazyInputs":
        return self  # stays on the host: batches are moved when read

    def __getitem__(self, key) -> torch.Tensor:
        return torch.stack([self.sample(i) for i in _positions(key, len(self))])

    def index_select(self, dim: int, idx: torch.Tensor) -> torch.Tensor:
        assert dim == 0
        return self[idx]

    # -- views ---------------------------------------------------------------------------------
    def drawn(self, augment, draw: int) -> "LazyInputs":
        """These inputs under augmentation draw `draw` (a view of its own for the teacher cache)."""
        return LazyInputs(self.listing, self.mean, self.std, self.workers, augment, draw, self.scale, self._tables)

    def subset(self, key) -> "LazyInputs":
        """The samples at `key` (a bool mask or positions, tensor or array; a slice)."""
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        return LazyInputs(self.listing[key], self.mean, self.std, self.workers, self.augment, self.draw, self.scale)

    def describe(self) -> dict:
        aug = self.augment.describe() if self.augment is not None else None
        return {"listing": self.listing.fingerprint(), "draw": self.draw, "augment": aug, "scale": list(self.scale),
                "mean": None if self.mean is None else self.mean.flatten().tolist(),
                "std": None if self.std is None else self.std.flatten().tolist()}

    def fingerprint(self) -> str:
        return hashlib.sha256(repr(sorted(self.describe().items())).encode()).hexdigest()[:20]

    # -- reading -------------------------------------------------------------------------------
    def sample(self, i: int, draw: Optional[int] = None) -> torch.Tensor:
        """Sample i, normalized, under draw `draw` (default: this view's) of the augmentation."""
        draw = self.draw if draw is None else draw
        aug = self.augment if draw is not None else None
        if aug is not None and aug.kind == "rrc_flip":
            return self._rrc(i, draw)
        x = self._normalized(self.listing.image(i))
        if aug is None:
            return x
        from kdexp.data.augment import augment_batch

        return augment_batch(x[None], self._table(draw)[i:i + 1], aug.pad)[0]

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return x
        return (x - self.mean[0]) / self.std[0]

    def _table(self, draw: int) -> torch.Tensor:
        """The crop/flip parameters of draw `draw`: the in-memory source's very table."""
        table = self._tables.get(draw)
        if table is None:
            if len(self._tables) >= 2:
                self._tables.clear()
            table = self._tables[draw] = self.augment.params(draw, len(self), tuple(self.shape[-2:]))
        return table

    def _rrc(self, i: int, draw: int) -> torch.Tensor:
        from kdexp.seeding import derive_seed

        gen = torch.Generator().manual_seed(derive_seed(self.augment.seed, f"augment/rrc_flip/{draw}/{i}"))
        reader, pos = self.listing.reader, int(self.listing.index[i])
        size = tuple(self.shape[-2:])
        if isinstance(reader, FileReader):
            img = reader.pil(pos)
            box = rrc_box(gen, img.size[1], img.size[0], self.scale)
            from kdexp.data.images import pil_to_array

            x = torch.from_numpy(pil_to_array(reader.geometry.train_crop(img, box, size), reader.channels, None))
        else:  # a tensor sample: the box of its own size
            x = reader.image(pos)
            box = rrc_box(gen, x.shape[-2], x.shape[-1], self.scale)
            x = Geometry().train_crop(x, box, size)
        if int(torch.randint(0, 2, (1,), generator=gen)):
            x = x.flip(-1)
        return self._normalized(x)

    def loader(self) -> "Loader":
        """This view's own persistent loader (validation passes every epoch)."""
        if self._loader is None:
            self._loader = Loader(self, self.workers, persistent=True)
        return self._loader


def _positions(key, n: int) -> Sequence[int]:
    if isinstance(key, slice):
        return range(n)[key]
    if isinstance(key, int):
        raise TypeError("index LazyInputs with a slice or an index tensor (x[i:i+1], not x[i])")
    a = key.cpu().numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    if a.dtype == bool:
        a = np.flatnonzero(a)
    return [int(i) for i in a.reshape(-1)]


class _Samples(torch.utils.data.Dataset):
    """What a worker reads: item (i, draw) is sample i of `x` under `draw` (None: x's own view)."""

    def __init__(self, x: LazyInputs):
        self.x = copy.copy(x)
        self.x._loader = None  # no cycle back to the loader: freed by reference counting, its workers stop at once

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key) -> torch.Tensor:
        i, draw = key
        return self.x.sample(i, draw)


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)  # the workers decode; the main process's threads compute


class _Batches:
    """The batch sampler of a Loader: the batches of keys of the current pass."""

    def __init__(self):
        self.batches: List[list] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


_OPEN: "weakref.WeakSet[Loader]" = weakref.WeakSet()


class Loader:
    """A DataLoader over LazyInputs that reads the batches it is handed, in order: each batch a
    list of (position, draw) keys. Its batch sampler holds the current pass's batches, so one
    DataLoader (and with `persistent`, one set of workers) serves every pass. Pinned memory when
    a GPU is present. `close` stops the workers (close_loaders: every open one, at a run's end)."""

    def __init__(self, x: LazyInputs, workers: int, persistent: bool = True):
        self._sampler = _Batches()
        self.dl = torch.utils.data.DataLoader(
            _Samples(x), batch_sampler=self._sampler, num_workers=workers, pin_memory=torch.cuda.is_available(),
            persistent_workers=persistent and workers > 0, worker_init_fn=_one_thread if workers else None,
            prefetch_factor=4 if workers else None,
            generator=torch.Generator())  # its own: each pass draws a worker seed, never from torch's global stream
        _OPEN.add(self)

    def read(self, batches: Sequence[list]) -> Iterator[torch.Tensor]:
        """The stacked samples of each batch of keys, in order."""
        self._sampler.batches = list(batches)
        try:
            yield from self.dl
        except KdexpError as e:  # raised in a worker: torch re-raises it with the worker's traceback as text
            self.close()
            raise type(e)(_last_line(e)) from None
        except BaseException:  # a failed or interrupted pass: the workers stop now, not at garbage collection
            self.close()
            raise

    def close(self) -> None:
        """Stop the workers now: left to garbage collection, torch waits up to 5 s for each."""
        it = getattr(self.dl, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.dl._iterator = None


def close_loaders() -> None:
    """Stop the workers of every open Loader (the end of a run: its data and sources go with it)."""
    for loader in list(_OPEN):
        loader.close()
    _OPEN.clear()


def _last_line(e: BaseException) -> str:
    """A worker's exception message: the original's, the last line of the traceback torch quotes."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    name = type(e).__name__ + ": "
    return last.split(name, 1)[1] if name in last else last


def batches_of(x, batch_size: int, positions: Optional[torch.Tensor] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(positions, inputs) of consecutive batches of x (default: all its samples, in order): slices
    of a tensor, or LazyInputs read by its loader's workers (then on the host)."""
    if positions is None:
        positions = torch.arange(len(x), device=x.device)
        if not isinstance(x, LazyInputs):  # slices: views, no copy
            for i in range(0, len(x), batch_size):
                yield positions[i:i + batch_size], x[i:i + batch_size]
            return
    chunks = [positions[i:i + batch_size] for i in range(0, len(positions), batch_size)]
    if not isinstance(x, LazyInputs):
        for sel in chunks:
            yield sel, x[sel]
        return
    keys = [[(int(i), None) for i in sel.tolist()] for sel in chunks]
    yield from zip(chunks, x.loader().read(keys))


def subset(x, key):
    """The samples of x at `key` (a bool mask, positions, a slice): a tensor's, or LazyInputs of them."""
    return x.subset(key) if isinstance(x, LazyInputs) else x[key]


def head(x, n: int):
    """The first n samples of x."""
    return subset(x, slice(0, n))


def channel_stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (images) or per-feature (vectors) mean and std of x (N, ...), keepdim: the
    standardization of load_dataset, one rule for in-memory and streamed data."""
    dims = [0] + list(range(2, x.dim()))
    return x.mean(dims, keepdim=True), x.std(dims, keepdim=True).clamp_min(1e-6)


def stats_sample(listing: Listing) -> torch.Tensor:
    """The training samples the statistics of streamed data are computed on: all of them up to
    STATS_SAMPLES (then the same numbers as in memory), else an evenly strided sample."""
    n = len(listing)
    positions = np.arange(n) if n <= STATS_SAMPLES else np.linspace(0, n - 1, STATS_SAMPLES).round().astype(int)
    return torch.as_tensor(listing[positions].materialize())
