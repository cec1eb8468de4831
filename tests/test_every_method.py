"""Tests every registered method gets without being listed anywhere: the teacher gets no gradient
and keeps its BatchNorm statistics; a short run on a student that fits trains end to end; a run
killed after an epoch resumes to the metrics of an uninterrupted one.

What a method needs comes from its declared requirements (kdexp.methods.base.Requirements) and from
the run plan: the first student option the plan accepts is the one that fits."""
import json
import os

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from kdexp import config_dir
from kdexp.engine.assemble import assemble, pretrain
from kdexp.engine.fit import fit
from kdexp.engine.hardware import Accelerator
from kdexp.engine.plan import plan
from kdexp.engine.record import Recorder
from kdexp.engine.source import InMemorySource
from kdexp.engine.steppers import MethodStepper
from kdexp.engine.teacher_cache import view_registrar
from kdexp.errors import ConfigError
from kdexp.methods import list_methods, requirements
from kdexp.train import run
from tests.conftest import composer, group_options

# Tiny random images (3 batches of 32) and a teacher with BatchNorm (resnet20), trained one epoch.
BASE = ["dataset=fake", "dataset.shape=[1,8,8]", "dataset.num_classes=10", "dataset.train_size=96",
        "dataset.val_size=32", "batch_size=32", "teacher=resnet20", "teacher.epochs=1", "teacher.batch_size=32",
        "epochs=2", "progress=false", "hardware=cpu"]
STUDENTS = [[], ["student=cnn"], ["student=resnet20"]]  # tried in order: the first the plan accepts fits


@pytest.fixture(scope="module")
def compose_cfg(tmp_path_factory):
    """One teacher cache for the module: the resnet20 teacher trains once."""
    yield composer(tmp_path_factory.mktemp("every_method"))
    GlobalHydra.instance().clear()


def fitting_config(compose_cfg, name):
    """The method's config on BASE with what its requirements ask for and the first student that fits."""
    req = requirements(name)
    extra = [f"method={name}", *BASE]
    if req.views == "paired":
        extra.append("domain=vflip")
    if req.labels == "partial":
        extra.append("dataset.label_fraction=0.5")
    errors = []
    for student in STUDENTS:
        cfg = compose_cfg(*extra, *student)
        try:
            plan(cfg)
            return cfg
        except ConfigError as e:
            errors.append(f"{student or 'student=mlp'}: {e}")
    pytest.fail(f"method={name}: no student option fits: {errors}")


def read(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("name", [n for n in list_methods() if requirements(n).uses_teacher])
def test_the_teacher_gets_no_gradient_and_keeps_its_statistics(compose_cfg, name):
    cfg = fitting_config(compose_cfg, name)
    p = plan(cfg)
    asm = assemble([p], Accelerator())
    teacher, method = asm.frozen.model, asm.methods[0]
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._NormBase) for m in teacher.modules())
    assert has_bn or p.requires.teacher == "self"  # resnet20 has BatchNorm; tfkd_self's teacher is the mlp
    before = {k: v.clone() for k, v in teacher.state_dict().items()}  # weights and running statistics
    assert not {id(q) for q in teacher.parameters()} & {id(q) for q in method.parameters()}
    pretrain(method, p, asm, "cpu")
    source = InMemorySource(asm.data, batch_size=cfg.batch_size, seed=0, pool=p.batch_pool,
                            register_view=view_registrar(asm.teacher))
    fit(MethodStepper(method, asm.data), source, optim_cfg=cfg.optim, epochs=1)
    assert not teacher.training
    assert all(q.grad is None and not q.requires_grad for q in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items()), name


class Crash(Exception):
    pass


def one_per_requirements(names):
    """The methods as parameters, all but the first of each distinct declared Requirements marked
    slow: the default run trains one method of every kind end to end, `pytest -m slow` all of them."""
    seen, params = set(), []
    for name in names:
        req = requirements(name)
        kind = (req.teacher, req.labels, req.views, req.features, req.inputs, req.cacheable, req.fusable)
        params.append(name if kind not in seen else pytest.param(name, marks=pytest.mark.slow))
        seen.add(kind)
    return params


@pytest.mark.parametrize("name", one_per_requirements(list_methods()))
def test_trains_end_to_end_and_resumes_after_a_crash(compose_cfg, tmp_path, monkeypatch, name):
    cfg = fitting_config(compose_cfg, name)
    record_epoch = Recorder.epoch

    def crash_after_the_first_epoch(self, epoch, metrics, state=None, **kw):
        record_epoch(self, epoch, metrics, state, **kw)  # metrics.json and the checkpoint, then the crash
        if epoch == 0:
            raise Crash()

    with monkeypatch.context() as m:
        m.setattr(Recorder, "epoch", crash_after_the_first_epoch)
        with pytest.raises(Crash):
            run(cfg, str(tmp_path / "crashed"))
    crashed = read(tmp_path / "crashed" / "metrics.json")
    assert crashed["status"] == "failed" and len(crashed["history"]) == 1
    first = crashed["history"][0]
    losses = {k: v for k, v in first.items() if k.startswith("train/loss")}
    assert len(losses) >= 2 and all(abs(v) < float("inf") for v in losses.values()), losses  # total + terms
    resumed = run(cfg, str(tmp_path / "crashed"))  # continues from checkpoints/last.pt
    whole = run(cfg, str(tmp_path / "whole"))
    a, b = read(tmp_path / "crashed" / "metrics.json"), read(tmp_path / "whole" / "metrics.json")
    assert a["status"] == b["status"] == "done" and resumed == whole
    assert a["history"][0] == first  # kept from before the crash (its timings too): continued, not rerun
    for ha, hb in zip(a["history"], b["history"], strict=True):
        for k, v in hb.items():
            if not k.startswith("time/"):
                assert ha[k] == pytest.approx(v, rel=1e-6, abs=1e-7), (name, ha["epoch"], k)


@pytest.mark.parametrize("name", list_methods())
def test_has_a_config_file_and_readme_rows(name):
    """Its conf/method option (named as registered, opening with a comment: the paper and its
    formula), its row in a README methods table and its name in the groups table's method row."""
    readme = open(os.path.join(os.path.dirname(config_dir()), "README.md")).read()
    groups = next(line for line in readme.splitlines() if line.startswith("| `method` |"))
    assert name in group_options("method")
    assert f"| `{name}` |" in readme and f"`{name}`" in groups, name
    with open(os.path.join(config_dir(), "method", f"{name}.yaml")) as f:
        assert f.readline().startswith("# "), name
