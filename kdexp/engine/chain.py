"""Chains: multi-stage pipelines in one command, each stage a normal run in its own directory.

A config's `chain` lists stages, each {name, overrides: [...], teacher: NAME (optional)}. Stage k
is the run config composed with the command's overrides plus the stage's own, in
<run dir>/<k>_<name>; `teacher: NAME` makes that earlier stage's run the stage's teacher
(teacher.checkpoint = its run directory, teacher.arch/args = its student's). A teacher-assistant
chain (Mirzadeh et al. AAAI 2020) is the preset experiment=takd:

    python -m kdexp.train experiment=takd

Each stage is resumable and skipped when done, like any run, so rerunning a chain continues it.
Returns the last stage's val/acc. Born-again networks (kdexp.engine.born_again) are a chain
generated from `born_again.generations`, run by `run_stages`."""
import logging
import os
from typing import Dict, List

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from kdexp import config_dir
from kdexp.engine.lifecycle import run
from kdexp.errors import ConfigError
from kdexp.io import atomic_json_dump

log = logging.getLogger("kdexp")


def parse_chain(items) -> List[Dict]:
    """The validated stages of `chain`: unique identifier names, override strings, teachers that
    are earlier stages."""
    stages, names = [], []
    for i, item in enumerate(items):
        where = f"chain[{i}]"
        item = OmegaConf.to_container(item, resolve=False) if OmegaConf.is_config(item) else item
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ConfigError(f"{where}={item!r}: a stage is {{name: NAME, overrides: [...], teacher: EARLIER_STAGE}}")
        unknown = sorted(set(item) - {"name", "overrides", "teacher"})
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; a stage has name, overrides, teacher")
        name, overrides, teacher = item["name"], item.get("overrides") or [], item.get("teacher")
        if not name.isidentifier() or name in names:
            raise ConfigError(f"{where}.name={name!r} must be a unique identifier")
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise ConfigError(f"{where}.overrides must be a list of overrides such as [method=kd, student=cnn]")
        if teacher is not None and teacher not in names:
            raise ConfigError(f"{where}.teacher={teacher!r} must name an earlier stage (one of {names or 'none'})")
        stages.append({"name": name, "overrides": list(overrides), "teacher": teacher})
        names.append(name)
    return stages


def _compose(overrides: List[str]):
    if GlobalHydra.instance().is_initialized():  # inside the running app (python -m kdexp.train)
        return compose("config", overrides=overrides)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):  # run() called directly
        return compose("config", overrides=overrides)


def stage_config(stage: Dict, overrides: List[str], dirs: Dict[str, str], students: Dict[str, Dict]):
    """The stage's run config: the command's overrides, the stage's, no chain (nor born-again
    generations, which expand into one); its teacher an earlier stage's run when it names one."""
    keep = [o for o in overrides if not o.split("=", 1)[0].lstrip("+~").startswith(("hydra.", "chain"))]
    cfg = _compose(keep + stage["overrides"] + ["chain=[]", "born_again.generations=null"])
    if stage["teacher"] is not None:
        student = students[stage["teacher"]]
        with open_dict(cfg):
            cfg.teacher.checkpoint = dirs[stage["teacher"]]
            cfg.teacher.arch = student["arch"]
            cfg.teacher.args = student["args"]
    return cfg


def run_chain(cfg, run_dir: str, overrides=()) -> float:
    """Run the stages of cfg.chain in order under `run_dir`; -> the last stage's final val/acc. Each
    stage is composed anew from `overrides` (those that composed `cfg`, as Hydra's main passes them)."""
    results = run_stages(parse_chain(cfg.chain), run_dir, overrides)
    return results[-1]["val/acc"] if results else float("nan")


def run_stages(stages: List[Dict], run_dir: str, overrides=()) -> List[Dict]:
    """Run parsed `stages` in order, stage k in <run_dir>/<k>_<name>; -> one result per stage
    {name, run_dir, method, student, seed, teacher, val/acc}, also written to <run_dir>/chain.json
    after each stage."""
    dirs: Dict[str, str] = {}
    students: Dict[str, Dict] = {}
    results = []
    for k, stage in enumerate(stages):
        stage_cfg = stage_config(stage, list(overrides), dirs, students)
        stage_dir = os.path.join(run_dir, f"{k}_{stage['name']}")
        teacher = f", teacher: stage {stage['teacher']}" if stage["teacher"] else ""
        log.info("chain stage %d/%d %s: method=%s, student %s%s -> %s", k + 1, len(stages), stage["name"],
                 stage_cfg.method.name, stage_cfg.student.arch, teacher, stage_dir)
        value = run(stage_cfg, stage_dir, [*overrides, *stage["overrides"]])
        dirs[stage["name"]] = stage_dir
        students[stage["name"]] = OmegaConf.to_container(stage_cfg.student, resolve=True)
        results.append({"name": stage["name"], "run_dir": stage_dir, "method": stage_cfg.method.name,
                        "student": students[stage["name"]]["arch"], "seed": stage_cfg.seed,
                        "teacher": stage["teacher"], "val/acc": value})
        atomic_json_dump({"stages": results}, os.path.join(run_dir, "chain.json"))
    return results
