"""Chains (kdexp.engine.chain): stages in one command, each a normal run directory, a stage's
teacher an earlier stage's run; experiment=takd is teacher -> assistant -> student."""
import json

import pytest
from omegaconf import OmegaConf

from kdexp.engine.chain import parse_chain
from kdexp.errors import ConfigError
from kdexp.train import run
from tests.conftest import composer


def read(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("chain,match", [
    ([{"overrides": []}], "a stage is"),
    ([{"name": "a"}, {"name": "a"}], "unique identifier"),
    ([{"name": "a", "teacher": "b"}], "earlier stage"),
    ([{"name": "a", "overrides": "method=kd"}], "list of overrides"),
    ([{"name": "a", "epochs": 3}], "unknown key"),
])
def test_bad_chains_are_one_line(chain, match):
    with pytest.raises(ConfigError, match=match):
        parse_chain(OmegaConf.create(chain))


def test_takd_runs_teacher_assistant_student_in_one_command(tmp_path):
    overrides = [f"paths.cache_dir={tmp_path / 'cache'}", "experiment=takd", "epochs=3", "progress=false",
                 "hardware=cpu"]
    cfg = composer(tmp_path)(*overrides[1:])
    assert [s["name"] for s in parse_chain(cfg.chain)] == ["teacher", "assistant", "student"]
    value = run(cfg, str(tmp_path / "takd"), overrides)
    stages = read(tmp_path / "takd" / "chain.json")["stages"]
    assert [s["name"] for s in stages] == ["teacher", "assistant", "student"] and value == stages[-1]["val/acc"]
    runs = [read(f"{s['run_dir']}/metrics.json") for s in stages]
    assert all(m["status"] == "done" and len(m["history"]) == 3 for m in runs)
    assert runs[0]["teacher"]["source"] == "none"  # the teacher stage is a ce run
    for k in (1, 2):  # each later stage distils from the previous stage's run directory
        assert runs[k]["teacher"]["source"] == "checkpoint" and runs[k]["teacher"]["key"].endswith(stages[k - 1]["name"])
        assert runs[k]["teacher"]["val/acc"] == runs[k - 1]["final"]["val/acc"]
    assert runs[1]["hparams"]["student.arch"] == "cnn" and runs[2]["hparams"]["student.arch"] == "mlp"
    assert run(cfg, str(tmp_path / "takd"), overrides) == value  # rerun: every stage is done and skipped
