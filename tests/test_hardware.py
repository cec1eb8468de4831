"""The hardware group: threads per process, CPU guards of the CUDA options, DDP on gloo."""
import json

import pytest
import torch

from kdexp.engine import hardware
from kdexp.engine.hardware import Accelerator, DistContext, parallel_share
from kdexp.errors import ConfigError
from kdexp.train import run
from tests.conftest import torchrun_kdexp


@pytest.fixture
def launcher(monkeypatch):
    """launcher(cfg_dict or None): what HydraConfig.get().launcher would say."""
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)

    def set_(cfg):
        monkeypatch.setattr(hardware, "_launcher_config", lambda: cfg)
    return set_


def test_threads_are_cores_divided_by_parallel_processes(launcher, monkeypatch):
    launcher(None)
    assert parallel_share(8) == (None, "single process")  # alone: torch's default
    launcher({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"})
    assert parallel_share(8)[0] is None
    launcher({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 2})
    assert parallel_share(8)[0] == 4
    launcher({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": -1})
    assert parallel_share(8)[0] == 1  # one job per core
    launcher({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 16})
    assert parallel_share(8)[0] == 1
    launcher({"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher", "cpus_per_task": 3})
    assert parallel_share(8)[0] == 3
    launcher(None)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun with 2 local ranks
    assert parallel_share(8)[0] == 4
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert parallel_share(8)[0] == 3  # 6 CPUs of the SLURM task shared by 2 ranks


def test_explicit_threads_are_applied(compose_cfg):
    before = torch.get_num_threads()
    try:
        assert hardware.apply_threads(compose_cfg("hardware=cpu", "hardware.threads=1").hardware) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_gpu_options_leave_the_cpu_path_alone(compose_cfg, caplog):
    cpu = Accelerator(torch.device("cpu"), compose_cfg("hardware=cpu").hardware)
    assert cpu.amp_dtype is None and cpu.scaler is None and not cpu.channels_last and cpu.sync_every == 1
    with pytest.raises(ConfigError, match="hardware.amp=bf16 needs a GPU"):
        Accelerator(torch.device("cpu"), compose_cfg("hardware=cpu", "hardware.amp=bf16").hardware)
    auto = Accelerator(torch.device("cpu"), compose_cfg("hardware=auto", "hardware.amp=fp16",
                                                        "hardware.channels_last=true").hardware)
    assert auto.amp_dtype is None and auto.scaler is None and not auto.channels_last
    assert "ignored" in caplog.text


@pytest.mark.parametrize("override,key", [("hardware.amp=fp8", "hardware.amp"), ("hardware.backend=mpi", "hardware.backend"),
                                          ("hardware.sync_every=0", "hardware.sync_every")])
def test_bad_hardware_values_are_rejected(compose_cfg, tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        run(compose_cfg("epochs=1", "progress=false", override), str(tmp_path / "r"))


def test_ddp_without_torchrun_says_how_to_launch(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError, match="torchrun"):
        run(compose_cfg("epochs=1", "progress=false", "hardware=ddp"), str(tmp_path / "r"))


def test_shards_cover_the_global_batch():
    idx = torch.arange(29)
    parts = [DistContext(r, 3).shard(idx) for r in range(3)]
    assert torch.equal(torch.cat(parts), idx) and [len(p) for p in parts] == [10, 10, 9]


def read(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.slow  # subprocesses end to end: with the slow tests
def test_ddp_on_two_gloo_processes_matches_one_process(compose_cfg, tmp_path):
    """torchrun --nproc_per_node=2 ... hardware=ddp (gloo): each rank trains on half of every global
    batch of 64; the result equals one process on the same batches."""
    common = ["epochs=2", "teacher.epochs=2", "progress=false", f"paths.cache_dir={tmp_path / 'cache'}"]
    single = run(compose_cfg(*common, "hardware=cpu"), str(tmp_path / "one"))
    torchrun_kdexp(tmp_path, *common, f"hydra.run.dir={tmp_path / 'ddp'}")
    a, b = read(tmp_path / "one" / "metrics.json"), read(tmp_path / "ddp" / "metrics.json")
    assert b["status"] == "done" and b["hardware"]["processes"] == 2 and a["hardware"]["processes"] == 1
    assert b["final"]["val/acc"] == pytest.approx(single, abs=1e-9)
    for k, v in a["final"].items():
        assert b["final"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert len(list((tmp_path / "ddp" / "tb").glob("events.out.tfevents*"))) == 1  # only rank 0 logs
    assert b["teacher"]["source"] == "cache"  # loaded, not trained again by either rank


@pytest.mark.slow
def test_torch_compile_of_the_student(compose_cfg, tmp_path):
    """hardware.compile=true (here on the CPU, inductor): same metrics, same checkpoint keys."""
    common = ["epochs=2", "teacher.epochs=2", "progress=false"]
    plain = run(compose_cfg(*common, "hardware=cpu"), str(tmp_path / "plain"))
    compiled = run(compose_cfg(*common, "hardware=cpu", "hardware.compile=true"), str(tmp_path / "compiled"))
    assert compiled == pytest.approx(plain, abs=1e-9)
    a, b = read(tmp_path / "plain" / "metrics.json"), read(tmp_path / "compiled" / "metrics.json")
    for k, v in a["final"].items():
        assert b["final"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    keys = lambda d: set(torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=False)["method"])  # noqa: E731
    assert keys("plain") == keys("compiled")
