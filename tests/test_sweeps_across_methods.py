"""A method key that only some methods of a sweep have applies to those (kdexp's default sweeper);
the others record it as not applied, and valid configs that are probably not meant warn."""
import json
import subprocess
import sys

import pytest

from hydra_plugins.kdexp_fused_sweeper.kdexp_sweeper import applicable_jobs

from kdexp.engine.plan import plan


def test_keys_apply_to_the_methods_that_have_them_and_same_runs_merge():
    jobs = [[f"method={m}", f"method.warmup_epochs={w}"] for m in ("dkd", "kd") for w in (5, 10)]
    assert applicable_jobs(jobs, "kd") == [
        ["method=dkd", "method.warmup_epochs=5"], ["method=dkd", "method.warmup_epochs=10"],
        ["method=kd", "not_applied=['method.warmup_epochs=5','method.warmup_epochs=10']"]]
    # the default method (no method= override) and a typo no method has (left for Hydra to report)
    assert applicable_jobs([["method.warmup_epochs=5"], ["method.warmup_epoch=5"]], "kd") == [
        ["not_applied=['method.warmup_epochs=5']"], ["method.warmup_epoch=5"]]
    assert applicable_jobs([["method=kd", "method.temperature=2"]], "kd") == [["method=kd", "method.temperature=2"]]


def test_probably_not_meant_configs_warn(compose_cfg):
    ce = plan(compose_cfg("method=ce", "method.temperature=8"), ["method=ce", "method.temperature=8"])
    assert any("ignores method.temperature" in w for w in ce.warnings)
    assert not plan(compose_cfg("method=kd", "method.temperature=8"), ["method.temperature=8"]).warnings
    dkd = plan(compose_cfg("method=dkd", "epochs=3"))
    assert any("warmup_epochs=20 is longer than the run (epochs=3)" in w for w in dkd.warnings)
    assert any("ensemble of one" in w for w in plan(compose_cfg("method=meal_v2", "teachers=[cnn]")).warnings)
    kd = plan(compose_cfg("method=kd", "not_applied=['method.warmup_epochs=5']"))
    assert any("method.warmup_epochs=5 does not apply to method=kd" in w for w in kd.warnings)


@pytest.mark.slow  # subprocesses end to end (~10 s): with the slow tests
def test_a_sweep_across_methods_runs_and_each_job_says_what_did_not_apply(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "kdexp.train", "-m", "method=dkd,kd", "method.warmup_epochs=1", "epochs=1",
           "teacher.epochs=1", "teacher.args.channels=[4,4,4]", "progress=false", f"hydra.sweep.dir={sweep}",
           f"paths.cache_dir={tmp_path / 'cache'}"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = {m["hparams"]["method.name"]: m for m in (json.loads(p.read_text()) for p in sweep.rglob("metrics.json"))}
    assert set(runs) == {"dkd", "kd"} and all(m["status"] == "done" for m in runs.values())
    assert runs["dkd"]["hparams"]["method.warmup_epochs"] == 1 and not runs["dkd"].get("warnings")
    assert any("method.warmup_epochs=1 does not apply to method=kd" in w for w in runs["kd"]["warnings"])
