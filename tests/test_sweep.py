"""Multirun through the real CLI in a subprocess, as a user runs it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import HPARAMS_TAGS, ROOT, tensorboard_run


@pytest.mark.slow  # subprocesses end to end (~10 s): with the slow tests
def test_two_methods_by_two_temperatures(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "kdexp.train", "-m", "method=ce,kd", "method.temperature=2,8", "method.alpha=0.5",
           "epochs=2", "teacher.epochs=2", f"hydra.sweep.dir={sweep}", f"paths.cache_dir={tmp_path / 'cache'}"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    runs = sorted(p.parent for p in sweep.rglob("metrics.json"))
    assert len(runs) == 4
    metrics = [json.loads((r / "metrics.json").read_text()) for r in runs]
    assert all(m["status"] == "done" for m in metrics)
    sources = sorted(m["teacher"]["source"] for m in metrics)
    assert sources == ["cache", "none", "none", "trained"]  # the teacher was trained exactly once
    for r in runs:
        scalars, hp = tensorboard_run(r)
        assert {"val/acc", "train/loss"} <= scalars
        assert HPARAMS_TAGS <= hp  # HParams in the same run folder, not a sibling
    table = subprocess.run([sys.executable, str(Path(ROOT) / "scripts" / "summarize.py"), str(sweep),
                            "--csv", str(tmp_path / "t.csv")], capture_output=True, text=True, check=True).stdout
    rows = [line for line in table.splitlines() if line.startswith("| ") and "| done |" in line]
    assert len(rows) == 4, table
    assert (tmp_path / "t.csv").read_text().count("\n") == 5


def test_console_script_runs_from_any_directory(tmp_path):
    exe = Path(sys.executable).parent / "kdexp-train"
    out = subprocess.run([str(exe), "--cfg", "job"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "name: kd" in out.stdout and "name: digits" in out.stdout


@pytest.mark.slow  # subprocesses end to end (~10 s): with the slow tests
def test_cli_errors_are_clear(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "kdexp.train", *args, f"hydra.run.dir={tmp_path / 'r'}"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)

    bad = run("method=kdd")
    assert bad.returncode != 0 and "kd" in bad.stdout + bad.stderr
    missing = run("dataset=mnist", f"dataset.root={tmp_path / 'nodata'}", "dataset.download=false")
    text = missing.stdout + missing.stderr
    assert missing.returncode == 1 and "Traceback" not in text and str(tmp_path / "nodata") in text
    neg = run("method.temperature=-1")
    assert neg.returncode == 1 and "method.temperature" in neg.stdout + neg.stderr
