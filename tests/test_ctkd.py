"""CTKD (method=ctkd): the curriculum against the authors' CosineDecay, the learned temperature's
reversed gradient, the losses it softens against independent float64 formulas, the method's keys,
and 2 steps on each CIFAR-100 pair."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from kdexp import config_dir
from kdexp.engine.plan import plan
from kdexp.errors import ConfigError
from kdexp.losses import ctkd_lambda, curriculum_temperature, dkd_terms, kd_loss
from kdexp.methods import METHODS, UNLABELED, Batch, get_method, list_methods, requirements
from kdexp.train import run
from tests.conftest import group_options
from tests.test_zoo import PRESETS, preset_cfg  # noqa: F401  (the fixture)


def authors_cosine_decay(i, max_value, min_value, num_loops):
    """zhengli97/CTKD train_student.py CosineDecay.get_value, as written there."""
    if i < 0:
        i = 0
    if i >= num_loops:
        i = num_loops
    value = (math.cos(i * math.pi / num_loops) + 1.0) * 0.5
    return value * (max_value - min_value) + min_value


@pytest.mark.parametrize("epoch", [0, 1, 2, 3, 5, 7, 9, 10, 11, 150, 240])
def test_schedule_is_the_authors_cosine_decay_negated(epoch):
    # CIFAR: decay_max 0, decay_min -1, decay_loops 10; their reversal layer multiplies by that (negative)
    # value, gradient_reversal by -lambda
    assert ctkd_lambda(epoch) == pytest.approx(-authors_cosine_decay(epoch, 0.0, -1.0, 10), abs=1e-15)
    # ImageNet (5 loops) and a general range: decay_max = -lambda_min, decay_min = -lambda_max
    assert ctkd_lambda(epoch, 0.0, 1.0, 5) == pytest.approx(-authors_cosine_decay(epoch, 0.0, -1.0, 5), abs=1e-15)
    assert ctkd_lambda(epoch, 0.2, 0.7, 8) == pytest.approx(-authors_cosine_decay(epoch, -0.2, -0.7, 8), abs=1e-15)


def test_schedule_end_points():
    assert ctkd_lambda(0) == 0.0 and ctkd_lambda(1) == pytest.approx(0.0244717, abs=1e-6)
    assert ctkd_lambda(5) == pytest.approx(0.5) and ctkd_lambda(10) == ctkd_lambda(500) == 1.0
    assert ctkd_lambda(1, 0.0, 0.6, 0) == 0.6  # no ramp


class Teacher:
    def __init__(self, logits):
        self._logits = logits

    def logits(self, batch):
        return self._logits[batch.idx]


def ctkd(base="kd", dtype=torch.float64, classes=5, features=6, n=8, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = OmegaConf.merge(OmegaConf.structured(METHODS.meta("ctkd")["config"]), {"base": base, **kw})
    student = nn.Linear(features, classes).to(dtype)
    teacher = Teacher(torch.randn(n, classes, dtype=dtype) * 3)
    method = get_method("ctkd")(cfg, student, teacher).to(dtype)
    batch = Batch(torch.randn(n, features, dtype=dtype), torch.randint(0, classes, (n,)), torch.arange(n))
    return method, batch


def distillation_loss(method, s, t, y, temperature):
    """The method's distillation terms, recomputed from kdexp.losses with a plain (unreversed) T."""
    c = method.cfg
    if c.base == "kd":
        return c.alpha * kd_loss(s, t, temperature)
    tckd, nckd = dkd_terms(s, t, y, temperature)
    return c.alpha * (c.dkd_alpha * tckd + c.dkd_beta * nckd)


@pytest.mark.parametrize("base", ["kd", "dkd"])
@pytest.mark.parametrize("epoch", [0, 4, 30])
def test_the_temperature_ascends_what_the_student_descends(base, epoch):
    """theta's gradient is -lambda(epoch) x the gradient of the same loss without the reversal;
    the student's gradients are those of the unreversed loss."""
    method, batch = ctkd(base)
    method.epoch = epoch
    lam = ctkd_lambda(epoch + 1)
    terms = method.losses(batch)
    assert set(terms) == ({"ce", "kd"} if base == "kd" else {"ce", "tckd", "nckd"})
    sum(terms.values()).backward()
    theta = method.temperature.theta.detach().clone().requires_grad_()
    temp = 1.0 + 20.0 * torch.sigmoid(theta)
    s = method.student(batch.x)
    plain = distillation_loss(method, s, method.teacher.logits(batch), batch.y, temp)
    d_theta, = torch.autograd.grad(plain, theta, retain_graph=True)
    assert method.temperature.theta.grad.item() == pytest.approx(-lam * d_theta.item(), rel=1e-12, abs=1e-15)
    assert d_theta.abs() > 1e-6  # the test sees a real gradient
    total = plain + method.w_ce * nn.functional.cross_entropy(s, batch.y)
    for p, g in zip(method.student.parameters(), torch.autograd.grad(total, list(method.student.parameters()))):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


def test_a_descent_step_raises_the_distillation_loss():
    method, batch = ctkd("kd", lambda_epochs=0)  # lambda = 1
    terms = method.losses(batch)
    terms["kd"].backward()
    with torch.no_grad():
        before = terms["kd"].item()
        method.temperature.theta -= 0.1 * method.temperature.theta.grad
        assert method.losses(batch)["kd"].item() > before


def kl_reference(s, t, temp):
    """T^2 * mean_b sum_c p_t log(p_t / p_s), p = softmax(z / T), written with numpy in float64 loops."""
    s, t = np.asarray(s, dtype=np.float64) / temp, np.asarray(t, dtype=np.float64) / temp
    out = 0.0
    for zs, zt in zip(s, t):
        ls = zs - zs.max() - math.log(np.exp(zs - zs.max()).sum())
        lt = zt - zt.max() - math.log(np.exp(zt - zt.max()).sum())
        out += sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))
    return temp ** 2 * out / len(s)


@pytest.mark.parametrize("shape", [(1, 2), (4, 10), (16, 100)])
@pytest.mark.parametrize("theta", [-3.0, 0.0, 1.0, 4.0])
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_curriculum_temperature_and_the_kd_it_softens_float64(shape, theta, scale):
    g = torch.Generator().manual_seed(shape[1])
    s = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * scale
    t = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * scale
    th = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
    temp = curriculum_temperature(th, 0.3)
    sig = 1.0 / (1.0 + math.exp(-theta))
    assert temp.item() == pytest.approx(1.0 + 20.0 * sig, rel=1e-14) and 1.0 < temp.item() < 21.0
    s = s.requires_grad_()
    loss = kd_loss(s, t, temp)
    assert loss.item() == pytest.approx(kl_reference(s.detach(), t, temp.item()), rel=1e-10, abs=1e-12)
    loss.backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(th.grad)
    # reversed chain rule: -0.3 * dL/dT * 20 sigma (1 - sigma), dL/dT by central differences of the reference
    h = 1e-5 * temp.item()
    dl_dt = (kl_reference(s.detach(), t, temp.item() + h) - kl_reference(s.detach(), t, temp.item() - h)) / (2 * h)
    assert th.grad.item() == pytest.approx(-0.3 * dl_dt * 20.0 * sig * (1 - sig), rel=1e-5, abs=1e-9)


def test_curriculum_temperature_range_and_no_reversal_at_lambda_zero():
    th = torch.tensor([-50.0, 50.0], dtype=torch.float64, requires_grad=True)
    temp = curriculum_temperature(th, 0.0, t_min=2.0, t_span=3.0)
    assert temp.tolist() == pytest.approx([2.0, 5.0])
    temp.sum().backward()
    assert th.grad.abs().max().item() == 0.0


def test_logit_standardize_softens_z_scored_logits():
    from kdexp.losses import standardize_logits
    method, batch = ctkd("kd", logit_standardize=True)
    t = method.teacher.logits(batch)
    s = method.student(batch.x)
    temp = method.temperature(0.0)
    want = method.alpha * kd_loss(standardize_logits(s), standardize_logits(t), temp)
    assert method.losses(batch)["kd"].item() == pytest.approx(want.item(), rel=1e-12)
    assert method.losses(batch)["kd"].item() != pytest.approx(method.alpha * kd_loss(s, t, temp).item(), rel=1e-3)


def test_dkd_base_weights_warmup_and_unlabeled_targets():
    method, batch = ctkd("dkd", alpha=0.5, dkd_alpha=2.0, dkd_beta=3.0, warmup_epochs=4, w_ce=1.0)
    batch.y[:3] = UNLABELED
    method.epoch = 1  # warm-up (1 + 1) / 4
    s, t = method.student(batch.x), method.teacher.logits(batch)
    target = torch.where(batch.y == UNLABELED, t.argmax(-1), batch.y)
    tckd, nckd = dkd_terms(s, t, target, method.temperature(0.0))
    terms = method.losses(batch)
    assert terms["tckd"].item() == pytest.approx(0.5 * 0.5 * 2.0 * tckd.item(), rel=1e-12)
    assert terms["nckd"].item() == pytest.approx(0.5 * 0.5 * 3.0 * nckd.item(), rel=1e-12)
    method.epoch = 10
    assert method.losses(batch)["nckd"].item() == pytest.approx(0.5 * 3.0 * nckd.item(), rel=1e-12)


def test_the_temperature_is_a_method_parameter_and_logged():
    method, batch = ctkd("kd", temperature_logit=0.0)
    assert any(p is method.temperature.theta for p in method.parameters())
    assert "temperature.theta" in method.state_dict()
    method.epoch = 4
    m = method.extra_metrics(None)
    assert m == {"ctkd/temperature": pytest.approx(11.0), "ctkd/lambda": pytest.approx(ctkd_lambda(5))}
    assert requirements("ctkd").ignores == ("temperature", "beta") and not requirements("ctkd").fusable


@pytest.mark.parametrize("key,value,match", [
    ("base", "dist", r"method.base='dist' is out of range: one of kd, dkd"),
    ("temperature_span", 0.0, "method.temperature_span=0.0 is out of range"),
    ("lambda_max", -1.0, "method.lambda_max=-1.0 is out of range"),
    ("lambda_epochs", -1, "method.lambda_epochs=-1 is out of range"),
    ("warmup_epochs", -2, "method.warmup_epochs=-2 is out of range")])
def test_bad_keys_name_the_key(compose_cfg, key, value, match):
    with pytest.raises(ConfigError, match=match):
        plan(compose_cfg("method=ctkd", f"method.{key}={value}"))


def test_config_file_readme_and_warnings(compose_cfg):
    assert "ctkd" in list_methods() and "ctkd" in group_options("method")
    readme = open(os.path.join(os.path.dirname(config_dir()), "README.md")).read()
    assert "| `ctkd` |" in readme and "`ctkd`" in readme.split("### Methods")[0]
    cfg = compose_cfg("method=ctkd").method
    assert (cfg.base, cfg.alpha, cfg.w_ce, cfg.temperature_logit, cfg.lambda_epochs, cfg.dkd_beta) == \
        ("kd", 0.9, None, 1.0, 10, 2.0)
    assert not plan(compose_cfg("method=ctkd")).warnings
    warnings = plan(compose_cfg("method=ctkd", "method.base=dkd")).warnings
    assert any("method.w_ce=1 method.alpha=1" in w for w in warnings)
    assert not plan(compose_cfg("method=ctkd", "method.base=dkd", "method.w_ce=1", "method.alpha=1")).warnings


def test_a_short_run_logs_the_learned_temperature(compose_cfg, tmp_path):
    cfg = compose_cfg("method=ctkd", "epochs=2", "teacher.epochs=2", "progress=false", "hardware=cpu",
                      "optim.name=sgd", "optim.lr=0.05")
    run(cfg, str(tmp_path / "run"))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    temps = [h["ctkd/temperature"] for h in m["history"]]
    assert m["status"] == "done" and all(1.0 < t < 21.0 for t in temps)
    assert temps[0] != pytest.approx(1.0 + 20.0 / (1.0 + math.exp(-1.0)), abs=1e-9)  # it was trained
    assert [h["ctkd/lambda"] for h in m["history"]] == pytest.approx([ctkd_lambda(1), ctkd_lambda(2)])


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("base", ["kd", "dkd"])
def test_ctkd_on_every_cifar_pair_of_fake_data(preset_cfg, tmp_path, preset, base):  # noqa: F811
    cfg = preset_cfg(preset, "dataset=fake", "epochs=1", "teacher.epochs=1", "progress=false", "method=ctkd",
                     f"method.base={base}")
    run(cfg, str(tmp_path / "run"))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["status"] == "done" and 1.0 < m["history"][0]["ctkd/temperature"] < 21.0
