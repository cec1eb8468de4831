"""Hydra callbacks (configured in conf/config.yaml under hydra.callbacks):
- fail early and clearly when the output directory cannot be written;
- after a multirun, list the failed jobs and exit non-zero (each job records its own
  failure in metrics.json and lets the other jobs run)."""
import json
import logging
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

log = logging.getLogger("kdexp")


def _check_writable(folder: str, what: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, ".kdexp-write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        print(f"kdexp: error: cannot write the {what} {folder!r}: {e.strerror or e}. "
              f"Choose a writable folder with {'hydra.run.dir' if what == 'run directory' else 'hydra.sweep.dir'}=...",
              file=sys.stderr)
        sys.exit(1)  # SystemExit passes Hydra's error reporter: one line, no traceback


def failed_runs(sweep_dir: str):
    for path in sorted(Path(sweep_dir).rglob("metrics.json")):
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError):
            yield path.parent, "unreadable metrics.json"
            continue
        if m.get("status") != "done":
            yield path.parent, m.get("error", m.get("status"))


class KdexpCallbacks(Callback):
    def on_run_start(self, config, **kwargs) -> None:
        _check_writable(config.hydra.run.dir, "run directory")

    def on_multirun_start(self, config, **kwargs) -> None:
        _check_writable(config.hydra.sweep.dir, "sweep directory")

    def on_multirun_end(self, config, **kwargs) -> None:
        failed = list(failed_runs(config.hydra.sweep.dir))
        if failed:
            for run_dir, error in failed:
                log.error("failed: %s: %s", run_dir, error)
            print(f"kdexp: {len(failed)} job(s) of the sweep failed (see above and their metrics.json); "
                  f"the others finished. python scripts/summarize.py {config.hydra.sweep.dir} shows all rows.",
                  file=sys.stderr)
            sys.exit(1)
