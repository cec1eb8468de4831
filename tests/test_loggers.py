"""Loggers (kdexp.engine.loggers): the logger group's options and schemas, csv rows, several loggers at
once, one-line errors for an unknown logger or a missing package, a failing backend, and the mlflow and
wandb backends read back through their own formats (skipped without the [mlflow] / [wandb] extras)."""
import csv
import glob
import json
import os
import struct
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from kdexp.config import LOGGER_SCHEMAS, LOGGER_SHORTHANDS, _schema_fields, chosen_loggers
from kdexp.engine import fused
from kdexp.engine.loggers import LOGGERS, CsvLogger, TensorBoardLogger, check_loggers
from kdexp.engine.plan import plan
from kdexp.engine.record import Recorder
from kdexp.errors import ConfigError, KdexpError
from kdexp.train import run
from tests.conftest import HPARAMS_TAGS, group_options, tensorboard_run

RUN = ["epochs=2", "teacher.epochs=2", "progress=false"]


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_group_options_schemas_and_registry_agree():
    assert group_options("logger") == sorted(LOGGER_SCHEMAS) == LOGGERS.names()
    keys = {k for schema in LOGGER_SCHEMAS.values() for k in _schema_fields(schema)}
    assert set(LOGGER_SHORTHANDS) == keys  # a shorthand for every logger key, and only those


def test_shorthands_and_nested_keys(compose_cfg):
    assert chosen_loggers(compose_cfg()) == {"tensorboard": {}}
    assert chosen_loggers(OmegaConf.create({"epochs": 1})) == {"tensorboard": {}}  # a config built by hand
    assert chosen_loggers(compose_cfg("logger=[]")) == {}
    flat = chosen_loggers(compose_cfg("logger=mlflow", "logger.tracking_uri=file:///tmp/x"))
    nested = chosen_loggers(compose_cfg("logger=mlflow", "logger.mlflow.tracking_uri=file:///tmp/x"))
    assert flat == nested == {"mlflow": {"tracking_uri": "file:///tmp/x", "experiment": "kdexp"}}
    both = chosen_loggers(compose_cfg("logger=[tensorboard,csv,wandb]", "logger.project=p"))
    assert both == {"tensorboard": {}, "csv": {}, "wandb": {"mode": "offline", "project": "p", "entity": None}}
    with pytest.raises(ConfigError, match=r"logger.tracking_uri='x': no chosen logger .*chosen: csv.*logger=mlflow"):
        plan(compose_cfg("logger=csv", "logger.tracking_uri=x"))
    with pytest.raises(ConfigError, match="logger.wandb.mode='offlin' is out of range: one of offline, online"):
        plan(compose_cfg("logger=wandb", "logger.mode=offlin"))


def test_unknown_logger_is_one_line_with_the_valid_names(tmp_path):
    with pytest.raises(ConfigError) as e:
        check_loggers(OmegaConf.create({"logger": {"tensorbord": {}}}))
    assert "\n" not in str(e.value)
    assert "logger='tensorbord': unknown logger. Did you mean 'tensorboard'?" in str(e.value)
    assert "Registered loggers: csv, mlflow, tensorboard, wandb" in str(e.value)
    out = subprocess.run([sys.executable, "-m", "kdexp.train", "logger=tensorbord", f"hydra.run.dir={tmp_path / 'r'}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 1 and "Could not find 'logger/tensorbord'" in text and "Traceback" not in text
    assert all(f"\t{name}\n" in text for name in LOGGERS.names())  # Hydra lists the group's options


@pytest.mark.parametrize("name", ["mlflow", "wandb"])
def test_missing_package_fails_at_plan_time_in_one_line(compose_cfg, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    with pytest.raises(ConfigError) as e:
        plan(compose_cfg(f"logger={name}"))
    assert str(e.value) == f"logger={name} needs the {name} package: pip install -e '.[{name}]'"


def test_csv_row_per_epoch_new_columns_and_resume(tmp_path):
    def start(resumed):
        logger = CsvLogger("csv", str(tmp_path), {})
        logger.start({}, {}, [], resumed)
        return logger

    logger = start(0)
    logger.metrics({"teacher/val/acc": 0.9, "teacher/train/loss": 0.1}, 1)  # the teacher's curves: not a row
    logger.metrics({"train/loss": 2.0, "val/acc": 0.5}, 1)
    logger.metrics({"train/loss": 1.0, "val/acc": 0.7, "train/loss_kd": 0.3}, 2)  # a column appears late
    columns, rows = read_csv(tmp_path / "metrics.csv")
    assert columns == ["epoch", "train/loss", "val/acc", "train/loss_kd"]
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[0]["train/loss_kd"] == ""
    assert float(rows[1]["val/acc"]) == 0.7
    logger.metrics({"test/acc": 0.8}, 2)  # the test split after the last epoch: that epoch's row
    columns, rows = read_csv(tmp_path / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"] and float(rows[1]["test/acc"]) == 0.8
    logger = start(1)  # resumed after epoch 1: epoch 2 is trained again
    logger.metrics({"train/loss": 1.5, "val/acc": 0.6}, 2)
    columns, rows = read_csv(tmp_path / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"] and float(rows[1]["val/acc"]) == 0.6
    start(0)  # a fresh run starts it over
    assert read_csv(tmp_path / "metrics.csv") == (["epoch"], [])


def test_tensorboard_and_csv_at_once(compose_cfg, tmp_path):
    run_dir = tmp_path / "run"
    run(compose_cfg("logger=[tensorboard,csv]", *RUN), str(run_dir))
    scalars, hparams = tensorboard_run(run_dir)
    assert {"val/acc", "train/loss", "teacher/val/acc", "best/val/acc"} <= scalars and HPARAMS_TAGS <= hparams
    columns, rows = read_csv(run_dir / "metrics.csv")
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert [r["epoch"] for r in rows] == ["1", "2"]  # one row per epoch (the teacher's curves are not rows)
    assert [float(r["val/acc"]) for r in rows] == [h["val/acc"] for h in history]
    assert not any(c.startswith("teacher/") for c in columns)


def test_each_run_of_a_fused_group_has_its_own_loggers(compose_cfg, tmp_path):
    variants = [["method=ce", "seed=0"], ["method=ce", "seed=1"]]
    jobs = [fused.Job(compose_cfg("logger=csv", *RUN, *v), str(tmp_path / f"f{i}"), v, i) for i, v in enumerate(variants)]
    assert [o.status for o in fused.triage(jobs)] == ["fuse", "fuse"]
    fused.train_group(jobs)
    accs = [[r["val/acc"] for r in read_csv(tmp_path / f"f{i}" / "metrics.csv")[1]] for i in range(2)]
    assert all(len(a) == 2 for a in accs) and accs[0] != accs[1]


def _recorder(tmp_path, *names):
    return Recorder(str(tmp_path), OmegaConf.create({"logger": {n: {} for n in names}, "epochs": 2}))


def test_a_logger_failing_mid_run_is_warned_about_once_and_dropped(tmp_path, monkeypatch):
    def broken(self, metrics, step):
        raise OSError("disk full")

    monkeypatch.setattr(CsvLogger, "metrics", broken)
    r = _recorder(tmp_path, "tensorboard", "csv")
    r.start({"seed": 0}, fresh=True)
    for step in (1, 2):
        r.scalars({"val/acc": 0.5, "train/loss": 1.0}, step)
    assert [lg.name for lg in r.loggers] == ["tensorboard"]
    assert r.record["warnings"] == ["logger=csv failed in metrics: OSError: disk full; it is dropped, the run goes on"]
    r.finish("failed", error="RuntimeError: x")
    assert {"val/acc", "train/loss"} <= tensorboard_run(tmp_path)[0]


def test_a_logger_that_cannot_start_fails_the_run_in_one_line(tmp_path, monkeypatch):
    def broken(self, *args):
        raise RuntimeError("no server at http://x\nlong detail")

    monkeypatch.setattr(CsvLogger, "start", broken)
    r = _recorder(tmp_path, "tensorboard", "csv")
    with pytest.raises(KdexpError, match=r"^logger=csv could not start: RuntimeError: no server at http://x$"):
        r.start({"seed": 0}, fresh=True)
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "failed" and "logger=csv could not start" in record["error"]
    assert r.loggers == [] and os.path.isdir(tmp_path / "tb")  # tensorboard, started first, was closed


def test_tensorboard_folder_kept_on_resume_and_dropped_when_fresh(tmp_path):
    stale = tmp_path / "tb" / "old"
    stale.mkdir(parents=True)
    logger = TensorBoardLogger("tensorboard", str(tmp_path), {})
    logger.start({}, {}, [], resumed=3)
    logger.close()
    assert stale.is_dir()
    logger.start({}, {}, [], resumed=0)
    logger.close()
    assert not stale.exists()


# ------------------------------------------------------------------------------ mlflow, wandb
@pytest.mark.slow  # subprocesses end to end (~10 s): with the slow tests
def test_mlflow_cli_one_run_with_params_metrics_artifacts(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"file://{tmp_path / 'mlruns'}"
    cmd = [sys.executable, "-m", "kdexp.train", "logger=mlflow", f"logger.tracking_uri={uri}", *RUN,
           f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED" and r.data.params["method.temperature"] == "4.0"
    assert r.data.tags["kdexp.run_dir"] == str(tmp_path / "run")
    assert [m.step for m in client.get_metric_history(r.info.run_id, "val/acc")] == [1, 2]
    assert {"best/val/acc", "teacher/val/acc"} <= set(r.data.metrics)
    assert {"metrics.json", "config.yaml", "run_info.json", "student.pt"} <= {a.path for a in
                                                                              client.list_artifacts(r.info.run_id)}


def test_mlflow_resumed_run_continues_the_same_mlflow_run(compose_cfg, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"file://{tmp_path / 'mlruns'}"
    run_dir = str(tmp_path / "run")
    run(compose_cfg("logger=mlflow", f"logger.tracking_uri={uri}", *RUN, "epochs=1"), run_dir)
    run(compose_cfg("logger=mlflow", f"logger.tracking_uri={uri}", *RUN), run_dir)  # more epochs: continued
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    run_id = json.loads(open(os.path.join(run_dir, "metrics.json")).read())["loggers"]["mlflow"]["run_id"]
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "val/acc")] == [1, 2]


def wandb_records(path):
    """The records of a wandb transaction log (run-<id>.wandb): a 7-byte header, then LevelDB-log
    framing (32 KiB blocks of chunks with a 7-byte header: crc, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, parts = open(path, "rb").read(), 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            yield wandb_internal_pb2.Record.FromString(parts)
            parts = b""


def _key(item):
    """A history or config item's key (newer wandb versions store it as a one-element nested_key)."""
    return item.key or ".".join(item.nested_key)


def test_wandb_offline_run_folder_holds_the_metrics(compose_cfg, tmp_path):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    run(compose_cfg("logger=wandb", "method.temperature=3", *RUN), str(run_dir))
    run_id = json.loads((run_dir / "metrics.json").read_text())["loggers"]["wandb"]["id"]
    [log] = glob.glob(str(run_dir / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    records = list(wandb_records(log))
    history = [{_key(i): json.loads(i.value_json) for i in r.history.item} for r in records if r.HasField("history")]
    assert [h["epoch"] for h in history if "val/acc" in h] == [1, 2]
    config = next(r.run.config for r in records if r.HasField("run"))  # the config wandb.init was given
    method = json.loads(next(u.value_json for u in config.update if _key(u) == "method"))
    assert method["temperature"] == 3.0
    assert next(r.exit for r in records if r.HasField("exit")).exit_code == 0
