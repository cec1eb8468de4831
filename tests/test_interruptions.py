"""Interruptions and shared run directories, from the command line: Ctrl-C (SIGINT) and SIGTERM
stop a run at a recorded point that resumes to the metrics of an uninterrupted run; a second
process on a run directory in use fails at once; a finished directory rerun with another config
says which keys differ."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

# ce with a small CNN on 6,000 random 8x8 images: ~0.4 s per epoch, long enough to interrupt; no teacher
SLOW = ["method=ce", "student=cnn", "student.args.channels=[16,32,32]", "dataset=fake", "dataset.shape=[1,8,8]",
        "dataset.num_classes=10", "dataset.train_size=6000", "dataset.val_size=500", "epochs=6", "hardware=cpu",
        "hardware.threads=1", "progress=false"]


def command(tmp_path, run_dir, *extra):
    return [sys.executable, "-m", "kdexp.train", *SLOW, *extra, f"hydra.run.dir={run_dir}",
            f"paths.cache_dir={tmp_path / 'cache'}"]


def start(tmp_path, run_dir, *extra):
    """The run, started in the background (its output line by line from proc.stdout)."""
    return subprocess.Popen(command(tmp_path, run_dir, *extra), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(proc, text, timeout=120):
    """The output up to the first line containing `text` (the process keeps running)."""
    seen, t0 = [], time.time()
    for line in proc.stdout:
        seen.append(line)
        if text in line or time.time() - t0 > timeout:
            break
    return "".join(seen)


def read(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("sig,code", [pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_run_at_a_recorded_point_that_resumes(tmp_path, sig, code):
    """SIGINT (slow: it also resumes and compares with an uninterrupted run) and SIGTERM."""
    run_dir = tmp_path / "run"
    proc = start(tmp_path, run_dir)
    out = wait_for(proc, "epoch 2/6")
    proc.send_signal(sig)
    out += proc.communicate(timeout=120)[0]
    assert proc.returncode == code, out[-2000:]
    assert "Traceback" not in out
    m = read(run_dir / "metrics.json")
    assert m["status"] == "interrupted" and 2 <= len(m["history"]) < 6, m.get("status")
    assert f"interrupted by {signal.Signals(sig).name}" in out and f"hydra.run.dir={run_dir}" in out  # the resume line
    if sig != signal.SIGINT:
        return
    resumed = subprocess.run(command(tmp_path, run_dir), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    whole = subprocess.run(command(tmp_path, tmp_path / "whole"), cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert resumed.returncode == 0 and whole.returncode == 0, resumed.stderr[-2000:]
    a, b = read(run_dir / "metrics.json"), read(tmp_path / "whole" / "metrics.json")
    assert a["status"] == "done" and [h["val/acc"] for h in a["history"]] == [h["val/acc"] for h in b["history"]]
    assert a["final"]["train/loss"] == pytest.approx(b["final"]["train/loss"], rel=1e-6)


@pytest.mark.slow  # subprocesses end to end: with the slow tests
def test_a_second_process_on_a_run_directory_in_use_fails_at_once(tmp_path):
    run_dir = tmp_path / "run"
    first = start(tmp_path, run_dir, "epochs=200")  # still training while the twin starts
    wait_for(first, "epoch 1/200")
    t0 = time.time()
    twin = subprocess.run(command(tmp_path, run_dir, "epochs=200"), cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert twin.returncode == 1 and time.time() - t0 < 30
    assert "in use by another kdexp process" in twin.stdout + twin.stderr and "Traceback" not in twin.stderr
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    m = read(run_dir / "metrics.json")  # the first run's record, untouched by the twin
    assert first.returncode == 143 and m["status"] == "interrupted" and len(m["history"]) >= 1


def test_a_finished_run_rerun_with_another_config_names_the_keys(compose_cfg, tmp_path):
    from kdexp.errors import ConfigError
    from kdexp.train import run

    fast = ["epochs=1", "teacher.epochs=1", "progress=false"]
    run(compose_cfg(*fast), str(tmp_path / "run"))
    assert run(compose_cfg(*fast), str(tmp_path / "run")) > 0  # the same config: skipped, its value
    with pytest.raises(ConfigError, match=r"different config \(method.temperature\).*force=true"):
        run(compose_cfg(*fast, "method.temperature=2"), str(tmp_path / "run"))
    assert read(tmp_path / "run" / "metrics.json")["status"] == "done"  # the finished run is untouched
    run(compose_cfg(*fast, "method.temperature=2", "force=true"), str(tmp_path / "run"))
    assert read(tmp_path / "run" / "metrics.json")["hparams"]["method.temperature"] == 2.0


@pytest.mark.parametrize("sig,raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, RuntimeError)])
def test_a_signal_during_an_atomic_write_waits_for_the_complete_file(tmp_path, sig, raised):
    """Ctrl-C or SIGTERM while a checkpoint is being written: the file is finished and renamed into
    place first, then the signal reaches its handler (torch.save interrupted midway reports an
    unrelated error instead of the interruption)."""
    from kdexp.io import atomic_write

    def on_term(signum, _frame):
        raise RuntimeError(f"handler got {signum}")

    path = tmp_path / "last.pt"
    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        def write(f):
            f.write(b"a" * 10)
            os.kill(os.getpid(), sig)
            time.sleep(0.05)  # undeferred, the handler would raise here, mid-file
            f.write(b"b" * 10)

        with pytest.raises(raised):
            atomic_write(str(path), write)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert path.read_bytes() == b"a" * 10 + b"b" * 10
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left
    assert signal.getsignal(signal.SIGTERM) is previous
