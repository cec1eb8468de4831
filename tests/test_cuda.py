"""The CUDA paths, on a GPU: skipped where torch sees none (CI and the machines kdexp is built on
have none; `scripts/gpu_check.sh` runs them when a GPU is lent). Each holds a GPU run to what the
CPU tests pin: the same run on the CPU, cached = online, fused = separate, a resumed run = the
uninterrupted one; AMP (bf16, fp16 with its GradScaler) and channels_last train a conv student to
about the float32 accuracy. The KD node's closed form on a GPU is a device of
tests/test_teacher_cache.py's test (marked cuda too)."""
import math

import pytest
import torch

from kdexp.engine import record
from kdexp.errors import RunInterrupted
from kdexp.train import run
from tests.test_fused import fused_and_separate_agree, read

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (torch sees none)")]

COMMON = ["epochs=3", "teacher.epochs=2", "progress=false"]


def test_a_gpu_run_matches_the_same_run_on_the_cpu(compose_cfg, tmp_path):
    # the teacher trained by the CPU run serves the GPU run (its key names the recipe and the data,
    # not the device); the student's steps differ only in float rounding
    run(compose_cfg(*COMMON, "hardware=cpu"), str(tmp_path / "cpu"))
    run(compose_cfg(*COMMON, "hardware=cuda"), str(tmp_path / "gpu"))
    a, b = read(tmp_path / "cpu" / "metrics.json"), read(tmp_path / "gpu" / "metrics.json")
    assert b["status"] == "done" and b["hardware"]["device"] == "cuda:0"
    assert b["teacher"]["source"] == "cache" and b["teacher"]["key"] == a["teacher"]["key"]
    assert b["teacher_cache"]["hits"] > 0 and b["teacher_cache"]["online_calls"] == 0
    for ha, hb in zip(a["history"], b["history"]):
        assert hb["val/acc"] == pytest.approx(ha["val/acc"], abs=0.02)
        assert hb["train/loss"] == pytest.approx(ha["train/loss"], rel=1e-2)


def test_cached_and_online_runs_agree_on_the_gpu(compose_cfg, tmp_path):
    cached = run(compose_cfg(*COMMON, "hardware=cuda"), str(tmp_path / "cached"))
    online = run(compose_cfg(*COMMON, "hardware=cuda", "teacher.cache=false"), str(tmp_path / "online"))
    a, b = read(tmp_path / "cached" / "metrics.json"), read(tmp_path / "online" / "metrics.json")
    assert a["teacher_cache"]["enabled"] and not b["teacher_cache"]["enabled"]
    assert cached == pytest.approx(online, abs=0.01)
    for k, v in a["final"].items():  # the teacher's kernels differ with the batch they run in (chunks vs batches)
        assert b["final"][k] == pytest.approx(v, rel=1e-4, abs=1e-5), k


def test_fused_students_match_separate_runs_on_the_gpu(compose_cfg, tmp_path):
    gpu = ["epochs=2", "teacher.epochs=2", "progress=false", "hardware=cuda"]
    mlp = [["method=kd", f"method.temperature={t}", f"method.alpha={a}"] for t, a in ((2, 0.5), (8, 0.9))]
    fused_and_separate_agree(compose_cfg, tmp_path / "mlp", mlp, gpu)
    # conv students under vmap: each layer of the group is one (grouped) convolution
    conv = [["method=kd", "student=cnn", "student.args.channels=[4,8]", f"method.temperature={t}"] for t in (2, 8)]
    fused_and_separate_agree(compose_cfg, tmp_path / "conv", conv, gpu)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_and_channels_last_train_a_conv_student(compose_cfg, tmp_path, amp):
    conv = [*COMMON, "student=cnn", "hardware=cuda"]
    fp32 = run(compose_cfg(*conv), str(tmp_path / "fp32"))
    mixed = run(compose_cfg(*conv, f"hardware.amp={amp}", "hardware.channels_last=true"), str(tmp_path / amp))
    m = read(tmp_path / amp / "metrics.json")
    assert m["status"] == "done" and all(math.isfinite(h["train/loss"]) for h in m["history"])
    assert mixed == pytest.approx(fp32, abs=0.05)
    state = torch.load(tmp_path / amp / "checkpoints" / "last.pt", weights_only=False)
    if amp == "fp16":  # the GradScaler's scale travels with the checkpoint
        assert state["accel"]["scaler"]["scale"] > 0
    else:
        assert state["accel"] == {}


def test_an_interrupted_gpu_run_resumes_to_the_uninterrupted_metrics(compose_cfg, tmp_path, monkeypatch):
    # the mlp student: cuBLAS products repeat bit for bit, where cuDNN may pick a convolution
    # algorithm that does not; fp16, so that the GradScaler's state resumes too
    cfg = compose_cfg(*COMMON, "hardware=cuda", "hardware.amp=fp16")
    run(cfg, str(tmp_path / "whole"))
    saved = record.Recorder.epoch

    def stop_after_the_second(self, epoch, *args, **kwargs):
        out = saved(self, epoch, *args, **kwargs)
        if epoch == 1:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(record.Recorder, "epoch", stop_after_the_second)
    with pytest.raises(RunInterrupted):
        run(cfg, str(tmp_path / "cut"))
    monkeypatch.setattr(record.Recorder, "epoch", saved)
    run(cfg, str(tmp_path / "cut"))
    a, b = read(tmp_path / "whole" / "metrics.json"), read(tmp_path / "cut" / "metrics.json")
    assert b["status"] == "done" and len(b["history"]) == len(a["history"]) == 3
    for ha, hb in zip(a["history"], b["history"]):
        for k, v in ha.items():
            if not k.startswith("time/"):
                assert hb[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k
