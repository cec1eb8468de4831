"""Loggers: where a run's metrics go besides metrics.json, one class per backend, registered by name
(the names of conf/logger's options; several at once: logger=[tensorboard,csv]).

    tensorboard  <run_dir>/tb/            scalars (flushed every epoch) + the HParams tab, in one run folder
    csv          <run_dir>/metrics.csv    a row per step (epoch), a column per metric
    mlflow       logger.tracking_uri      a run per kdexp run: the resolved config as params, metrics per epoch,
                                          tags, the run directory's small files as artifacts, its end status
    wandb        <run_dir>/wandb/         the same, offline unless logger.mode=online

The recorder (kdexp.engine.record) owns them: it starts them, fans every scalar out to them and
finishes them with the run's status (done, failed, interrupted). Each keeps what a resumed run needs
to continue the same backend run in `state` (metrics.json's loggers.<name>)."""
import csv
import importlib
import io
import os
import shutil
import time
from typing import Dict, List, Optional

from kdexp.config import chosen_loggers
from kdexp.engine.resume import flatten
from kdexp.errors import ConfigError
from kdexp.io import atomic_write
from kdexp.registry import Registry

LOGGERS = Registry("logger")
# The run directory's files a backend that stores artifacts (mlflow) keeps with its run.
RUN_FILES = ("metrics.json", "config.yaml", "run_info.json", "student.pt")


class Logger:
    """One backend for one run. `settings` are its keys (logger.<name>.*); `state` what the run
    kept of it in metrics.json when it is resumed ({} otherwise). A logger raises on failure: the
    recorder turns that into a one-line error at start and into a warning later on."""

    def __init__(self, name: str, run_dir: str, settings: dict, state: Optional[dict] = None):
        self.name, self.run_dir, self.settings, self.state = name, run_dir, settings, dict(state or {})

    def start(self, params: Dict, config: dict, tags: List[str], resumed: int) -> None:
        """Open the backend. `params`: the run's knobs (the HParams dict); `config`: the resolved
        config (nested); `tags`: the run's tags; `resumed`: the epochs already done (0: a fresh run)."""

    def metrics(self, metrics: Dict[str, float], step: int) -> None:
        """Scalars at `step`: epoch k (the teacher's curves at its own epochs; accuracies it has no
        curve of at 0)."""

    def finish(self, status: str, final_metrics: Dict[str, float], step: int) -> None:
        """The run ended with `status` (done | failed | interrupted); `final_metrics` (empty unless
        done) at `step`, the last epoch's."""

    def close(self) -> None:
        """Release files and handles (after finish, or instead of it when the start failed)."""


def check_loggers(cfg) -> None:
    """Every chosen logger is registered and its package importable: at plan time, so that a missing
    extra fails in one line before any data is loaded or a teacher trained."""
    for name in chosen_loggers(cfg):
        LOGGERS.get(name, key="logger")  # one line naming the registered loggers
        package = LOGGERS.meta(name).get("package")
        if package is None:
            continue
        try:
            importlib.import_module(package)
        except ImportError as e:
            broken = "" if e.name == package else f" (importing it failed: {e})"
            raise ConfigError(f"logger={name} needs the {package} package: pip install -e '.[{name}]'{broken}") from None


def build_loggers(cfg, run_dir: str, states: Dict[str, dict]) -> List[Logger]:
    """The run's loggers, not started yet; `states`: metrics.json's loggers.<name> of a resumed run."""
    return [LOGGERS.get(name, key="logger")(name, run_dir, settings, states.get(name))
            for name, settings in chosen_loggers(cfg).items()]


# ------------------------------------------------------------------------------ tensorboard
@LOGGERS.register("tensorboard")
class TensorBoardLogger(Logger):
    def start(self, params, config, tags, resumed):
        from torch.utils.tensorboard import SummaryWriter

        folder = os.path.join(self.run_dir, "tb")
        if not resumed and os.path.isdir(folder):
            shutil.rmtree(folder)  # starting over: old curves would mix with the new
        self.params = params
        self.writer = SummaryWriter(folder)

    def metrics(self, metrics, step):
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def finish(self, status, final_metrics, step):
        if status != "done":
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        # HParams tab: written into this run's own event file (SummaryWriter.add_hparams would make a
        # sibling run), with the final metrics as the run's metrics.
        for s in hparams_summary(self.params, {k: 0.0 for k in final_metrics}):
            self.writer.file_writer.add_summary(s)
        self.metrics(final_metrics, step)

    def close(self):
        self.writer.close()


# ------------------------------------------------------------------------------ csv
@LOGGERS.register("csv")
class CsvLogger(Logger):
    """metrics.csv: columns epoch + every metric in the order they first appeared, one row per student
    epoch. A row is appended per epoch; a new column, or an epoch logged again (the test split's
    metrics after the last one), rewrites the file (atomically, so a reader never sees half of it).
    The teacher's curves (teacher/*, at the teacher's own epochs) stay out: a row is a student epoch;
    they are in metrics.json's teacher.history."""

    def start(self, params, config, tags, resumed):
        self.path = os.path.join(self.run_dir, "metrics.csv")
        self.columns, self.rows = ["epoch"], []
        if resumed and os.path.isfile(self.path):  # continue it, without the epochs after the checkpoint
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or self.columns)
                self.rows = [row for row in reader if int(row["epoch"]) <= resumed]
        self._rewrite()

    def metrics(self, metrics, step):
        metrics = {k: v for k, v in metrics.items() if not k.startswith("teacher/")}
        if not metrics:
            return
        new = [k for k in metrics if k not in self.columns]
        self.columns += new
        row = next((r for r in self.rows if int(r["epoch"]) == step), None)
        if row is None:
            self.rows.append({"epoch": step, **metrics})
        else:
            row.update(metrics)
        if new or row is not None:
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.columns).writerow(self.rows[-1])

    def _rewrite(self):
        text = io.StringIO()
        writer = csv.DictWriter(text, self.columns)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(self.path, lambda f: f.write(text.getvalue().encode()))


# ------------------------------------------------------------------------------ mlflow
MLFLOW_STATUS = {"done": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
MLFLOW_BATCH = 100  # params or tags per log_batch call (the tracking API's limit)
MLFLOW_PARAM_CHARS = 6000  # the longest param value mlflow >= 2 stores (longer ones are cut)


def tracking_uri(value: str) -> str:
    """A folder (absolute or relative to the working directory) as a file: URI; URIs as they are."""
    if ":" in value or value == "databricks":
        return value
    return "file://" + os.path.abspath(value)


def flat_params(config: dict) -> Dict[str, str]:
    """The resolved config as mlflow params: dotted keys, values as strings (null for None), cut to
    mlflow's length limit. Empty nodes have no param."""
    return {k: ("null" if v is None else str(v))[:MLFLOW_PARAM_CHARS] for k, v in flatten(config).items()}


def _chunks(items: list, n: int):
    return [items[i:i + n] for i in range(0, len(items), n)]


@LOGGERS.register("mlflow", package="mlflow")
class MlflowLogger(Logger):
    """One mlflow run per kdexp run, through an MlflowClient of its own (no global active run: the
    runs of a fused group are open at once in one process). A resumed run continues its mlflow run
    (state: run_id)."""

    def start(self, params, config, tags, resumed):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        uri = tracking_uri(self.settings["tracking_uri"])
        if uri.startswith("file:"):  # mlflow 3 asks for an opt-in to its file store, kdexp's default
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        self.logged: set = set()  # metric names logged as a series (the final metrics do not repeat them)
        run_id = self.state.get("run_id") if resumed else None
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_tags = {**{str(t): "" for t in tags}, "kdexp.run_dir": os.path.abspath(self.run_dir)}
            run_id = self.client.create_run(self._experiment_id(), run_name=os.path.basename(
                os.path.normpath(self.run_dir)), tags=run_tags).info.run_id
        self.run_id = self.state["run_id"] = run_id
        self.state["tracking_uri"] = uri
        # params are immutable in mlflow: a resumed run adds only those it did not log before
        before = self.client.get_run(run_id).data.params if resumed else {}
        todo = [Param(k, v) for k, v in flat_params(config).items() if k not in before]
        for chunk in _chunks(todo, MLFLOW_BATCH):
            self.client.log_batch(run_id, params=chunk)

    def _experiment_id(self) -> str:
        name = self.settings["experiment"]
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another job of the sweep created it in the meantime
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def metrics(self, metrics, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for chunk in _chunks(batch, MLFLOW_BATCH * 10):
            self.client.log_batch(self.run_id, metrics=chunk)
        self.logged.update(metrics)

    def finish(self, status, final_metrics, step):
        self.metrics({k: v for k, v in final_metrics.items() if k not in self.logged}, step)
        for name in RUN_FILES:
            path = os.path.join(self.run_dir, name)
            if os.path.isfile(path):
                self.client.log_artifact(self.run_id, path)
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FAILED"))


# ------------------------------------------------------------------------------ wandb
WANDB_EXIT_CODE = {"done": 0, "failed": 1, "interrupted": 255}


@LOGGERS.register("wandb", package="wandb")
class WandbLogger(Logger):
    """One wandb run per kdexp run, in <run_dir>/wandb/; a resumed run continues it by id (state: id).
    Runs are created side by side (reinit="create_new"): a fused group has several open at once."""

    def start(self, params, config, tags, resumed):
        import wandb

        s = self.settings
        self.run = wandb.init(mode=s["mode"], project=s["project"], entity=s["entity"], dir=self.run_dir,
                              name=os.path.basename(os.path.normpath(self.run_dir)), config=config,
                              tags=list(tags), id=self.state.get("id") if resumed else None, resume="allow",
                              reinit="create_new", settings=wandb.Settings(console="off", silent=True))
        self.state["id"] = self.run.id
        # wandb's own step only grows, but the teacher's curves come before the student's epochs on
        # the same axis: every metric is charted against `epoch` instead
        self.run.define_metric("epoch")
        self.run.define_metric("*", step_metric="epoch")

    def metrics(self, metrics, step):
        self.run.log({**metrics, "epoch": step})

    def finish(self, status, final_metrics, step):
        self.run.summary.update(final_metrics)
        self.run.finish(exit_code=WANDB_EXIT_CODE.get(status, 1))
