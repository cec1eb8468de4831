"""`hydra/sweeper=kdexp`, kdexp's default sweeper (set by conf/sweeper/kdexp.yaml): the basic
sweeper's grid, same syntax, job list and run directories, except that a sweep across methods
may set a key that only some of them have:

    python -m kdexp.train -m method=dkd,kd method.warmup_epochs=5

applies method.warmup_epochs=5 to the dkd jobs; each kd job runs without it and records it as not
applied (`not_applied` in its config, a warning in its log and metrics.json). A key that no
registered method has is left in, so that Hydra reports it as the typo it is. Jobs that become
identical once such keys are dropped run once.
"""
import logging
from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.types import Override

log = logging.getLogger("kdexp")


@dataclass
class KdexpSweeperConf:
    _target_: str = "hydra_plugins.kdexp_fused_sweeper.kdexp_sweeper.KdexpSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None  # sweep parameters in the config, as the basic sweeper


ConfigStore.instance().store(group="hydra/sweeper", name="kdexp", node=KdexpSweeperConf, provider="kdexp")


def _method_keys() -> Dict[str, set]:
    from kdexp.methods import METHODS  # the plugin is imported by Hydra before kdexp's configs

    return {name: {f.name for f in fields(METHODS.meta(name)["config"])} for name in METHODS.names()}


def split_not_applied(job: Sequence[str], default_method: str, keys: Dict[str, set]):
    """(the job's overrides without the method keys its method lacks but another method has, those)."""
    method = next((o.split("=", 1)[1] for o in job if o.split("=", 1)[0] == "method"), default_method)
    own = keys.get(method)
    anyone = set().union(*keys.values())
    kept, dropped = [], []
    for o in job:
        key = o.split("=", 1)[0]
        name = key[len("method."):] if key.startswith("method.") else None
        if own is not None and name and "." not in name and name not in own and name in anyone:
            dropped.append(o)
        else:
            kept.append(o)
    return kept, dropped


def applicable_jobs(jobs: Sequence[Sequence[str]], default_method: str) -> List[List[str]]:
    """Each job without the keys that do not apply to its method (recorded as `not_applied=[...]`);
    jobs that are then identical are merged into one."""
    keys = _method_keys()
    merged: Dict[tuple, List[str]] = {}
    for job in jobs:
        kept, dropped = split_not_applied(job, default_method, keys)
        merged.setdefault(tuple(kept), [])
        merged[tuple(kept)] += [d for d in dropped if d not in merged[tuple(kept)]]
    out = []
    for kept, dropped in merged.items():
        if dropped:
            log.info("job %s: %s do(es) not apply to its method (kept as not_applied)", " ".join(kept),
                     ", ".join(dropped))
        out.append(list(kept) + ([f"not_applied=[{','.join(repr(d) for d in dropped)}]"] if dropped else []))
    if len(out) < len(jobs):
        log.info("%d job(s) of the sweep were the same run once the keys that do not apply were dropped: "
                 "%d job(s) run", len(jobs) - len(out), len(out))
    return out


class KdexpSweeper(BasicSweeper):
    def split_arguments(self, overrides: List[Override], max_batch_size: Optional[int]) -> List[List[List[str]]]:
        jobs = applicable_jobs(BasicSweeper.split_arguments(overrides, None)[0], str(self.config.method.name))
        if max_batch_size is None:
            return [jobs]
        return [jobs[i:i + max_batch_size] for i in range(0, len(jobs), max_batch_size)]
