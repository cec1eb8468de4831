"""Born-again networks (Furlanello et al., ICML 2018, arXiv 1805.04770) as a chain
(kdexp.engine.chain): `born_again.generations=K` expands into K+1 stages of the configured student

    gen0   method=ce, the run's seed                      (learns from labels)
    gen<k> the configured method (experiment=born_again: kd at T=1 on the teacher's outputs alone),
           teacher: gen<k-1>, its own seed, k = 1..K       (a born-again student)

each a normal run directory (<run dir>/<k>_gen<k>, resumable, skipped when done). Every generation
has the same architecture (no stage overrides the student) and a seed of its own (`generation_seed`),
so its initialization and batch order differ from its teacher's. After the last generation the
ensemble of generations `ensemble_from`..K (default 1..K, the paper's BAN ensemble of born-again
students) is evaluated: the average of their softmax outputs, the teacher-ensemble code's
`EnsembleModel`, on the validation split, written to chain.json (`ensemble/val/acc`, ...) beside each
generation's val/acc.

    python -m kdexp.train experiment=born_again [born_again.generations=5] [student=cnn]
    python -m kdexp.train born_again.generations=2 method=kd ...   # any config: its method as is

Returns the last generation's val/acc (a single network, comparable with every other run's
val/acc); the ensemble's is in chain.json and the log."""
import logging
import os
from typing import Dict, List

from kdexp.data import load_dataset
from kdexp.engine.chain import parse_chain, run_stages
from kdexp.engine.evaluate import evaluate, teacher_metrics
from kdexp.engine.hardware import select_device
from kdexp.engine.teacher import EnsembleModel, FrozenTeacher, read_state_dict
from kdexp.errors import ConfigError
from kdexp.io import atomic_json_dump
from kdexp.models import get_model
from kdexp.seeding import derive_seed

log = logging.getLogger("kdexp")


def generation_seed(seed: int, k: int) -> int:
    """Generation k's run seed: the run's own for generation 0 (which is then exactly a ce run of that
    seed), one derived from it per generation after (an independent stream: seeds 0 and 1 of a sweep
    share no generation's seed, as seed + k would). Below 2**31, so that every logger keeps it exact."""
    return seed if k == 0 else derive_seed(seed, f"born_again/generation{k}") % 2 ** 31


def born_again_stages(cfg) -> List[Dict]:
    """The chain stages of cfg.born_again (validated): gen0 (ce), then gen1..genK, each distilled from
    the one before with its own seed."""
    ba = cfg.born_again
    if cfg.get("chain"):
        raise ConfigError("born_again and chain are both set: born_again expands into its own chain; "
                          "set chain=[] or born_again=null")
    k_max = ba.generations
    if isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 1:
        raise ConfigError(f"born_again.generations={k_max!r} must be an integer >= 1 (generation 0 learns "
                          f"from labels, generations 1..K are its born-again students)")
    if isinstance(ba.ensemble_from, bool) or not isinstance(ba.ensemble_from, int) \
            or not 0 <= ba.ensemble_from <= k_max:
        raise ConfigError(f"born_again.ensemble_from={ba.ensemble_from!r} must be an integer in [0, {k_max}] "
                          f"(born_again.generations): the first generation in the ensemble")
    stages = [{"name": "gen0", "overrides": ["method=ce"]}]
    stages += [{"name": f"gen{k}", "teacher": f"gen{k - 1}", "overrides": [f"seed={generation_seed(cfg.seed, k)}"]}
               for k in range(1, k_max + 1)]
    return parse_chain(stages)


def ensemble_metrics(cfg, run_dirs: List[str]) -> Dict[str, float]:
    """Accuracy and CE of the average of the softmax outputs of the students saved in `run_dirs` (each
    a run directory of cfg.student: its student.pt) on the validation split, the view val/acc is
    measured on (the target view with a domain shift, then also ensemble/val/acc_source and _target)."""
    device = select_device(cfg.hardware)
    data = load_dataset(cfg.dataset, cfg.get("domain"), cfg.paths.cache_dir).to(device)
    models = []
    for run_dir in run_dirs:
        model = get_model(cfg.student.arch, data.in_shape, data.num_classes, **cfg.student.args)
        model.load_state_dict(read_state_dict(run_dir, model, "born-again generation"))
        models.append(model)
    ensemble = FrozenTeacher(EnsembleModel(models).to(device))
    x_val = data.x_val if data.x_val_target is None else data.x_val_target
    val = evaluate(ensemble.model, x_val, data.y_val, cfg.eval_batch_size)
    shifted = teacher_metrics(ensemble, data, cfg.eval_batch_size)  # {} without a domain shift
    return {"ensemble/val/acc": val["acc"], "ensemble/val/loss": val["loss"],
            **{f"ensemble/{k}": v for k, v in shifted.items()}}


def run_born_again(cfg, run_dir: str, overrides=()) -> float:
    """Generations 0..K under `run_dir` (kdexp.engine.chain.run_stages), then their ensemble; chain.json
    holds the generations (each with its val/acc and seed), `ensemble/members` and the ensemble's
    metrics. -> the last generation's final val/acc."""
    results = run_stages(born_again_stages(cfg), run_dir, overrides)
    members = results[cfg.born_again.ensemble_from:]
    metrics = ensemble_metrics(cfg, [r["run_dir"] for r in members])
    atomic_json_dump({"stages": results, "ensemble/members": [r["name"] for r in members], **metrics},
                     os.path.join(run_dir, "chain.json"))
    log.info("born-again: generations %s val/acc %s; ensemble of %s: val/acc %.4f",
             "..".join((results[0]["name"], results[-1]["name"])),
             " ".join(f"{r['val/acc']:.4f}" for r in results), "+".join(r["name"] for r in members),
             metrics["ensemble/val/acc"])
    return results[-1]["val/acc"]
