"""What a run reports and how it can be cut short: the best epoch by a chosen metric
(checkpoints/best.pt), early stopping, a validation split carved from train with the held-out split
reported once as test/*, the HParams (every key that differs from the defaults, tags), the
teacher's training curves in every student run, and the debug group (fast, overfit, limit, profile)."""
import json
import os

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from kdexp.data import load_dataset
from kdexp.engine.evaluate import limit_validation
from kdexp.engine.plan import fuse_reason
from kdexp.engine.record import hparams_of
from kdexp.engine.source import InMemorySource, LimitedSource, limited
from kdexp.engine.stopping import Best, EarlyStop, Threshold, resolve_mode, student_stops
from kdexp.errors import ConfigError
from kdexp.methods import METHODS
from kdexp.train import run
from tests.conftest import composer

QUICK = ["epochs=3", "teacher.epochs=2", "progress=false"]


def read(path):
    with open(path) as f:
        return json.load(f)


def scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    return {e.step: e.value for e in ea.Scalars(tag)} if tag in ea.Tags()["scalars"] else {}


@pytest.fixture
def train(tmp_path):
    """train(name, *overrides) -> the run directory of a finished in-process run under tmp_path."""
    compose = composer(tmp_path)

    def _train(name, *overrides, quick=True):
        run(compose(*(QUICK if quick else ["progress=false"]), *overrides), str(tmp_path / name))
        return tmp_path / name

    yield _train
    GlobalHydra.instance().clear()


# -- watching a metric -----------------------------------------------------------------------------
def test_best_tracks_the_chosen_metric_and_its_direction():
    assert resolve_mode("val/loss", "auto") == "min" and resolve_mode("train/loss_kd", "auto") == "min"
    assert resolve_mode("val/acc", "auto") == "max" and resolve_mode("val/loss", "max") == "max"
    best = Best("val/loss")
    improved = [best.update(e, {"val/loss": v}) for e, v in enumerate([0.9, 0.5, 0.7, 0.4, 0.45], 1)]
    assert improved == [True, True, False, True, False] and (best.epoch, best.value, best.since) == (4, 0.4, 1)
    replayed = Best("val/loss").replay([{"epoch": e, "val/loss": v} for e, v in enumerate([0.9, 0.5, 0.7], 1)])
    assert (replayed.epoch, replayed.since) == (2, 1)  # a resumed run continues the count


def test_early_stop_waits_patience_epochs_beyond_min_delta():
    rule = EarlyStop(Best("val/acc", min_delta=0.01), patience=2)
    reasons = [rule(e, {"val/acc": v}) for e, v in enumerate([0.5, 0.6, 0.605, 0.609, 0.9], 1)]
    assert reasons[:3] == [None, None, None] and "did not improve for 2 epochs" in reasons[3]
    assert Threshold("train/loss", 0.01, "min", "debug.overfit_loss")(1, {"train/loss": 0.009})
    assert not Threshold("val/acc", 0.9, "max", "teacher.stop_at_acc")(1, {"val/acc": 0.89})


def test_a_monitored_metric_the_run_does_not_have_names_the_key_and_the_metrics(train):
    with pytest.raises(ConfigError, match=r"monitor.metric=val/acc_typo: .*they have: .*train/loss_kd.*val/acc"):
        train("typo", "monitor.metric=val/acc_typo")


@pytest.mark.parametrize("override,message", [
    ("monitor.mode=up", "monitor.mode='up' is out of range: one of auto, max, min"),
    ("early_stop.patience=0", "early_stop.patience=0 is out of range"),
    ("monitor.metric=test/acc", "test/\\* is measured once"),
    ("dataset.val_from_train=1.5", "dataset.val_from_train=1.5 is out of range"),
    ("debug.val_batches=0", "debug.val_batches=0 is out of range"),
])
def test_bad_reporting_keys_fail_before_any_training(train, override, message):
    with pytest.raises(ConfigError, match=message):
        train("bad", override)


def test_best_pt_follows_monitor_metric(train):
    r = train("loss", "monitor.metric=val/loss", "method=ce")
    m = read(r / "metrics.json")
    losses = [h["val/loss"] for h in m["history"]]
    epoch = losses.index(min(losses)) + 1
    assert m["best"]["metric"] == "val/loss" and m["best"]["mode"] == "min" and m["best"]["epoch"] == epoch
    assert m["best"]["value"] == min(losses) and m["best"]["val/acc"] == m["history"][epoch - 1]["val/acc"]
    assert torch.load(r / "checkpoints" / "best.pt", weights_only=True)["epoch"] == epoch


def test_early_stopping_ends_the_run_with_its_checkpoint(train):
    # train/loss falls every epoch, so with mode=max it never improves after epoch 1: stop after epoch 2
    r = train("stop", "epochs=6", "early_stop.patience=1", "early_stop.metric=train/loss", "early_stop.mode=max")
    m = read(r / "metrics.json")
    assert m["status"] == "done" and len(m["history"]) == 2
    assert m["stopped"]["epoch"] == 2 and "did not improve for 1 epochs" in m["stopped"]["reason"]
    assert torch.load(r / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2
    assert m["final"]["val/acc"] == m["history"][-1]["val/acc"]


def test_early_stop_follows_the_monitor_unless_its_own_keys_say_otherwise(tmp_path):
    compose = composer(tmp_path)
    (rule,) = student_stops(compose("early_stop.patience=2", "monitor.metric=val/loss", "monitor.mode=max"))
    assert (rule.best.metric, rule.best.mode, rule.best.key) == ("val/loss", "max", "monitor.metric")
    (rule,) = student_stops(compose("early_stop.patience=2", "early_stop.mode=min"))
    assert (rule.best.metric, rule.best.mode) == ("val/acc", "min")  # an explicit mode is not dropped
    (rule,) = student_stops(compose("early_stop.patience=2", "early_stop.metric=train/loss"))
    assert (rule.best.metric, rule.best.mode, rule.best.key) == ("train/loss", "min", "early_stop.metric")
    GlobalHydra.instance().clear()


def test_fused_groups_leave_early_stopping_and_debug_runs_alone(tmp_path):
    compose = composer(tmp_path)
    kd = METHODS.meta("kd")["requires"]
    assert fuse_reason(compose(), kd) is None
    assert "early_stop" in fuse_reason(compose("early_stop.patience=3"), kd)
    assert "debug" in fuse_reason(compose("debug=fast"), kd)
    assert "debug" in fuse_reason(compose("debug.val_batches=2"), kd)
    assert "val_from_train" in fuse_reason(compose("dataset.val_from_train=0.1"), kd)
    GlobalHydra.instance().clear()


# -- splits ----------------------------------------------------------------------------------------
def test_val_from_train_carves_validation_and_keeps_the_held_out_split_as_test(tmp_path):
    compose = composer(tmp_path)
    plain = load_dataset(compose("dataset.normalize=false").dataset)
    carved = load_dataset(compose("dataset.normalize=false", "dataset.val_from_train=0.1").dataset)
    GlobalHydra.instance().clear()
    assert plain.x_test is None and plain.splits == {"val": "dataset.val_fraction=0.2 of the data, stratified "
                                                               "(split_seed 0)"}
    assert torch.equal(carved.x_test, plain.x_val) and torch.equal(carved.y_test, plain.y_val)
    assert len(carved.x_val) == round(0.1 * len(plain.x_train)) and len(carved.x_train) + len(carved.x_val) == len(
        plain.x_train)
    assert sorted(carved.y_val.unique().tolist()) == list(range(10))  # stratified
    assert carved.splits["val"].startswith("dataset.val_from_train=0.1 of the training data")
    assert carved.splits["test"].startswith("dataset.val_fraction=0.2 of the data")


def test_a_run_with_a_test_split_reports_test_metrics_once_and_says_which_split(train):
    r = train("carved", "dataset.val_from_train=0.2", "method=ce")
    m = read(r / "metrics.json")
    assert 0.5 < m["final"]["test/acc"] <= 1 and m["final"]["test/loss"] > 0
    assert not any(k.startswith("test/") for h in m["history"] for k in h)  # never per epoch
    assert set(m["splits"]) == {"val", "test"} and "measured once after the last epoch" in m["splits"]["test"]
    assert scalars(r, "test/acc") == {3: pytest.approx(m["final"]["test/acc"])}


def test_limited_validation_and_sources():
    gen = torch.Generator().manual_seed(0)
    from kdexp.data import Data

    data = Data(torch.randn(50, 4, generator=gen), torch.arange(50) % 3, torch.randn(30, 4), torch.arange(30) % 3,
                3, "toy")
    assert len(limit_validation(data, 2, 8).x_val) == 16 and limit_validation(data, None, 8) is data
    source = LimitedSource(InMemorySource(data, batch_size=8, seed=1), 3)
    total, steps = source.epoch(0)
    assert source.steps == 3 and total == 24 and len(list(steps)) == 3
    repeat = LimitedSource(InMemorySource(data, batch_size=8, seed=1), 2, repeat=True)
    first = [s.batch.idx.tolist() for s in repeat.epoch(0)[1]]
    assert first == [s.batch.idx.tolist() for s in repeat.epoch(1)[1]]  # the same batches every epoch
    base = InMemorySource(data, batch_size=8, seed=1)
    assert limited(base, None) is base


# -- what is recorded --------------------------------------------------------------------------------
def test_hparams_hold_every_key_that_differs_from_the_defaults_and_tags(tmp_path):
    compose = composer(tmp_path)
    default = hparams_of(compose())
    changed = hparams_of(compose("dataset.label_fraction=0.5", "student.args.hidden=32", "optim.weight_decay=0.001",
                                 "tags=[baseline,v2]", "method=dkd"))
    GlobalHydra.instance().clear()
    assert {"dataset.label_fraction", "student.args.hidden", "optim.weight_decay"}.isdisjoint(default)
    assert default["tags"] == "" and default["method.temperature"] == 4.0 and default["seed"] == 0
    assert changed["dataset.label_fraction"] == 0.5 and changed["student.args.hidden"] == 32
    assert changed["optim.weight_decay"] == 0.001 and changed["tags"] == "baseline,v2"
    assert changed["method.beta"] == 8.0 and changed["method.name"] == "dkd"  # every key of the method
    assert not any(k.startswith(("paths.", "hydra.")) for k in changed)


def test_the_teachers_curves_show_in_every_student_run_trained_or_cached(train, tmp_path):
    first = train("first", "tags=[a,b]")
    second = train("second", "seed=1")
    m1, m2 = read(first / "metrics.json"), read(second / "metrics.json")
    assert m1["teacher"]["source"] == "trained" and m2["teacher"]["source"] == "cache"
    assert m1["tags"] == ["a", "b"] and m1["hparams"]["tags"] == "a,b"
    assert len(m1["teacher"]["history"]) == 2 and m1["teacher"]["history"] == m2["teacher"]["history"]
    for r in (first, second):
        assert sorted(scalars(r, "teacher/train/loss")) == [1, 2]
        assert {1, 2} <= set(scalars(r, "teacher/val/acc"))  # (and the final value beside the HParams)
    assert scalars(second, "teacher/val/acc")[2] == pytest.approx(m1["teacher"]["history"][1]["val/acc"])


# -- debug -------------------------------------------------------------------------------------------
def test_debug_fast_trains_a_few_batches_and_caches_nothing(train, tmp_path):
    r = train("fast", "debug=fast", quick=False)
    m = read(r / "metrics.json")
    assert m["status"] == "done" and len(m["history"]) == 1 and len(m["teacher"]["history"]) == 1
    assert not (r / "checkpoints").exists() and not (r / "student.pt").exists()
    teachers = tmp_path / "cache" / "teachers"
    assert m["teacher"]["source"] == "trained"
    assert not teachers.exists() or not [f for f in os.listdir(teachers) if f.endswith(".pt")]


def test_debug_overfit_drives_the_loss_of_a_few_batches_near_zero(train):
    r = train("overfit", "debug=overfit", "method=ce", "student=cnn", quick=False)
    m = read(r / "metrics.json")
    assert m["stopped"]["reason"].startswith("train/loss") and m["history"][-1]["train/loss"] <= 0.01
    assert len(m["history"]) < 300


def test_debug_profile_writes_a_trace_of_the_student_steps(train):
    r = train("profile", "debug=profile", "debug.profile_steps=2", "teacher.epochs=2", quick=False)
    trace = json.loads((r / "profile" / "trace.json").read_text())
    assert trace["traceEvents"] and "ProfilerStep" in (r / "profile" / "trace.json").read_text()
    assert "Self CPU" in (r / "profile" / "ops.txt").read_text()
