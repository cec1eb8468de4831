import os
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import kdexp.train  # noqa: F401  (registers the structured configs)
from kdexp import config_dir

# One torch thread in the test process: the test models are tiny, and on a 2-core machine shared with
# other jobs thread hand-offs cost more than they gain (whole test files ran several times faster).
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUPS = ("dataset", "teacher", "student", "method", "hardware")
# Short recipes so end-to-end tests take seconds.
FAST = ["epochs=1", "teacher.epochs=2", "progress=false"]


def group_options(group: str):
    return sorted(f[:-5] for f in os.listdir(os.path.join(config_dir(), group)) if f.endswith(".yaml"))


def composer(root):
    """compose(*overrides) -> the composed DictConfig, with the teacher cache and data under `root`."""
    def _compose(*overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose("config", overrides=[f"paths.cache_dir={root / 'cache'}",
                                                f"paths.data_dir={root / 'data'}", *overrides])
    return _compose


@pytest.fixture
def compose_cfg(tmp_path):
    """compose_cfg(*overrides) -> the composed DictConfig, cache and data under tmp_path."""
    yield composer(tmp_path)
    GlobalHydra.instance().clear()


@pytest.fixture
def python():
    return sys.executable


def tensorboard_run(run_dir):
    """(scalar tags, hparams plugin tags) of the TensorBoard events in <run_dir>/tb (one run folder)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(os.path.join(str(run_dir), "tb"))
    ea.Reload()
    try:
        hparams = ea.PluginTagToContent("hparams")
    except KeyError:  # a run that did not finish has no HParams
        hparams = {}
    return set(ea.Tags()["scalars"]), set(hparams)


HPARAMS_TAGS = {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}


def fit_method(method, data, *, optim_cfg, epochs, batch_size, seed, pool="all", **kw):
    """The one fit loop on a method with in-memory batches (what a single run does after assembly)."""
    from kdexp.engine.fit import fit
    from kdexp.engine.source import InMemorySource
    from kdexp.engine.steppers import MethodStepper

    source = InMemorySource(data, batch_size=batch_size, seed=seed, pool=pool)
    return fit(MethodStepper(method, data), source, optim_cfg=optim_cfg, epochs=epochs, **kw)


def torchrun_kdexp(cwd, *args, timeout=600):
    """`torchrun --standalone --nproc_per_node=2 -m kdexp.train hardware=ddp *args` (gloo on the CPU,
    one torch thread per rank); asserts that it succeeded -> the completed process."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdexp.train",
           "hardware=ddp", *args]
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return out


def sigkill_after_epochs(cmd, cwd, run_dir, epochs: int, after: float = 0.0, timeout: float = 240) -> dict:
    """Start `cmd`, SIGKILL it once <run_dir>/metrics.json records `epochs` epochs (and `after`
    seconds more: into the next epoch) -> the metrics.json the killed run left."""
    import json
    import signal
    import subprocess
    import time

    path = os.path.join(str(run_dir), "metrics.json")
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with open(path) as f:
                if len(json.load(f)["history"]) >= epochs:
                    break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    time.sleep(after)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with open(path) as f:
        return json.load(f)


@pytest.fixture(autouse=True)
def _stop_dataloader_workers():
    """After each test, stop the workers of streamed data's loaders it left open (a run closes its
    own): left to garbage collection in a later test, torch waits 5 s for each worker."""
    yield
    from kdexp.data.stream import close_loaders

    close_loaders()
