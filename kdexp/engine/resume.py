"""Resuming a run directory: skip finished runs, continue interrupted ones from
checkpoints/last.pt, and refuse to continue a checkpoint made with another config."""
import json
import logging
import os
from typing import Optional, Tuple

import torch
from omegaconf import OmegaConf

from kdexp.errors import ConfigError

log = logging.getLogger(__name__)
# Keys that may change between the interrupted run and its continuation.
MAY_CHANGE = ("epochs", "resume", "force", "progress", "checkpoint_every", "hardware", "paths", "eval_batch_size",
              "not_applied", "chain", "born_again", "tags", "logger")


def read_metrics(run_dir: str) -> Optional[dict]:
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # a run killed before its first write: start over


def finished_value(cfg, run_dir: str) -> Optional[float]:
    """The final val/acc of a run directory that is already done for `cfg` (skipped, unless
    force=true; a run asked for more epochs than it has is continued instead), else None. A
    finished directory made with another config is an error naming the keys that differ."""
    previous = read_metrics(run_dir)
    if (previous and previous.get("status") == "done" and not cfg.force
            and len(previous.get("history", [])) >= cfg.epochs):
        saved = os.path.join(run_dir, "config.yaml")
        changed = config_changes(OmegaConf.to_container(OmegaConf.load(saved)), cfg) if os.path.isfile(saved) else []
        if changed:
            raise ConfigError(f"{run_dir} holds a finished run of a different config ({', '.join(changed[:8])}"
                              f"{' ...' if len(changed) > 8 else ''}); force=true reruns it there, or choose another "
                              f"hydra.run.dir")
        value = float(previous["final"]["val/acc"])
        log.info("%s is already done (val/acc %.4f); skipping it (force=true reruns it)", run_dir, value)
        return value
    return None


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested dict as {"a.b.c": value}."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def config_changes(saved: dict, cfg) -> list:
    """Keys (dotted) whose values differ between a checkpoint's config and `cfg`."""
    now = flatten({k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in MAY_CHANGE})
    before = flatten({k: v for k, v in saved.items() if k not in MAY_CHANGE})
    return sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))


def load_checkpoint(cfg, run_dir: str) -> Tuple[Optional[dict], Optional[dict]]:
    """-> (fit state, metrics record truncated to the checkpoint) or (None, None) to start fresh."""
    path = os.path.join(run_dir, "checkpoints", "last.pt")
    if not cfg.resume or cfg.force or not os.path.isfile(path):
        return None, None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ConfigError(f"cannot resume: {path} is unreadable ({e}); rerun with resume=false to start over") from None
    changed = config_changes(state.get("config", {}), cfg)
    if changed:
        raise ConfigError(f"cannot resume {run_dir}: its checkpoint was made with a different config "
                          f"({', '.join(changed[:8])}{' ...' if len(changed) > 8 else ''}); rerun with resume=false "
                          f"to start over or use another run directory")
    record = read_metrics(run_dir) or {}
    record["history"] = record.get("history", [])[:state["epoch"]]
    record.pop("error", None)
    log.info("resuming %s after epoch %d", run_dir, state["epoch"])
    return state, record
