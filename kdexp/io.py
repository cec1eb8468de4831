"""Atomic file writes: a reader never sees a half-written checkpoint, metrics or cache file."""
import json
import os
import tempfile

import torch


def atomic_write(path: str, write) -> None:
    """Write a file through `write(binary file object)`: a temporary file, flushed and fsynced,
    then renamed over `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_json_dump(obj, path: str) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))
