"""Every user mistake gets one line naming the problem, no traceback, and no run marked done.

Each case is a run of the composed config through `kdexp.train.run` (what the command line does
after Hydra's composition; `main` prints the KdexpError's line and exits 1). The mistakes the run
plan can see fail before any data is loaded or teacher trained, so the whole table runs in seconds."""
import json

import numpy as np
import pytest
import torch
from filelock import FileLock

from kdexp.engine.record import describe
from kdexp.errors import KdexpError
from kdexp.train import run

FAST = ["epochs=1", "teacher.epochs=1", "teacher.args.channels=[4,4,4]", "progress=false", "hardware=cpu"]

CASES = {  # name: (overrides, a fragment the one-line message must contain)
    # ranges
    "negative temperature": (["method.temperature=-1"], "method.temperature"),
    "zero temperature": (["method.temperature=0"], "method.temperature"),
    "alpha above 1": (["method.alpha=1.5"], "method.alpha"),
    "negative alpha": (["method.alpha=-0.1"], "method.alpha"),
    "negative beta": (["method.beta=-1"], "method.beta"),
    "negative w_ce": (["method.w_ce=-1"], "method.w_ce"),
    "no epochs": (["epochs=0"], "epochs"),
    "no batch": (["batch_size=0"], "batch_size"),
    "no teacher epochs": (["teacher.epochs=0"], "teacher.epochs"),
    "no teacher batch": (["teacher.batch_size=0"], "teacher.batch_size"),
    "stop_at_acc above 1": (["teacher.stop_at_acc=1.5"], "teacher.stop_at_acc"),
    "zero teacher lr": (["teacher.optim.lr=0"], "teacher.optim.lr"),
    "zero lr": (["optim.lr=0"], "optim.lr"),
    "negative lr": (["optim.lr=-1"], "optim.lr"),
    "unknown optimizer": (["optim.name=rmsprop"], "optim.name"),
    "unknown schedule": (["optim.schedule=linear"], "optim.schedule"),
    "unknown teacher optimizer": (["teacher.optim.name=lbfgs"], "teacher.optim.name"),
    "no labels kept": (["dataset.label_fraction=0"], "dataset.label_fraction"),
    "label fraction above 1": (["dataset.label_fraction=1.5"], "dataset.label_fraction"),
    "no validation": (["dataset.val_fraction=0"], "dataset.val_fraction"),
    "no training": (["dataset.val_fraction=1"], "dataset.val_fraction"),
    "unknown device": (["hardware.device=tpu"], "hardware.device"),
    "negative threads": (["hardware.threads=-1"], "hardware.threads"),
    "unknown amp": (["hardware.amp=fp8"], "hardware.amp"),
    "unknown backend": (["hardware.backend=mpi"], "hardware.backend"),
    "sync every 0": (["hardware.sync_every=0"], "hardware.sync_every"),
    "negative cache budget": (["teacher.cache_max_gb=-1"], "teacher.cache_max_gb"),
    "negative first-stage epochs": (["method=fitnet", "method.init_epochs=-1"], "method.init_epochs"),
    "first-stage batch 0": (["method=fitnet", "method.init_batch_size=0"], "method.init_batch_size"),
    "first-stage lr 0": (["method=fitnet", "method.init_optim.lr=0"], "method.init_optim.lr"),
    "one class": (["dataset.classes=[3]"], "2 classes"),
    "a class twice": (["dataset.classes=[3,3]"], "dataset.classes"),
    "a class out of range": (["dataset.classes=[0,42]"], "dataset.classes"),
    # models
    "unknown student": (["student.arch=nosuch"], "student.arch='nosuch'"),
    "unknown teacher": (["teacher.arch=nosuch"], "teacher.arch='nosuch'"),
    "unknown student argument": (["+student.args.hiden=32"], "hiden"),
    "unknown teacher argument": (["+teacher.args.chanels=[8]"], "chanels"),
    "a string for a width": (["student.args.hidden=abc"], "student.args"),
    # methods and what they need
    "attention on vectors": (["method=at"], "student options that fit"),
    "nst on vectors": (["method=nst"], "student options that fit"),
    "fsp on vectors": (["method=fsp"], "fsp"),
    "unknown student layer": (["method=fitnet", "method.student_layers=[nosuch]"], "nosuch"),
    "unknown teacher layer": (["method=fitnet", "method.teacher_layers=[nosuch]"], "nosuch"),
    "ts_adapt without a shift": (["method=ts_adapt"], "needs a domain shift"),
    "dann without a shift": (["method=dann"], "needs a domain shift"),
    "cqd without a shift": (["method=cqd"], "needs a domain shift"),
    "kd from a teacher of other classes": (["teacher.classes=[0,1]"], "teacher.classes"),
    "data_distill without a transfer set": (["method=data_distill"], "dataset.label_fraction < 1"),
    "tfkd_self with an ensemble": (["method=tfkd_self", "teachers=[cnn]"], "ensemble"),
    "unknown ensemble member": (["teachers=[cnnn]"], "cnnn"),
    "ensemble member without arch": (["teachers=[{epochs:3}]"], "no arch"),
    "finetune across architectures": (["method=finetune"], "architecture"),
    "progressive across architectures": (["method=progressive"], "architecture"),
    "ts_adapt across architectures": (["method=ts_adapt", "domain=vflip"], "architecture"),
    "method.name instead of method": (["method.name=dkd"], "method=dkd"),
    "unknown method.name": (["method.name=nosuch"], "method.name='nosuch'"),
    "ce with nothing to train": (["method=ce", "method.w_ce=0"], "nothing to train"),
    "fitnet with nothing to train": (["method=fitnet", "method.w_ce=0", "method.beta=0"], "nothing to train"),
    "jacobian with nothing to train": (["method=jacobian", "method.w_ce=0", "method.alpha=0", "method.beta=0"],
                                       "nothing to train"),
    "lsr epsilon 1.5": (["method=lsr", "method.epsilon=1.5"], "method.epsilon"),
    "negative dkd warm-up": (["method=dkd", "method.warmup_epochs=-1"], "method.warmup_epochs"),
    "a cohort of one": (["method=dml", "method.peers=1"], "peers"),
    "crd temperature 0": (["method=crd", "method.nce_t=0"], "crd"),
    "unknown adapter": (["method=ts_adapter", "domain=vflip", "method.adapter=bogus"], "method.adapter"),
    "multitask without tasks": (["method=multitask", "method.tasks=[]"], "method.tasks"),
    "unknown domain transform": (["domain.transforms=[nosuch]"], "nosuch"),
    "unknown train view": (["domain=vflip", "domain.train_view=both"], "domain.train_view"),
    "ddp without torchrun": (["hardware=ddp"], "torchrun"),
    "cuda without a GPU": (["hardware=cuda"], "hardware=cuda"),
    # files
    "missing teacher checkpoint": (["teacher.checkpoint=/nonexistent/teacher.pt"], "no such file"),
    "npz without a path": (["dataset=npz"], "dataset.path"),
    "missing npz": (["dataset=npz", "dataset.path=/nonexistent/data.npz"], "no such file"),
    "missing mnist": (["dataset=mnist", "dataset.download=false", "dataset.root={tmp}/nodata"], "nodata"),
    "unreadable teacher checkpoint": (["teacher.checkpoint={tmp}/garbage.pt"], "not a readable"),
    "npz labels 1..10": (["dataset=npz", "dataset.path={tmp}/one_based.npz"], "dataset.classes=[1"),
    "npz with NaN inputs": (["dataset=npz", "dataset.path={tmp}/nan.npz"], "NaN"),
    "corrupt npz": (["dataset=npz", "dataset.path={tmp}/corrupt.npz"], "corrupt"),
    # keys nobody reads
    "a misspelled key added with +": (["+method.temprature=2"], "method.temperature"),
    "a model class path": (["+student._target_=mymodels.TinyNet"], "arch"),
    "an unknown dataset key": (["+dataset.foo=1"], "dataset.foo"),
    "an unknown top-level key": (["+seed2=3"], "seed2"),
}


def files(tmp):
    """The bad files the cases above point at."""
    rng = np.random.default_rng(0)
    x = rng.random((60, 1, 6, 6)).astype(np.float32)
    np.savez(tmp / "one_based.npz", x=x, y=np.arange(60) % 10 + 1)
    bad = x.copy()
    bad[0, 0, 0, :3] = np.nan
    np.savez(tmp / "nan.npz", x=bad, y=np.arange(60) % 3)
    (tmp / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip file")
    (tmp / "garbage.pt").write_bytes(b"not a checkpoint")


@pytest.mark.parametrize("name", list(CASES))
def test_a_mistake_is_one_line_and_no_run_is_done(compose_cfg, tmp_path, name):
    overrides, fragment = CASES[name]
    files(tmp_path)
    cfg = compose_cfg(*FAST, *[o.replace("{tmp}", str(tmp_path)) for o in overrides])
    with pytest.raises(KdexpError) as e:
        run(cfg, str(tmp_path / "run"))
    message = describe(e.value)
    assert "\n" not in message and fragment in message, message
    metrics = tmp_path / "run" / "metrics.json"
    assert not metrics.exists() or json.loads(metrics.read_text())["status"] != "done"
    assert not (tmp_path / "cache" / "teachers").exists(), "a teacher was trained before the mistake was seen"


def test_the_table_is_long_enough():
    assert len(CASES) >= 60


def test_a_run_directory_in_use_and_a_resume_with_another_config(compose_cfg, tmp_path):
    cfg = compose_cfg(*FAST)
    (tmp_path / "busy").mkdir()
    with FileLock(str(tmp_path / "busy" / ".kdexp.lock")):
        with pytest.raises(KdexpError, match="in use by another kdexp process"):
            run(cfg, str(tmp_path / "busy"))
    run(compose_cfg(*FAST, "epochs=2"), str(tmp_path / "half"))
    state = torch.load(tmp_path / "half" / "checkpoints" / "last.pt", weights_only=False)
    assert state["epoch"] == 2
    with pytest.raises(KdexpError, match="different config"):
        run(compose_cfg(*FAST, "epochs=3", "method.temperature=2"), str(tmp_path / "half"))
