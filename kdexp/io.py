"""Atomic file writes: a reader never sees a half-written checkpoint, metrics or cache file."""
import contextlib
import json
import os
import signal
import tempfile
import threading

import torch


@contextlib.contextmanager
def signals_deferred(signums=(signal.SIGINT, signal.SIGTERM)):
    """Hold SIGINT/SIGTERM until the block ends, then deliver the first one that arrived to the
    handler that was in place (Ctrl-C's KeyboardInterrupt, kdexp's RunInterrupted for SIGTERM).
    A signal raised inside torch.save's C++ writer leaves it in a state it reports as an
    unrelated RuntimeError ("unexpected pos"), so an interruption would be recorded as a crash;
    deferred, the file is finished first and the interruption is recorded as one. Main thread only
    (Python runs signal handlers there); elsewhere the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = {s: signal.signal(s, lambda signum, _frame: pending.append(signum)) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pending:
            handler = previous[pending[0]]
            if callable(handler):
                handler(pending[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(pending[0])


def atomic_write(path: str, write) -> None:
    """Write a file through `write(binary file object)`: a temporary file, flushed and fsynced,
    then renamed over `path`. SIGINT/SIGTERM wait until the file is complete (signals_deferred)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with signals_deferred():
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
