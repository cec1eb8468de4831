"""Run directory outputs: TensorBoard scalars + HParams (same run folder), metrics.json."""
import os
import time
from typing import Dict, Optional

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

from kdexp.engine.checkpoint import atomic_json_dump


def _hparam_value(v):
    if isinstance(v, (bool, int, float, str)):
        return v
    return "null" if v is None else str(v)


class RunLogger:
    """Writes <run_dir>/tb/ and <run_dir>/metrics.json. metrics.json is rewritten after
    every epoch, so a crashed run still shows how far it got."""

    def __init__(self, run_dir: str, hparams: Dict, overrides=(), record: Optional[dict] = None):
        self.run_dir = run_dir
        self.tb = SummaryWriter(os.path.join(run_dir, "tb"))
        self.hparams = {k: _hparam_value(v) for k, v in hparams.items()}
        self.t0 = time.time()
        self.record = record or {}
        self.record.update({"status": "running", "overrides": list(overrides), "hparams": self.hparams,
                            "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        self.record.setdefault("history", [])
        self.write()

    def write(self) -> None:
        atomic_json_dump(self.record, os.path.join(self.run_dir, "metrics.json"))

    def scalars(self, metrics: Dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def epoch(self, epoch: int, metrics: Dict[str, float]) -> None:
        self.scalars(metrics, epoch + 1)
        self.record["history"].append({"epoch": epoch + 1, **metrics})
        best = self.record.get("best", {})
        if metrics["val/acc"] > best.get("val/acc", -1.0):
            self.record["best"] = {"val/acc": metrics["val/acc"], "epoch": epoch + 1}
        self.record["final"] = {k: v for k, v in metrics.items() if k.startswith(("val/", "train/"))}
        self.record["val/acc"] = metrics["val/acc"]
        self.write()

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
        if status == "done":
            # HParams tab: written into this run's own event file (SummaryWriter.add_hparams
            # would make a sibling run), with the final metrics as the run's metrics.
            final = {**self.record.get("final", {}), "best/val/acc": self.record["best"]["val/acc"]}
            if "teacher" in self.record and self.record["teacher"].get("val/acc") is not None:
                final["teacher/val/acc"] = self.record["teacher"]["val/acc"]
            exp, ssi, sei = hparams_summary(self.hparams, {k: 0.0 for k in final})
            for s in (exp, ssi, sei):
                self.tb.file_writer.add_summary(s)
            self.scalars(final, len(hist))
        self.tb.close()
