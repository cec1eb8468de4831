"""torchvision datasets read from dataset.root into memory. Without the files and without
a network, one error says exactly where to put them; with files that are there but unreadable,
one error names each corrupt file and why."""
import math
import os
import socket
import struct
from typing import List, Optional, Tuple

import numpy as np

from kdexp.data.core import register_dataset
from kdexp.data.sanity import DataContentError
from kdexp.data.stream import ArrayReader, Listing
from kdexp.errors import DataError

# name -> (torchvision class, number of classes, where the files go under root)
_VISION = {
    "mnist": ("MNIST", 10, "MNIST/raw/ (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
                           "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz])"),
    "fashion_mnist": ("FashionMNIST", 10, "FashionMNIST/raw/ (the four *-idx?-ubyte[.gz] files)"),
    "cifar10": ("CIFAR10", 10, "cifar-10-batches-py/ (or cifar-10-python.tar.gz in root)"),
    "cifar100": ("CIFAR100", 100, "cifar-100-python/ (or cifar-100-python.tar.gz in root)"),
}
# name -> the input shape `build` gives: the (MNIST) 28x28 grayscale / (CIFAR) 32x32 RGB images
# torchvision holds in `.data`, channel first. The dataset's signature: known without its files.
_SHAPES = {"mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32)}


def _expected_files(cls, root: str) -> List[Tuple[str, Optional[str]]]:
    """Every file torchvision reads for `cls` under root, with the md5 it verifies first (None:
    none). MNIST-like datasets read the unpacked idx files in <root>/<Class>/raw/ unverified;
    CIFAR verifies each pickled batch and the meta file against its md5 before unpickling."""
    if hasattr(cls, "resources"):  # MNIST, FashionMNIST: (archive name, md5 of the .gz archive)
        raw = os.path.join(root, cls.__name__, "raw")
        return [(os.path.join(raw, os.path.splitext(os.path.basename(f))[0]), None) for f, _ in cls.resources]
    entries = [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]
    return [(os.path.join(root, cls.base_folder, f), md5) for f, md5 in entries]


def _idx_problem(path: str) -> Optional[str]:
    """Why an MNIST idx file is unreadable, from its header and size alone, or None when they are
    consistent. torchvision reports a wrong magic number as a bare AssertionError and a truncated
    file as a tensor-shape RuntimeError, neither naming the file. The magic number 0x0000080N says
    unsigned bytes in N dimensions: N=3 for images (idx3), N=1 for labels (idx1)."""
    ndim = 3 if "idx3" in os.path.basename(path) else 1
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(4 * (ndim + 1))
    if len(head) < 4 * (ndim + 1):
        return f"{size} bytes, shorter than its idx header"
    magic, *dims = struct.unpack(f">{ndim + 1}I", head)
    if magic != 0x800 + ndim:
        return f"magic number {magic:#010x} instead of {0x800 + ndim:#010x}: not an idx{ndim} file of bytes"
    need = len(head) + math.prod(dims)
    if size != need:
        return (f"{'truncated: ' if size < need else ''}{size} bytes, but its header announces "
                f"{'x'.join(map(str, dims))} values ({need} bytes)")
    return None


def _problem(path: str, md5: Optional[str]) -> Optional[str]:
    """Why one expected file cannot be read, or None when it looks intact."""
    if md5 is None:
        return _idx_problem(path)
    from torchvision.datasets.utils import check_integrity

    return None if check_integrity(path, md5) else "md5 differs from the official file"


def _first_line(e: BaseException, with_type: bool = False) -> str:
    """An exception in one line for a message: its first line, its type where it has no text
    (torchvision's failed asserts have none) or `with_type`."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    return f"{type(e).__name__}: {text.splitlines()[0]}" if with_type else text.splitlines()[0]


def _corrupt(cls, root: str, name: str, error: BaseException, download_error: Optional[BaseException] = None):
    """The DataError for files that are all present but unreadable, naming each corrupt file and
    why; None when a file is missing (then "files not found" is the message). Only reached when
    torchvision failed, so the second look at the files costs nothing on a valid dataset."""
    files = _expected_files(cls, root)
    if not all(os.path.isfile(p) for p, _ in files):
        return None
    bad = [(p, why) for p, md5 in files for why in [_problem(p, md5)] if why]
    # A download that failed differently from the read (CIFAR fetches over a corrupt file; MNIST
    # keeps the files it finds, so its second try fails the same way) is worth its reason.
    retried = download_error is not None and (type(download_error), str(download_error)) != (type(error), str(error))
    tried = f"; the download did not replace them ({_first_line(download_error)})" if retried else ""
    them = "it" if len(bad) == 1 else "them"
    fix = f"delete {them} and set dataset.download=true to fetch {them} again, or copy intact files there"
    if not bad:  # every file looks intact, yet torchvision could not read them
        return DataContentError(f"dataset={name}: the files under dataset.root={root} are corrupt or unreadable "
                                f"({_first_line(error, with_type=True)}){tried}; {fix}")
    by_reason = {}  # CIFAR's files all fail the same way: each reason once
    for p, why in bad:
        by_reason.setdefault(why, []).append(os.path.relpath(p, root))
    listed = "; ".join(f"{', '.join(paths)} ({why})" for why, paths in by_reason.items())
    return DataContentError(f"dataset={name}: corrupt file{'s' if len(bad) > 1 else ''} under dataset.root={root}: "
                            f"{listed}{tried}; {fix}")


def _open(cls, root: str, train: bool, download: bool, where: str, name: str):
    """torchvision's dataset `cls` read from root, downloaded there first if allowed and needed.
    Every failure is one DataError: files missing (where to put them), or present but corrupt
    (which and why), whatever exception torchvision raised for it."""
    try:
        return cls(root, train=train, download=False)
    except Exception as e:  # missing or unreadable files: RuntimeError, AssertionError, ValueError, ...
        error = e
    if not download:
        corrupt = _corrupt(cls, root, name, error)
        if corrupt is not None:
            raise corrupt from None
        raise DataError(f"dataset={name}: files not found under {root}. Put them in {os.path.join(root, where)} "
                        f"or set dataset.download=true") from None
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)  # an offline cluster node should fail fast, not hang
    try:
        return cls(root, train=train, download=True)  # CIFAR downloads over a corrupt file; MNIST keeps it
    except Exception as e:
        corrupt = _corrupt(cls, root, name, error, download_error=e)
        if corrupt is not None:
            raise corrupt from None
        reason = _first_line(e)
        raise DataError(f"dataset={name}: files not found under {root} and the download failed ({reason}). "
                        f"Put the files in {os.path.join(root, where)} or point dataset.root "
                        f"(or paths.data_dir) at a folder that has them.") from None
    finally:
        socket.setdefaulttimeout(old)


def _make(name: str):
    cls_name, num_classes, where = _VISION[name]

    def build(cfg):
        import torchvision.datasets as tvd

        root = os.path.abspath(os.path.expanduser(cfg.root))
        cls = getattr(tvd, cls_name)
        splits = []
        for train in (True, False):
            ds = _open(cls, root, train, cfg.download, where, name)
            x = np.asarray(ds.data)  # uint8 pixels, read / 255 (kdexp.data.stream.ArrayReader)
            x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # MNIST (N,H,W); CIFAR (N,H,W,C)
            splits += [Listing(ArrayReader(x)), np.asarray(ds.targets)]
        return splits[0], splits[1], splits[2], splits[3], num_classes

    build.__doc__ = f"torchvision {cls_name} from dataset.root; official test split as val."
    return build


def _origin(name: str):
    """How messages name a torchvision dataset: by name and the folder its files are read from."""
    return lambda cfg: f"dataset={name} (dataset.root={os.path.abspath(os.path.expanduser(cfg.root))})"


for _name in _VISION:
    register_dataset(_name, signature=lambda cfg, _name=_name: (_SHAPES[_name], _VISION[_name][1]),
                     origin=_origin(_name), held_out=lambda cfg: "the official test split")(_make(_name))
