"""End-to-end runs on digits through kdexp.train.run (no subprocess)."""
import json

import pytest
import torch

from kdexp.errors import ConfigError
from kdexp.train import run
from tests.conftest import FAST


def read(path):
    with open(path) as f:
        return json.load(f)


def test_one_epoch_kd_run_writes_the_run_directory(compose_cfg, tmp_path):
    cfg = compose_cfg(*FAST, "method=kd")
    acc = run(cfg, str(tmp_path / "run"))
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0
    m = read(tmp_path / "run" / "metrics.json")
    assert m["status"] == "done" and m["val/acc"] == acc == m["final"]["val/acc"]
    assert m["teacher"]["source"] == "trained" and 0 < m["teacher"]["val/acc"] <= 1
    assert {"train/loss", "train/loss_ce", "train/loss_kd", "val/acc", "val/loss", "time/epoch_s",
            "time/samples_per_s"} <= set(m["history"][0])
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents*"))


def test_same_command_twice_gives_same_metrics_with_cached_teacher(compose_cfg, tmp_path):
    cfg = compose_cfg("epochs=2", "teacher.epochs=2", "progress=false")
    first = run(cfg, str(tmp_path / "a"))
    second = run(cfg, str(tmp_path / "b"))
    a, b = read(tmp_path / "a" / "metrics.json"), read(tmp_path / "b" / "metrics.json")
    assert (a["teacher"]["source"], b["teacher"]["source"]) == ("trained", "cache")
    assert a["teacher"]["key"] == b["teacher"]["key"]
    assert first == second
    assert [h["train/loss"] for h in a["history"]] == [h["train/loss"] for h in b["history"]]


def test_teacher_is_frozen_in_eval_mode_and_outside_the_optimizer(compose_cfg):
    from kdexp.data import load_dataset
    from kdexp.engine.plan import plan
    from kdexp.engine.teacher import provide_teacher
    from kdexp.methods import Batch, get_method
    from kdexp.models import get_model

    cfg = compose_cfg(*FAST, "teacher.args.dropout=0.5")
    data = load_dataset(cfg.dataset)
    teacher, info = provide_teacher(plan(cfg), data)
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    before = [p.clone() for p in teacher.model.parameters()]
    method = get_method("kd")(cfg.method, get_model("mlp", data.in_shape, 10), teacher)
    assert not {id(p) for p in teacher.model.parameters()} & {id(p) for p in method.parameters()}
    batch = Batch(data.x_train[:32], data.y_train[:32], torch.arange(32))
    sum(method.losses(batch).values()).backward()
    assert torch.equal(teacher.logits(batch), teacher.logits(batch))  # eval mode: dropout off
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.model.parameters()))


def test_teacher_checkpoint_is_loaded(compose_cfg, tmp_path):
    from kdexp.models import get_model

    model = get_model("cnn", (1, 8, 8), 10)
    torch.save(model.state_dict(), tmp_path / "t.pt")
    cfg = compose_cfg(*FAST, f"teacher.checkpoint={tmp_path / 't.pt'}")
    run(cfg, str(tmp_path / "run"))
    m = read(tmp_path / "run" / "metrics.json")
    assert m["teacher"]["source"] == "checkpoint"
    torch.save(get_model("lenet5", (1, 8, 8), 10).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="does not fit"):
        run(compose_cfg(*FAST, f"teacher.checkpoint={tmp_path / 'other.pt'}"), str(tmp_path / "run2"))
    assert read(tmp_path / "run2" / "metrics.json")["status"] == "failed"


def test_ce_needs_no_teacher(compose_cfg, tmp_path):
    run(compose_cfg(*FAST, "method=ce"), str(tmp_path / "run"))
    assert read(tmp_path / "run" / "metrics.json")["teacher"]["source"] == "none"
    assert not (tmp_path / "cache" / "teachers").exists()  # (cache/splits/ holds the dataset split)


def test_bad_value_fails_with_status_failed(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match="method.temperature"):
        run(compose_cfg(*FAST, "method.temperature=-1"), str(tmp_path / "run"))


def test_resume_continues_from_last_checkpoint(compose_cfg, tmp_path):
    full = run(compose_cfg("epochs=3", "teacher.epochs=2", "progress=false"), str(tmp_path / "full"))
    run(compose_cfg("epochs=2", "teacher.epochs=2", "progress=false"), str(tmp_path / "part"))
    # a 2-epoch run resumed to 3 epochs: same schedule (constant lr) -> same result
    resumed = run(compose_cfg("epochs=3", "teacher.epochs=2", "progress=false", "resume=true"), str(tmp_path / "part"))
    assert resumed == pytest.approx(full, abs=0)
    assert len(read(tmp_path / "part" / "metrics.json")["history"]) == 3
