"""Distillation losses as pure functions of tensors, like torch.nn.functional: no state,
no config. Shapes: logits are (B, C); every loss returns a scalar averaged over the batch.
Each docstring states the convention chosen where papers and peer code disagree."""
import itertools
import math
import warnings
from typing import Iterable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def soften(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probabilities of logits softened by temperature T: log_softmax(logits / T).
    The single place where temperature softening happens."""
    return F.log_softmax(logits / temperature, dim=-1)


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardization (Sun et al. CVPR 2024, arXiv 2403.01427): each sample's logits
    z-scored over the classes, (z - mean(z)) / (std(z) + eps), shape (B, C) -> (B, C).

    std is the unbiased one (divides by C - 1) and eps is added to it, as in the authors' code
    (`torch.std` default, 1e-7); a sample whose logits are all equal maps to zeros. Softening the
    result at a base temperature T makes the effective temperature std(z) * T per sample."""
    centered = logits - logits.mean(dim=-1, keepdim=True)
    return centered / (logits.std(dim=-1, keepdim=True) + eps)


def kl_div_log(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) from log-probabilities, summed over classes and averaged over the batch
    ('batchmean'). Written out instead of F.kl_div, which has no vmap batching rule."""
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015: T^2 * KL(softmax(t/T) || softmax(s/T)), batchmean.

    The T^2 factor keeps the gradient scale of the soft term independent of T; KL is
    summed over classes and averaged over the batch (not averaged over classes, which
    would make it C times smaller). Adding the weighted CE on labels is the method's job.
    """
    return temperature ** 2 * kl_div_log(soften(teacher_logits, temperature), soften(student_logits, temperature))


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, weight=1.0, ignore_index: int = -1) -> torch.Tensor:
    """weight * cross-entropy on labels, averaged over the labeled samples (labels != ignore_index;
    0 when there are none). Shapes: logits (..., B, C), labels (..., B) -> (...): leading dims are
    independent groups (the students of a fused sweep), `weight` a float or a tensor of shape (...).
    Every method's CE term (`Method.ce`) and a fused sweep's are this function."""
    n = (labels != ignore_index).sum(-1).clamp_min(1)
    if logits.dim() == 2:
        return weight * F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum") / n
    c = logits.shape[-1]
    per = F.cross_entropy(logits.reshape(-1, c), labels.reshape(-1), ignore_index=ignore_index, reduction="none")
    return weight * per.view(labels.shape).sum(-1) / n


def soft_kd_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, teacher_neg_entropy: torch.Tensor,
                 temperature, weight=1.0) -> torch.Tensor:
    """weight * kd_loss from the teacher's softened distribution p = softmax(t/T) and its negative
    entropy sum_c p log p instead of its logits (what the teacher-output cache serves per T):
    weight * T^2 * mean_b (sum p log p - sum p log softmax(s/T)). Shapes: student_logits and
    teacher_probs (..., B, C), teacher_neg_entropy (..., B) -> (...); `temperature` and `weight` are
    floats or tensors of shape (...) (one per fused student). Written out instead of F.kl_div,
    which has no vmap batching rule."""
    t = torch.as_tensor(temperature, dtype=student_logits.dtype, device=student_logits.device)
    log_q = torch.log_softmax(student_logits / t.view(*t.shape, 1, 1), dim=-1)
    return weight * t ** 2 * (teacher_neg_entropy - (teacher_probs * log_q).sum(-1)).mean(-1)


_MINUS_ONES = {}


def _minus_ones(like: torch.Tensor) -> torch.Tensor:
    """A (B, 1) column of -1 (cached: the CE gradient's one-hot subtraction runs every step)."""
    key = (like.shape[0], like.dtype, like.device)
    col = _MINUS_ONES.get(key)
    if col is None:
        col = _MINUS_ONES[key] = torch.full((like.shape[0], 1), -1.0, dtype=like.dtype, device=like.device)
    return col


class _SoftKDCE(torch.autograd.Function):
    """(w_ce * CE, alpha * T^2 * KL(p || softmax(s/T))) with closed-form gradients, from the
    teacher's softened probabilities p and their sum p log p: one autograd node for both terms."""

    @staticmethod
    def forward(ctx, s, y, p, neg_entropy, temperature, w_ce, alpha, ignore_index, all_labeled):
        b = s.shape[0]
        log_q = torch.log_softmax(s * (1.0 / temperature), dim=-1)
        kd = (neg_entropy.sum() - torch.dot(p.reshape(-1), log_q.reshape(-1))) * (alpha * temperature ** 2 / b)
        ctx.c = (alpha * temperature / b, w_ce, ignore_index, all_labeled)
        if not w_ce:
            ctx.save_for_backward(log_q, p)
            return torch.zeros_like(kd), kd
        log_p = torch.log_softmax(s, dim=-1)
        if all_labeled:  # n = b: no count, no ignore_index
            ctx.n = float(b)
            ctx.save_for_backward(log_q, p, log_p, y)
            return F.nll_loss(log_p, y, reduction="sum") * (w_ce / b), kd
        n = (y != ignore_index).sum().clamp_min(1).to(s.dtype)
        ctx.save_for_backward(log_q, p, log_p, y, n)
        return F.nll_loss(log_p, y, ignore_index=ignore_index, reduction="sum") * w_ce / n, kd

    @staticmethod
    def backward(ctx, g_ce, g_kd):
        kd_scale, w_ce, ignore_index, all_labeled = ctx.c
        log_q, p = ctx.saved_tensors[:2]
        grad = (log_q.exp() - p) * (g_kd * kd_scale)
        if w_ce:
            log_p, y = ctx.saved_tensors[2:4]
            g = log_p.exp()  # softmax(s) - one_hot(y), on the labeled rows
            if all_labeled:
                g.scatter_add_(1, y.unsqueeze(1), _minus_ones(g))
                grad = grad + g * (g_ce * (w_ce / ctx.n))
            else:
                g.scatter_add_(1, y.clamp_min(0).unsqueeze(1), _minus_ones(g))
                grad = grad + g * (y != ignore_index).unsqueeze(1) * (g_ce * w_ce / ctx.saved_tensors[4])
        return grad, None, None, None, None, None, None, None, None


def kd_ce_loss_soft(student_logits: torch.Tensor, labels: torch.Tensor, teacher_probs: torch.Tensor,
                    teacher_neg_entropy: torch.Tensor, temperature: float, w_ce: float, alpha: float,
                    ignore_index: int = -1, all_labeled: bool = False):
    """KD's two terms at once -> (w_ce * CE, alpha * kd_loss(s, t, T)), given the teacher's softened
    distribution p = softmax(t/T) (B, C) and its negative entropy sum_c p log p (B,) instead of its
    logits t: what the teacher-output cache serves per temperature (kdexp.engine.teacher_cache), so
    a step does no teacher-side softmax (KL(p || q) = sum p log p - sum p log q).

    CE is the mean over the labeled samples (labels != ignore_index; 0 when there are none), as
    `Method.ce`; `all_labeled=True` promises there is no ignore_index label (skips the count).
    Values and gradients equal `w_ce * CE + alpha * kd_loss` to float rounding; the gradients are
    the closed forms w_ce * (softmax(s) - one_hot(y)) / n + alpha * T * (softmax(s/T) - p) / B in one
    autograd node, which makes a cached KD step cost about what a CE step costs. w_ce=0: the CE
    output is 0 (not computed). First-order only (no double backward)."""
    return _SoftKDCE.apply(student_logits, labels, teacher_probs, teacher_neg_entropy, float(temperature),
                           float(w_ce), float(alpha), int(ignore_index), bool(all_labeled))


# ---------------------------------------------------------------------------------------
# Logit-level and teacher-free distillation: logit regression, LSR, Tf-KD's
# virtual teacher, DKD, DIST, mutual learning, teacher ensembles, the MEAL V2 discriminator.
# Temperature softening and KL come from `soften` / `kl_div_log` / `kd_loss` above.
# ---------------------------------------------------------------------------------------


def logit_mse_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Ba & Caruana 2014 (arXiv 1312.6184): regression on the teacher's logits,
    1/2 * sum_c (s_c - t_c)^2, averaged over the batch.

    Convention: the paper's objective 1/(2N) * sum_n ||g(x_n) - z_n||^2, i.e. C/2 times the
    element-mean F.mse_loss. No temperature: logits are matched as they are."""
    return 0.5 * (student_logits - teacher_logits).pow(2).sum(-1).mean()


def smoothed_labels(y: torch.Tensor, num_classes: int, epsilon: float) -> torch.Tensor:
    """(1 - eps) * one_hot(y) + eps / C: eps is spread over all C classes (Szegedy et al. 2016)."""
    return F.one_hot(y, num_classes).to(torch.get_default_dtype()) * (1.0 - epsilon) + epsilon / num_classes


def lsr_loss(logits: torch.Tensor, y: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Label smoothing regularization: cross-entropy H(q', softmax(s)) with
    q' = (1 - eps) * one_hot(y) + eps / C, averaged over the batch.

    Convention: eps is spread uniformly over all C classes, as in Szegedy et al. 2016 (the LSR
    that Yuan et al. 2020 analyse) and torch's `label_smoothing`; the Tf-KD authors' code instead
    puts eps / (C - 1) on the other classes only. The value is a cross-entropy, not a KL (they
    differ by the constant entropy of q')."""
    log_q = soften(logits, 1.0)
    return -(smoothed_labels(y, logits.shape[-1], epsilon).to(log_q.dtype) * log_q).sum(-1).mean()


def virtual_teacher_logits(y: torch.Tensor, num_classes: int, correct_prob: float,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Log-probabilities of Tf-KD's manually designed teacher (Yuan et al. 2020, eq. 8):
    p^d(k) = a on the true class, (1 - a) / (C - 1) on every other class, with a = correct_prob
    in (0, 1). Log-probabilities are valid logits of p^d (softmax(log p) = p), so the usual
    temperature softening softmax(log p^d / T) = p^d^(1/T) / Z applies to them unchanged."""
    if not 0.0 < correct_prob < 1.0:
        raise ValueError(f"correct_prob must be in (0, 1), got {correct_prob}")
    if num_classes < 2:
        raise ValueError("the virtual teacher needs at least 2 classes")
    out = torch.full((len(y), num_classes), math.log((1.0 - correct_prob) / (num_classes - 1)), dtype=dtype,
                     device=y.device)
    return out.scatter_(1, y.unsqueeze(1), math.log(correct_prob))


def tfkd_reg_loss(student_logits: torch.Tensor, y: torch.Tensor, correct_prob: float,
                  temperature: float) -> torch.Tensor:
    """Tf-KD_reg (Yuan et al. 2020, eq. 9, the soft term): T^2 * KL(p^d_T || softmax(s/T)), batchmean,
    where p^d_T is the virtual teacher's distribution softened with T.

    Conventions: (1) softening follows the paper, p^d_T = softmax(log p^d / T); the authors'
    code applies softmax to the probabilities divided by T, which is nearly uniform and not
    what the paper describes. (2) The student is softened with the same T and the T^2 factor
    of `kd_loss` is kept, so that `method.temperature`/`method.alpha` mean what they mean in KD
    (the authors' code leaves the student unsoftened and scales with a per-run multiplier)."""
    teacher = virtual_teacher_logits(y, student_logits.shape[-1], correct_prob, student_logits.dtype)
    return kd_loss(student_logits, teacher, temperature)


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
              temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decoupled KD (Zhao et al. CVPR 2022) -> (TCKD, NCKD), each T^2 * KL, batchmean.

    TCKD = KL(b^t || b^s) with the binary distributions b = [p_target, 1 - p_target];
    NCKD = KL(p_hat^t || p_hat^s) over the C - 1 non-target classes, p_hat = softmax of the
    non-target logits / T. Both are scaled by T^2 as in the authors' code (mdistiller).

    Convention: computed in log space. log b = [log p_target, logsumexp_{j != target} log p_j]
    and the non-target distribution is a log_softmax over the gathered non-target logits, so
    nothing takes the log of a probability that underflowed. The authors' formulation
    (log of a masked softmax, -1000 * mask) gives inf/NaN in float32 at T=1 with logits
    around +-100. With 2 classes the non-target distribution has a single class and NCKD is
    identically 0 (a warning is issued)."""
    b, c = student_logits.shape
    if c == 2:
        warnings.warn("DKD with 2 classes: the non-target distribution has a single class, so NCKD "
                      "(the beta term) is always 0 and DKD reduces to TCKD + CE", stacklevel=2)
    gt = F.one_hot(target, c).bool()

    def parts(logits):
        log_p = soften(logits, temperature)
        log_target = log_p.gather(1, target.unsqueeze(1))
        log_rest = log_p.masked_fill(gt, float("-inf")).logsumexp(-1, keepdim=True)
        non_target = logits[~gt].view(b, c - 1)
        return torch.cat([log_target, log_rest], 1), soften(non_target, temperature)

    binary_s, nt_s = parts(student_logits)
    binary_t, nt_t = parts(teacher_logits)
    t2 = temperature ** 2
    return t2 * kl_div_log(binary_t, binary_s), t2 * kl_div_log(nt_t, nt_s)


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
             temperature: float, alpha: float = 1.0, beta: float = 8.0) -> torch.Tensor:
    """alpha * TCKD + beta * NCKD (see `dkd_terms`); defaults are the paper's CIFAR-100 ones."""
    tckd, nckd = dkd_terms(student_logits, teacher_logits, target, temperature)
    return alpha * tckd + beta * nckd


def pearson_correlation(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise Pearson correlation of (N, D) tensors -> (N,):
    <a - mean(a), b - mean(b)> / (|a - mean(a)| * |b - mean(b)| + eps).

    Convention: eps is added to the product of the norms, as in the DIST authors' code
    (`cosine_similarity` would clamp each norm instead; up to 0.7 % apart)."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


def dist_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """DIST (Huang et al. NeurIPS 2022) -> (inter-class, intra-class) relation losses.

    With Y = softmax(logits / T) of shape (B, C): inter = T^2 * (1 - mean_b pearson(Y_s[b], Y_t[b]))
    (each sample's class ranking), intra = T^2 * (1 - mean_c pearson(Y_s[:, c], Y_t[:, c]))
    (each class's distribution over the batch), as in the authors' code."""
    y_s, y_t = soften(student_logits, temperature).exp(), soften(teacher_logits, temperature).exp()
    t2 = temperature ** 2
    inter = 1.0 - pearson_correlation(y_s, y_t).mean()
    intra = 1.0 - pearson_correlation(y_s.t(), y_t.t()).mean()
    return t2 * inter, t2 * intra


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
              beta: float = 1.0, gamma: float = 1.0) -> torch.Tensor:
    """beta * inter + gamma * intra (see `dist_terms`), the paper's names and ImageNet defaults."""
    inter, intra = dist_terms(student_logits, teacher_logits, temperature)
    return beta * inter + gamma * intra


def mutual_kl_loss(peer_logits: Sequence[torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """Deep mutual learning (Zhang et al. CVPR 2018): sum over peers k of
    1/(K-1) * sum_{l != k} T^2 * KL(p_l || p_k), each peer's targets p_l detached.

    Convention: all peers are updated at once from one forward pass, each treating the others'
    current predictions as fixed targets (the common implementation); the paper updates the
    peers one after the other, re-predicting in between. T=1 is the paper's setting; the T^2
    factor of `kd_loss` keeps other temperatures comparable with KD."""
    k = len(peer_logits)
    if k < 2:
        raise ValueError("mutual learning needs at least 2 peers")
    total = 0.0
    for i, z in enumerate(peer_logits):
        total = total + sum(kd_loss(z, other.detach(), temperature)
                            for j, other in enumerate(peer_logits) if j != i) / (k - 1)
    return total


def ensemble_log_probs(member_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """log of the average of the members' softmax outputs: log(1/M * sum_m softmax(z_m)), computed as
    logsumexp_m log_softmax(z_m) - log M. These are valid logits of the averaged distribution, so
    an ensemble is softened with T like any teacher (softmax(log p_bar / T))."""
    stacked = torch.stack([soften(z, 1.0) for z in member_logits])
    return stacked.logsumexp(0) - math.log(len(member_logits))


def discriminator_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of a discriminator's logits: real (teacher outputs) -> 1,
    fake (student outputs) -> 0, each averaged over its samples:
    mean softplus(-d_real) + mean softplus(d_fake) = -mean log sigmoid(d_real) - mean log(1 - sigmoid(d_fake))."""
    return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()


# =======================================================================================
# Feature- and relation-based distillation: FitNets, AT, NST, AB, FT, FSP, SP,
# PKT, RKD, CC, VID, CRD, DarkRank, Jacobian matching. Shapes: feature maps (B,C,H,W),
# embeddings (B,D) (anything else is flattened per sample). Spatial matching and channel
# connectors are the methods' job (kdexp.models.connectors); these functions are pure.
# =======================================================================================


def fitnet_loss(student_regressed: torch.Tensor, teacher_hint: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss (Romero et al. ICLR 2015): squared error between the regressed guided
    layer and the teacher's hint.

    Convention: element-mean MSE (RepDistiller, torchdistill), not the paper's
    1/2 * per-sample sum: the paper's value is D/2 times this (D = C*H*W of the hint), so one
    default weight (beta=100, RepDistiller) works for any hint size."""
    return (student_regressed - teacher_hint).pow(2).mean()


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis (ICLR 2017) activation-based spatial attention: sum over channels
    of |A_c|^p, flattened and L2-normalized per sample -> (B, H*W)."""
    return F.normalize(features.abs().pow(p).sum(1).flatten(1), dim=1)


def at_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer for one layer pair of equal H x W:
    mean_b || Q_s/||Q_s||_2 - Q_t/||Q_t||_2 ||_2 with Q = sum_c |A_c|^p.

    Convention: the paper's unsquared L2 distance of the normalized maps averaged over the
    batch (the authors' code uses the mean of squared differences instead). The paper's
    per-layer weight beta/2 divided by the map size H*W is applied by the `at` method."""
    return (attention_map(student_features, p) - attention_map(teacher_features, p)).norm(dim=1).mean()


def nst_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Neuron selectivity transfer (Huang & Wang 2017): squared MMD between the sets of channel
    activation maps (each flattened over H*W and L2-normalized) of student and teacher, with the
    polynomial kernel k(x, y) = (x^T y)^2 (d=2, c=0), per sample, averaged over the batch:
    mean_ij k(t_i,t_j) + mean_ij k(s_i,s_j) - 2 mean_ij k(s_i,t_j). Channel counts may differ;
    H x W must match. Convention: the full MMD^2 including the constant teacher-teacher term
    (as the paper and RepDistiller), so the value is >= 0 and 0 for identical sets."""
    s = F.normalize(student_features.flatten(2), dim=2)
    t = F.normalize(teacher_features.flatten(2), dim=2)

    def k(a, b):
        return torch.bmm(a, b.transpose(1, 2)).pow(2).mean((1, 2))

    return (k(t, t) + k(s, s) - 2 * k(s, t)).mean()


def ab_loss(student_connected: torch.Tensor, teacher_preact: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Activation-boundary transfer (Heo et al. AAAI 2019), the alternative (squared-hinge) loss:
    where the teacher neuron is active (t > 0), (m - s)^2 if s < m; where it is not, (m + s)^2
    if s > -m; s is the connector's output on the student's pre-activation, m the margin.

    Convention: averaged over all neurons and samples (the paper sums over neurons per sample,
    i.e. C*H*W times this; the authors' code scales that sum by 3/1000): a layer-size-free scale
    that lets one initialization learning rate fit every architecture."""
    s, active = student_connected, teacher_preact > 0
    loss = torch.where(active, (s - margin).pow(2) * (s < margin), (s + margin).pow(2) * (s > -margin))
    return loss.mean()


def factor_transfer_loss(student_factor: torch.Tensor, teacher_factor: torch.Tensor, p: int = 1) -> torch.Tensor:
    """Factor transfer (Kim et al. NeurIPS 2018): || F_s/||F_s||_2 - F_t/||F_t||_2 ||_p^p with the
    factors flattened per sample.

    Convention: averaged over factor elements and samples, as in the authors' code (L1Loss on
    the normalized factors, with its beta=500); the paper's per-sample p-norm sum is D times
    larger (D = factor size)."""
    s = F.normalize(student_factor.flatten(1), dim=1)
    t = F.normalize(teacher_factor.flatten(1), dim=1)
    return (s - t).abs().pow(p).mean()


def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Flow of solution procedure (Yim et al. CVPR 2017): G_ij = sum_{h,w} F1_i F2_j / (H*W)
    -> (B, C1, C2). The larger map is average-pooled to the smaller's H x W first."""
    size = (min(first.shape[2], second.shape[2]), min(first.shape[3], second.shape[3]))
    first, second = F.adaptive_avg_pool2d(first, size), F.adaptive_avg_pool2d(second, size)
    return torch.einsum("bihw,bjhw->bij", first, second) / (size[0] * size[1])


def fsp_loss(student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """FSP loss over consecutive layers l, l+1 of each list (same channels per position):
    sum_l mean_b || G_s^l - G_t^l ||_F^2, all pair weights 1.

    Convention: the paper's squared Frobenius norm per sample (torchdistill sums unsquared
    column norms; RepDistiller takes the element mean of the squared differences)."""
    if len(student_features) != len(teacher_features) or len(student_features) < 2:
        raise ValueError("fsp_loss needs two equally long lists of at least 2 feature maps")
    total = 0.0
    for i in range(len(student_features) - 1):
        g_s = fsp_matrix(student_features[i], student_features[i + 1])
        g_t = fsp_matrix(teacher_features[i], teacher_features[i + 1])
        total = total + (g_s - g_t).pow(2).sum((1, 2)).mean()
    return total


def sp_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori ICCV 2019): G = A A^T over the batch (A: features
    flattened per sample), each row L2-normalized; || G_s - G_t ||_F^2 / B^2.

    Convention: rows normalized by their L2 norm, as in the paper (torchdistill uses L1)."""
    b = student_features.shape[0]

    def gram(f):
        f = f.flatten(1)
        return F.normalize(f @ f.t(), p=2, dim=1)

    return (gram(student_features) - gram(teacher_features)).pow(2).sum() / (b * b)


def _pairwise_sq_dist(x: torch.Tensor) -> torch.Tensor:
    diff = x.unsqueeze(1) - x.unsqueeze(0)
    return diff.pow(2).sum(-1)


def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """(B, B, ...) -> (B, B-1, ...): every row without its diagonal entry, order kept."""
    b = m.shape[0]
    keep = ~torch.eye(b, dtype=torch.bool, device=m.device)
    return m[keep].reshape(b, b - 1, *m.shape[2:])


def pkt_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas ECCV 2018), cosine kernel
    K(a, b) = (cos(a, b) + 1) / 2: for each anchor i, p_{j|i} = K_ij / sum_{k != i} K_ik over
    the other samples j != i; loss = mean_i sum_{j != i} p^t_{j|i} log(p^t_{j|i} / p^s_{j|i}).

    Convention: the paper's conditional probabilities without the diagonal, KL summed over
    j and averaged over anchors ('batchmean', like kd_loss). The authors' code keeps the
    diagonal and averages over all B^2 entries, i.e. about 1/B of this value (hence our default
    beta=500 ~ RepDistiller's 30000 / 64). No eps inside the log: the kernel is clamped at
    1e-12 only so that exactly opposite embeddings stay finite."""
    def cond(f):
        f = F.normalize(f.flatten(1), dim=1)
        k = _off_diagonal(((f @ f.t()) + 1.0) / 2.0).clamp_min(1e-12)
        return k.log() - k.sum(1, keepdim=True).log()

    log_p_s, log_p_t = cond(student_features), cond(teacher_features)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()


def rkd_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, w_dist: float = 25.0,
             w_angle: float = 50.0) -> torch.Tensor:
    """Relational KD (Park et al. CVPR 2019): w_dist * L_dist + w_angle * L_angle.
    L_dist: Huber (delta 1) between pairwise distances divided by their mean; L_angle: Huber
    between cosines of the angle at vertex j of (i, j, k), <e_ij, e_kj>, e_ij = unit(x_i - x_j).

    Convention: the paper's means over distinct pairs (i != j) and distinct triplets (i, j, k
    all different); the authors' code averages over all B^2 pairs / B^3 triplets including the
    degenerate ones (whose terms are 0), which makes both terms smaller."""
    b = student_features.shape[0]
    loss = 0.0
    s, t = student_features.flatten(1), teacher_features.flatten(1)
    if w_dist:
        d_s = _off_diagonal(_pairwise_sq_dist(s)).clamp_min(1e-12).sqrt()  # clamp: duplicates stay finite
        d_t = _off_diagonal(_pairwise_sq_dist(t)).clamp_min(1e-12).sqrt()
        loss = loss + w_dist * F.smooth_l1_loss(d_s / d_s.mean(), d_t / d_t.mean())
    if w_angle and b >= 3:
        def cosines(x):
            e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), dim=2)  # e[j, i] = unit(x_i - x_j)
            return torch.bmm(e, e.transpose(1, 2))  # [j, i, k] = <e_ij, e_kj>

        eye = torch.eye(b, dtype=torch.bool, device=s.device)
        distinct = ~(eye.unsqueeze(2) | eye.unsqueeze(1) | eye.unsqueeze(0))  # j != i, j != k, i != k
        loss = loss + w_angle * F.smooth_l1_loss(cosines(s)[distinct], cosines(t)[distinct])
    return loss


def cc_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, gamma: float = 0.4,
            order: int = 2) -> torch.Tensor:
    """Correlation congruence (Peng et al. ICCV 2019): correlation matrices C_ij = k(f_i, f_j) of
    the L2-normalized embeddings with the Gaussian RBF kernel exp(-gamma ||f_i - f_j||^2) =
    exp(-2 gamma) exp(2 gamma f_i^T f_j), approximated by its Taylor series up to `order` (P=2);
    loss = || C_s - C_t ||_F^2 / B^2.

    Convention: the paper's squared Frobenius norm of normalized embeddings (torchdistill's
    CCKDLoss takes the unsquared norm and does not normalize)."""
    b = student_features.shape[0]

    def corr(f):
        f = F.normalize(f.flatten(1), dim=1)
        dot = f @ f.t()
        series = sum((2 * gamma) ** p / math.factorial(p) * dot.pow(p) for p in range(order + 1))
        return math.exp(-2 * gamma) * series

    return (corr(student_features) - corr(teacher_features)).pow(2).sum() / (b * b)


def vid_loss(pred_mean: torch.Tensor, pred_var: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Variational information distillation (Ahn et al. CVPR 2019): Gaussian negative
    log-likelihood of the teacher feature t under N(mu(s), sigma_c^2) with one variance per
    channel: 1/2 (log sigma_c^2 + (t - mu)^2 / sigma_c^2), constant log(2 pi)/2 dropped.

    Convention: averaged over elements and samples, as the authors' code (the paper sums over
    channels and positions, i.e. C*H*W times this); pred_var has shape (C,)."""
    var = pred_var.view(1, -1, *([1] * (target.dim() - 2)))
    return (0.5 * (var.log() + (target - pred_mean).pow(2) / var)).mean()


def crd_nce_loss(probs: torch.Tensor, n_data: int) -> torch.Tensor:
    """CRD's NCE objective (Tian et al. ICLR 2020, eq. 18): column 0 of `probs` (B, K+1) holds the
    positive pair's P = exp(<u, v>/tau)/Z, columns 1..K the negatives'; with noise probability
    1/N and K negatives, h = P / (P + K/N);
    loss = -mean_b [ log h(pos) + sum_k log(1 - h(neg_k)) ].
    Convention: no eps in the denominators (P + K/N > 0), batch mean."""
    k = probs.shape[1] - 1
    noise = k / float(n_data)
    log_pos = torch.log(probs[:, 0] / (probs[:, 0] + noise))
    log_neg = torch.log(noise / (probs[:, 1:] + noise)).sum(1)
    return -(log_pos + log_neg).mean()


def _plackett_luce_log_prob(scores: torch.Tensor) -> torch.Tensor:
    """log P(order) of scores already sorted in the order: sum_i [x_i - logsumexp(x_i..x_n)]."""
    tail = torch.logcumsumexp(scores.flip(-1), dim=-1).flip(-1)
    return (scores - tail).sum(-1)


def darkrank_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, alpha: float = 3.0,
                  beta: float = 3.0, list_len: Optional[int] = None, soft: bool = False) -> torch.Tensor:
    """DarkRank (Chen, Wang & Zhang AAAI 2018): every sample is a query, the other samples of the
    batch its candidates, scored by S(x_i) = -alpha * ||x_q - x_i||_2^beta. The teacher's scores
    rank the candidates; the student's scores give Plackett-Luce probabilities of rankings.
    Hard transfer: -log P_s(teacher's ranking); soft transfer: KL(P_t || P_s) over all
    permutations of the list (list_len <= 8). Batch mean over queries.

    Conventions: the full list of B-1 candidates (list_len=None) unless truncated to the
    teacher's top `list_len`; the embeddings are used as given (the `darkrank` method
    L2-normalizes them, as the authors' code)."""
    b = student_features.shape[0]
    s, t = student_features.flatten(1), teacher_features.flatten(1)
    score_s = -alpha * _off_diagonal(_pairwise_sq_dist(s)).clamp_min(1e-12).sqrt().pow(beta)  # (B, B-1)
    score_t = -alpha * _off_diagonal(_pairwise_sq_dist(t)).clamp_min(1e-12).sqrt().pow(beta)
    n = b - 1 if list_len is None else min(list_len, b - 1)
    order = score_t.argsort(dim=1, descending=True, stable=True)[:, :n]
    ranked_s, ranked_t = score_s.gather(1, order), score_t.gather(1, order)
    if not soft:
        return -_plackett_luce_log_prob(ranked_s).mean()
    if n > 8:
        raise ValueError(f"soft DarkRank enumerates all n! rankings; list_len={n} is too long (max 8)")
    perms = torch.tensor(list(itertools.permutations(range(n))), device=s.device)  # (n!, n)
    log_p_s = _plackett_luce_log_prob(ranked_s[:, perms])  # (B, n!)
    log_p_t = _plackett_luce_log_prob(ranked_t[:, perms])
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()


def jacobian_loss(student_grad: torch.Tensor, teacher_grad: torch.Tensor) -> torch.Tensor:
    """Jacobian matching (Srinivas & Fleuret ICML 2018): input gradients flattened per sample
    and L2-normalized; mean_b || g_s/||g_s||_2 - g_t/||g_t||_2 ||_2^2.

    Convention: the squared distance (the paper's form, from its equivalence with distillation
    under input noise); some reimplementations use the plain L2 distance."""
    s = F.normalize(student_grad.flatten(1), dim=1)
    t = F.normalize(teacher_grad.flatten(1), dim=1)
    return (s - t).pow(2).sum(1).mean()


# =======================================================================================
# Transfer learning and domain adaptation: teacher/student adaptation on parallel
# data, cross-quality distillation, L2-SP, gradient reversal and DANN's domain loss.
# =======================================================================================


def ts_adapt_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, match: str = "logits",
                  temperature: float = 1.0) -> torch.Tensor:
    """Teacher/student domain adaptation (Li et al. Interspeech 2017, arXiv 1708.05466): the
    student's outputs on the target view of a sample match the teacher's on its source view.

    match="logits": `logit_mse_loss` (1/2 * sum_c (s_c - t_c)^2, batch mean; no temperature).
    match="soft": `kd_loss`, T^2 * KL(softmax(t/T) || softmax(s/T)), batchmean. The paper
    minimizes KL(p_t || p_s) of the plain posteriors, i.e. "soft" at T=1; T > 1 softens both
    sides as in KD."""
    if match == "logits":
        return logit_mse_loss(student_logits, teacher_logits)
    if match == "soft":
        return kd_loss(student_logits, teacher_logits, temperature)
    raise ValueError(f"match={match!r}: one of 'logits', 'soft'")


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """Cross-quality distillation's soft term (Su & Maji 2016, arXiv 1604.00433):
    T^2 * H(softmax(t/T), softmax(s/T)) = -T^2 * sum_c p_t log p_s, batch mean.

    Conventions: a cross-entropy, as in the paper (it exceeds T^2 * KL by T^2 times the
    teacher's entropy, a constant, so the gradients equal `kd_loss`'s); the T^2 factor is not in
    the paper (its lambda absorbs the scale) and is kept so that `method.alpha` means what it
    means in KD."""
    p_t = soften(teacher_logits, temperature).exp()
    return -temperature ** 2 * (p_t * soften(student_logits, temperature)).sum(-1).mean()


def l2sp_loss(params: Iterable[torch.Tensor], reference: Iterable[torch.Tensor]) -> torch.Tensor:
    """L2-SP (Li, Grandvalet & Davoine, ICML 2018, arXiv 1802.01483): 1/2 * sum ||w - w0||^2 over
    the given parameters and their pretrained values w0 (summed over every element, not averaged;
    the paper's alpha/2 * ||w_S - w_S^0||^2 with alpha the method's weight)."""
    total = None
    for w, w0 in zip(params, reference):
        term = (w - w0).pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("l2sp_loss needs at least one parameter")
    return 0.5 * total


def l2_loss(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """1/2 * sum ||w||^2: L2-SP's decay of the parameters without a pretrained value (new layers)."""
    params = list(params)
    if not params:
        raise ValueError("l2_loss needs at least one parameter")
    return 0.5 * sum(w.pow(2).sum() for w in params)


class _ScaledGradReverse(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -lambda."""

    @staticmethod
    def forward(ctx, x, lambd):
        ctx.lambd = float(lambd)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.lambd * grad, None


def gradient_reversal(x: torch.Tensor, lambd: float = 1.0) -> torch.Tensor:
    """Gradient reversal layer (Ganin & Lempitsky, ICML 2015, arXiv 1409.7495): the identity in
    the forward pass, the gradient times -lambda in the backward pass."""
    return _ScaledGradReverse.apply(x, lambd)


def dann_lambda(progress: float, gamma: float = 10.0) -> float:
    """DANN's adaptation factor schedule: 2 / (1 + exp(-gamma * p)) - 1 for training progress p
    in [0, 1] (0 at the start, -> 1; gamma = 10 in the paper)."""
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0


def domain_classification_loss(source_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """DANN's domain loss: binary cross-entropy of the domain classifier's logits (B, 1) or (B,),
    source -> 0 and target -> 1, averaged over all samples of both domains:
    (sum softplus(d_s) + sum softplus(-d_t)) / (B_s + B_t)."""
    s, t = source_logits.reshape(-1), target_logits.reshape(-1)
    return (F.softplus(s).sum() + F.softplus(-t).sum()) / (len(s) + len(t))


# ---- data-free distillation (helper datafree)
# DAFL (Chen et al. ICCV 2019, arXiv 1904.01186): a generator is trained against the frozen teacher
# with three terms of the teacher's outputs on the generated batch; the student then learns KD
# (kd_loss) from the teacher on those inputs alone.

def one_hot_loss(teacher_logits: torch.Tensor) -> torch.Tensor:
    """DAFL's one-hot loss: cross-entropy of the teacher's logits (B, C) to their own argmax (the
    pseudo-labels, not differentiated), averaged over the batch -> scalar. Low when the teacher is
    confident on every generated input."""
    return F.cross_entropy(teacher_logits, teacher_logits.detach().argmax(1))


def activation_loss(features: torch.Tensor) -> torch.Tensor:
    """DAFL's activation loss: minus the mean absolute value of the teacher's features (B, ...) on
    the generated batch -> scalar. Convention: the element mean of the authors' code
    (`-features.abs().mean()`); the paper's -1/n sum_i ||f_i||_1 is D times this (D features per
    sample), so the authors' weight a=0.1 goes with the mean."""
    return -features.abs().mean()


def information_entropy_loss(teacher_logits: torch.Tensor, log_base: float = 10.0) -> torch.Tensor:
    """DAFL's information-entropy loss: minus the entropy of the batch-mean teacher prediction,
    sum_c pbar_c log_b pbar_c with pbar = mean_i softmax(t_i) over the batch (B, C) -> scalar. Its
    minimum, -log_b C, is at a uniform pbar: minimizing it balances the classes the generator makes.
    Convention: base 10, as the authors' code (`torch.log10`), which their weights (ie 5 for MNIST
    and CIFAR-10, 20 for CIFAR-100) were tuned with; the natural-log entropy is ln(10) x this.
    Computed in log space (log pbar = logsumexp_i log_softmax(t_i) - log B), so a class no sample
    predicts contributes 0 instead of the authors' 0 * log 0 = NaN."""
    log_pbar = torch.logsumexp(F.log_softmax(teacher_logits, dim=1), dim=0) - math.log(teacher_logits.shape[0])
    return (log_pbar.exp() * log_pbar).sum() / math.log(log_base)


def attention_mse_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer as the AT authors' code and Zero-Shot KT (Micaelli & Storkey NeurIPS 2019,
    arXiv 1905.09768) compute it for one layer pair of equal H x W: the mean over the batch and the
    H*W positions of the squared difference of the L2-normalized attention maps (`attention_map`),
    i.e. ||Q_s/||Q_s|| - Q_t/||Q_t|| ||^2 / (B * H * W). `at_loss` is the AT paper's unsquared
    distance averaged over the batch instead. Zero-Shot KT's beta=250 goes with this form."""
    return (attention_map(student_features, p) - attention_map(teacher_features, p)).pow(2).mean()
