"""Feature- and relation-based losses against independent float64 references written another
way (explicit loops over samples, channels, pairs and permutations, numpy)."""
import itertools
import math

import numpy as np
import pytest
import torch

from kdexp import losses as L

RNG = np.random.default_rng(1234)


def t64(a):
    return torch.tensor(a, dtype=torch.float64)


def rand(*shape, scale=1.0):
    return RNG.standard_normal(shape) * scale


def huber(x):
    x = abs(x)
    return 0.5 * x * x if x < 1 else x - 0.5


def unit(v):
    return v / np.sqrt((v ** 2).sum())


# --------------------------------------------------------------------------- feature losses

def test_fitnet_is_the_mean_of_squared_errors_per_element():
    s, t = rand(3, 4, 5, 5), rand(3, 4, 5, 5)
    ref = sum(((s[b] - t[b]) ** 2).sum() for b in range(3)) / s.size  # paper's 0.5*sum, over D/2, batch mean
    assert L.fitnet_loss(t64(s), t64(t)).item() == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("p", [1.0, 2.0, 4.0])
def test_at_loss_matches_per_sample_loop(p):
    s, t = rand(4, 3, 5, 6), rand(4, 7, 5, 6)  # channel counts may differ
    total = 0.0
    for b in range(4):
        qs = np.zeros(30)
        qt = np.zeros(30)
        for c in range(3):
            qs += np.abs(s[b, c]).ravel() ** p
        for c in range(7):
            qt += np.abs(t[b, c]).ravel() ** p
        total += np.sqrt(((unit(qs) - unit(qt)) ** 2).sum())
    assert L.at_loss(t64(s), t64(t), p).item() == pytest.approx(total / 4, rel=1e-10)
    assert L.at_loss(t64(s), t64(s), p).item() == pytest.approx(0.0, abs=1e-12)


def test_nst_loss_is_mmd_with_polynomial_kernel():
    s, t = rand(3, 4, 3, 3), rand(3, 6, 3, 3)
    total = 0.0
    for b in range(3):
        fs = [unit(s[b, i].ravel()) for i in range(4)]
        ft = [unit(t[b, j].ravel()) for j in range(6)]
        k = lambda a, c: float(a @ c) ** 2  # noqa: E731
        tt = sum(k(a, c) for a in ft for c in ft) / 36
        ss = sum(k(a, c) for a in fs for c in fs) / 16
        st = sum(k(a, c) for a in fs for c in ft) / 24
        total += tt + ss - 2 * st
    assert L.nst_loss(t64(s), t64(t)).item() == pytest.approx(total / 3, rel=1e-10)
    assert L.nst_loss(t64(t), t64(t)).item() == pytest.approx(0.0, abs=1e-12)


def test_ab_loss_alternative_squared_hinge():
    s, t = rand(2, 3, 4, 4, scale=1.5), rand(2, 3, 4, 4)
    m = 1.0
    vals = []
    for sv, tv in zip(s.ravel(), t.ravel()):
        if tv > 0:
            vals.append((sv - m) ** 2 if sv < m else 0.0)
        else:
            vals.append((sv + m) ** 2 if sv > -m else 0.0)
    assert L.ab_loss(t64(s), t64(t), m).item() == pytest.approx(np.mean(vals), rel=1e-12)
    # a student beyond the margin on the right side of every boundary has no loss
    assert L.ab_loss(t64(np.where(t > 0, 2.0, -2.0)), t64(t)).item() == 0.0


@pytest.mark.parametrize("p", [1, 2])
def test_factor_transfer_loss(p):
    s, t = rand(3, 2, 4, 4), rand(3, 2, 4, 4)
    per = [np.abs(unit(s[b].ravel()) - unit(t[b].ravel())) ** p for b in range(3)]
    ref = np.concatenate(per).mean()
    assert L.factor_transfer_loss(t64(s), t64(t), p).item() == pytest.approx(ref, rel=1e-10)


def np_fsp(a, b):
    """Loops: G_ij = sum_hw a_i b_j / (HW), after 2x2 average pooling of the larger map."""
    def pool2(x):  # (C, H, W) -> (C, H/2, W/2)
        c, h, w = x.shape
        return x.reshape(c, h // 2, 2, w // 2, 2).mean((2, 4))
    if a.shape[1] > b.shape[1]:
        a = pool2(a)
    elif b.shape[1] > a.shape[1]:
        b = pool2(b)
    hw = a.shape[1] * a.shape[2]
    g = np.zeros((a.shape[0], b.shape[0]))
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            g[i, j] = (a[i] * b[j]).sum() / hw
    return g


def test_fsp_loss_squared_frobenius_of_gram_differences_with_pooling():
    s = [rand(2, 3, 8, 8), rand(2, 4, 4, 4), rand(2, 5, 4, 4)]
    t = [rand(2, 3, 8, 8), rand(2, 4, 4, 4), rand(2, 5, 4, 4)]
    ref = 0.0
    for i in range(2):
        ref += np.mean([((np_fsp(s[i][b], s[i + 1][b]) - np_fsp(t[i][b], t[i + 1][b])) ** 2).sum() for b in range(2)])
    got = L.fsp_loss([t64(x) for x in s], [t64(x) for x in t]).item()
    assert got == pytest.approx(ref, rel=1e-10)
    assert L.fsp_matrix(t64(s[0]), t64(s[1])).shape == (2, 3, 4)


def test_sp_loss_row_l2_normalized_gram():
    s, t = rand(5, 3, 2, 2), rand(5, 7)
    def g(x):
        x = x.reshape(len(x), -1)
        gram = np.array([[float(x[i] @ x[j]) for j in range(len(x))] for i in range(len(x))])
        return np.array([row / np.sqrt((row ** 2).sum()) for row in gram])
    ref = ((g(s) - g(t)) ** 2).sum() / 25
    assert L.sp_loss(t64(s), t64(t)).item() == pytest.approx(ref, rel=1e-10)


def test_pkt_loss_conditional_probabilities_without_diagonal():
    s, t = rand(6, 4), rand(6, 9)
    def cond(x):
        k = np.array([[(float(unit(x[i]) @ unit(x[j])) + 1) / 2 for j in range(6)] for i in range(6)])
        p = np.zeros((6, 6))
        for i in range(6):
            z = sum(k[i, m] for m in range(6) if m != i)
            for j in range(6):
                if j != i:
                    p[i, j] = k[i, j] / z
        return p
    ps, pt = cond(s), cond(t)
    ref = np.mean([sum(pt[i, j] * math.log(pt[i, j] / ps[i, j]) for j in range(6) if j != i) for i in range(6)])
    assert L.pkt_loss(t64(s), t64(t)).item() == pytest.approx(ref, rel=1e-10)
    assert L.pkt_loss(t64(t), t64(t)).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("w_dist,w_angle", [(1.0, 0.0), (0.0, 1.0), (25.0, 50.0)])
def test_rkd_loss_over_distinct_pairs_and_triplets(w_dist, w_angle):
    s, t = rand(5, 3), rand(5, 6, scale=3.0)
    b = 5
    def dist(x):
        d = {(i, j): np.sqrt(((x[i] - x[j]) ** 2).sum()) for i in range(b) for j in range(b) if i != j}
        mu = np.mean(list(d.values()))
        return {k: v / mu for k, v in d.items()}
    ds, dt = dist(s), dist(t)
    l_d = np.mean([huber(ds[k] - dt[k]) for k in ds])
    def angle(x, i, j, k):
        return float(unit(x[i] - x[j]) @ unit(x[k] - x[j]))
    trip = [(i, j, k) for i in range(b) for j in range(b) for k in range(b) if len({i, j, k}) == 3]
    l_a = np.mean([huber(angle(s, *tr) - angle(t, *tr)) for tr in trip])
    ref = w_dist * l_d + w_angle * l_a
    assert L.rkd_loss(t64(s), t64(t), w_dist, w_angle).item() == pytest.approx(ref, rel=1e-10)


def test_cc_loss_taylor_kernel_and_its_limit_the_gaussian_rbf():
    s, t = rand(6, 5), rand(6, 8)
    gamma = 0.4
    def corr(x, order):
        f = [unit(v) for v in x]
        return np.array([[math.exp(-2 * gamma) * sum((2 * gamma) ** p / math.factorial(p) * float(a @ c) ** p
                                                     for p in range(order + 1)) for c in f] for a in f])
    ref = ((corr(s, 2) - corr(t, 2)) ** 2).sum() / 36
    assert L.cc_loss(t64(s), t64(t), gamma, 2).item() == pytest.approx(ref, rel=1e-10)
    # a long expansion is the Gaussian kernel exp(-gamma ||f_i - f_j||^2) itself
    def rbf(x):
        f = [unit(v) for v in x]
        return np.array([[math.exp(-gamma * ((a - c) ** 2).sum()) for c in f] for a in f])
    exact = ((rbf(s) - rbf(t)) ** 2).sum() / 36
    assert L.cc_loss(t64(s), t64(t), gamma, 20).item() == pytest.approx(exact, rel=1e-9)


def test_vid_loss_gaussian_nll_per_channel_variance():
    mu, t = rand(2, 3, 2, 2), rand(2, 3, 2, 2)
    var = np.array([0.5, 2.0, 5.0])
    vals = [0.5 * (math.log(var[c]) + (t[b, c, h, w] - mu[b, c, h, w]) ** 2 / var[c])
            for b in range(2) for c in range(3) for h in range(2) for w in range(2)]
    assert L.vid_loss(t64(mu), t64(var), t64(t)).item() == pytest.approx(np.mean(vals), rel=1e-12)
    # equals torch's Gaussian NLL without its constant
    nll = torch.nn.functional.gaussian_nll_loss(t64(mu), t64(t), t64(var).view(1, 3, 1, 1).expand(2, 3, 2, 2))
    assert L.vid_loss(t64(mu), t64(var), t64(t)).item() == pytest.approx(nll.item(), rel=1e-12)


def test_crd_nce_loss_against_loop():
    p = RNG.uniform(1e-5, 1e-3, size=(4, 11))
    n = 500
    k = 10
    total = 0.0
    for row in p:
        total += math.log(row[0] / (row[0] + k / n))
        for q in row[1:]:
            total += math.log(1 - q / (q + k / n))
    assert L.crd_nce_loss(t64(p), n).item() == pytest.approx(-total / 4, rel=1e-12)


def pl_log_prob(scores):
    """Plackett-Luce log-probability of scores listed in ranking order, as a product of choices."""
    prob = 1.0
    for i in range(len(scores)):
        prob *= math.exp(scores[i]) / sum(math.exp(v) for v in scores[i:])
    return math.log(prob)


def darkrank_reference(s, t, a, p, n=None, soft=False):
    b = len(s)
    total = 0.0
    for q in range(b):
        cands = [i for i in range(b) if i != q]
        ss = {i: -a * np.sqrt(((s[q] - s[i]) ** 2).sum()) ** p for i in cands}
        st = {i: -a * np.sqrt(((t[q] - t[i]) ** 2).sum()) ** p for i in cands}
        ranking = sorted(cands, key=lambda i: -st[i])[: (n or b - 1)]
        if not soft:
            total += -pl_log_prob([ss[i] for i in ranking])
        else:
            for perm in itertools.permutations(ranking):
                lt = pl_log_prob([st[i] for i in perm])
                total += math.exp(lt) * (lt - pl_log_prob([ss[i] for i in perm]))
    return total / b


@pytest.mark.parametrize("n", [None, 3])
def test_darkrank_hard_transfer_against_loop(n):
    s, t = rand(6, 4), rand(6, 5)
    s = s / np.linalg.norm(s, axis=1, keepdims=True)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    ref = darkrank_reference(s, t, 3.0, 3.0, n)
    assert L.darkrank_loss(t64(s), t64(t), 3.0, 3.0, n).item() == pytest.approx(ref, rel=1e-10)


def test_darkrank_soft_transfer_is_kl_over_all_rankings():
    s, t = rand(5, 3), rand(5, 3)
    ref = darkrank_reference(s, t, 2.0, 1.5, 4, soft=True)
    assert L.darkrank_loss(t64(s), t64(t), 2.0, 1.5, 4, soft=True).item() == pytest.approx(ref, rel=1e-9)
    assert L.darkrank_loss(t64(t), t64(t), 2.0, 1.5, 4, soft=True).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="too long"):
        L.darkrank_loss(t64(rand(12, 3)), t64(rand(12, 3)), soft=True)


def test_jacobian_loss_squared_distance_of_normalized_gradients():
    gs, gt = rand(3, 1, 4, 4), rand(3, 1, 4, 4)
    ref = np.mean([((unit(gs[b].ravel()) - unit(gt[b].ravel())) ** 2).sum() for b in range(3)])
    assert L.jacobian_loss(t64(gs), t64(gt)).item() == pytest.approx(ref, rel=1e-12)
    # invariant to the gradients' scale
    assert L.jacobian_loss(t64(gs * 7.0), t64(gt * 0.1)).item() == pytest.approx(ref, rel=1e-12)


def test_relation_losses_have_finite_gradients_with_duplicate_samples():
    x = torch.randn(4, 5, dtype=torch.float64)
    s = torch.cat([x, x[:1]]).requires_grad_(True)  # sample 0 twice: a zero distance
    t = torch.randn(5, 6, dtype=torch.float64)
    for fn in (L.rkd_loss, L.darkrank_loss, L.pkt_loss, L.cc_loss, L.sp_loss):
        s.grad = None
        fn(s, t).backward()
        assert torch.isfinite(s.grad).all(), fn.__name__
