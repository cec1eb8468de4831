"""Entrypoint: compose the config, then the run lifecycle (kdexp.engine.lifecycle):
plan -> record -> assemble -> pretrain -> fit -> report.

    python -m kdexp.train method=kd method.temperature=4
    python -m kdexp.train -m method=ce,kd method.temperature=2,8
"""
import logging
import os
import sys
from dataclasses import fields
from typing import List

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig

from kdexp import config_dir
from kdexp.config import register_configs
from kdexp.engine.born_again import run_born_again
from kdexp.engine.chain import run_chain
from kdexp.engine.lifecycle import run as run_one
from kdexp.engine.record import describe
from kdexp.errors import KdexpError, RunInterrupted
from kdexp.methods import MethodConfig

__all__ = ["main", "run", "cli"]


def run(cfg, run_dir: str, overrides=()) -> float:
    """One experiment in `run_dir` (kdexp.engine.lifecycle.run), or the stages of its `chain`, each in
    a directory of its own under `run_dir` (kdexp.engine.chain), or the generations of `born_again`
    (a chain, kdexp.engine.born_again); -> the (last) final val/acc."""
    if cfg.get("born_again") and cfg.born_again.generations is not None:
        return run_born_again(cfg, run_dir, overrides)
    return run_chain(cfg, run_dir, overrides) if cfg.get("chain") else run_one(cfg, run_dir, overrides)


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


def sweep_method_keys(argv: List[str]) -> List[str]:
    """In a multirun, a key only some methods have (method.warmup_epochs=5 in -m method=dkd,kd) is
    handed to the sweeper as a one-value sweep (choice(5)), which applies it to the jobs whose
    method has it and records it as not applied in the others (kdexp's sweeper). Hydra would
    otherwise apply it to the primary config's default method first and stop the whole sweep."""
    if not any(a in ("-m", "--multirun") for a in argv):
        return argv
    parser = OverridesParser.create()
    common = {f.name for f in fields(MethodConfig)}
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        name = key[len("method."):] if key.startswith("method.") else ""
        if sep and name and "." not in name and name not in common:
            try:
                if not parser.parse_override(arg).is_sweep_override():
                    arg = parser.parse_override(f"{key}=choice({value})").input_line
            except Exception:  # not an override Hydra can parse: it reports it as is
                pass
        out.append(arg)
    return out


def cli() -> None:
    """Console script `kdexp-train`. Like `python -m kdexp.train`, it puts the working directory first on
    sys.path, so `student.arch=mymodels:TinyNet` finds a mymodels.py where the run starts (a console
    script's sys.path starts with its own bin folder instead)."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if sys.argv[1:] in (["--help"], ["-h"]):  # the same page as Hydra's, without its 6 s listing of groups
        from kdexp.catalog import help_page
        from kdexp.config import Config

        print(help_page(Config))
        return
    sys.argv = sweep_method_keys(sys.argv)
    main()


if __name__ == "__main__":
    cli()
