"""Entrypoint: compose the config, then the run lifecycle (kdexp.engine.lifecycle):
plan -> record -> assemble -> pretrain -> fit -> report.

    python -m kdexp.train method=kd method.temperature=4
    python -m kdexp.train -m method=ce,kd method.temperature=2,8
"""
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from kdexp import config_dir
from kdexp.config import register_configs
from kdexp.engine.lifecycle import run
from kdexp.engine.record import describe
from kdexp.errors import KdexpError, RunInterrupted

__all__ = ["main", "run", "cli"]
log = logging.getLogger("kdexp")
register_configs()


@hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        return run(cfg, hc.runtime.output_dir, hc.overrides.task)
    except RunInterrupted as e:  # Ctrl-C or SIGTERM: the run directory says interrupted; a sweep stops too
        log.error("%s", e)
        sys.exit(e.exit_code)
    except (KdexpError, OSError) as e:
        log.error("%s", describe(e))
        if multirun:
            return float("nan")  # recorded in metrics.json; the sweep goes on and exits 1 at its end
        sys.exit(1)
    except Exception:
        if not multirun:
            raise  # an unexpected error: keep the traceback
        log.exception("job failed")  # traceback into this job's log; the other jobs still run
        return float("nan")


def cli() -> None:
    """Console script `kdexp-train`."""
    main()


if __name__ == "__main__":
    main()
