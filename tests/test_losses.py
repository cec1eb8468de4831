"""kd_loss against independent float64 formulas written with explicit probabilities."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdexp.losses import kd_loss, soften


def reference_kd(s: np.ndarray, t: np.ndarray, T: float) -> float:
    """T^2 * mean_b sum_c p_c (log p_c - log q_c), p = softmax(t/T), q = softmax(s/T); loops, float64."""
    total = 0.0
    for sb, tb in zip(s.astype(np.float64), t.astype(np.float64)):
        es, et = np.exp(sb / T - np.max(sb / T)), np.exp(tb / T - np.max(tb / T))
        q, p = es / es.sum(), et / et.sum()
        total += sum(pc * (np.log(pc) - np.log(qc)) for pc, qc in zip(p, q))
    return T * T * total / len(s)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 10.0, 20.0])
def test_kd_loss_matches_reference(T):
    g = torch.Generator().manual_seed(int(T))
    s, t = torch.randn(16, 10, generator=g) * 3, torch.randn(16, 10, generator=g) * 3
    assert kd_loss(s, t, T).item() == pytest.approx(reference_kd(s.numpy(), t.numpy(), T), rel=1e-5, abs=1e-6)


def test_temperature_scaling_is_t_squared_times_kl():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    T = 3.0
    kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean", log_target=True)
    assert kd_loss(s, t, T).item() == pytest.approx(T * T * kl.item(), rel=1e-5)


def test_t1_equals_soft_target_cross_entropy_minus_teacher_entropy():
    """At T=1, KL(p||q) = CE(p, q) - H(p): same value up to the teacher entropy, same gradient."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(12, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(12, 7, generator=g, dtype=torch.float64)
    p = torch.softmax(t, -1)
    soft_ce = F.cross_entropy(s, p)  # soft targets
    entropy = -(p * p.log()).sum(-1).mean()
    loss = kd_loss(s, t, 1.0)
    assert loss.item() == pytest.approx((soft_ce - entropy).item(), rel=1e-10)
    (g_kd,) = torch.autograd.grad(loss, s)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(s, p), s)
    assert torch.allclose(g_kd, g_ce, atol=1e-12)


def test_zero_when_student_equals_teacher_and_positive_otherwise():
    x = torch.randn(4, 6)
    assert kd_loss(x, x, 4.0).abs().item() < 1e-6
    assert kd_loss(x, x.flip(-1), 4.0).item() > 0


@pytest.mark.parametrize("T", [1.0, 20.0])
def test_extreme_logits_stay_finite(T):
    s = torch.tensor([[100.0, -100.0, 0.0], [-100.0, 100.0, 50.0]], requires_grad=True)
    t = torch.tensor([[-100.0, 100.0, 0.0], [100.0, -100.0, -50.0]])
    loss = kd_loss(s, t, T)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_soften_is_log_softmax_of_scaled_logits():
    x = torch.randn(3, 4)
    assert torch.allclose(soften(x, 2.0).exp().sum(-1), torch.ones(3))
    assert torch.allclose(soften(x, 2.0), torch.log_softmax(x / 2.0, -1))
