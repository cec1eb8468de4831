"""Fused sweeps (kdexp.engine.fused + hydra/sweeper=fused): N students trained in one process
give the results of N separate runs, in the same run directories."""
import json
import os
import subprocess
import sys

import pytest
import torch

from kdexp.engine import fused
from kdexp.engine.plan import student_reason
from kdexp.methods import list_methods, requirements
from kdexp.models import get_model
from kdexp.train import run

SHORT = ["epochs=2", "teacher.epochs=2", "progress=false"]


def read(path):
    with open(path) as f:
        return json.load(f)


def jobs_of(compose_cfg, tmp_path, variants, name, epochs=SHORT):
    return [fused.Job(compose_cfg(*epochs, *v), str(tmp_path / f"{name}{i}"), v, i) for i, v in enumerate(variants)]


def fused_and_separate_agree(compose_cfg, tmp_path, variants, epochs=SHORT):
    """Train `variants` as separate runs and as one fused group: the same final values and, epoch by
    epoch, the same metric names and values (to 1e-4) in each run's metrics.json."""
    separate = [run(j.cfg, j.run_dir, j.overrides) for j in jobs_of(compose_cfg, tmp_path, variants, "sep", epochs)]
    jobs = jobs_of(compose_cfg, tmp_path, variants, "fus", epochs)
    assert [o.status for o in fused.triage(jobs)] == ["fuse"] * len(jobs), [o.separate for o in fused.triage(jobs)]
    values = fused.train_group(jobs)
    assert values == pytest.approx(separate, abs=1e-4)
    for i in range(len(variants)):
        a, b = read(tmp_path / f"sep{i}" / "metrics.json"), read(tmp_path / f"fus{i}" / "metrics.json")
        assert b["status"] == "done" and b["fused"]["group_size"] == len(variants)
        assert [set(h) for h in a["history"]] == [set(h) for h in b["history"]]  # same metric names per epoch
        for ha, hb in zip(a["history"], b["history"]):
            for k in ha:
                if not k.startswith("time/"):
                    assert hb[k] == pytest.approx(ha[k], abs=1e-4), (i, k)
        assert b["teacher"]["key"] == a["teacher"]["key"] and b["hardware"] == a["hardware"]


FUSABLE = [n for n in list_methods() if requirements(n).fusable]


def test_every_logit_method_fuses():
    assert set(FUSABLE) == {"ce", "kd", "lskd", "logit_mse", "lsr", "tfkd_self", "tfkd_reg", "dkd", "dist", "mlkd",
                            "nkd", "wsld"}


@pytest.mark.parametrize("method", sorted(set(FUSABLE) - {"ce", "kd"}))
def test_fused_logit_methods_match_separate_runs(compose_cfg, tmp_path, method):
    # per-student temperature, alpha and beta (each a weight of some method's term; 0 leaves its
    # term out) and two seeds: one epoch, so that each method's step is compared, not its accuracy
    variants = [[f"method={method}", *v] for v in (
        ["method.temperature=2", "method.alpha=0.5", "method.beta=0.0", "seed=0"],
        ["method.temperature=6", "method.alpha=0.0", "method.beta=2.0", "seed=0"],
        ["method.temperature=3", "method.alpha=0.9", "method.beta=1.0", "seed=1"],
    )]
    fused_and_separate_agree(compose_cfg, tmp_path, variants, ["epochs=1", "teacher.epochs=1", "progress=false"])


@pytest.mark.parametrize("method", ["kd", "ce"])
def test_fused_students_match_separate_runs(compose_cfg, tmp_path, method):
    # temperatures, alphas (0: CE only), w_ce (0: KD only) and two seeds (different init and batches)
    variants = [[f"method={method}", *v] for v in (
        ["method.temperature=2", "method.alpha=0.5", "seed=0"],
        ["method.temperature=8", "method.alpha=0.9", "seed=0"],
        ["method.temperature=4", "method.alpha=0.0", "seed=1"],
        ["method.temperature=4", "method.alpha=0.9", "method.w_ce=0.0", "seed=1"],
    )]
    if method == "ce":
        variants = variants[:3]  # ce with w_ce=0 has nothing to train
    fused_and_separate_agree(compose_cfg, tmp_path, variants)
    for i in range(len(variants)):
        run_dir = tmp_path / f"fus{i}"
        assert (run_dir / "checkpoints" / "last.pt").is_file() and (run_dir / "run_info.json").is_file()
        assert list((run_dir / "tb").glob("events.out.tfevents*"))
        ck = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
        sep = torch.load(tmp_path / f"sep{i}" / "checkpoints" / "last.pt", weights_only=False)
        assert set(ck) == set(sep) and ck["epoch"] == 2
        for k, v in sep["method"].items():  # the weights copied back into each student
            assert torch.allclose(ck["method"][k], v, atol=1e-4), k


def test_fused_conv_students_match_separate_runs(compose_cfg, tmp_path):
    # a student that is not a linear chain runs under vmap (kdexp.engine.stacked)
    variants = [["method=kd", "student=cnn", "student.args.channels=[4,8]", f"method.temperature={t}"] for t in (2, 8)]
    fused_and_separate_agree(compose_cfg, tmp_path, variants, ["epochs=1", "teacher.epochs=1", "progress=false"])


@pytest.mark.slow
def test_a_fused_checkpoint_resumes_as_a_separate_run(compose_cfg, tmp_path):
    variants = [["method=kd", "method.temperature=2"], ["method=kd", "method.temperature=6", "seed=3"]]
    fused.train_group([fused.Job(compose_cfg("epochs=1", "teacher.epochs=2", "progress=false", *v),
                                 str(tmp_path / f"f{i}"), v, i) for i, v in enumerate(variants)])
    for i, v in enumerate(variants):  # continue each fused run for a second epoch, as a separate run
        resumed = run(compose_cfg(*SHORT, *v), str(tmp_path / f"f{i}"))
        full = run(compose_cfg(*SHORT, *v), str(tmp_path / f"full{i}"))
        assert resumed == pytest.approx(full, abs=1e-4)
        a, b = read(tmp_path / f"f{i}" / "metrics.json"), read(tmp_path / f"full{i}" / "metrics.json")
        assert len(a["history"]) == 2  # epoch 1 fused, epoch 2 from its checkpoint (optimizer state included)
        assert a["final"]["val/loss"] == pytest.approx(b["final"]["val/loss"], abs=1e-4)
        assert a["final"]["train/loss"] == pytest.approx(b["final"]["train/loss"], abs=1e-4)


def test_what_does_not_fuse_says_why(compose_cfg):
    assert fused.config_reason(compose_cfg("method=kd")) is None
    assert fused.config_reason(compose_cfg("method=ce")) is None
    assert fused.config_reason(compose_cfg("method=dkd")) is None
    assert "method=ctkd" in fused.config_reason(compose_cfg("method=ctkd"))
    assert "method=fitnet" in fused.config_reason(compose_cfg("method=fitnet", "student=cnn"))
    assert "teacher.cache=false" in fused.config_reason(compose_cfg("method=kd", "teacher.cache=false"))
    assert "ddp" in fused.config_reason(compose_cfg("method=kd", "hardware=ddp"))
    assert "dataset.augment=crop" in fused.config_reason(compose_cfg("method=kd", "dataset.augment=crop"))
    assert "domain" in fused.config_reason(compose_cfg("method=kd", "domain=vflip"))
    assert student_reason(get_model("mlp", (1, 8, 8), 10)) is None
    assert student_reason(get_model("lenet5", (1, 8, 8), 10)) is None
    assert student_reason(get_model("cnn", (1, 8, 8), 10)) is None  # dropout p=0: inactive
    assert "dropout" in student_reason(get_model("cnn", (1, 8, 8), 10, dropout=0.3))
    assert "BatchNorm" in student_reason(get_model("resnet8", (3, 32, 32), 10))
    a, b = compose_cfg("method=kd", "method.temperature=2", "seed=1"), compose_cfg("method=kd", "seed=5")
    assert fused.group_key(a) == fused.group_key(b) != fused.group_key(compose_cfg("method=kd", "optim.lr=0.1"))


def test_bn_students_fall_back_before_writing_anything(compose_cfg, tmp_path):
    variants = [["student=resnet8", "method=kd", f"seed={s}"] for s in (0, 1)]
    jobs = [fused.Job(compose_cfg("dataset=fake", "dataset.num_classes=10", *SHORT, *v), str(tmp_path / f"r{i}"), v, i)
            for i, v in enumerate(variants)]
    with pytest.raises(fused.NotFusable, match="BatchNorm"):
        fused.train_group(jobs)
    assert not any(os.path.exists(j.run_dir) for j in jobs)


@pytest.mark.slow  # subprocesses end to end: with the slow tests
def test_fused_sweeper_from_the_command_line(tmp_path):
    """hydra/sweeper=fused: kd jobs train as one group, ctkd jobs run separately (and say why: its
    temperature is a trained parameter of the method);
    every job gets its run directory with .hydra/, metrics.json, TensorBoard and its log."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "kdexp.train", "-m", "hydra/sweeper=fused", "method=kd,ctkd",
           "method.temperature=2,8", "epochs=1", "teacher.epochs=2", f"hydra.sweep.dir={sweep}",
           f"paths.cache_dir={tmp_path / 'cache'}"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "fused group of 2 kd students" in log and "runs separately: method=ctkd" in log
    runs = sorted(p.parent for p in sweep.rglob("metrics.json"))
    assert len(runs) == 4
    by_method = {}
    for r in runs:
        m = read(r / "metrics.json")
        assert m["status"] == "done"
        assert (r / ".hydra" / "overrides.yaml").is_file() and list((r / "tb").glob("events.out.tfevents*"))
        by_method.setdefault(m["hparams"]["method.name"], []).append((r, m))
    assert all(m["fused"]["group_size"] == 2 and (r / "train.log").is_file() for r, m in by_method["kd"])
    assert all("fused" not in m for _, m in by_method["ctkd"])
    sources = sorted(m["teacher"]["source"] for ms in by_method.values() for _, m in ms)
    assert sources == ["cache", "cache", "cache", "trained"]  # one teacher training for the sweep
    assert "epoch 1/1" in (by_method["kd"][0][0] / "train.log").read_text()
