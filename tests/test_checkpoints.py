"""Run outputs others can use (student.pt, checkpoints/best.pt) and the checkpoint layouts
teacher.checkpoint reads (kdexp run directories and checkpoints, plain state_dicts, wrappers,
DataParallel/Lightning prefixes) or refuses in one line."""
import argparse
import json
import logging
import os

import pytest
import torch
import torch.nn as nn
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from kdexp.engine.record import Recorder
from kdexp.engine.teacher import read_state_dict
from kdexp.errors import ConfigError
from kdexp.models import get_model
from kdexp.train import run
from tests.conftest import composer

MLP = {"hidden": 64, "activation": "sigmoid", "depth": 1}  # conf/student/mlp.yaml: the ce run's student


def read(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def ce_run(tmp_path_factory):
    """A 3-epoch ce run on digits (default student mlp), shared by the tests of this file."""
    root = tmp_path_factory.mktemp("ce")
    run(composer(root)("epochs=3", "progress=false", "method=ce"), str(root / "run"))
    GlobalHydra.instance().clear()
    return root / "run"


# -- the run's outputs ---------------------------------------------------------------------------
def test_student_pt_loads_strictly_into_the_architecture(ce_run):
    sd = torch.load(ce_run / "student.pt", weights_only=True)
    model = get_model("mlp", (1, 8, 8), 10, **MLP)
    model.load_state_dict(sd, strict=True)
    last = torch.load(ce_run / "checkpoints" / "last.pt", weights_only=True)
    assert set(sd) == set(model.state_dict()) and not any(k.startswith("student.") for k in sd)
    assert all(torch.equal(v, last["method"][f"student.{k}"]) for k, v in sd.items())  # the last epoch's


def test_best_pt_is_the_best_epoch_and_last_pt_keeps_its_format(ce_run):
    m = read(ce_run / "metrics.json")
    best = torch.load(ce_run / "checkpoints" / "best.pt", weights_only=True)
    last = torch.load(ce_run / "checkpoints" / "last.pt", weights_only=True)
    assert best["epoch"] == m["best"]["epoch"]
    assert set(best) == set(last) == {"epoch", "method", "optimizer", "scheduler", "generator", "torch_rng",
                                      "history", "accel", "teacher_key", "config"}


def test_a_ce_run_directory_is_a_kd_teacher_with_the_same_accuracy(ce_run, tmp_path):
    compose = composer(tmp_path)
    cfg = compose("epochs=1", "progress=false", "method=kd", "teacher=mlp", f"teacher.checkpoint={ce_run}")
    assert OmegaConf.to_container(cfg.teacher.args) == MLP
    run(cfg, str(tmp_path / "kd"))
    GlobalHydra.instance().clear()
    teacher = read(tmp_path / "kd" / "metrics.json")["teacher"]
    assert teacher["source"] == "checkpoint"
    assert teacher["val/acc"] == read(ce_run / "metrics.json")["final"]["val/acc"]  # same evaluation, exactly


def test_fused_runs_write_the_same_files(compose_cfg, tmp_path):
    from kdexp.engine import fused

    variants = [["method=ce", "seed=0"], ["method=ce", "seed=1"]]
    jobs = [fused.Job(compose_cfg("epochs=2", "progress=false", *v), str(tmp_path / f"f{i}"), v, i)
            for i, v in enumerate(variants)]
    assert [o.status for o in fused.triage(jobs)] == ["fuse", "fuse"]
    fused.train_group(jobs)
    students = []
    for i in range(2):
        run_dir = tmp_path / f"f{i}"
        sd = torch.load(run_dir / "student.pt", weights_only=True)
        get_model("mlp", (1, 8, 8), 10, **MLP).load_state_dict(sd, strict=True)
        last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
        assert all(torch.equal(v, last["method"][f"student.{k}"]) for k, v in sd.items())  # its own slice
        best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
        assert best["epoch"] == read(run_dir / "metrics.json")["best"]["epoch"]
        students.append(sd)
    first = next(iter(students[0]))
    assert not torch.equal(students[0][first], students[1][first])  # each run its own student (seeds 0, 1)


def _recorder(tmp_path, epochs, every=1):
    cfg = OmegaConf.create({"epochs": epochs, "checkpoint_every": every})
    r = Recorder(str(tmp_path), cfg)
    r.record = {"history": [], "status": "running"}
    return r


def _metrics(acc):
    return {"train/loss": 1.0, "val/acc": acc, "val/loss": 1.0, "time/epoch_s": 0.1}


def test_best_pt_is_written_only_on_improvement(tmp_path):
    r = _recorder(tmp_path, epochs=3)
    for epoch, acc in enumerate([0.5, 0.7, 0.6]):
        r.epoch(epoch, _metrics(acc), {"epoch": epoch + 1, "method": {"student.w": torch.full((2,), float(epoch))}})
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert (best["epoch"], last["epoch"], r.record["best"]["epoch"]) == (2, 3, 2)
    assert torch.equal(best["method"]["student.w"], torch.ones(2))
    assert torch.equal(torch.load(tmp_path / "student.pt", weights_only=True)["w"], torch.full((2,), 2.0))


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_an_epoch_kept_for_later_is_what_an_interruption_or_failure_saves(tmp_path, stop):
    """checkpoint_every > 1: the live weights change after the epoch; the saved ones must not."""
    r = _recorder(tmp_path, epochs=10, every=5)
    w = torch.zeros(3)
    with pytest.raises(BaseException):
        with r.failure_recorded():
            r.epoch(0, _metrics(0.5), {"epoch": 1, "method": {"student.w": w}})
            w.add_(1.0)  # the next epoch's optimizer steps, in place
            raise stop()
    assert torch.equal(torch.load(tmp_path / "student.pt", weights_only=True)["w"], torch.zeros(3))
    if stop is KeyboardInterrupt:
        assert torch.equal(torch.load(tmp_path / "checkpoints" / "last.pt")["method"]["student.w"], torch.zeros(3))


# -- teacher.checkpoint layouts ------------------------------------------------------------------
def _small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def _prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


LAYOUTS = {
    "plain": lambda sd: sd,
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 3},
    "model_state_dict": lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {}},
    "repdistiller": lambda sd: {"epoch": 240, "model": sd, "accuracy": 77.1, "optimizer": {"state": {}}},
    "repdistiller_last": lambda sd: {"opt": argparse.Namespace(model="cnn", lr=0.05), "model": sd},
    "net": lambda sd: {"net": sd, "acc": 95.0},
    "dataparallel": lambda sd: _prefixed(sd, "module."),
    "lightning": lambda sd: {"state_dict": _prefixed(sd, "model."), "epoch": 9, "global_step": 90},
    "ddp_in_lightning": lambda sd: {"state_dict": _prefixed(sd, "model.module.")},
    "nested": lambda sd: {"model": {"state_dict": sd}},
    "kdexp_checkpoint": lambda sd: {"epoch": 2, "method": {**_prefixed(sd, "student."), "proj.weight": torch.ones(1)},
                                    "optimizer": {}, "config": {"seed": 0}},
    "torchvision_without_counters": lambda sd: {k: v for k, v in sd.items() if "num_batches_tracked" not in k},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_accepted_layouts_load_equal_tensors(tmp_path, layout):
    source = _small()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    sd = source.state_dict()
    torch.save(LAYOUTS[layout](sd), tmp_path / "t.pt")
    target = _small()
    got = read_state_dict(str(tmp_path / "t.pt"), target)
    target.load_state_dict(got, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


def test_a_stripped_prefix_is_said_in_one_log_line(tmp_path, caplog):
    torch.save(_prefixed(_small().state_dict(), "module."), tmp_path / "t.pt")
    with caplog.at_level(logging.INFO, logger="kdexp"):
        read_state_dict(str(tmp_path / "t.pt"), _small())
    lines = [r.getMessage() for r in caplog.records if "prefix" in r.getMessage()]
    assert len(lines) == 1 and "'module.'" in lines[0] and "t.pt" in lines[0]


@pytest.mark.parametrize("files", [["student.pt"], ["checkpoints/last.pt"], ["student.pt", "checkpoints/last.pt"]])
def test_a_run_directory_gives_its_student(tmp_path, files):
    source, other = _small(), nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    for name in files:  # student.pt wins over last.pt (here: another model's weights)
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        sd = source.state_dict() if name == files[0] else other.state_dict()
        torch.save(sd if name == "student.pt" else LAYOUTS["kdexp_checkpoint"](sd), tmp_path / name)
    got = read_state_dict(str(tmp_path), _small())
    assert all(torch.equal(got[k], v) for k, v in source.state_dict().items())


def _pickled_module(path):
    torch.save(_small(), path)


REFUSED = {
    "pickled_module": (_pickled_module, "torch.save(model.state_dict(), path)"),
    "no_tensors": (lambda p: torch.save({"epoch": 3, "acc": 0.9}, p), "a dict with keys ['epoch', 'acc']"),
    "a_tensor": (lambda p: torch.save(torch.zeros(2, 3), p), "a single tensor of shape (2, 3)"),
    "text": (lambda p: open(p, "w").write("not a checkpoint\n"), "not a readable PyTorch checkpoint"),
    "other_arch": (lambda p: torch.save(nn.Linear(4, 2).state_dict(), p), "does not fit this teacher architecture"),
    "other_classes": (lambda p: torch.save(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 5))
                                           .state_dict(), p), "for 5 classes, this dataset has 2"),
    "missing": (lambda p: None, "no such file"),
    "empty_dir": (lambda p: os.makedirs(p), "a directory without student.pt or checkpoints/last.pt"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_files_give_one_line_naming_the_file(tmp_path, case):
    make, says = REFUSED[case]
    path = str(tmp_path / "teacher.pth")
    make(path)
    with pytest.raises(ConfigError) as e:
        read_state_dict(path, _small())
    msg = str(e.value)
    assert "\n" not in msg and path in msg and says in msg, msg
