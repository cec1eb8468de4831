"""Born-again networks (kdexp.engine.born_again): born_again.generations=K expands into the chain
gen0 (ce) -> gen1 -> ... -> genK, every generation the same architecture with its own seed, each a
student of the one before; then the ensemble (averaged softmax) of generations ensemble_from..K."""
import json
import os

import numpy as np
import pytest
import torch

from kdexp.data import load_dataset
from kdexp.engine.born_again import born_again_stages, generation_seed
from kdexp.engine.chain import stage_config
from kdexp.engine.plan import plan
from kdexp.errors import ConfigError
from kdexp.train import run
from tests.conftest import composer

TINY = ["dataset=digits", "student=mlp", "epochs=1", "progress=false", "hardware=cpu"]


def read(path):
    with open(path) as f:
        return json.load(f)


def overrides_for(tmp_path, *extra):
    return [f"paths.cache_dir={tmp_path / 'cache'}", "experiment=born_again", *TINY, *extra]


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("student", ["mlp", "cnn"])
def test_generations_expand_into_k_plus_one_stages_of_one_architecture(tmp_path, k, student):
    overrides = overrides_for(tmp_path, f"born_again.generations={k}", f"student={student}", "seed=7")
    cfg = composer(tmp_path)(*overrides[1:])
    stages = born_again_stages(cfg)
    assert [s["name"] for s in stages] == [f"gen{i}" for i in range(k + 1)]
    assert [s["teacher"] for s in stages] == [None] + [f"gen{i}" for i in range(k)]
    dirs, students, cfgs = {}, {}, []
    for i, stage in enumerate(stages):  # compose every stage as the chain does
        stage_cfg = stage_config(stage, overrides, dirs, students)
        dirs[stage["name"]] = str(tmp_path / f"{i}_{stage['name']}")
        students[stage["name"]] = {"arch": stage_cfg.student.arch, "args": dict(stage_cfg.student.args)}
        cfgs.append(stage_cfg)
    assert [c.method.name for c in cfgs] == ["ce"] + ["kd"] * k
    assert all(c.student == cfg.student and c.student.arch == student for c in cfgs)
    assert all(c.born_again.generations is None and not c.chain for c in cfgs)  # a stage is one run
    for i, c in enumerate(cfgs[1:], start=1):  # generation i distils from generation i-1's run, same arch
        assert c.teacher.checkpoint == dirs[f"gen{i - 1}"]
        assert c.teacher.arch == student and dict(c.teacher.args) == dict(cfg.student.args)
        assert (c.method.temperature, c.method.alpha, c.method.w_ce) == (1.0, 1.0, None)  # the paper's BAN loss
    seeds = [c.seed for c in cfgs]
    assert seeds[0] == 7 and len(set(seeds)) == k + 1  # every generation starts from another init
    assert seeds == [generation_seed(7, i) for i in range(k + 1)]
    assert plan(cfgs[-1]).teachers[0].arch == student and not plan(cfgs[0]).requires.uses_teacher


def test_generation_seeds_of_different_run_seeds_do_not_overlap():
    seeds = {s: [generation_seed(s, k) for k in range(1, 6)] for s in range(4)}
    flat = [x for v in seeds.values() for x in v] + list(seeds)
    assert len(set(flat)) == len(flat) and all(0 <= x < 2 ** 31 for x in flat)


@pytest.mark.parametrize("extra,match", [
    (["born_again.generations=0"], r"born_again.generations=0 must be an integer >= 1"),
    (["born_again.generations=-2"], r"born_again.generations=-2 must be an integer >= 1"),
    (["born_again.ensemble_from=4"], r"born_again.ensemble_from=4 must be an integer in \[0, 3\]"),
    (["born_again.ensemble_from=-1"], r"born_again.ensemble_from=-1 must be an integer in \[0, 3\]"),
    (["chain=[{name: a}]"], "born_again and chain are both set"),
])
def test_bad_born_again_configs_fail_in_one_line_before_any_training(tmp_path, extra, match):
    overrides = overrides_for(tmp_path, *extra)
    cfg = composer(tmp_path)(*overrides[1:])
    with pytest.raises(ConfigError, match=match):
        run(cfg, str(tmp_path / "ban"), overrides)
    assert not os.path.exists(tmp_path / "ban")


def test_a_generations_value_that_is_no_integer_is_rejected_naming_the_key(tmp_path):
    with pytest.raises(Exception, match="born_again.generations=two"):
        composer(tmp_path)("experiment=born_again", "born_again.generations=two")


def test_born_again_runs_are_never_fused(tmp_path):
    cfg = composer(tmp_path)("experiment=born_again", *TINY)
    assert "chain" in plan(cfg).fuse_reason


def independent_ensemble_accuracy(run_dirs, data) -> float:
    """Accuracy of the mean of the softmax outputs of the MLP-64 students in run_dirs, in float64
    numpy from their student.pt (flatten, Linear, sigmoid, Linear): no kdexp model, loader or
    ensemble code."""
    x = data.x_val.reshape(len(data.x_val), -1).numpy().astype(np.float64)
    probs = []
    for run_dir in run_dirs:
        w = {k: v.numpy().astype(np.float64) for k, v in
             torch.load(os.path.join(run_dir, "student.pt"), weights_only=True).items()}
        h = 1.0 / (1.0 + np.exp(-(x @ w["1.weight"].T + w["1.bias"])))
        z = h @ w["3.weight"].T + w["3.bias"]
        e = np.exp(z - z.max(axis=1, keepdims=True))
        probs.append(e / e.sum(axis=1, keepdims=True))
    return float((np.mean(probs, axis=0).argmax(axis=1) == data.y_val.numpy()).mean())


@pytest.mark.parametrize("k,ensemble_from", [(1, 0), (2, 1)])
def test_born_again_end_to_end_writes_the_ensemble_accuracy(tmp_path, k, ensemble_from):
    overrides = overrides_for(tmp_path, f"born_again.generations={k}", f"born_again.ensemble_from={ensemble_from}")
    cfg = composer(tmp_path)(*overrides[1:])
    value = run(cfg, str(tmp_path / "ban"), overrides)
    summary = read(tmp_path / "ban" / "chain.json")
    stages = summary["stages"]
    assert [s["name"] for s in stages] == [f"gen{i}" for i in range(k + 1)]
    assert value == stages[-1]["val/acc"]  # the command's result: the last generation's val/acc
    runs = [read(os.path.join(s["run_dir"], "metrics.json")) for s in stages]
    assert all(m["status"] == "done" and m["hparams"]["student.arch"] == "mlp" for m in runs)
    assert [s["val/acc"] for s in stages] == [m["final"]["val/acc"] for m in runs]
    assert runs[0]["teacher"]["source"] == "none" and runs[0]["hparams"]["method.name"] == "ce"
    for i in range(1, k + 1):
        assert runs[i]["teacher"]["source"] == "checkpoint" and runs[i]["teacher"]["key"] == stages[i - 1]["run_dir"]
        assert runs[i]["teacher"]["val/acc"] == runs[i - 1]["final"]["val/acc"]
        assert runs[i]["hparams"]["teacher.arch"] == "mlp" and runs[i]["hparams"]["method.name"] == "kd"
    assert len({s["seed"] for s in stages}) == k + 1
    weights = [torch.load(os.path.join(s["run_dir"], "student.pt"), weights_only=True) for s in stages]
    assert not torch.equal(weights[0]["1.weight"], weights[1]["1.weight"])
    members = stages[ensemble_from:]
    assert summary["ensemble/members"] == [s["name"] for s in members]
    data = load_dataset(cfg.dataset, None, cfg.paths.cache_dir)
    expected = independent_ensemble_accuracy([s["run_dir"] for s in members], data)
    assert summary["ensemble/val/acc"] == pytest.approx(expected, abs=1e-12)
    assert np.isfinite(summary["ensemble/val/loss"])


def test_rerun_skips_done_generations_and_more_generations_train_only_the_new_ones(tmp_path):
    overrides = overrides_for(tmp_path, "born_again.generations=1")
    cfg = composer(tmp_path)(*overrides[1:])
    value = run(cfg, str(tmp_path / "ban"), overrides)
    first = read(tmp_path / "ban" / "chain.json")
    stamps = [os.path.getmtime(os.path.join(s["run_dir"], "metrics.json")) for s in first["stages"]]
    assert run(cfg, str(tmp_path / "ban"), overrides) == value  # every generation done: skipped
    assert read(tmp_path / "ban" / "chain.json") == first
    assert [os.path.getmtime(os.path.join(s["run_dir"], "metrics.json")) for s in first["stages"]] == stamps
    more = overrides_for(tmp_path, "born_again.generations=2")
    run(composer(tmp_path)(*more[1:]), str(tmp_path / "ban"), more)
    summary = read(tmp_path / "ban" / "chain.json")
    assert summary["stages"][:2] == first["stages"] and summary["stages"][2]["name"] == "gen2"
    assert [os.path.getmtime(os.path.join(s["run_dir"], "metrics.json")) for s in first["stages"]] == stamps
    assert summary["ensemble/members"] == ["gen1", "gen2"]


def test_with_a_domain_shift_the_ensemble_is_measured_on_the_target_view(tmp_path):
    overrides = overrides_for(tmp_path, "born_again.generations=1", "born_again.ensemble_from=0", "domain=vflip")
    cfg = composer(tmp_path)(*overrides[1:])
    run(cfg, str(tmp_path / "ban"), overrides)
    summary = read(tmp_path / "ban" / "chain.json")
    assert summary["ensemble/val/acc"] == summary["ensemble/val/acc_target"]
    assert 0.0 <= summary["ensemble/val/acc_source"] <= 1.0
    runs = [read(os.path.join(s["run_dir"], "metrics.json")) for s in summary["stages"]]
    assert all(m["final"]["val/acc"] == m["final"]["val/acc_target"] for m in runs)


def test_a_run_directory_recorded_before_born_again_existed_is_still_skipped(tmp_path):
    """Every config now has a born_again node; a finished run whose config.yaml predates it is the same run."""
    from omegaconf import OmegaConf

    overrides = [f"paths.cache_dir={tmp_path / 'cache'}", "method=ce", *TINY]
    cfg = composer(tmp_path)(*overrides[1:])
    value = run(cfg, str(tmp_path / "one"), overrides)
    saved = OmegaConf.to_container(OmegaConf.load(tmp_path / "one" / "config.yaml"))
    assert saved.pop("born_again") == {"generations": None, "ensemble_from": 1}
    (tmp_path / "one" / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    stamp = os.path.getmtime(tmp_path / "one" / "metrics.json")
    assert run(cfg, str(tmp_path / "one"), overrides) == value
    assert os.path.getmtime(tmp_path / "one" / "metrics.json") == stamp
