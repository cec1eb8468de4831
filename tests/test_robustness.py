"""Robustness: resume after SIGKILL, failure isolation in sweeps, clear errors, reproducibility,
optuna/grid presets, reports."""
import errno
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kdexp.errors import ConfigError, KdexpError
from kdexp.models import get_model
from kdexp.train import describe, run
from tests.conftest import FAST, ROOT, sigkill_after_epochs

TRAIN = [sys.executable, "-m", "kdexp.train"]


def metrics(run_dir) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def cli(tmp_path, *args, timeout=300):
    return subprocess.run([*TRAIN, *args, f"paths.cache_dir={tmp_path / 'cache'}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_gives_identical_metrics(tmp_path):
    args = ["epochs=40", "teacher.epochs=2", "progress=false", f"paths.cache_dir={tmp_path / 'cache'}"]
    full = subprocess.run([*TRAIN, *args, f"hydra.run.dir={tmp_path / 'full'}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = tmp_path / "killed"
    interrupted = sigkill_after_epochs([*TRAIN, *args, f"hydra.run.dir={killed}"], tmp_path, killed, 3)
    assert interrupted["status"] == "running" and 3 <= len(interrupted["history"]) < 40, "not killed mid-training"
    resumed = subprocess.run([*TRAIN, *args, f"hydra.run.dir={killed}"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout + resumed.stderr
    a, b = metrics(tmp_path / "full"), metrics(killed)
    assert b["status"] == "done" and len(b["history"]) == 40
    for key in ("val/acc", "val/loss", "train/loss"):
        assert a["final"][key] == b["final"][key], key
    assert [h["val/loss"] for h in a["history"]] == [h["val/loss"] for h in b["history"]]


@pytest.mark.slow  # subprocesses end to end: with the slow tests
def test_sweep_with_a_failing_job_finishes_the_others_and_exits_1(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "method.temperature=2,-1", "epochs=1", "teacher.epochs=1", f"hydra.sweep.dir={sweep}"]
    out = cli(tmp_path, *args)
    assert out.returncode == 1
    text = out.stdout + out.stderr
    assert "1 job(s) of the sweep failed" in text and "Traceback" not in text
    runs = {p.parent.name: json.loads(p.read_text()) for p in sweep.rglob("metrics.json")}
    assert len(runs) == 2
    ok = next(m for n, m in runs.items() if "temperature=2" in n)
    bad = next(m for n, m in runs.items() if "temperature=-1" in n)
    assert ok["status"] == "done" and bad["status"] == "failed" and "method.temperature" in bad["error"]
    table = subprocess.run([sys.executable, str(Path(ROOT) / "scripts" / "summarize.py"), str(sweep)],
                           capture_output=True, text=True).stdout
    assert "| failed (ConfigError" in table and "| done |" in table
    # rerunning the finished sweep skips the finished job
    again = cli(tmp_path, *args)
    assert again.returncode == 1 and "already done" in again.stdout + again.stderr


def test_divergence_stops_at_once_naming_step_and_term(compose_cfg, tmp_path):
    with pytest.raises(KdexpError, match=r"epoch 1, step \d+ \(non-finite term\(s\): \[.*'kd'.*\]"):
        run(compose_cfg(*FAST, "optim.lr=1e30", "optim.name=sgd", "optim.momentum=0", "student.args.activation=relu"),
            str(tmp_path / "run"))
    m = metrics(tmp_path / "run")
    assert m["status"] == "failed" and "non-finite" in m["error"]


@pytest.mark.slow  # subprocesses end to end: with the slow tests
def test_concurrent_joblib_jobs_train_the_teacher_once(tmp_path):
    sweep = tmp_path / "sweep"
    out = cli(tmp_path, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method.temperature=2,8",
              "epochs=1", "teacher.epochs=3", f"hydra.sweep.dir={sweep}")
    assert out.returncode == 0, out.stderr[-3000:]
    ms = [json.loads(p.read_text()) for p in sweep.rglob("metrics.json")]
    assert sorted(m["teacher"]["source"] for m in ms) == ["cache", "trained"]
    assert len({m["teacher"]["key"] for m in ms}) == 1
    files = list((tmp_path / "cache" / "teachers").glob("*.pt"))
    assert len(files) == 1 and not list((tmp_path / "cache" / "teachers").glob(".tmp-*"))
    torch.load(files[0], weights_only=True)  # complete, readable


def test_resume_refuses_a_changed_config(compose_cfg, tmp_path):
    run(compose_cfg("epochs=1", "teacher.epochs=1", "progress=false"), str(tmp_path / "r"))
    with pytest.raises(ConfigError, match="method.temperature"):
        run(compose_cfg("epochs=2", "teacher.epochs=1", "progress=false", "method.temperature=7"), str(tmp_path / "r"))
    # resume=false starts over instead
    run(compose_cfg("epochs=2", "teacher.epochs=1", "progress=false", "method.temperature=7", "resume=false"),
        str(tmp_path / "r"))
    assert metrics(tmp_path / "r")["status"] == "done"


@pytest.mark.parametrize("case", ["missing", "corrupt", "other_arch", "class_count", "input_shape"])
def test_bad_teacher_checkpoints(compose_cfg, tmp_path, case):
    path = tmp_path / "t.pt"
    extra = []
    if case == "corrupt":
        path.write_bytes(b"not a checkpoint")
    elif case == "other_arch":
        torch.save(get_model("lenet5", (1, 8, 8), 10).state_dict(), path)
    elif case == "class_count":
        torch.save(get_model("cnn", (1, 8, 8), 10).state_dict(), path)
        extra = ["dataset.classes=[6,9]"]
    elif case == "input_shape":
        torch.save(get_model("cnn", (1, 28, 28), 10).state_dict(), path)
    expected = {"missing": "no such file", "corrupt": "not a readable", "other_arch": "another architecture",
                "class_count": "for 10 classes, this dataset has 2", "input_shape": "input size"}[case]
    with pytest.raises(ConfigError, match=expected):
        run(compose_cfg(*FAST, f"teacher.checkpoint={path}", *extra), str(tmp_path / "run"))
    assert metrics(tmp_path / "run")["status"] == "failed"


def test_unwritable_output_dir_is_one_clear_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = cli(tmp_path, f"hydra.run.dir={blocker / 'run'}")
    assert out.returncode == 1 and "Traceback" not in out.stdout + out.stderr
    assert "cannot write the run directory" in out.stderr and str(blocker) in out.stderr


def test_disk_full_is_reported_with_the_path(compose_cfg, tmp_path, monkeypatch):
    import kdexp.engine.record as logging_mod

    def full(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(logging_mod, "atomic_json_dump", full)
    with pytest.raises(OSError) as e:
        run(compose_cfg(*FAST), str(tmp_path / "run"))
    msg = describe(e.value)
    assert "No space left on device" in msg and str(tmp_path / "run") in msg


def test_run_directory_holds_what_reproduces_it(compose_cfg, tmp_path):
    run(compose_cfg(*FAST, "method.temperature=3"), str(tmp_path / "run"))
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["packages"]["torch"] and info["packages"]["hydra-core"] and info["command"]
    assert set(info["git"]) == {"commit", "dirty"}
    if info["git"]["commit"] is not None:
        assert len(info["git"]["commit"]) == 40 and isinstance(info["git"]["dirty"], bool)
    resolved = (tmp_path / "run" / "config.yaml").read_text()
    assert "temperature: 3.0" in resolved and "${" not in resolved


def test_same_seed_gives_bit_identical_cpu_runs(compose_cfg, tmp_path):
    cfg = compose_cfg("epochs=2", "teacher.epochs=1", "progress=false", "student=cnn", "seed=5")
    run(cfg, str(tmp_path / "a"))
    run(cfg, str(tmp_path / "b"))
    a, b = torch.load(tmp_path / "a/checkpoints/last.pt"), torch.load(tmp_path / "b/checkpoints/last.pt")
    assert all(torch.equal(a["method"][k], b["method"][k]) for k in a["method"])


@pytest.mark.slow  # subprocesses end to end: with the slow tests
def test_optuna_preset_runs_a_short_study(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    out = cli(tmp_path, "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3",
              "hydra.sweeper.sampler.n_startup_trials=2", "epochs=1", "teacher.epochs=1", f"hydra.sweep.dir={sweep}")
    assert out.returncode == 0, out.stderr[-3000:]
    results = (sweep / "optimization_results.yaml").read_text()
    assert "best_value" in results and "method.temperature" in results
    assert len(list(sweep.rglob("metrics.json"))) == 3


def test_grid_preset_composes(compose_cfg):
    from hydra import compose

    cfg = compose_cfg("hparams_search=grid")
    assert cfg.method.name == "kd" and compose is not None


@pytest.mark.slow
def test_summary_seeds_table_and_plots(tmp_path):
    sweep = tmp_path / "sweep"
    out = cli(tmp_path, "-m", "method=kd", "method.temperature=1,4", "method.alpha=0.5,0.9", "seed=0,1",
              "epochs=2", "teacher.epochs=1", f"hydra.sweep.dir={sweep}", timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    table = subprocess.run([sys.executable, str(Path(ROOT) / "scripts" / "summarize.py"), str(sweep), "--seeds-only"],
                           capture_output=True, text=True, check=True).stdout
    kd_rows = [line for line in table.splitlines() if "| kd |" in line]
    assert len(kd_rows) == 4 and all("| 2 | 0 |" in r and "±" in r for r in kd_rows), table
    plots = subprocess.run([sys.executable, str(Path(ROOT) / "scripts" / "plot.py"), str(sweep)],
                           capture_output=True, text=True, check=True).stdout.split()
    names = sorted(Path(p).name for p in plots)
    assert names == ["acc_vs_temperature.png", "alpha_temperature.png", "learning_curves.png", "loss_terms.png"]
    for p in plots:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(p).stat().st_size > 10_000
