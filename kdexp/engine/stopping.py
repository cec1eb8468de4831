"""Watching a metric over epochs: the best epoch (checkpoints/best.pt, metrics.json `best`), early
stopping, and thresholds that end a training once reached (a deliberately weak teacher's
teacher.stop_at_acc, debug=overfit's train/loss). The fit loop stops after an epoch whose
`on_epoch` returns True; these objects decide it from that epoch's metrics."""
from dataclasses import dataclass
from typing import Dict, List, Optional

from kdexp.errors import ConfigError


def resolve_mode(metric: str, mode: str) -> str:
    """max | min; auto: min for a loss (val/loss, train/loss_kd, ...), max for the rest (accuracies)."""
    if mode != "auto":
        return mode
    return "min" if "loss" in metric.rsplit("/", 1)[-1] else "max"


def metric_of(metrics: Dict[str, float], metric: str, key: str) -> float:
    """metrics[metric], or one line naming `key` (the config key that chose it) and the epoch's metrics."""
    if metric not in metrics:
        names = ", ".join(sorted(k for k in metrics if k.startswith(("val/", "train/"))))
        raise ConfigError(f"{key}={metric}: this run's epochs have no such metric; they have: {names}")
    return float(metrics[metric])


@dataclass
class Best:
    """The best epoch of `metric` (mode max or min) so far: `update` says whether an epoch improved
    on it by more than `min_delta`; `epoch` (1-based) and `value` describe it."""
    metric: str
    mode: str = "auto"
    min_delta: float = 0.0
    key: str = "monitor.metric"
    value: Optional[float] = None
    epoch: Optional[int] = None
    since: int = 0  # epochs since the best one

    def __post_init__(self):
        self.mode = resolve_mode(self.metric, self.mode)

    def update(self, epoch: int, metrics: Dict[str, float]) -> bool:
        v = metric_of(metrics, self.metric, self.key)
        better = self.value is None or (v > self.value + self.min_delta if self.mode == "max"
                                        else v < self.value - self.min_delta)
        if better:
            self.value, self.epoch, self.since = v, epoch, 0
        else:
            self.since += 1
        return better

    def replay(self, history: List[Dict[str, float]]) -> "Best":
        """The state after the recorded epochs (a resumed run continues where it stopped)."""
        for h in history:
            self.update(h["epoch"], h)
        return self

    def describe(self) -> dict:
        return {"metric": self.metric, "mode": self.mode, "value": self.value, "epoch": self.epoch}


@dataclass
class EarlyStop:
    """Stop after `patience` epochs in which `best` did not improve."""
    best: Best
    patience: int

    def replay(self, history: List[Dict[str, float]]) -> None:
        """Continue the count of a resumed run from its recorded epochs."""
        self.best.replay(history)

    def __call__(self, epoch: int, metrics: Dict[str, float]) -> Optional[str]:
        self.best.update(epoch, metrics)
        if self.best.since >= self.patience:
            return (f"early stop: {self.best.metric} did not improve for {self.patience} epochs (best "
                    f"{self.best.value:.4f} at epoch {self.best.epoch})")
        return None


@dataclass
class Threshold:
    """Stop once `metric` reaches `value` (>= for mode max, <= for min)."""
    metric: str
    value: float
    mode: str
    key: str

    def replay(self, history: List[Dict[str, float]]) -> None:
        """Nothing to continue: each epoch is judged alone."""

    def __call__(self, epoch: int, metrics: Dict[str, float]) -> Optional[str]:
        v = metric_of(metrics, self.metric, self.key)
        if (v >= self.value) if self.mode == "max" else (v <= self.value):
            return f"{self.metric} {v:.4f} {'>=' if self.mode == 'max' else '<='} {self.key}={self.value:g}"
        return None


def student_stops(cfg) -> list:
    """The rules that may end a student's training early: early_stop.patience, debug.overfit_loss.
    A rule is called with each epoch's metrics (-> why it stops, or None) and `replay`s a resumed
    run's recorded epochs."""
    rules = []
    es = cfg.get("early_stop")
    if es is not None and es.patience is not None:
        metric = es.metric or cfg.monitor.metric
        # the monitor's direction goes with its metric, unless early_stop.mode says otherwise
        mode = es.mode if es.metric or es.mode != "auto" else cfg.monitor.mode
        rules.append(EarlyStop(Best(metric, mode, es.min_delta,
                                    key="early_stop.metric" if es.metric else "monitor.metric"), es.patience))
    d = cfg.get("debug")
    if d is not None and d.overfit_batches:
        rules.append(Threshold("train/loss", d.overfit_loss, "min", "debug.overfit_loss"))
    return rules
