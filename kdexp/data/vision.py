"""torchvision datasets read from dataset.root into memory. Without the files and without
a network, one error says exactly where to put them."""
import os
import socket

import numpy as np

from kdexp.data.core import register_dataset
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


def _open(cls, root: str, train: bool, download: bool, where: str, name: str):
    try:
        return cls(root, train=train, download=False)
    except (RuntimeError, FileNotFoundError, OSError):
        if not download:
            raise DataError(f"dataset={name}: files not found under {root}. Put them in {os.path.join(root, where)} "
                            f"or set dataset.download=true") from None
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)  # an offline cluster node should fail fast, not hang
    try:
        return cls(root, train=train, download=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
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
            x = np.asarray(ds.data, dtype=np.float32) / 255.0
            x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # MNIST (N,H,W); CIFAR (N,H,W,C)
            splits += [x, np.asarray(ds.targets)]
        return splits[0], splits[1], splits[2], splits[3], num_classes

    build.__doc__ = f"torchvision {cls_name} from dataset.root; official test split as val."
    return build


for _name in _VISION:
    register_dataset(_name, signature=lambda cfg, _name=_name: (_SHAPES[_name], _VISION[_name][1]))(_make(_name))
