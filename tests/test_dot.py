"""DOT (optim.name=dot, kdexp.engine.dot): the update against a hand-written two-momentum SGD, its
reduction to torch SGD at delta=0, the fit loop's two backward passes (AMP scaling, DDP), resume,
the config checks and where a run with it goes (not fused; teachers and first stages refuse it)."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from kdexp.engine.dot import DOT, split_terms
from kdexp.engine.hardware import Accelerator, DistContext
from kdexp.engine.optim import build_optimizer
from kdexp.engine.plan import plan, student_teacher_config
from kdexp.engine.record import Recorder
from kdexp.errors import ConfigError
from kdexp.methods import OptimConfig
from kdexp.train import run
from tests.conftest import torchrun_kdexp

FAST = ["epochs=2", "teacher.epochs=2", "progress=false", "hardware=cpu"]


class Tiny(nn.Module):
    """A shared body, a parameter only the task loss reads and one only the distillation loss reads."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 4)
        self.task_only = nn.Parameter(torch.randn(4))
        self.distill_only = nn.Parameter(torch.randn(4))

    def terms(self, x, y, t):
        z = self.body(x)
        ce = nn.functional.cross_entropy(z + self.task_only, y)
        kd = ((torch.log_softmax(z, -1) - torch.log_softmax(t, -1)) ** 2).sum(-1).mean()
        kd = kd + (self.distill_only * z).mean()
        return {"ce": ce, "kd": kd}


def batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (8,), generator=g),
             torch.randn(8, 4, generator=g, dtype=torch.float64)) for _ in range(n)]


def tiny():
    torch.manual_seed(0)
    return Tiny().double()


def reference_dot(model, data, lr, beta, delta, wd):
    """The authors' algorithm written out: per parameter a task buffer (beta - delta) and a distillation
    buffer (beta + delta), beta for a buffer whose parameter has only that one gradient, weight decay
    on the task gradient (on the distillation gradient of a parameter without a task gradient), each
    buffer started by its first gradient, and two separate in-place updates."""
    params = list(model.parameters())
    task_buf, kd_buf = {}, {}
    for x, y, t in data:
        terms = model.terms(x, y, t)
        g_task = torch.autograd.grad(terms["ce"], params, retain_graph=True, allow_unused=True)
        g_kd = torch.autograd.grad(terms["kd"], params, allow_unused=True)
        with torch.no_grad():
            for i, p in enumerate(params):
                gt, gk = g_task[i], g_kd[i]
                if gt is not None:
                    d = gt + wd * p
                    m = beta - delta if gk is not None else beta
                    task_buf[i] = d.clone() if i not in task_buf else m * task_buf[i] + d
                    p -= lr * task_buf[i]
            for i, p in enumerate(params):
                gt, gk = g_task[i], g_kd[i]
                if gk is not None:
                    d = gk if gt is not None else gk + wd * p
                    m = beta + delta if gt is not None else beta
                    kd_buf[i] = d.clone() if i not in kd_buf else m * kd_buf[i] + d
                    p -= lr * kd_buf[i]
    return task_buf, kd_buf


def dot_steps(model, data, opt):
    for x, y, t in data:
        opt.zero_grad(set_to_none=True)
        opt.backward(model.terms(x, y, t))
        opt.step()


@pytest.mark.parametrize("beta,delta,wd", [(0.9, 0.075, 5e-4), (0.5, 0.3, 0.0), (0.9, 0.0, 1e-2)])
def test_dot_matches_a_hand_written_two_momentum_sgd(beta, delta, wd):
    ref, model = tiny(), tiny()
    data = batches(5)
    task_buf, kd_buf = reference_dot(ref, data, 0.1, beta, delta, wd)
    opt = DOT(model.parameters(), lr=0.1, momentum=beta, delta=delta, weight_decay=wd)
    dot_steps(model, data, opt)
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    params = list(model.parameters())
    for i, p in enumerate(params):  # the buffers are where the state_dict keeps them
        state = opt.state[p]
        assert ("momentum_buffer" in state) == (i in task_buf)
        assert ("distillation_momentum_buffer" in state) == (i in kd_buf)
        if i in task_buf:
            torch.testing.assert_close(state["momentum_buffer"], task_buf[i], rtol=1e-12, atol=1e-12)
        if i in kd_buf:
            torch.testing.assert_close(state["distillation_momentum_buffer"], kd_buf[i], rtol=1e-12, atol=1e-12)
    assert "momentum_buffer" not in opt.state[model.distill_only]
    assert "distillation_momentum_buffer" not in opt.state[model.task_only]


def test_dot_differs_from_sgd_when_delta_is_set():
    a, b = tiny(), tiny()
    data = batches(4)
    dot_steps(a, data, DOT(a.parameters(), lr=0.1, momentum=0.9, delta=0.075))
    dot_steps(b, data, DOT(b.parameters(), lr=0.1, momentum=0.9, delta=0.0))
    assert (a.body.weight - b.body.weight).abs().max() > 1e-4


@pytest.mark.parametrize("wd", [0.0, 5e-4])
def test_dot_with_delta_zero_is_torch_sgd(wd):
    a, b = tiny(), tiny()
    data = batches(5)
    dot_steps(a, data, DOT(a.parameters(), lr=0.1, momentum=0.9, delta=0.0, weight_decay=wd))
    sgd = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=wd)
    for x, y, t in data:
        sgd.zero_grad(set_to_none=True)
        sum(b.terms(x, y, t).values()).backward()
        sgd.step()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, msg=name)


def test_split_terms_and_a_single_kind_of_gradient_is_sgd():
    """ce is the task; every other term (and only those with a gradient) is distillation. A fit with
    one kind (a teacher on CE) is SGD with momentum beta."""
    w = torch.ones(3, requires_grad=True)
    task, distill = split_terms({"ce": w.sum(), "kd": 2 * w.sum(), "nckd": 3 * w.sum(), "const": torch.tensor(1.0)})
    assert task.item() == 3 and distill.item() == 15
    assert split_terms({"kd": w.sum()})[0] is None and split_terms({"ce": w.sum()})[1] is None
    for kind in ("ce", "kd"):
        a, b = tiny(), tiny()
        opt = DOT(a.parameters(), lr=0.1, momentum=0.9, delta=0.075, weight_decay=1e-3)
        sgd = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        for x, y, t in batches(4):
            opt.zero_grad()
            opt.backward({kind: a.terms(x, y, t)[kind]})
            opt.step()
            sgd.zero_grad()
            b.terms(x, y, t)[kind].backward()
            sgd.step()
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_state_dict_round_trip_keeps_both_buffers():
    a, b = tiny(), tiny()
    data = batches(6)
    opt = DOT(a.parameters(), lr=0.1, momentum=0.9, delta=0.075)
    dot_steps(a, data[:3], opt)
    b.load_state_dict(a.state_dict())
    resumed = DOT(b.parameters(), lr=0.1, momentum=0.9, delta=0.075)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a checkpoint file (no shared buffers)
    dot_steps(a, data[3:], opt)
    dot_steps(b, data[3:], resumed)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_amp_grad_scaler_unscales_both_gradients_and_skips_non_finite_steps():
    """The distillation slots are param groups, so GradScaler unscales them and sees their inf."""
    a, b = tiny(), tiny()
    data = batches(3)
    dot_steps(a, data, DOT(a.parameters(), lr=0.1, momentum=0.9, delta=0.075))
    opt = DOT(b.parameters(), lr=0.1, momentum=0.9, delta=0.075)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for x, y, t in data:
        opt.zero_grad(set_to_none=True)
        opt.backward(b.terms(x, y, t), scaler.scale)
        scaler.step(opt)
        scaler.update()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    before = [p.clone() for p in b.parameters()]
    x, y, t = data[0]
    terms = b.terms(x, y, t)
    terms["kd"] = terms["kd"] * float("inf")  # only the distillation gradient is non-finite
    opt.zero_grad(set_to_none=True)
    opt.backward(terms, scaler.scale)
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(before, b.parameters()))
    assert scaler.get_scale() == 2.0 ** 11


def test_ddp_reduction_keeps_a_gradient_no_rank_has_absent():
    """hardware=ddp: both halves of DOT's groups are all-reduced; a parameter without a task gradient
    stays without one (so it keeps the one-gradient momentum, as in one process)."""
    model = tiny()
    opt = DOT(model.parameters(), lr=0.1, momentum=0.9, delta=0.075)
    x, y, t = batches(1)[0]
    opt.backward(model.terms(x, y, t))
    grads = [p.grad for p in model.parameters()]
    slots = [s.grad for s in opt.param_groups[1]["params"]]
    accel = Accelerator()
    accel.dist = DistContext(rank=0, world=2)
    accel.dist.all_reduce_ = lambda v: v.mul_(2)  # two ranks with the same shard
    accel.reduce_gradients(opt, 0.5)
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None) == (g is None) and (g is None or torch.allclose(p.grad, g))
    for s, g in zip(opt.param_groups[1]["params"], slots):
        assert (s.grad is None) == (g is None) and (g is None or torch.allclose(s.grad, g))
    slot_of = dict(zip(model.parameters(), opt.param_groups[1]["params"]))
    assert model.distill_only.grad is None and slot_of[model.task_only].grad is None
    assert slot_of[model.distill_only].grad is not None and model.task_only.grad is not None


def test_build_optimizer_and_the_lr_schedule_reach_dot():
    model = tiny()
    cfg = OptimConfig(name="dot", lr=0.2, momentum=0.8, delta=0.1, weight_decay=1e-4)
    opt = build_optimizer([{"params": [model.body.weight]}, {"params": [model.body.bias], "lr": 0.05}], cfg)
    assert isinstance(opt, DOT) and len(opt.param_groups) == 4 and opt.n_groups == 2
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.05, 0.2, 0.05]
    assert (opt.param_groups[0]["momentum"], opt.param_groups[0]["delta"]) == (0.8, 0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.025, 0.1, 0.025]


@pytest.mark.parametrize("override,key", [
    ("optim.delta=-0.1", "optim.delta"), ("optim.delta=0.95", "optim.delta"),
    ("optim.delta=0.2", "optim.momentum"), ("optim.nesterov=true", "optim.nesterov")])
def test_out_of_range_dot_keys_name_the_key(compose_cfg, override, key):
    with pytest.raises(ConfigError, match=rf"{key}=.* is out of range"):
        plan(compose_cfg("optim.name=dot", "optim.momentum=0.9", override))


def test_unknown_optimizer_lists_dot(compose_cfg):
    with pytest.raises(ConfigError, match="one of adam, adamw, sgd, dot"):
        plan(compose_cfg("optim.name=lion"))


def test_teacher_and_first_stage_recipes_refuse_dot(compose_cfg):
    with pytest.raises(ConfigError, match="teacher.optim.name=dot .* a teacher trains on labels alone; use "
                                          "teacher.optim.name=sgd"):
        plan(compose_cfg("teacher.optim.name=dot"))
    with pytest.raises(ConfigError, match="method.init_optim.name=dot .* first stage trains one loss"):
        plan(compose_cfg("method=fitnet", "student=cnn", "teacher=cnn", "method.init_optim.name=dot"))


def test_a_dot_run_is_not_fused_and_its_self_teacher_is_the_sgd_ones(compose_cfg):
    p = plan(compose_cfg("method=kd", "student=mlp", "optim.name=dot"))
    assert "optim.name=dot" in p.fuse_reason
    assert plan(compose_cfg("method=kd", "student=mlp", "optim.name=sgd")).fuse_reason is None
    dot_teacher = student_teacher_config(compose_cfg("method=tfkd_self", "optim.name=dot", "optim.delta=0.05"))
    sgd_teacher = student_teacher_config(compose_cfg("method=tfkd_self", "optim.name=sgd"))
    assert dot_teacher.optim.name == "sgd"
    from kdexp.engine.teacher import teacher_key
    from kdexp.data import load_dataset
    cfg = compose_cfg("method=tfkd_self")
    data = load_dataset(cfg.dataset)
    assert teacher_key(dot_teacher, cfg.dataset, data) == teacher_key(sgd_teacher, cfg.dataset, data)


def read(path):
    with open(path) as f:
        return json.load(f)


def test_fit_with_delta_zero_equals_sgd_end_to_end(compose_cfg, tmp_path):
    """The fit loop's two backward passes and DOT's step at delta=0 give the sgd run's metrics."""
    common = [*FAST, "method=kd", "optim.lr=0.05", "optim.momentum=0.9", "optim.weight_decay=5e-4"]
    run(compose_cfg(*common, "optim.name=sgd"), str(tmp_path / "sgd"))
    run(compose_cfg(*common, "optim.name=dot", "optim.delta=0"), str(tmp_path / "dot0"))
    run(compose_cfg(*common, "optim.name=dot"), str(tmp_path / "dot"))
    a, b, c = (read(tmp_path / d / "metrics.json") for d in ("sgd", "dot0", "dot"))
    for ha, hb in zip(a["history"], b["history"], strict=True):
        for k in ("train/loss", "train/loss_kd", "train/loss_ce", "val/loss", "val/acc"):
            assert hb[k] == pytest.approx(ha[k], rel=1e-5, abs=1e-6), k
    assert c["history"][-1]["train/loss"] != pytest.approx(a["history"][-1]["train/loss"], rel=1e-4)
    for h in c["history"]:  # the logged total is still the sum of the terms
        assert h["train/loss"] == pytest.approx(h["train/loss_ce"] + h["train/loss_kd"], rel=1e-6)


class Crash(Exception):
    pass


def test_a_resumed_dot_run_equals_an_uninterrupted_one(compose_cfg, tmp_path, monkeypatch):
    cfg = compose_cfg(*FAST, "epochs=3", "method=ctkd", "optim.name=dot", "optim.lr=0.05", "optim.weight_decay=5e-4")
    record_epoch = Recorder.epoch

    def crash_after_the_first_epoch(self, epoch, metrics, state=None, **kw):
        record_epoch(self, epoch, metrics, state, **kw)
        if epoch == 0:
            raise Crash()

    with monkeypatch.context() as m:
        m.setattr(Recorder, "epoch", crash_after_the_first_epoch)
        with pytest.raises(Crash):
            run(cfg, str(tmp_path / "crashed"))
    state = torch.load(tmp_path / "crashed" / "checkpoints" / "last.pt", weights_only=False)["optimizer"]["state"]
    kinds = [set(s) for s in state.values()]
    assert {"momentum_buffer", "distillation_momentum_buffer"} in kinds  # the student's weights: both
    assert {"distillation_momentum_buffer"} in kinds  # ctkd's temperature: distillation only
    resumed = run(cfg, str(tmp_path / "crashed"))
    whole = run(cfg, str(tmp_path / "whole"))
    a, b = read(tmp_path / "crashed" / "metrics.json"), read(tmp_path / "whole" / "metrics.json")
    assert resumed == whole and a["status"] == b["status"] == "done"
    for ha, hb in zip(a["history"], b["history"], strict=True):
        for k, v in hb.items():
            if not k.startswith("time/"):
                assert ha[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k


@pytest.mark.slow
def test_the_command_line_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "kdexp.train", "method=kd", "optim.name=dot", "epochs=2", "progress=false",
           f"hydra.run.dir={tmp_path / 'dot1'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    m = read(tmp_path / "dot1" / "metrics.json")
    assert m["status"] == "done" and len(m["history"]) == 2 and not m["plan"]["fusable"]


@pytest.mark.slow
def test_ddp_on_two_gloo_processes_matches_one_process(compose_cfg, tmp_path):
    """torchrun --nproc_per_node=2 hardware=ddp with optim.name=dot and ctkd (its temperature has a
    distillation gradient only) equals one process on the same batches."""
    common = ["epochs=2", "teacher.epochs=2", "progress=false", f"paths.cache_dir={tmp_path / 'cache'}",
              "method=ctkd", "optim.name=dot", "optim.lr=0.05", "optim.weight_decay=5e-4"]
    single = run(compose_cfg(*common, "hardware=cpu"), str(tmp_path / "one"))
    torchrun_kdexp(tmp_path, *common, f"hydra.run.dir={tmp_path / 'ddp'}")
    a, b = read(tmp_path / "one" / "metrics.json"), read(tmp_path / "ddp" / "metrics.json")
    assert b["final"]["val/acc"] == pytest.approx(single, abs=1e-9)
    for k, v in a["final"].items():
        assert b["final"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_the_readme_cifar_command_plans(compose_cfg):
    cfg = compose_cfg("experiment=cifar100_resnet32x4_resnet8x4", "method=kd", "optim.name=dot")
    p = plan(cfg)
    assert (cfg.optim.name, cfg.optim.momentum, cfg.optim.delta, cfg.teacher.optim.name) == ("dot", 0.9, 0.075, "sgd")
    assert "optim.name=dot" in p.fuse_reason
