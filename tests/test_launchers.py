"""Hydra launchers for many runs: joblib (local processes, threads = cores / n_jobs) and
submitit_local (one subprocess per job), through the real CLI."""
import json
import subprocess
import sys

import pytest

from kdexp.engine.hardware import cpu_count


def sweep(tmp_path, *args):
    out = subprocess.run([sys.executable, "-m", "kdexp.train", "-m", *args, "method=ce", "seed=0,1", "epochs=1",
                          f"hydra.sweep.dir={tmp_path / 'sweep'}", f"paths.cache_dir={tmp_path / 'cache'}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    runs = sorted((tmp_path / "sweep").rglob("metrics.json"))
    assert len(runs) == 2
    return [json.loads(p.read_text()) for p in runs]


@pytest.mark.slow
def test_joblib_gives_each_job_its_share_of_the_cores(tmp_path):
    metrics = sweep(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert all(m["status"] == "done" for m in metrics)
    assert {m["hardware"]["threads"] for m in metrics} == {max(1, cpu_count() // 2)}


@pytest.mark.slow
def test_submitit_local_sweep(tmp_path):
    metrics = sweep(tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=1",
                    "hydra.launcher.timeout_min=10")
    assert all(m["status"] == "done" for m in metrics)
    assert {m["hardware"]["threads"] for m in metrics} == {1}
    assert list((tmp_path / "sweep" / ".submitit").glob("*/*_log.out"))  # submitit ran each job
