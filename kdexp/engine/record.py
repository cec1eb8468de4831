"""The recorder: the one owner of a run directory.

    <run_dir>/metrics.json        status (running | done | failed + error), history, final, best,
                                  splits, stopped, tags, timings, teacher (+ its history), hardware, ...
                                  (rewritten after every epoch)
    <run_dir>/metrics.csv         one row per epoch, with logger=csv
    <run_dir>/tb/                 TensorBoard scalars + HParams (same run folder), with logger=tensorboard
                                  (the default; other loggers: kdexp.engine.loggers)
    <run_dir>/checkpoints/last.pt the fit state after the last finished epoch (resume)
    <run_dir>/checkpoints/best.pt the same content at the best epoch so far by monitor.metric (val/acc)
    <run_dir>/student.pt          the student's plain state_dict (torch.load(..., weights_only=True))
    <run_dir>/run_info.json       what reproduces it (command, git commit, package versions)
    <run_dir>/config.yaml         the resolved config

Single runs and each run of a fused group get one `Recorder`; with DDP only rank 0 writes (the
other ranks' recorders keep the record in memory and write nothing)."""
import contextlib
import functools
import logging
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from typing import Dict, Iterator, List, Optional

from filelock import FileLock, Timeout

import torch
from omegaconf import OmegaConf

from kdexp.data.domain import describe as describe_domain, parse_transforms
from kdexp.engine.loggers import Logger, build_loggers
from kdexp.engine.resume import finished_value, flatten, load_checkpoint
from kdexp.engine.runinfo import write_run_info
from kdexp.engine.stopping import Best, student_stops
from kdexp.errors import ConfigError, KdexpError, RunInterrupted
from kdexp.io import atomic_json_dump, atomic_torch_save, atomic_write

log = logging.getLogger("kdexp")


# Always in the HParams tab, so that every run of a sweep has the same main columns; with them,
# every method key and every key whose value differs from the defaults (default_values).
MAIN_KEYS = ("dataset.name", "teacher.arch", "student.arch", "seed", "epochs", "batch_size", "optim.name", "optim.lr")
# Not knobs of the experiment: where files go, how the run is executed or continued.
NOT_HPARAMS = ("hydra", "paths", "resume", "force", "progress", "not_applied", "tags", "chain", "born_again")


def knobs(container: dict) -> Dict[str, object]:
    """A resolved config as {dotted key: value}, without the keys that are not the experiment's (NOT_HPARAMS)."""
    return flatten({k: v for k, v in container.items() if k not in NOT_HPARAMS})


@functools.lru_cache(maxsize=None)
def default_values(config_dir: str) -> Optional[Dict[str, object]]:
    """The knobs of the config kdexp composes with no override (conf/config.yaml's defaults), or None
    when it cannot be composed here. Inside a Hydra app its own config search path is used."""
    try:
        from hydra import compose, initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        if GlobalHydra.instance().is_initialized():
            cfg = compose(config_name="config")
        else:
            with initialize_config_dir(config_dir, version_base="1.3"):
                cfg = compose(config_name="config")
        return knobs(OmegaConf.to_container(cfg, resolve=True))
    except Exception as e:  # the HParams then list the main keys, the method's and the overridden ones
        log.debug("no default config to compare the run's with: %s", e)
        return None


def hparams_of(cfg, overrides=()) -> dict:
    """The run's knobs for the HParams tab and every logger's params: MAIN_KEYS, every method.* key
    (a sweep across methods compares them side by side), every key that differs from the default
    config (dataset.label_fraction, student.args.*, optim.weight_decay, ...; the keys named in
    `overrides` when the defaults cannot be composed), the domain shift in words, and `tags`."""
    from kdexp import config_dir

    values = knobs(OmegaConf.to_container(cfg, resolve=True))
    defaults = default_values(config_dir())
    if defaults is None:
        named = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
        changed = {k for k in values if k in named or any(k.startswith(n + ".") for n in named)}
    else:
        changed = {k for k, v in values.items() if k not in defaults or defaults[k] != v}
    hp = {k: values[k] for k in values if k in MAIN_KEYS or k.startswith("method.") or k in changed}
    if cfg.get("domain") is not None and cfg.domain.get("transforms"):
        hp["domain"] = describe_domain(parse_transforms(cfg.domain))
    hp["tags"] = ",".join(str(t) for t in cfg.get("tags") or [])
    return hp


def describe(e: BaseException) -> str:
    """One clear line for errors a user can fix; writing errors name the path and reason."""
    if isinstance(e, OSError) and not isinstance(e, KdexpError):
        return f"cannot write the run outputs: {e.strerror or e}" + (f": {e.filename}" if e.filename else "")
    return str(e)


def resume_command(run_dir: str, overrides=()) -> str:
    """The command line that continues the run in `run_dir` (its overrides, that directory)."""
    keep = [o for o in overrides if not o.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
    return shlex.join([os.path.basename(sys.executable), "-m", "kdexp.train", *keep, f"hydra.run.dir={run_dir}"])


@contextlib.contextmanager
def run_dir_lock(run_dir: str, main: bool = True) -> Iterator[None]:
    """One process per run directory: a second one fails at once instead of training into the
    same files. The lock is the OS's (flock), so a killed process leaves none behind."""
    if not main:  # DDP: rank 0 holds it for the run
        yield
        return
    os.makedirs(run_dir, exist_ok=True)
    lock = FileLock(os.path.join(run_dir, ".kdexp.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(f"run directory {run_dir} is in use by another kdexp process; wait for it to finish or "
                          f"choose another hydra.run.dir") from None
    try:
        yield
    finally:
        lock.release()


def interruption(e: BaseException, run_dir: str, overrides=()) -> RunInterrupted:
    """Ctrl-C (KeyboardInterrupt) or SIGTERM (RunInterrupted) as the RunInterrupted of `run_dir`,
    with the command that resumes it."""
    signum = e.signum if isinstance(e, RunInterrupted) else signal.SIGINT
    return RunInterrupted(signum, run_dir, resume_command(run_dir, overrides))


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM (a cluster's pre-emption, `kill`) raises like Ctrl-C does, so that the run stops at
    a recorded point (RunInterrupted) instead of dying mid-write. Main thread only (signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, _frame):
        raise RunInterrupted(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def student_weights(method_state: dict) -> dict:
    """The student's own state_dict from a method's: its "student."-prefixed keys, prefix dropped.
    For a method whose deployed model wraps the student (progressive's columns, ts_adapter's
    adapter + teacher copy) this is that wrapper module's state_dict."""
    return {k[len("student."):]: v for k, v in method_state.items() if k.startswith("student.")}


def snapshot(obj):
    """A copy of a fit state whose tensors no longer change: the fit loop's state shares storage
    with the live parameters and optimizer buffers, which the next epoch updates in place, so an
    epoch kept for a later checkpoint (checkpoint_every > 1) is copied, to the CPU (where
    checkpoints are read back anyway)."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [snapshot(v) for v in obj]
    if type(obj) is tuple:
        return tuple(snapshot(v) for v in obj)
    return obj


def epoch_summary(metrics: Dict[str, float], note: str = "") -> str:
    """An epoch's log line after "epoch k/n": its losses and accuracies and how long it took."""
    shown = ["train/loss", "val/acc", "val/loss", "val/acc_source", "val/acc_target"]
    return ("  ".join(f"{k} {metrics[k]:.4f}" for k in shown if k in metrics)
            + f"  ({metrics['time/epoch_s']:.2f}s{note})")


def _hparam_value(v):
    if isinstance(v, (bool, int, float, str)):
        return v
    return "null" if v is None else str(v)


class Recorder:
    def __init__(self, run_dir: str, cfg, overrides=(), main: bool = True):
        self.run_dir, self.cfg, self.overrides, self.main = run_dir, cfg, list(overrides), main
        self.checkpoint_path = os.path.join(run_dir, "checkpoints", "last.pt")
        self.best_path = os.path.join(run_dir, "checkpoints", "best.pt")
        self.student_path = os.path.join(run_dir, "student.pt")
        self.record: dict = {}
        self.loggers: List[Logger] = []  # started in `start` (rank 0 only)
        self.t0 = time.time()
        self._resolved = None  # the resolved config for checkpoints, converted once (it costs ms)
        self._unsaved: Optional[dict] = None  # the last finished epoch's state, when not checkpointed yet
        monitor = cfg.get("monitor")
        self.monitor = Best(monitor.metric, monitor.mode) if monitor is not None else Best("val/acc")
        self.stops = student_stops(cfg)  # early stopping, debug=overfit's loss threshold
        debug = cfg.get("debug")
        self.keeps_checkpoints = debug is None or debug.get("checkpoints", True)

    # -- before the run -------------------------------------------------------------------------
    def finished_value(self) -> Optional[float]:
        """The final val/acc when the directory already holds this run, done (it is then skipped)."""
        return finished_value(self.cfg, self.run_dir)

    def resume_state(self) -> Optional[dict]:
        """The fit state of an interrupted run to continue (its record is taken over), or None."""
        state, record = load_checkpoint(self.cfg, self.run_dir)
        self.record = record or {}
        for watch in [self.monitor, *self.stops]:
            watch.replay(self.record.get("history", []))  # the best epoch and patience so far
        return state

    def fail_early(self, e: BaseException) -> None:
        """Record a run that failed before it started (an invalid config), so a sweep's summary shows it."""
        if self.main:
            os.makedirs(self.run_dir, exist_ok=True)
            atomic_json_dump({"status": "failed", "error": f"{type(e).__name__}: {describe(e)}",
                              "overrides": self.overrides}, os.path.join(self.run_dir, "metrics.json"))

    def start(self, hparams: Dict, fresh: bool) -> None:
        """Open the run directory: run_info, the loggers (a fresh run starts their files over; a
        resumed one continues them), metrics.json. A logger that cannot start fails the run here,
        recorded, in one line."""
        self.hparams = {k: _hparam_value(v) for k, v in hparams.items()}
        self.record.update({"status": "running", "overrides": self.overrides, "hparams": self.hparams,
                            "tags": [str(t) for t in self.cfg.get("tags") or []],
                            "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        self.record.setdefault("history", [])
        if not self.main:
            return
        write_run_info(self.run_dir, self.cfg)
        try:
            self._start_loggers(resumed=0 if fresh else len(self.record["history"]))
        except KdexpError as e:
            self.finish("failed", error=f"{type(e).__name__}: {e}")  # the loggers started so far end as failed
            raise
        self.write()

    def resolved(self) -> dict:
        """The resolved config as plain containers, converted once (it costs ms)."""
        if self._resolved is None:
            self._resolved = OmegaConf.to_container(self.cfg, resolve=True)
        return self._resolved

    def _start_loggers(self, resumed: int) -> None:
        """Start the config's loggers into self.loggers; metrics.json keeps what each needs to be
        resumed (loggers.<name>). The knobs of the HParams tab are their params, the resolved config
        and the run's tags go to those that store them (mlflow, wandb)."""
        states = self.record.get("loggers", {}) if resumed else {}
        for logger in build_loggers(self.cfg, self.run_dir, states):
            try:
                logger.start(self.hparams, self.resolved(), self.record["tags"], resumed)
            except Exception as e:
                detail = (str(e).strip().splitlines() or [""])[0]
                raise KdexpError(f"logger={logger.name} could not start: {type(e).__name__}: {detail}") from e
            self.loggers.append(logger)
        self.record["loggers"] = {logger.name: logger.state for logger in self.loggers}

    def _each_logger(self, call: str, *args) -> None:
        """`call` on every logger. A backend that fails mid-run must not stop the training: it is
        warned about once (and kept under `warnings`) and dropped."""
        for logger in list(self.loggers):
            try:
                getattr(logger, call)(*args)
            except Exception as e:
                self.loggers.remove(logger)
                with contextlib.suppress(Exception):
                    logger.close()
                self.warn([f"logger={logger.name} failed in {call}: {type(e).__name__}: {e}; it is dropped, "
                           f"the run goes on"])

    # -- during the run -------------------------------------------------------------------------
    def write(self) -> None:
        if self.main:
            atomic_json_dump(self.record, os.path.join(self.run_dir, "metrics.json"))

    def scalars(self, metrics: Dict[str, float], step: int) -> None:
        if metrics:
            self._each_logger("metrics", metrics, step)

    def teacher(self, info: dict) -> None:
        """The teacher's record {source, key, val/acc, history, ...}: its training curves as
        teacher/train/loss, teacher/val/acc, ... at the teacher's epochs, and the accuracies its
        history lacks (a loaded checkpoint's; the domain views') at step 0."""
        self.record["teacher"] = info
        history = info.get("history") or []
        for h in history:
            self.scalars({f"teacher/{k}": v for k, v in h.items() if k != "epoch"}, h["epoch"])
        curves = {k for h in history for k in h}
        self.scalars({f"teacher/{k}": v for k, v in info.items()
                      if k.startswith("val/") and v is not None and k not in curves}, 0)

    def test(self, metrics: Dict[str, float]) -> None:
        """The test split's metrics (dataset.val_from_train), measured once after the last epoch."""
        self.record["final"].update(metrics)
        self.scalars(metrics, len(self.record["history"]))
        log.info("test split (%s): %s", self.record.get("splits", {}).get("test", "test"),
                 "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def epoch(self, epoch: int, metrics: Dict[str, float], state: Optional[dict] = None, note: str = "",
              extra: Optional[dict] = None) -> bool:
        """One finished epoch: TensorBoard, metrics.json, the log line, checkpoints/last.pt every
        checkpoint_every epochs and after the last, checkpoints/best.pt when monitor.metric improved
        (`state` from the fit loop). -> True when this epoch is the last (early_stop, debug=overfit)."""
        cfg = self.cfg
        self.scalars(metrics, epoch + 1)
        self.record["history"].append({"epoch": epoch + 1, **metrics})
        improved = self.monitor.update(epoch + 1, metrics)
        if improved:
            self.record["best"] = {**self.monitor.describe(), **{k: v for k, v in metrics.items() if k.startswith("val/")}}
        self.record["final"] = {k: v for k, v in metrics.items() if k.startswith(("val/", "train/"))}
        self.record["val/acc"] = metrics["val/acc"]
        stop = next((why for why in (rule(epoch + 1, metrics) for rule in self.stops) if why), None)
        if stop:
            self.record["stopped"] = {"epoch": epoch + 1, "of": cfg.epochs, "reason": stop}
        self.write()
        log.info("epoch %d/%d  %s", epoch + 1, cfg.epochs, epoch_summary(metrics, note), extra=extra)
        if stop:
            log.info("%s: training stops after epoch %d of %d", stop, epoch + 1, cfg.epochs, extra=extra)
        if state is None or not self.keeps_checkpoints:
            return bool(stop)
        due = (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs or bool(stop)
        if due:
            self.checkpoint(state)
        else:  # kept, so that an interruption before the next checkpoint loses nothing
            self._unsaved = snapshot(state) if self.main else state
        if improved:
            self.best(state, copy_last=due)
        return bool(stop)

    def _contents(self, state: dict) -> dict:
        """What a checkpoint file holds: the fit state, the teacher's key and the resolved config."""
        return {**state, "teacher_key": self.record.get("teacher", {}).get("key"), "config": self.resolved()}

    def checkpoint(self, state: dict) -> None:
        """checkpoints/last.pt (resume) and student.pt (the deployable weights) of the same epoch."""
        self._unsaved = None
        if not self.main:
            return
        atomic_torch_save(self._contents(state), self.checkpoint_path)
        self.save_student(state)

    def best(self, state: dict, copy_last: bool) -> None:
        """checkpoints/best.pt: last.pt's content at an epoch that improved on monitor.metric's best.
        Written only on improvement; when last.pt was just written with this state, it is copied
        (no second serialization)."""
        if not self.main:
            return
        if copy_last:
            with open(self.checkpoint_path, "rb") as src:
                atomic_write(self.best_path, lambda f: shutil.copyfileobj(src, f))
        else:
            atomic_torch_save(self._contents(state), self.best_path)

    def save_student(self, state: dict) -> None:
        """student.pt: the method's `student` module's own state_dict (the method's keys without
        their "student." prefix), loadable with weights_only=True into the architecture."""
        if self.main:
            atomic_torch_save(student_weights(state["method"]), self.student_path)

    def warn(self, lines: List[str]) -> None:
        """Valid configs or data that are probably not meant: logged, and kept under `warnings`."""
        for line in lines:
            log.warning("%s", line)
        self.record.setdefault("warnings", []).extend(lines)
        self.write()

    # -- the end ---------------------------------------------------------------------------------
    def finish(self, status: str, error: Optional[str] = None) -> None:
        self.record["status"] = status
        if error:
            self.record["error"] = error
        hist = self.record["history"]
        self.record["timings"] = {
            "total_s": time.time() - self.t0,
            "time/epoch_s": sum(h["time/epoch_s"] for h in hist) / len(hist) if hist else None,
            "time/samples_per_s": sum(h["time/samples_per_s"] for h in hist) / len(hist) if hist else None,
        }
        self.write()
        self._each_logger("finish", status, self._final_metrics() if status == "done" else {}, len(hist))
        self._each_logger("close")
        self.loggers = []

    def _final_metrics(self) -> Dict[str, float]:
        """A finished run's metrics for the loggers' summaries (the HParams tab's metrics): the last
        epoch's, the best val/acc and the teacher's."""
        final = {**self.record.get("final", {}), "best/val/acc": self.record["best"]["val/acc"]}
        if self.record.get("teacher", {}).get("val/acc") is not None:
            final["teacher/val/acc"] = self.record["teacher"]["val/acc"]
        return final

    def done(self, extra: Optional[dict] = None) -> float:
        """Mark the run done (the teacher's accuracies join the final metrics); -> final val/acc."""
        teacher = self.record.get("teacher", {})
        if teacher.get("val/acc") is not None:
            self.record["final"].update({f"teacher/{k}": v for k, v in teacher.items() if k.startswith("val/")})
        self.finish("done")
        final = float(self.record["final"]["val/acc"])
        best = self.record["best"]
        there = "" if best.get("metric", "val/acc") == "val/acc" else f", val/acc {best['val/acc']:.4f} there"
        log.info("done: val/acc %.4f (best %s %.4f at epoch %d%s), teacher %s -> %s", final,
                 best.get("metric", "val/acc"), best.get("value", best["val/acc"]), best["epoch"], there,
                 teacher.get("source", "none"), self.run_dir, extra=extra)
        return final

    @contextlib.contextmanager
    def failure_recorded(self):
        """An error leaves metrics.json saying failed, with the error. SIGINT/SIGTERM leave it saying
        interrupted, with the last finished epoch checkpointed, and raise RunInterrupted with the
        command that resumes."""
        try:
            yield self
        except (KeyboardInterrupt, RunInterrupted) as e:
            stop = interruption(e, self.run_dir, self.overrides)
            if self._unsaved is not None:
                self.checkpoint(self._unsaved)
            if self.record.get("status") == "running":
                self.finish("interrupted", error=f"interrupted by {signal.Signals(stop.signum).name}")
            raise stop from None
        except BaseException as e:
            if self._unsaved is not None:  # the last finished epoch's student, as an interruption keeps it
                self.save_student(self._unsaved)
            if self.record.get("status") == "running":
                self.finish("failed", error=f"{type(e).__name__}: {describe(e)}")
            raise
