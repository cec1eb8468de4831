"""MLKD, NKD and WSLD: their losses against independent float64 references (numpy loops, explicit
probabilities), extreme logits, the authors' conventions; the methods' wiring (weights, targets of
unlabeled samples, logit standardization, bad configs); and 2 steps on each CIFAR-100 pair."""
import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kdexp.config import validate
from kdexp.engine.teacher import FrozenTeacher
from kdexp.errors import ConfigError
from kdexp.losses import (kd_loss, kept_fraction, mlkd_terms, nkd_terms, prediction_correlation_loss,
                          standardize_logits, weighted_kd_loss, wsld_weights)
from kdexp.methods import METHODS, UNLABELED, Batch, get_method, requirements
from kdexp.models import get_model
from kdexp.train import run
from tests.conftest import composer
from tests.test_logit_losses import extreme, labels, rand
from tests.test_logit_standardization import AffineTeacher, method_terms
from tests.test_zoo import PRESETS, preset_cfg  # noqa: F401  (the fixture)

METHODS_HERE = ["mlkd", "nkd", "wsld"]
REL, ABS = 1e-5, 1e-6
DTYPES = [torch.float32, torch.float64]


def assert_finite(loss, x):
    loss.backward()
    assert torch.isfinite(loss), loss
    assert x.grad is not None and torch.isfinite(x.grad).all()


def softmax_rows(z, temperature=1.0):
    """Row-wise softmax of a (B, C) array in float64, one row at a time."""
    out = []
    for row in np.asarray(z, dtype=np.float64):
        e = [math.exp((v - max(row)) / temperature) for v in row]
        out.append([x / sum(e) for x in e])
    return np.array(out)


def kl_rows(p, q):
    """Per-row KL(p || q) with explicit sums (0 log 0 = 0)."""
    return [sum(pc * (math.log(pc) - math.log(qc)) for pc, qc in zip(pr, qr) if pc > 0) for pr, qr in zip(p, q)]


# ---- MLKD ------------------------------------------------------------------------------------

def gram_gap_np(p_s, p_t, level):
    """sum of squared Gram differences with explicit index loops, / B (batch) or / C (class)."""
    b, c = p_s.shape
    n, other = (b, c) if level == "batch" else (c, b)
    total = 0.0
    for i in range(n):
        for j in range(n):
            if level == "batch":
                gs = sum(p_s[i, k] * p_s[j, k] for k in range(other))
                gt = sum(p_t[i, k] * p_t[j, k] for k in range(other))
            else:
                gs = sum(p_s[k, i] * p_s[k, j] for k in range(other))
                gt = sum(p_t[k, i] * p_t[k, j] for k in range(other))
            total += (gt - gs) ** 2
    return total / n


def mlkd_reference(s, t, temps, pct=50.0, cls_pct=50.0, s_rel=None, t_rel=None, t_conf=None):
    """The authors' two-view objective written term by term with both views = the one batch:
    masked weak-view KD + unmasked strong-view KD, masked weak-view batch and class terms. The
    masks are applied as in their code: a mask vector times an already reduced loss, averaged."""
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    s_rel = s if s_rel is None else np.asarray(s_rel, np.float64)
    t_rel = t if t_rel is None else np.asarray(t_rel, np.float64)
    p1 = softmax_rows(t if t_conf is None else t_conf)
    conf = p1.max(1)
    mask = (conf <= np.percentile(conf, pct)).astype(float)
    class_conf = p1.sum(0)
    class_mask = (class_conf <= np.percentile(class_conf, cls_pct)).astype(float)
    kd_weak = kd_strong = bc = cc = 0.0
    for temp in temps:
        kd = temp ** 2 * np.mean(kl_rows(softmax_rows(t, temp), softmax_rows(s, temp)))
        kd_weak += np.mean(kd * mask)
        kd_strong += kd
        ps, pt = softmax_rows(s_rel, temp), softmax_rows(t_rel, temp)
        bc += np.mean(gram_gap_np(ps, pt, "batch") * mask)
        cc += np.mean(gram_gap_np(ps, pt, "class") * class_mask)
    return {"instance": kd_weak + kd_strong, "batch": bc, "class": cc}


@pytest.mark.parametrize("b,c,temps", [(8, 5, [4.0, 2.0, 3.0, 5.0, 6.0]), (7, 10, [1.0]), (5, 3, [2.0, 2.0, 6.0]),
                                       (4, 2, [3.0])])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mlkd_matches_the_authors_objective_with_both_views_equal(b, c, temps, dtype):
    s, t = rand(b, c, 0, dtype=dtype), rand(b, c, 1, dtype=dtype)
    got = mlkd_terms(s, t, temps)
    ref = mlkd_reference(s.tolist(), t.tolist(), temps)
    for name in ("instance", "batch", "class"):
        assert got[name].item() == pytest.approx(ref[name], rel=REL, abs=ABS), name


def test_mlkd_percentiles_and_the_inputs_of_each_part():
    s, t = rand(9, 6, 2), rand(9, 6, 3)
    got = mlkd_terms(s, t, [4.0, 2.0], 30.0, 80.0)
    ref = mlkd_reference(s.tolist(), t.tolist(), [4.0, 2.0], 30.0, 80.0)
    assert {k: v.item() for k, v in got.items()} == pytest.approx(ref, rel=REL)
    # standardized logits with the masks from the raw teacher, the relations on raw logits (the LS authors' MLKD)
    zs, zt = standardize_logits(s), standardize_logits(t)
    got = mlkd_terms(zs, zt, [4.0, 2.0], confidence_logits=t, relation_logits=(s, t))
    ref = mlkd_reference(zs.tolist(), zt.tolist(), [4.0, 2.0], s_rel=s.tolist(), t_rel=t.tolist(), t_conf=t.tolist())
    assert {k: v.item() for k, v in got.items()} == pytest.approx(ref, rel=REL)
    assert got["batch"].item() == pytest.approx(mlkd_terms(s, t, [4.0, 2.0])["batch"].item(), rel=REL)
    assert got["instance"].item() != pytest.approx(mlkd_terms(s, t, [4.0, 2.0])["instance"].item(), rel=1e-3)


@pytest.mark.parametrize("n,pct", [(8, 50.0), (7, 50.0), (10, 30.0), (1, 50.0), (6, 100.0), (6, 0.0)])
def test_kept_fraction_counts_like_np_percentile(n, pct):
    x = rand(1, n, n)[0]
    ref = float(np.mean(x.double().numpy() <= np.percentile(x.double().numpy(), pct)))
    assert kept_fraction(x, pct).item() == pytest.approx(ref)
    ties = torch.tensor([0.5, 0.5, 0.5, 0.2])  # ties at the threshold are all kept, as with `le`
    assert kept_fraction(ties, 50.0).item() == 1.0


def test_prediction_correlation_levels():
    s, t = rand(3, 4, 4), rand(3, 4, 5)
    assert prediction_correlation_loss(t, t, 2.0, "batch").item() == 0.0
    for level in ("batch", "class"):
        ref = gram_gap_np(softmax_rows(s.tolist(), 2.0), softmax_rows(t.tolist(), 2.0), level)
        assert prediction_correlation_loss(s, t, 2.0, level).item() == pytest.approx(ref, rel=REL)
    with pytest.raises(ValueError, match="level"):
        prediction_correlation_loss(s, t, 2.0, "sample")


@pytest.mark.parametrize("temps", [[1.0], [4.0, 2.0, 3.0, 5.0, 6.0]])
def test_mlkd_extreme_logits_are_finite(temps):
    s, t = extreme()
    parts = mlkd_terms(s, t, temps)
    assert_finite(parts["instance"] + parts["batch"] + parts["class"], s)


# ---- NKD -------------------------------------------------------------------------------------

def nkd_reference(s, t, y, temp):
    """Target term from explicit softmaxes at T=1; the non-target distributions as the T-softened
    probabilities of all classes divided by 1 - p(target), the target left out."""
    ps1, pt1 = softmax_rows(s), softmax_rows(t)
    psT, ptT = softmax_rows(s, temp), softmax_rows(t, temp)
    target = non = 0.0
    for b, label in enumerate(y):
        target += -pt1[b, label] * math.log(ps1[b, label])
        for j in range(len(s[0])):
            if j != label:
                q_t = ptT[b, j] / (1 - ptT[b, label])
                q_s = psT[b, j] / (1 - psT[b, label])
                non += -temp ** 2 * q_t * math.log(q_s)
    return target / len(y), non / len(y)


@pytest.mark.parametrize("b,c,temp", [(8, 5, 1.0), (6, 10, 3.0), (5, 3, 0.5)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nkd_matches_renormalized_probabilities(b, c, temp, dtype):
    s, t, y = rand(b, c, 6, dtype=dtype), rand(b, c, 7, dtype=dtype), labels(b, c, 8)
    target, non = nkd_terms(s, t, y, temp)
    ref_target, ref_non = nkd_reference(s.tolist(), t.tolist(), y.tolist(), temp)
    assert target.item() == pytest.approx(ref_target, rel=REL, abs=ABS)
    assert non.item() == pytest.approx(ref_non, rel=REL, abs=ABS)


def test_nkd_non_target_term_is_a_cross_entropy_with_the_kl_gradient():
    s = rand(6, 5, 9, dtype=torch.float64).requires_grad_(True)
    t, y = rand(6, 5, 10, dtype=torch.float64), labels(6, 5, 11)
    _, non = nkd_terms(s, t, y, 2.0)
    _, at_teacher = nkd_terms(t.clone().requires_grad_(True), t, y, 2.0)
    assert at_teacher.item() > 0  # the teacher's entropy of the non-target distribution, times T^2
    (grad,) = torch.autograd.grad(non, s)
    keep = torch.ones(6, 5, dtype=torch.bool).scatter_(1, y[:, None], False)
    ns, nt = s[keep].view(6, 4), t[keep].view(6, 4)
    (ref,) = torch.autograd.grad(kd_loss(ns, nt, 2.0), s)  # KL of the renormalized distributions
    assert torch.allclose(grad, ref)


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_nkd_extreme_logits_are_finite(temp):
    s, t = extreme()
    target, non = nkd_terms(s, t, labels(6, 5, 0), temp)
    assert_finite(target + non, s)


def test_nkd_two_classes_warns_and_the_non_target_term_is_zero():
    with pytest.warns(UserWarning, match="2 classes"):
        _, non = nkd_terms(rand(4, 2, 0), rand(4, 2, 1), labels(4, 2, 2), 2.0)
    assert non.item() == 0.0


# ---- WSLD ------------------------------------------------------------------------------------

def wsld_reference(s, t, y, temp):
    ps1, pt1 = softmax_rows(s), softmax_rows(t)
    kls = kl_rows(softmax_rows(t, temp), softmax_rows(s, temp))
    total, weights = 0.0, []
    for b, label in enumerate(y):
        ce_s, ce_t = -math.log(ps1[b, label]), -math.log(pt1[b, label])
        w = 1 - math.exp(-max(ce_s / (ce_t + 1e-7), 0.0))
        weights.append(w)
        total += w * kls[b]
    return temp ** 2 * total / len(y), weights


@pytest.mark.parametrize("b,c,temp", [(8, 5, 4.0), (6, 10, 1.0), (5, 3, 2.0)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_wsld_matches_explicit_weights(b, c, temp, dtype):
    s, t, y = rand(b, c, 12, dtype=dtype), rand(b, c, 13, dtype=dtype), labels(b, c, 14)
    w = wsld_weights(s, t, y)
    ref, ref_w = wsld_reference(s.tolist(), t.tolist(), y.tolist(), temp)
    assert w.tolist() == pytest.approx(ref_w, rel=REL, abs=ABS)
    assert weighted_kd_loss(s, t, temp, w).item() == pytest.approx(ref, rel=REL, abs=ABS)
    assert weighted_kd_loss(s, t, temp, torch.ones(b)).item() == pytest.approx(kd_loss(s, t, temp).item(), rel=REL)


def test_wsld_has_the_gradient_of_the_authors_cross_entropy_form():
    s = rand(7, 6, 15, dtype=torch.float64).requires_grad_(True)
    t, y, temp = rand(7, 6, 16, dtype=torch.float64), labels(7, 6, 17), 4.0
    w = wsld_weights(s, t, y)
    assert not w.requires_grad  # the weights carry no gradient
    (grad,) = torch.autograd.grad(weighted_kd_loss(s, t, temp, w), s)
    p_t = torch.softmax(t / temp, -1)
    cross_entropy = temp ** 2 * (w * -(p_t * torch.log_softmax(s / temp, -1)).sum(-1)).mean()
    (ref,) = torch.autograd.grad(cross_entropy, s)
    assert torch.allclose(grad, ref)


def test_wsld_weights_order_and_extremes():
    y = torch.tensor([0, 0])
    t = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    s = torch.tensor([[5.0, 0.0], [-5.0, 0.0]])  # fits the label better than the teacher / much worse
    w = wsld_weights(s, t, y)
    assert w[0] < 0.1 < 0.9 < w[1]
    for temp in (1.0, 4.0):
        s, t = extreme()
        assert_finite(weighted_kd_loss(s, t, temp, wsld_weights(s, t, labels(6, 5, 1))), s)


# ---- methods ---------------------------------------------------------------------------------

def make(name, student=None, seed=0, **kw):
    cfg = OmegaConf.merge(OmegaConf.structured(METHODS.meta(name)["config"]), kw)
    torch.manual_seed(seed)
    student = student or get_model("mlp", (1, 8, 8), 10)
    teacher = FrozenTeacher(get_model("cnn", (1, 8, 8), 10, channels=(4, 4, 4)))
    return get_method(name)(cfg, student, teacher), teacher


def a_batch(n=16, unlabeled=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    labeled = None
    if unlabeled:
        labeled = torch.arange(n) >= unlabeled
        y = torch.where(labeled, y, torch.full_like(y, UNLABELED))
    return Batch(x, y, torch.arange(n), labeled)


def test_declared_requirements():  # the config file and README rows: tests/test_every_method.py
    for name in METHODS_HERE:
        assert requirements(name).uses_teacher and requirements(name).labels == "optional"
    assert requirements("wsld").ignores == ("beta",) and requirements("mlkd").ignores == ()


@pytest.mark.parametrize("name", METHODS_HERE)
@pytest.mark.parametrize("standardize", [False, True])
def test_gradients_reach_the_student_not_the_teacher(name, standardize):
    method, teacher = make(name, logit_standardize=standardize)
    assert not {id(p) for p in teacher.model.parameters()} & {id(p) for p in method.parameters()}
    terms = method.losses(a_batch(unlabeled=4))
    assert len(terms) >= 2 and all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())


def test_mlkd_terms_weights_and_temperatures():
    method, teacher = make("mlkd", temperature=3.0, extra_temperatures=[1.0, 8.0], alpha=0.5, beta=2.0, gamma=0.0,
                           w_ce=0.3, confidence_percentile=40.0)
    assert method.temperatures == [3.0, 1.0, 8.0]
    batch = a_batch()
    terms = method.losses(batch)
    assert set(terms) == {"ce", "instance", "batch"}  # gamma 0 drops the class term
    s, t = method.student(batch.x), teacher.logits(batch)
    parts = mlkd_terms(s, t, [3.0, 1.0, 8.0], 40.0, 50.0)
    assert terms["instance"].item() == pytest.approx(0.5 * parts["instance"].item(), rel=REL)
    assert terms["batch"].item() == pytest.approx(2.0 * parts["batch"].item(), rel=REL)
    assert terms["ce"].item() == pytest.approx(0.3 * torch.nn.functional.cross_entropy(s, batch.y).item(), rel=REL)
    # logit standardization: every part on z-scored logits, the masks from the raw teacher; with
    # standardize_relations=false the batch and class parts keep the raw logits
    zs, zt = standardize_logits(s), standardize_logits(t)
    for relations, pair in ((True, None), (False, (s, t))):
        ls, _ = make("mlkd", temperature=3.0, extra_temperatures=[1.0, 8.0], logit_standardize=True,
                     standardize_relations=relations)
        got = ls.losses(batch)
        ref = mlkd_terms(zs, zt, [3.0, 1.0, 8.0], confidence_logits=t, relation_logits=pair)
        assert {k: got[k].item() for k in ref} == pytest.approx({k: 0.9 * v.item() for k, v in ref.items()}, rel=REL)
    assert ref["batch"].item() == pytest.approx(mlkd_terms(s, t, [3.0, 1.0, 8.0])["batch"].item(), rel=REL)


@pytest.mark.parametrize("name,kw", [("mlkd", {}), ("nkd", {}), ("nkd", {"temperature": 3.0})])
def test_standardized_terms_ignore_the_teachers_logit_scale_and_shift(name, kw):
    torch.manual_seed(1)
    teacher = FrozenTeacher(get_model("cnn", (1, 8, 8), 10, channels=(4, 4, 4)), in_shape=(1, 8, 8))
    a = torch.linspace(0.2, 7.0, 16).unsqueeze(1)
    b = torch.linspace(-30.0, 30.0, 16).unsqueeze(1)
    plain, moved = (method_terms(name, tt, True, **kw) for tt in (AffineTeacher(teacher, 1.0, 0.0),
                                                                  AffineTeacher(teacher, a, b)))
    assert plain == pytest.approx(moved, rel=1e-4, abs=1e-6)
    raw, raw_moved = (method_terms(name, tt, False, **kw) for tt in (AffineTeacher(teacher, 1.0, 0.0),
                                                                     AffineTeacher(teacher, a, b)))
    assert any(raw[k] != pytest.approx(raw_moved[k], rel=1e-3) for k in raw if k != "ce")


@pytest.mark.parametrize("kw,key", [({"extra_temperatures": [2.0, 0.0]}, "method.extra_temperatures"),
                                    ({"confidence_percentile": 120.0}, "method.confidence_percentile"),
                                    ({"class_confidence_percentile": -1.0}, "method.class_confidence_percentile"),
                                    ({"gamma": -0.5}, "method.gamma")])
def test_mlkd_bad_configs_name_the_key(kw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make("mlkd", **kw)


def test_nkd_weights_targets_of_unlabeled_samples_and_standardization():
    method, teacher = make("nkd", temperature=3.0, alpha=0.5, beta=3.5)
    batch = a_batch(unlabeled=5)
    terms = method.losses(batch)
    s, t = method.student(batch.x), teacher.logits(batch)
    target = torch.where(batch.y == UNLABELED, t.argmax(-1), batch.y)
    assert (target[:5] == t.argmax(-1)[:5]).all() and (target[5:] == batch.y[5:]).all()
    tt, nt = nkd_terms(s, t, target, 3.0)
    assert terms["target"].item() == pytest.approx(0.5 * tt.item(), rel=REL)
    assert terms["non_target"].item() == pytest.approx(3.5 * nt.item(), rel=REL)
    ls, _ = make("nkd", temperature=3.0, logit_standardize=True)
    tt, nt = nkd_terms(standardize_logits(s), standardize_logits(t), target, 3.0)
    ls_terms = ls.losses(batch)
    assert (ls_terms["target"].item(), ls_terms["non_target"].item()) == pytest.approx((tt.item(), 1.5 * nt.item()),
                                                                                       rel=REL)


def test_wsld_weights_targets_of_unlabeled_samples_and_standardization():
    method, teacher = make("wsld")
    assert (method.cfg.temperature, method.cfg.alpha, method.w_ce) == (4.0, 2.25, 1.0)
    batch = a_batch(unlabeled=5)
    terms = method.losses(batch)
    s, t = method.student(batch.x), teacher.logits(batch)
    target = torch.where(batch.y == UNLABELED, t.argmax(-1), batch.y)
    w = wsld_weights(s, t, target)
    assert terms["wsl"].item() == pytest.approx(2.25 * weighted_kd_loss(s, t, 4.0, w).item(), rel=REL)
    ls, _ = make("wsld", logit_standardize=True)
    ref = weighted_kd_loss(standardize_logits(s), standardize_logits(t), 4.0, w)  # weights from the raw logits
    assert ls.losses(batch)["wsl"].item() == pytest.approx(2.25 * ref.item(), rel=REL)


def test_alpha_above_one_needs_an_explicit_w_ce(tmp_path):
    compose = composer(tmp_path)
    validate(compose("method=wsld"))  # the paper's alpha 2.25 with w_ce 1
    validate(compose("method=kd", "method.alpha=1.5", "method.w_ce=1.0"))
    for overrides in (["method=kd", "method.alpha=1.5"], ["method=wsld", "method.w_ce=null"],
                      ["method=wsld", "method.alpha=-1"]):
        with pytest.raises(ConfigError, match=r"method\.alpha"):
            validate(compose(*overrides))


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("method", METHODS_HERE)
def test_two_steps_on_every_cifar_pair_of_fake_data(preset_cfg, tmp_path, preset, method):  # noqa: F811
    cfg = preset_cfg(preset, "dataset=fake", "epochs=1", "teacher.epochs=1", "progress=false", f"method={method}")
    run(cfg, str(tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "done"
