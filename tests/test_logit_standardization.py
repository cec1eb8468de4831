"""Logit standardization (Sun et al. CVPR 2024): the z-score against numpy, the methods that take
`method.logit_standardize`, and what it guarantees: a per-sample affine change of the teacher's
logits (shift, positive scale) leaves every standardized soft term unchanged."""
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kdexp.engine.plan import fuse_reason
from kdexp.engine.teacher import FrozenTeacher
from kdexp.losses import standardize_logits
from kdexp.methods import METHODS, Batch, SofteningConfig, get_method, list_methods, requirements
from kdexp.models import get_model
from tests.conftest import composer


def zscore_np(z, eps=1e-7):
    out = np.empty_like(z, dtype=np.float64)
    for i, row in enumerate(np.asarray(z, dtype=np.float64)):
        mean = sum(row) / len(row)
        var = sum((v - mean) ** 2 for v in row) / (len(row) - 1)  # unbiased, as torch.std
        out[i] = [(v - mean) / (math.sqrt(var) + eps) for v in row]
    return out


@pytest.mark.parametrize("shape", [(1, 2), (7, 2), (5, 10), (3, 100)])
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_standardize_logits_is_the_unbiased_z_score(shape, scale):
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1])) * scale
    got = standardize_logits(z)
    np.testing.assert_allclose(got.numpy(), zscore_np(z.numpy()), rtol=1e-5, atol=1e-5)
    if shape[1] > 2:  # unbiased: the squared entries of a row sum to C - 1
        np.testing.assert_allclose((got.double() ** 2).sum(-1).numpy(), shape[1] - 1, rtol=1e-4)


def test_standardize_logits_of_extreme_and_constant_rows_is_finite():
    z = torch.tensor([[100.0, -100.0, 100.0, 0.0], [5.0, 5.0, 5.0, 5.0]], requires_grad=True)
    out = standardize_logits(z)
    assert torch.equal(out[1], torch.zeros(4))  # all equal: zeros (eps keeps the division finite)
    out.pow(3).sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(z.grad).all()


def softening_methods():
    return [n for n in list_methods() if issubclass(METHODS.meta(n)["config"], SofteningConfig)]


def test_the_methods_that_soften_logits_take_the_key():
    names = set(softening_methods())
    assert {"kd", "lskd", "tfkd_self", "dkd", "dist", "dml", "fitnet", "at", "crd", "jacobian"} <= names
    assert not {"ce", "lsr", "logit_mse", "tfkd_reg", "finetune"} & names  # nothing softened, nothing to standardize


class AffineTeacher:
    """The teacher's logits changed per sample by a positive scale and a shift."""

    def __init__(self, teacher, a, b):
        self.model, self.a, self.b, self.in_shape = teacher.model, a, b, teacher.in_shape

    def logits(self, batch):
        with torch.no_grad():
            return self.a * self.model(batch.x) + self.b


def method_terms(name, teacher, standardize, **kw):
    cfg = OmegaConf.merge(OmegaConf.structured(METHODS.meta(name)["config"]),
                          {"logit_standardize": standardize, **kw})
    torch.manual_seed(0)
    method = get_method(name)(cfg, get_model("mlp", (1, 8, 8), 10), teacher)
    method.epoch = 30  # past any warm-up
    g = torch.Generator().manual_seed(3)
    batch = Batch(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g), torch.arange(16))
    return {k: v.item() for k, v in method.losses(batch).items()}


@pytest.mark.parametrize("name", ["kd", "lskd", "tfkd_self", "dkd", "dist"])
def test_standardized_terms_ignore_the_teachers_logit_scale_and_shift(name):
    torch.manual_seed(1)
    teacher = FrozenTeacher(get_model("cnn", (1, 8, 8), 10, channels=(4, 4, 4)), in_shape=(1, 8, 8))
    a = torch.linspace(0.2, 7.0, 16).unsqueeze(1)
    b = torch.linspace(-30.0, 30.0, 16).unsqueeze(1)
    plain, moved = (method_terms(name, t, True) for t in (AffineTeacher(teacher, 1.0, 0.0), AffineTeacher(teacher, a, b)))
    assert plain == pytest.approx(moved, rel=1e-4, abs=1e-6)
    raw, raw_moved = (method_terms(name, t, False) for t in (AffineTeacher(teacher, 1.0, 0.0),
                                                             AffineTeacher(teacher, a, b)))
    soft = [k for k in raw if k != "ce"]
    assert any(raw[k] != pytest.approx(raw_moved[k], rel=1e-3) for k in soft)  # without it they change


def softmax_np(z):
    e = np.exp(z - z.max())
    return e / e.sum()


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_kd_with_standardized_logits_matches_the_formula(T):
    torch.manual_seed(2)
    teacher = FrozenTeacher(get_model("cnn", (1, 8, 8), 10, channels=(4, 4, 4)), in_shape=(1, 8, 8))
    cfg = OmegaConf.merge(OmegaConf.structured(METHODS.meta("kd")["config"]),
                          {"logit_standardize": True, "temperature": T, "alpha": 1.0, "w_ce": 0.0})
    student = get_model("mlp", (1, 8, 8), 10)
    method = get_method("kd")(cfg, student, teacher)
    x = torch.randn(9, 1, 8, 8, dtype=torch.float32)
    got = method.losses(Batch(x, torch.zeros(9, dtype=torch.long), torch.arange(9)))["kd"].item()
    with torch.no_grad():
        zs, zt = zscore_np(student(x).double().numpy()), zscore_np(teacher.model(x).double().numpy())
    ref = 0.0
    for s_row, t_row in zip(zs, zt):
        p, q = softmax_np(t_row / T), softmax_np(s_row / T)
        ref += sum(pc * (math.log(pc) - math.log(qc)) for pc, qc in zip(p, q))
    assert got == pytest.approx(T * T * ref / 9, rel=1e-4)


def test_dml_standardizes_every_peer():
    on = method_terms("dml", None, True)
    off = method_terms("dml", None, False)
    assert on["ce"] == pytest.approx(off["ce"]) and on["dml"] != pytest.approx(off["dml"], rel=1e-3)


@pytest.fixture(scope="module")
def compose_cfg(tmp_path_factory):
    yield composer(tmp_path_factory.mktemp("ls"))


def test_lskd_is_kd_with_the_papers_weights_and_fuses(compose_cfg):
    m = compose_cfg("method=lskd").method
    assert (m.logit_standardize, m.temperature, m.alpha, m.w_ce) == (True, 2.0, 9.0, 0.1)
    assert requirements("lskd").fusable  # fused students take the standardized KD of its logit_terms (tests/test_fused.py)
    cfg = compose_cfg("method=kd", "method.logit_standardize=true", "hardware=cpu")
    assert fuse_reason(cfg, requirements("kd")) is None
    assert fuse_reason(compose_cfg("method=kd", "hardware=cpu"), requirements("kd")) is None


def test_methods_without_soft_terms_reject_the_key(compose_cfg):
    with pytest.raises(Exception, match="logit_standardize"):
        compose_cfg("method=ce", "method.logit_standardize=true")


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["cifar100_resnet32x4_resnet8x4", "cifar100_wrn_40_2_wrn_16_2",
                                    "cifar100_resnet56_resnet20", "cifar100_vgg13_vgg8"])
@pytest.mark.parametrize("extra", [["method=lskd"], ["method=dkd", "method.logit_standardize=true"]])
def test_standardized_methods_run_two_steps_on_every_cifar_pair(tmp_path, preset, extra):
    import json
    from kdexp.train import run
    cfg = composer(tmp_path)(f"experiment={preset}", "dataset=fake", "epochs=1", "teacher.epochs=1", "progress=false",
                             *extra)
    run(cfg, str(tmp_path / "run"))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["status"] == "done" and m["plan"]["fusable"] is False
