"""Logit-level losses against independent float64 references written another way (numpy loops,
explicit probabilities), extreme logits, and where the gradients go."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdexp.losses import (discriminator_loss, dist_loss, dist_terms, dkd_loss, dkd_terms, ensemble_log_probs,
                          kd_loss, logit_mse_loss, lsr_loss, mutual_kl_loss, pearson_correlation, tfkd_reg_loss,
                          virtual_teacher_logits)

REL, ABS = 1e-5, 1e-6
DTYPES = [torch.float32, torch.float64]


def softmax_np(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def kl_np(p, q):
    return sum(pc * (math.log(pc) - math.log(qc)) for pc, qc in zip(p, q) if pc > 0)


def rand(b, c, seed, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, generator=g, dtype=torch.float64) * scale).to(dtype)


def labels(b, c, seed):
    return torch.randint(0, c, (b,), generator=torch.Generator().manual_seed(seed))


def extreme(b=6, c=5, seed=0):
    """Logits of magnitude 100 (with signs and ties), as tensors requiring grad."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randint(-1, 2, (b, c), generator=g) * 100.0).requires_grad_(True)
    t = torch.randint(-1, 2, (b, c), generator=g) * 100.0
    return s, t


def assert_finite(loss, *tensors):
    loss.backward()
    assert torch.isfinite(loss), loss
    for x in tensors:
        assert x.grad is not None and torch.isfinite(x.grad).all()


# ---- logit regression ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_logit_mse_matches_half_squared_error_per_sample(dtype):
    s, t = rand(7, 10, 0, dtype=dtype), rand(7, 10, 1, dtype=dtype)
    ref = sum(0.5 * sum((a - b) ** 2 for a, b in zip(sr, tr)) for sr, tr in zip(s.double().tolist(),
                                                                                   t.double().tolist())) / 7
    assert logit_mse_loss(s, t).item() == pytest.approx(ref, rel=REL, abs=ABS)
    # the paper's scale is C/2 times the element-mean MSE
    assert logit_mse_loss(s, t).item() == pytest.approx(10 / 2 * F.mse_loss(s, t).item(), rel=REL)


# ---- label smoothing -------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lsr_matches_explicit_smoothed_targets(eps, dtype):
    s, y = rand(9, 6, 2, dtype=dtype), labels(9, 6, 3)
    total = 0.0
    for row, label in zip(s.double().numpy(), y.tolist()):
        p = softmax_np(row)
        q = [(1 - eps) * (c == label) + eps / 6 for c in range(6)]
        total += -sum(qc * math.log(pc) for qc, pc in zip(q, p))
    assert lsr_loss(s, y, eps).item() == pytest.approx(total / 9, rel=REL, abs=ABS)
    # eps over all C classes, like torch's label_smoothing (not eps/(C-1) over the others)
    assert lsr_loss(s, y, eps).item() == pytest.approx(F.cross_entropy(s, y, label_smoothing=eps).item(), rel=REL)


# ---- Tf-KD virtual teacher -------------------------------------------------------------------

def test_virtual_teacher_is_a_probability_distribution():
    y = torch.tensor([0, 3, 2])
    p = virtual_teacher_logits(y, 4, 0.9).exp()
    assert torch.allclose(p.sum(-1), torch.ones(3))
    assert torch.allclose(p[torch.arange(3), y], torch.full((3,), 0.9))
    assert torch.allclose(p[0, 1:], torch.full((3,), 0.1 / 3))


@pytest.mark.parametrize("T", [1.0, 4.0, 20.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_tfkd_reg_matches_paper_softening(T, dtype):
    a, C = 0.9, 7
    s, y = rand(5, C, 4, dtype=dtype), labels(5, C, 5)
    total = 0.0
    for row, label in zip(s.double().numpy(), y.tolist()):
        pd = np.array([a if c == label else (1 - a) / (C - 1) for c in range(C)])
        pd_T = pd ** (1 / T) / (pd ** (1 / T)).sum()  # the paper: p^(1/T), renormalized
        total += kl_np(pd_T, softmax_np(row / T))
    assert tfkd_reg_loss(s, y, a, T).item() == pytest.approx(T * T * total / 5, rel=REL, abs=ABS)


def test_tfkd_reg_does_not_softmax_probabilities():
    """The authors' code uses softmax(p / T), nearly uniform; ours keeps the paper's sharper p^(1/T)."""
    y, C, a, T = torch.tensor([1]), 10, 0.9, 20.0
    ours = F.softmax(virtual_teacher_logits(y, C, a) / T, -1)[0]
    theirs = F.softmax(virtual_teacher_logits(y, C, a).exp() / T, -1)[0]
    ratio = ours[1] / ours[0]
    assert ratio.item() == pytest.approx((a * (C - 1) / (1 - a)) ** (1 / T), rel=1e-5)
    assert (theirs[1] / theirs[0]).item() < ratio.item() - 0.1


# ---- DKD -------------------------------------------------------------------------------------

def reference_dkd(s, t, y, T):
    """Explicit probabilities, float64 loops: TCKD on [p_gt, 1 - p_gt], NCKD on p_j / (1 - p_gt)."""
    tckd = nckd = 0.0
    for sr, tr, label in zip(s, t, y):
        ps, pt = softmax_np(sr / T), softmax_np(tr / T)
        bs, bt = [ps[label], 1 - ps[label]], [pt[label], 1 - pt[label]]
        tckd += kl_np(bt, bs)
        others = [j for j in range(len(sr)) if j != label]
        nckd += kl_np([pt[j] / (1 - pt[label]) for j in others], [ps[j] / (1 - ps[label]) for j in others])
    n = len(s)
    return T * T * tckd / n, T * T * nckd / n


@pytest.mark.parametrize("T", [1.0, 4.0, 20.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dkd_terms_match_reference(T, dtype):
    s, t, y = rand(8, 6, 6, dtype=dtype), rand(8, 6, 7, dtype=dtype), labels(8, 6, 8)
    tckd, nckd = dkd_terms(s, t, y, T)
    ref_t, ref_n = reference_dkd(s.double().numpy(), t.double().numpy(), y.tolist(), T)
    assert tckd.item() == pytest.approx(ref_t, rel=REL, abs=ABS)
    assert nckd.item() == pytest.approx(ref_n, rel=REL, abs=ABS)
    assert dkd_loss(s, t, y, T, 0.5, 3.0).item() == pytest.approx(0.5 * ref_t + 3.0 * ref_n, rel=REL, abs=ABS)


def test_dkd_decomposes_kd():
    """Zhao et al. eq. 1: KD = TCKD + (1 - p_gt^t) * NCKD, per sample."""
    s, t, y = rand(5, 8, 9, dtype=torch.float64), rand(5, 8, 10, dtype=torch.float64), labels(5, 8, 11)
    T = 3.0
    for i in range(5):
        si, ti, yi = s[i:i + 1], t[i:i + 1], y[i:i + 1]
        tckd, nckd = dkd_terms(si, ti, yi, T)
        pt_gt = torch.softmax(ti / T, -1)[0, yi].item()
        assert kd_loss(si, ti, T).item() == pytest.approx((tckd + (1 - pt_gt) * nckd).item(), rel=1e-10)


@pytest.mark.parametrize("T", [1.0, 20.0])
def test_dkd_extreme_logits_stay_finite(T):
    s, t = extreme()
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    tckd, nckd = dkd_terms(s, t, y, T)
    assert_finite(tckd + 8 * nckd, s)
    # the authors' formulation (log of a masked softmax) is not finite here in float32
    with torch.no_grad():
        p = torch.softmax(s.detach() / 1.0, -1)
        gt = F.one_hot(y, 5).bool()
        binary = torch.stack([(p * gt).sum(1), (p * ~gt).sum(1)], 1)
        assert not torch.isfinite(torch.log(binary)).all()


def test_dkd_warns_with_two_classes_and_nckd_vanishes():
    s, t, y = rand(4, 2, 12), rand(4, 2, 13), labels(4, 2, 14)
    with pytest.warns(UserWarning, match="2 classes"):
        tckd, nckd = dkd_terms(s, t, y, 4.0)
    assert nckd.item() == 0.0 and tckd.item() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dkd_terms(rand(4, 3, 12), rand(4, 3, 13), labels(4, 3, 14), 4.0)  # no warning with 3 classes


# ---- DIST ------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dist_matches_numpy_corrcoef(T, dtype):
    s, t = rand(10, 7, 15, dtype=dtype), rand(10, 7, 16, dtype=dtype)
    ys = np.stack([softmax_np(r / T) for r in s.double().numpy()])
    yt = np.stack([softmax_np(r / T) for r in t.double().numpy()])
    inter = 1 - np.mean([np.corrcoef(ys[i], yt[i])[0, 1] for i in range(10)])
    intra = 1 - np.mean([np.corrcoef(ys[:, c], yt[:, c])[0, 1] for c in range(7)])
    got_inter, got_intra = dist_terms(s, t, T)
    assert got_inter.item() == pytest.approx(T * T * inter, rel=REL, abs=ABS)
    assert got_intra.item() == pytest.approx(T * T * intra, rel=REL, abs=ABS)
    assert dist_loss(s, t, T, 2.0, 0.5).item() == pytest.approx(T * T * (2 * inter + 0.5 * intra), rel=REL, abs=ABS)


def test_pearson_eps_in_denominator_and_zero_for_constant_rows():
    a = torch.tensor([[1.0, 2.0, 4.0], [3.0, 3.0, 3.0]])
    b = torch.tensor([[2.0, 4.0, 8.0], [1.0, 2.0, 3.0]])
    r = pearson_correlation(a, b)
    assert r[0].item() == pytest.approx(1.0, abs=1e-6) and r[1].item() == 0.0


def test_dist_perfect_match_is_zero_and_invariant_to_teacher_shift():
    s = rand(6, 5, 17)
    assert dist_loss(s, s).item() == pytest.approx(0.0, abs=1e-6)
    assert dist_loss(s, s + 3.0).item() == pytest.approx(0.0, abs=1e-6)  # softmax is shift-invariant


@pytest.mark.parametrize("T", [1.0, 20.0])
def test_dist_extreme_logits_stay_finite(T):
    s, t = extreme(seed=1)
    inter, intra = dist_terms(s, t, T)
    assert_finite(inter + intra, s)


# ---- mutual learning -------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1.0, 3.0])
def test_mutual_kl_matches_reference_for_three_peers(T):
    peers = [rand(4, 5, 20 + k, dtype=torch.float64) for k in range(3)]
    total = 0.0
    for k in range(3):
        for l in range(3):
            if l != k:
                total += sum(kl_np(softmax_np(pl / T), softmax_np(pk / T))
                             for pk, pl in zip(peers[k].numpy(), peers[l].numpy())) / 4 * T * T / 2
    assert mutual_kl_loss(peers, T).item() == pytest.approx(total, rel=1e-10)


def test_mutual_kl_treats_the_other_peers_as_fixed_targets():
    peers = [rand(4, 5, 30 + k, dtype=torch.float64).requires_grad_(True) for k in range(3)]
    (g0,) = torch.autograd.grad(mutual_kl_loss(peers, 2.0), peers[0])
    own = sum(kd_loss(peers[0], p.detach(), 2.0) for p in peers[1:]) / 2
    (ref,) = torch.autograd.grad(own, peers[0])
    assert torch.allclose(g0, ref, atol=1e-12)


@pytest.mark.parametrize("T", [1.0, 20.0])
def test_mutual_kl_extreme_logits_stay_finite(T):
    s, t = extreme(seed=2)
    t = t.clone().requires_grad_(True)
    assert_finite(mutual_kl_loss([s, t], T), s, t)


# ---- ensembles and the discriminator ---------------------------------------------------------

def test_ensemble_log_probs_is_log_of_averaged_softmax():
    members = [rand(3, 4, 40 + m, dtype=torch.float64) for m in range(3)]
    ref = np.log(np.mean([[softmax_np(r) for r in m.numpy()] for m in members], axis=0))
    assert np.allclose(ensemble_log_probs(members).numpy(), ref, rtol=1e-12)
    s, t = extreme(seed=3)
    out = ensemble_log_probs([s, t])
    assert torch.isfinite(out).all() and torch.allclose(out.exp().sum(-1), torch.ones(6))
    assert_finite(out.sum(), s)


def test_discriminator_loss_is_binary_cross_entropy():
    d_real, d_fake = rand(6, 1, 50, dtype=torch.float64), rand(5, 1, 51, dtype=torch.float64)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    ref = (-np.mean([math.log(sig(v)) for v in d_real.flatten().tolist()])
           - np.mean([math.log(1 - sig(v)) for v in d_fake.flatten().tolist()]))
    assert discriminator_loss(d_real, d_fake).item() == pytest.approx(ref, rel=1e-10)
    big = torch.tensor([[100.0], [-100.0]], requires_grad=True)
    assert_finite(discriminator_loss(big, -big), big)


# ---- the remaining losses at extreme logits --------------------------------------------------

@pytest.mark.parametrize("T", [1.0, 20.0])
def test_extreme_logits_stay_finite(T):
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    for loss in (lambda s, t: logit_mse_loss(s, t), lambda s, t: lsr_loss(s, y, 0.1),
                 lambda s, t: tfkd_reg_loss(s, y, 0.9, T), lambda s, t: kd_loss(s, t, T)):
        s, t = extreme(seed=4)
        assert_finite(loss(s, t), s)
