"""`hydra/sweeper=fused`: the basic sweeper's grid (same syntax, same job list and run
directories), but jobs whose configs differ only in method.temperature / alpha / beta / w_ce /
seed are trained together in this process as one fused group (kdexp.engine.fused): N students
sharing one teacher output per sample. Jobs that cannot be fused (why is logged) go to the
configured launcher (basic, joblib, submitit) as separate runs.

    python -m kdexp.train -m hydra/sweeper=fused method=kd method.temperature=1,2,4,8 method.alpha=0.5,0.9
"""
import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from hydra_plugins.kdexp_fused_sweeper.kdexp_sweeper import KdexpSweeper

log = logging.getLogger("kdexp")


@dataclass
class FusedSweeperConf:
    _target_: str = "hydra_plugins.kdexp_fused_sweeper.fused_sweeper.FusedSweeper"
    max_batch_size: Optional[int] = None  # separate (unfusable) jobs: launcher batches of this size
    params: Optional[Dict[str, str]] = None  # sweep parameters in the config, as the basic sweeper
    max_group_size: int = 64  # students trained together at most (larger groups are split)
    fuse: bool = True  # false: every job runs separately (the basic sweeper's behaviour)


ConfigStore.instance().store(group="hydra/sweeper", name="fused", node=FusedSweeperConf, provider="kdexp")


class _RunFilter(logging.Filter):
    """Passes the group's own lines and the lines of run `index`."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "fused_run", self.index) == self.index


class FusedSweeper(KdexpSweeper):
    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[Dict[str, str]] = None,
                 max_group_size: int = 64, fuse: bool = True) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        if max_group_size < 2:
            raise ValueError(f"hydra.sweeper.max_group_size={max_group_size} must be >= 2")
        self.max_group_size = max_group_size
        self.fuse = fuse
        self.task_function: Optional[TaskFunction] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.task_function = task_function

    # -- jobs ---------------------------------------------------------------------------------
    def _job_config(self, overrides: Sequence[str], idx: int) -> DictConfig:
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg):
            cfg.hydra.job.id = idx
            cfg.hydra.job.num = idx
        HydraConfig.instance().set_config(cfg)
        out = os.path.join(str(OmegaConf.select(cfg, "hydra.sweep.dir")), str(OmegaConf.select(cfg, "hydra.sweep.subdir")))
        with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
            cfg.hydra.runtime.output_dir = os.path.abspath(out)
        HydraConfig.instance().set_config(cfg)
        return cfg

    @staticmethod
    def _task_cfg(cfg: DictConfig) -> DictConfig:
        task = copy.deepcopy(cfg)
        with read_write(task), open_dict(task):
            del task["hydra"]
        return task

    def sweep(self, arguments: List[str]) -> Any:
        from kdexp.engine import fused

        params_conf = self._parse_config()
        params_conf.extend(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        jobs = self.split_arguments(parser.parse_overrides(params_conf), None)[0]
        self.overrides = [jobs]
        self.batch_index = 1
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        # compose every job; group those that differ only in fusable keys
        composed = []
        groups: Dict[str, List[int]] = {}
        separate: List[int] = []
        orig_hydra_cfg = HydraConfig.instance().cfg
        try:
            for idx, overrides in enumerate(jobs):
                cfg = self._job_config(overrides, idx)
                task = self._task_cfg(cfg)
                composed.append((overrides, cfg, task))
                reason = fused.config_reason(task) if self.fuse else "hydra.sweeper.fuse=false"
                if reason:
                    log.info("job #%d (%s) runs separately: %s", idx, " ".join(filter_overrides(overrides)), reason)
                    separate.append(idx)
                else:
                    groups.setdefault(fused.group_key(task), []).append(idx)
        finally:
            HydraConfig.instance().cfg = orig_hydra_cfg

        returns: List[Sequence[JobReturn]] = []
        done: List[JobReturn] = []
        for members in groups.values():
            for start in range(0, len(members), self.max_group_size):
                chunk = members[start:start + self.max_group_size]
                done += self._run_group([(i, *composed[i]) for i in chunk], separate)
        if done:
            returns.append(done)
        separate.sort()
        if separate:
            batches = self.split_overrides_to_chunks([list(composed[i][0]) for i in separate], self.max_batch_size)
            initial = len(jobs) - len(separate)
            for batch in batches:
                self.validate_batch_is_legal(batch)
                results = self.launcher.launch(batch, initial_job_idx=initial)
                for r in results:
                    _ = r.return_value  # raises for a job that failed, as the basic sweeper does
                initial += len(batch)
                returns.append(results)
        return returns

    def _run_group(self, members, separate: List[int]) -> List[JobReturn]:
        """Train one group fused; jobs it cannot take are appended to `separate`."""
        from kdexp.engine import fused

        jobs = [fused.Job(task, cfg.hydra.runtime.output_dir, list(cfg.hydra.overrides.task), idx)
                for idx, _, cfg, task in members]
        by_index = {idx: (overrides, cfg, task) for idx, overrides, cfg, task in members}
        returns: List[JobReturn] = []
        to_fuse = []
        for outcome in fused.triage(jobs):
            idx = outcome.job.index
            if outcome.status == "skipped":
                returns.append(self._job_return(by_index[idx][1], outcome.value))
            elif outcome.status == "separate":
                log.info("job #%d runs separately: %s", idx, outcome.separate)
                separate.append(idx)
            else:
                to_fuse.append(outcome.job)
        if len(to_fuse) < 2:
            for job in to_fuse:
                log.info("job #%d runs separately: no other job of its group left to fuse with", job.index)
                separate.append(job.index)
            return returns
        orig_hydra_cfg = HydraConfig.instance().cfg
        handlers = []
        try:
            for job in to_fuse:
                cfg = by_index[job.index][1]
                self._save_hydra_files(cfg, by_index[job.index][2])
                handler = logging.FileHandler(os.path.join(job.run_dir, f"{cfg.hydra.job.name}.log"))
                handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
                handler.addFilter(_RunFilter(job.index))
                logging.getLogger().addHandler(handler)
                handlers.append(handler)
            HydraConfig.instance().set_config(by_index[to_fuse[0].index][1])
            for job in to_fuse:
                self.hydra_context.callbacks.on_job_start(config=by_index[job.index][1], task_function=self.task_function)
            try:
                values = fused.train_group(to_fuse)
            except fused.NotFusable as e:
                log.info("jobs %s run separately: %s", [j.index for j in to_fuse], e)
                separate += [j.index for j in to_fuse]
                return returns
            for job, value in zip(to_fuse, values):
                ret = self._job_return(by_index[job.index][1], value)
                self.hydra_context.callbacks.on_job_end(config=by_index[job.index][1], job_return=ret)
                returns.append(ret)
        finally:
            for h in handlers:
                logging.getLogger().removeHandler(h)
                h.close()
            HydraConfig.instance().cfg = orig_hydra_cfg
        return returns

    @staticmethod
    def _save_hydra_files(cfg: DictConfig, task: DictConfig) -> None:
        """What run_job writes: <output_dir>/.hydra/{config,hydra,overrides}.yaml."""
        if cfg.hydra.output_subdir is None:
            return
        folder = Path(cfg.hydra.runtime.output_dir) / str(cfg.hydra.output_subdir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(OmegaConf.to_yaml(task))
        (folder / "hydra.yaml").write_text(OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, "hydra")))
        (folder / "overrides.yaml").write_text(OmegaConf.to_yaml(cfg.hydra.overrides.task))

    def _job_return(self, cfg: DictConfig, value: float) -> JobReturn:
        ret = JobReturn()
        ret.cfg = self._task_cfg(cfg)
        ret.hydra_cfg = OmegaConf.masked_copy(cfg, "hydra")
        ret.overrides = list(OmegaConf.to_container(cfg.hydra.overrides.task))
        ret.working_dir = os.getcwd()
        ret.task_name = cfg.hydra.job.name
        ret.status = JobStatus.COMPLETED
        ret.return_value = value
        return ret
