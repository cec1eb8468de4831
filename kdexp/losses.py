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


def kl_per_sample(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p_b || q_b) from log-probabilities (B, C) -> (B,), summed over classes. Written out
    instead of F.kl_div, which has no vmap batching rule."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def kl_div_log(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) from log-probabilities, summed over classes and averaged over the batch
    ('batchmean')."""
    return kl_per_sample(log_p, log_q).mean()


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


_CONSTANTS = {}  # made-once tensors of the KD node (kd_ce_loss_soft), by value, dtype and device


def _minus_ones(shape: Tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A tensor of -1 of `shape` (made once: the CE gradient's one-hot subtraction runs every step)."""
    key = (shape, like.dtype, like.device)
    ones = _CONSTANTS.get(key)
    if ones is None:
        ones = _CONSTANTS[key] = torch.full(shape, -1.0, dtype=like.dtype, device=like.device)
    return ones


def classes_first(logits: torch.Tensor) -> bool:
    """Whether a softmax over the classes of (..., B, C) logits runs faster over dim -2 of their
    transposed copy (..., C, B): on the CPU, PyTorch's log_softmax over a last dim shorter than 16
    costs several times its cost over the transposed copy's dim -2, the copy included (measured,
    2 AVX2 cores: two log_softmaxes of 64 x 10 logits 16 us row-wise vs 6 us; 8 x 64 x 10, 88 vs
    16 us; no gain from C = 16 up). On a GPU the row-wise kernel is the fast one."""
    return logits.device.type == "cpu" and logits.shape[-1] < 16


def _kd_ce_factors(temperature, w_ce, alpha, b: int, all_labeled: bool, like: torch.Tensor):
    """The KD node's factors (1/T, alpha T^2 / B, alpha T / B, the CE gradient's w_ce (/ B when
    every sample is labeled), the CE value's -w_ce / B), for (..., B, C) tensors: from floats made
    once per (T, w_ce, alpha, B) as 0-dim tensors (multiplying by a Python float wraps it into a
    new tensor every call, about 3 us on the CPU against 1 us for the multiply); from tensors of
    shape (...) (one value per fused student) viewed as (..., 1, 1) where they scale (..., B, C)."""
    if isinstance(temperature, torch.Tensor):
        def rows(v):
            return v.view(*v.shape, 1, 1) if isinstance(v, torch.Tensor) else v

        return (rows(1.0 / temperature), alpha * temperature ** 2 / b, rows(alpha * temperature / b),
                rows(w_ce / b if all_labeled else w_ce), -w_ce / b)
    key = (temperature, w_ce, alpha, b, all_labeled, like.dtype, like.device)
    factors = _CONSTANTS.get(key)
    if factors is None:
        if len(_CONSTANTS) > 1024:  # a long sweep in one process: many temperatures and batch sizes
            _CONSTANTS.clear()
        values = (1.0 / temperature, alpha * temperature ** 2 / b, alpha * temperature / b,
                  w_ce / b if all_labeled else w_ce, -w_ce / b)
        factors = _CONSTANTS[key] = tuple(torch.tensor(v, dtype=like.dtype, device=like.device) for v in values)
    return factors


def _swap(x: torch.Tensor) -> torch.Tensor:
    """(..., B, C) <-> (..., C, B) as a view (`t()` for 2-d: the cheaper call)."""
    return x.t() if x.dim() == 2 else x.transpose(-1, -2)


def _as_factor(g: torch.Tensor) -> torch.Tensor:
    """An output's gradient, () or (N,), as a factor of (..., B, C) tensors."""
    return g.view(*g.shape, 1, 1) if g.dim() else g


class _SoftKDCE(torch.autograd.Function):
    """(w_ce * CE, alpha * T^2 * KL(p || softmax(s/T))) with closed-form gradients, from the
    teacher's softened probabilities p and their sum p log p: one autograd node for both terms.
    Internally the logits are (..., C, B) where `classes_first` says so: the softmaxes run over
    the class dim `cd` of that layout, and the gradient goes back as a transposed view. The
    hyperparameters are floats, or tensors of shape (...) (`_per_group`)."""

    @staticmethod
    def forward(ctx, s, y, p, neg_entropy, temperature, w_ce, alpha, ignore_index, all_labeled):
        b = s.shape[-2]
        major = classes_first(s)
        cd = -2 if major else -1
        x = _swap(s).contiguous() if major else s
        p = _swap(p) if major else p  # in x's layout (a view)
        inv_t, kd_value, kd_grad, ce_grad, ce_value = _kd_ce_factors(temperature, w_ce, alpha, b, all_labeled, s)
        log_q = torch.log_softmax(x * inv_t, cd)
        both = (-2, -1)
        kd = (neg_entropy.sum(-1) - (p * log_q).sum(both)).mul_(kd_value)
        unweighted = not isinstance(w_ce, torch.Tensor) and not w_ce
        ctx.c = (kd_grad, None if unweighted else ce_grad, all_labeled, major)
        if unweighted:
            ctx.save_for_backward(log_q, p)
            return torch.zeros_like(kd), kd
        log_p = torch.log_softmax(x, cd)
        y = y.unsqueeze(cd)  # an index along cd
        if all_labeled:  # n = b: no count, no ignore_index
            ctx.save_for_backward(log_q, p, log_p, y)
            return log_p.gather(cd, y).sum(both).mul_(ce_value), kd
        labeled = y != ignore_index
        y = y.clamp_min(0)
        n = labeled.sum(both).clamp_min(1).to(s.dtype)
        ctx.save_for_backward(log_q, p, log_p, y, labeled, n)
        ce = torch.where(labeled, log_p.gather(cd, y), torch.zeros((), dtype=s.dtype, device=s.device)).sum(both)
        return ce * -w_ce / n, kd

    @staticmethod
    def backward(ctx, g_ce, g_kd):
        kd_scale, ce_scale, all_labeled, major = ctx.c
        saved = ctx.saved_tensors  # unpacked once: each access re-creates the tensors
        log_q, p = saved[:2]
        grad = (log_q.exp() - p).mul_(_as_factor(g_kd)).mul_(kd_scale)  # alpha T (softmax(s/T) - p) / B
        if ce_scale is not None:
            log_p, y = saved[2:4]
            cd = -2 if major else -1
            g = log_p.exp().scatter_add_(cd, y, _minus_ones(tuple(y.shape), log_p))  # softmax(s) - one_hot(y)
            if all_labeled:  # ce_scale = w_ce / B
                grad = torch.addcmul(grad, g.mul_(ce_scale), _as_factor(g_ce))
            else:  # on the labeled samples, over their count n
                labeled, n = saved[4:]
                grad = grad + g * labeled * (_as_factor(g_ce) * ce_scale / _as_factor(n))
        return _swap(grad) if major else grad, None, None, None, None, None, None, None, None


def kd_ce_loss_soft(student_logits: torch.Tensor, labels: torch.Tensor, teacher_probs: torch.Tensor,
                    teacher_neg_entropy: torch.Tensor, temperature, w_ce, alpha,
                    ignore_index: int = -1, all_labeled: bool = False):
    """KD's two terms at once -> (w_ce * CE, alpha * kd_loss(s, t, T)), given the teacher's softened
    distribution p = softmax(t/T) (B, C) and its negative entropy sum_c p log p (B,) instead of its
    logits t: what the teacher-output cache serves per temperature (kdexp.engine.teacher_cache), so
    a step does no teacher-side softmax (KL(p || q) = sum p log p - sum p log q).

    Shapes: logits and p (..., B, C), labels and the negative entropy (..., B) -> two (...):
    leading dims are independent groups (the students of a fused sweep), and `temperature`,
    `w_ce`, `alpha` floats or tensors of shape (...). CE is the mean over the labeled samples
    (labels != ignore_index; 0 when there are none), as `Method.ce`; `all_labeled=True` promises
    there is no ignore_index label (skips the count). Values and gradients equal
    `w_ce * CE + alpha * kd_loss` to float rounding; the gradients are the closed forms
    w_ce * (softmax(s) - one_hot(y)) / n + alpha * T * (softmax(s/T) - p) / B in one autograd node,
    which makes a cached KD step cost about what a CE step costs. A float w_ce=0: the CE output is
    0 (not computed). First-order only (no double backward)."""
    def scalar(v):
        return v if isinstance(v, torch.Tensor) else float(v)

    return _SoftKDCE.apply(student_logits, labels, teacher_probs, teacher_neg_entropy, scalar(temperature),
                           scalar(w_ce), scalar(alpha), int(ignore_index), bool(all_labeled))


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
    # out of place: under vmap (a fused sweep) y is batched and `out` is not
    return out.scatter(1, y.unsqueeze(1), math.log(correct_prob))


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
    c = student_logits.shape[-1]
    if c == 2:
        warnings.warn("DKD with 2 classes: the non-target distribution has a single class, so NCKD "
                      "(the beta term) is always 0 and DKD reduces to TCKD + CE", stacklevel=2)
    gt = F.one_hot(target, c).bool()

    def parts(logits):
        log_p = soften(logits, temperature)
        log_target = log_p.gather(1, target.unsqueeze(1))
        log_rest = log_p.masked_fill(gt, float("-inf")).logsumexp(-1, keepdim=True)
        return torch.cat([log_target, log_rest], 1), soften(_non_target_logits(logits, target), temperature)

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

    Convention: the paper's unsquared L2 distance d_b of the normalized maps averaged over the
    batch. The authors' code (szagoruyko/attention-transfer `at_loss`, also RepDistiller) takes
    the mean of the squared differences over the batch and the H*W positions, sum_b d_b^2 / (B H W),
    so this value is H*W * mean_b(d_b) / mean_b(d_b^2) times theirs. The paper's per-layer weight
    beta/2 divided by the map size H*W is applied by the `at` method, which cancels the H*W: its
    term is mean_b(d_b) / (2 mean_b(d_b^2)) times the authors' at the same beta and inputs, for any
    H*W and B (1/(2d) when every d_b = d; at least 1/(2 sqrt 2), since d_b <= sqrt 2 for these
    non-negative maps; unbounded as the maps converge), and its gradient for sample b is 1/(4 d_b)
    times theirs (larger while d_b < 1/4)."""
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
    i.e. N = C*H*W times this): a layer-size-free scale that lets one initialization learning
    rate fit every architecture. The authors' code (bhheo/AB_distillation) sums each layer over
    its neurons, averages over the batch, weighs layer l of n by 2^(l-n+1) and scales the total by
    3/1000: its layer l is 3 N_l / 1000 times the `ab` method's (which keeps the 2^(l-n+1) weights
    on these means). The layers' relative weights therefore differ by their sizes: with the
    authors' WRN teacher on CIFAR (N_l halving from layer to layer) their code weighs the three
    layers' per-neuron means equally (each by 3 * 2^(l-n+1) N_l / 1000 = 49.152), kdexp by 1/4,
    1/2, 1."""
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


# ---- review and overhaul feature distillation: ReviewKD's HCL, OFD's margin and partial L2

def hcl_loss(student_fused: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor],
             levels: Sequence[int] = (4, 2, 1)) -> torch.Tensor:
    """ReviewKD's hierarchical context loss (Chen et al. CVPR 2021, arXiv 2104.09044): for each pair
    of equally shaped maps (B, C, H, W), the element-mean MSE at full resolution plus the MSE of both
    maps adaptive-average-pooled to l x l for each l of `levels` smaller than the map, weighted
    1, 1/2, 1/4, ... in the order used and divided by the sum of the weights used; summed over pairs.

    Convention: as the authors' code (`hcl`, also mdistiller's): a level l counts when l < H (their
    maps are square; here l < min(H, W)), so a 1x1 map (the pooled embedding) is a plain MSE and
    an 8x8 map gets (mse + mse_4/2 + mse_2/4 + mse_1/8) / (1 + 1/2 + 1/4 + 1/8)."""
    if len(student_fused) != len(teacher_features) or not student_fused:
        raise ValueError(f"hcl_loss needs two equally long, non-empty lists of maps (got {len(student_fused)} "
                         f"and {len(teacher_features)})")
    total = 0.0
    for fs, ft in zip(student_fused, teacher_features):
        if fs.shape != ft.shape or fs.dim() != 4:
            raise ValueError(f"hcl_loss compares (B,C,H,W) maps of one shape; got {tuple(fs.shape)} and "
                             f"{tuple(ft.shape)}")
        loss, weight, weights = F.mse_loss(fs, ft), 1.0, 1.0
        for level in levels:
            if level >= min(fs.shape[-2:]):
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, level), F.adaptive_avg_pool2d(ft, level))
            weights += weight
        total = total + loss / weights
    return total


def ofd_margin(bn_mean: torch.Tensor, bn_std: torch.Tensor, min_prob: float = 1e-3) -> torch.Tensor:
    """OFD's per-channel margin (Heo et al. ICCV 2019, arXiv 1904.01866): the expected value of the
    negative responses of a pre-ReLU feature distributed as N(mean, std^2) per channel,
    E[x | x < 0] = mean - std * phi(mean/std) / Phi(-mean/std). Shapes (C,), (C,) -> (C,).

    `mean`/`std` are the teacher BatchNorm's bias and |weight| (its output is gamma * x_hat + beta
    with x_hat ~ N(0, 1)), as in the authors' `get_margin_from_BN`. Where P(x < 0) <= `min_prob`
    (0.001 in their code) the margin is -3 std, as theirs. Computed in float64 with log Phi for
    stability, returned in the input's dtype."""
    mean, std = bn_mean.double(), bn_std.double().abs().clamp_min(1e-12)
    a = mean / std
    log_neg = torch.special.log_ndtr(-a)  # log P(x < 0)
    log_pdf = -0.5 * a * a - 0.5 * math.log(2 * math.pi)
    margin = mean - std * torch.exp(log_pdf - log_neg)
    return torch.where(log_neg > math.log(min_prob), margin, -3.0 * std).to(bn_mean.dtype)


def ofd_partial_l2(student_features: torch.Tensor, teacher_features: torch.Tensor,
                   margin: torch.Tensor) -> torch.Tensor:
    """OFD's partial L2 distance: the teacher's pre-ReLU feature t is raised to the margin m of its
    channel (t' = max(t, m)); the squared difference (s - t')^2 counts where s > t' or t' > 0, i.e.
    nowhere the student is already at or below a teacher response that the ReLU discards.
    Shapes: (B, C, ...) features, margin (C,) -> scalar.

    Convention: summed over all elements and divided by the batch size, as the authors' code
    (`loss.sum()`, then `/ batch_size / 1000` in training: kdexp's ofd puts that 1/1000 in beta)."""
    if margin.numel() != student_features.shape[1]:
        raise ValueError(f"ofd_partial_l2: margin has {margin.numel()} channels, the features "
                         f"{student_features.shape[1]}")
    m = margin.reshape(1, -1, *([1] * (student_features.dim() - 2)))
    target = torch.maximum(teacher_features, m)
    keep = (student_features > target) | (target > 0)
    return ((student_features - target).pow(2) * keep).sum() / student_features.shape[0]


# ---- channel- and head-level feature distillation: SRD, ICKD, CWD, MGD
# Shapes as in the feature block above. The connectors, the teacher's classifier (SRD), the random
# mask and the generation block (MGD) belong to the methods (kdexp/methods/srd.py, ickd.py, cwd.py,
# mgd.py); these functions only compare tensors.


def srd_terms(student_feature: torch.Tensor, teacher_feature: torch.Tensor, student_head_logits: torch.Tensor,
              teacher_logits: torch.Tensor, sr_loss: str = "mse",
              temperature: float = 4.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax regression representation learning (Yang et al. ICLR 2021) -> (fm, sr):
    fm = feature matching of the connected student embedding (B, D) to the teacher's (B, D);
    sr = the teacher's classifier applied to the connected student embedding (`student_head_logits`,
    (B, K)) against the teacher's own logits (B, K).

    Conventions (the authors' code, KD_SRRL): fm is the element-mean squared error (their
    `statm_loss`: squared differences of the pooled features, averaged over channels and batch;
    the paper writes an unnormalized squared L2 norm, D times this); sr_loss="mse" is the
    element-mean squared error of the logits (F.mse_loss, what their code trains with);
    sr_loss="kl" is the paper's softmax form, T^2 * KL(softmax(t/T) || softmax(s/T)) batchmean
    (`kd_loss`)."""
    fm = fitnet_loss(student_feature.flatten(1), teacher_feature.flatten(1))
    if sr_loss == "mse":
        sr = (student_head_logits - teacher_logits).pow(2).mean()
    elif sr_loss == "kl":
        sr = kd_loss(student_head_logits, teacher_logits, temperature)
    else:
        raise ValueError(f"srd_terms: sr_loss={sr_loss!r}; one of mse, kl")
    return fm, sr


def srd_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, student_head_logits: torch.Tensor,
             teacher_logits: torch.Tensor, sr_loss: str = "mse", temperature: float = 4.0,
             fm_weight: float = 1.0, sr_weight: float = 1.0) -> torch.Tensor:
    """fm_weight * fm + sr_weight * sr of `srd_terms` (the authors' code weighs both by 1)."""
    fm, sr = srd_terms(student_feature, teacher_feature, student_head_logits, teacher_logits, sr_loss, temperature)
    return fm_weight * fm + sr_weight * sr


def inter_channel_correlation(features: torch.Tensor) -> torch.Tensor:
    """ICKD's inter-channel correlation (Liu et al. ICCV 2021) of (B, C, H, W) maps -> (B, C, C): the
    Gram matrix G_ij = <F_i, F_j> of the flattened channel maps, each row L2-normalized (the
    authors' code: F.normalize(bmm(F, F^T), dim=2); the channel maps themselves are not
    normalized). The rows are scale-free, so each sample is first divided by its largest |value|
    (a constant for autograd: same value and gradient) to keep the Gram finite for any input scale."""
    f = features.flatten(2)
    scale = f.detach().abs().amax(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(f.dtype).tiny)
    f = f / scale
    return F.normalize(torch.bmm(f, f.transpose(1, 2)), dim=2)


def ickd_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """ICKD (Liu et al. ICCV 2021): sum_{b,i,j} (G^s_bij - G^t_bij)^2 / (C * B) with G the
    row-normalized inter-channel correlation (`inter_channel_correlation`) of the whole map, as the
    authors' CIFAR code divides (the squared Frobenius distance per sample, over C, batch mean).
    Channel counts must match (the student goes through a connector); H x W may differ."""
    if student_features.shape[:2] != teacher_features.shape[:2]:
        raise ValueError(f"ickd_loss: (B, C) must match, got {tuple(student_features.shape)} and "
                         f"{tuple(teacher_features.shape)}")
    b, c = teacher_features.shape[:2]
    diff = inter_channel_correlation(student_features) - inter_channel_correlation(teacher_features)
    return diff.pow(2).sum() / (c * b)


def cwd_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, tau: float = 4.0) -> torch.Tensor:
    """Channel-wise distillation (Shu et al. ICCV 2021): every channel of a (B, C, H, W) map becomes a
    distribution over its H*W positions, softmax(x / tau); tau^2 * KL(teacher || student) per
    channel, summed over channels and averaged over the batch and channels: / (B * C), as the
    authors' code (TorchDistiller's CriterionCWD) and mmrazor's ChannelWiseDivergence divide.
    That is `kd_loss` with the positions in the role of the classes and every (sample, channel)
    pair as one row. Shapes must match (a connector maps the student's channels)."""
    if student_features.shape != teacher_features.shape:
        raise ValueError(f"cwd_loss: shapes must match, got {tuple(student_features.shape)} and "
                         f"{tuple(teacher_features.shape)}")
    return kd_loss(student_features.flatten(2), teacher_features.flatten(2), tau)


def mgd_loss(generated: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Masked generative distillation (Yang et al. ECCV 2022): the feature the generation block
    produced from the masked student feature against the teacher's, squared error summed over
    C, H, W and averaged over the batch (the authors' MSELoss(reduction='sum') / N); their small
    weight (alpha_mgd, 7e-5 on ImageNet) is sized for this sum."""
    if generated.shape != teacher_features.shape:
        raise ValueError(f"mgd_loss: shapes must match, got {tuple(generated.shape)} and "
                         f"{tuple(teacher_features.shape)}")
    return (generated - teacher_features).pow(2).sum() / generated.shape[0]


# ---- curriculum temperature
# CTKD (Li et al. AAAI 2023): a learned temperature behind a gradient reversal layer, so that it
# maximizes the distillation loss the student minimizes, with the reversal's weight on a cosine ramp.
# The losses it softens are kd_loss / dkd_terms above, which take a tensor temperature as is.


def ctkd_lambda(epoch: int, lambda_min: float = 0.0, lambda_max: float = 1.0, ramp_epochs: int = 10) -> float:
    """CTKD's curriculum for the reversal weight at 1-based `epoch` (the authors count from 1):
    lambda_min + (lambda_max - lambda_min) * (1 - cos(pi * min(epoch, E) / E)) / 2, E = ramp_epochs;
    lambda_max from the start when E = 0. The paper's eq. written as the authors' `CosineDecay`
    (decay_max = -lambda_min, decay_min = -lambda_max: their reversal layer multiplies by the signed
    value, `gradient_reversal` by -lambda). CIFAR defaults: 0 -> 1 over 10 epochs."""
    if ramp_epochs <= 0:
        return float(lambda_max)
    e = min(max(epoch, 0), ramp_epochs)
    return lambda_min + (lambda_max - lambda_min) * (1.0 - math.cos(math.pi * e / ramp_epochs)) / 2.0


def curriculum_temperature(theta: torch.Tensor, lambd: float, t_min: float = 1.0, t_span: float = 20.0) -> torch.Tensor:
    """CTKD's global temperature t_min + t_span * sigmoid(theta), shape of theta (a scalar), in
    (t_min, t_min + t_span): (1, 21) with the authors' defaults (t_start 1, t_end 20). theta enters
    through `gradient_reversal(theta, lambd)`, as in the authors' code (before the sigmoid), so the
    forward value is unchanged and theta's gradient is -lambd times that of the loss it softens:
    the optimizer's descent step on theta ascends the distillation loss."""
    return t_min + t_span * torch.sigmoid(gradient_reversal(theta, lambd))


# ---- logit-level variants: MLKD, NKD, WSLD
# Multi-level logit distillation (Jin et al. CVPR 2023), the normalized KD loss (Yang et al. ICCV
# 2023) and weighted soft labels (Zhou et al. ICLR 2021). Softening and KL come from `soften`,
# `kl_div_log` and `kd_loss` above.


def _non_target_logits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The (B, C - 1) logits of every class but each sample's target, in class order. A gather
    (class j of the result is class j, or j + 1 from the target on), not a boolean mask: its
    shape is static, so it runs under vmap (a fused sweep) with per-student targets."""
    others = torch.arange(logits.shape[-1] - 1, device=logits.device)
    return logits.gather(-1, others + (others >= target.unsqueeze(-1)))


def _warn_two_classes(method: str, term: str) -> None:
    warnings.warn(f"{method} with 2 classes: the non-target distribution has a single class, so {term} is "
                  f"always 0", stacklevel=3)


def kept_fraction(scores: torch.Tensor, percentile: float) -> torch.Tensor:
    """MLKD's confidence mask as the authors' code applies it, shape (N,) -> scalar: the fraction of
    `scores` at or below their `percentile`-th percentile (linear interpolation, as np.percentile).

    In the authors' code the mask multiplies a loss already reduced to a scalar and is then
    averaged, so it scales the whole term by this fraction (about percentile / 100) rather than
    selecting samples. No gradient flows through it."""
    scores = scores.detach()
    # torch.quantile's linear interpolation written out: sort has a vmap batching rule, quantile none
    ordered = scores.sort().values
    pos = (scores.shape[-1] - 1) * percentile / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    threshold = ordered[..., lo] + (ordered[..., hi] - ordered[..., lo]) * (pos - lo)
    return (scores <= threshold.unsqueeze(-1)).to(scores.dtype).mean(-1)


def prediction_correlation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                                level: str) -> torch.Tensor:
    """MLKD's batch- and class-level alignment: with P = softmax(logits / T) of shape (B, C), the
    squared Frobenius distance between the teacher's and the student's Gram matrices,
    level "batch": G = P P^T (B x B, input correlation), divided by B;
    level "class": G = P^T P (C x C, category correlation), divided by C.
    No T^2 factor (the authors' code has none for these terms)."""
    p_s, p_t = soften(student_logits, temperature).exp(), soften(teacher_logits, temperature).exp()
    if level == "batch":
        g_s, g_t, n = p_s @ p_s.t(), p_t @ p_t.t(), p_s.shape[0]
    elif level == "class":
        g_s, g_t, n = p_s.t() @ p_s, p_t.t() @ p_t, p_s.shape[1]
    else:
        raise ValueError(f"level={level!r}: one of batch, class")
    return (g_t - g_s).pow(2).sum() / n


def mlkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperatures: Sequence[float],
               confidence_percentile: float = 50.0, class_confidence_percentile: float = 50.0,
               confidence_logits: Optional[torch.Tensor] = None,
               relation_logits: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> dict:
    """Multi-level logit distillation (Jin et al. CVPR 2023, the authors' code) on ONE view of the
    batch -> {"instance", "batch", "class"}, each summed over the prediction-augmentation
    `temperatures` (T_k; duplicates count twice, as in the authors' code):

      instance = (1 + f) * sum_k T_k^2 KL(softmax(t/T_k) || softmax(s/T_k))   (batchmean)
      batch    = f       * sum_k prediction_correlation_loss(s, t, T_k, "batch")
      class    = f_cls   * sum_k prediction_correlation_loss(s, t, T_k, "class")

    f = `kept_fraction` of the teacher's confidence (max softmax at T=1, per sample) at
    `confidence_percentile`; f_cls = that of its class confidence (softmax summed over the batch,
    per class) at `class_confidence_percentile`; both from `confidence_logits` (the raw teacher
    logits, as in the authors' code; None: `teacher_logits`). `relation_logits`: the (student,
    teacher) pair of the batch and class terms (None: the logits given).

    Conventions: (1) the authors train on a weak and a strong (RandAugment) view; their instance
    term is the weak view's KD scaled by f plus the strong view's unscaled KD, and their batch and
    class terms use the weak view only. Here both views are the one view given, which makes the
    instance term (1 + f) times the KD sum. (2) The masks scale each term by f as the authors'
    code does (see `kept_fraction`), not per sample."""
    s_rel, t_rel = (student_logits, teacher_logits) if relation_logits is None else relation_logits
    with torch.no_grad():
        p_t = soften(teacher_logits if confidence_logits is None else confidence_logits, 1.0).exp()
        f = kept_fraction(p_t.max(-1).values, confidence_percentile)
        f_cls = kept_fraction(p_t.sum(0), class_confidence_percentile)
    kd = sum(kd_loss(student_logits, teacher_logits, temp) for temp in temperatures)
    bc = sum(prediction_correlation_loss(s_rel, t_rel, temp, "batch") for temp in temperatures)
    cc = sum(prediction_correlation_loss(s_rel, t_rel, temp, "class") for temp in temperatures)
    return {"instance": (1.0 + f) * kd, "batch": f * bc, "class": f_cls * cc}


def nkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
              temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Normalized KD (Yang et al. ICCV 2023, arXiv 2303.13005) -> (target term, non-target term):

      target     = -mean_b  p_t(y_b) * log p_s(y_b)                 (softmax at T=1)
      non-target = -T^2 mean_b sum_{j != y_b} q_t(j) log q_s(j),   q = softmax(non-target logits / T)

    i.e. the non-target probabilities renormalized to sum to 1. The paper's gamma weighs the
    non-target term (the method's job). Conventions: cross-entropy values as in the paper and the
    authors' code (the non-target term exceeds the KL between the q's by the teacher's entropy
    T^2 * H(q_t); gradients are those of the KL); the temperature softens the non-target term only,
    as in the authors' code; computed in log space (finite at T=1 with logits around +-100). With 2
    classes the non-target term is identically 0 (a warning is issued)."""
    c = student_logits.shape[-1]
    if c == 2:
        _warn_two_classes("NKD", "the non-target term (beta)")
    idx = target.unsqueeze(1)
    log_s_target = soften(student_logits, 1.0).gather(1, idx).squeeze(1)
    p_t_target = soften(teacher_logits, 1.0).gather(1, idx).squeeze(1)
    target_term = -(p_t_target.exp() * log_s_target).mean()
    non_target = soft_cross_entropy(_non_target_logits(student_logits, target),
                                    _non_target_logits(teacher_logits, target), temperature)
    return target_term, non_target


def wsld_weights(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                 eps: float = 1e-7) -> torch.Tensor:
    """Weighted soft labels (Zhou et al. ICLR 2021, arXiv 2102.00650): per-sample weights (B,)
    w = 1 - exp(-max(CE_s / (CE_t + eps), 0)), with CE_s, CE_t the student's and the teacher's
    cross-entropy on `target` at T=1, computed without gradient (the authors' code, eps 1e-7).
    A sample the student already fits better than the teacher gets a small weight."""
    with torch.no_grad():
        idx = target.unsqueeze(1)
        ce_s = -soften(student_logits, 1.0).gather(1, idx).squeeze(1)
        ce_t = -soften(teacher_logits, 1.0).gather(1, idx).squeeze(1)
        return 1.0 - torch.exp(-(ce_s / (ce_t + eps)).clamp_min(0.0))


def weighted_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                     weights: torch.Tensor) -> torch.Tensor:
    """T^2 * mean_b w_b * KL(softmax(t_b/T) || softmax(s_b/T)): `kd_loss` with per-sample weights
    (B,); all weights 1 give `kd_loss`. WSLD's soft term with `wsld_weights`.

    Convention: KL, as kdexp's KD; the WSLD authors' code weighs the cross-entropy
    -sum p_t log p_s, which is larger by T^2 * mean_b w_b H(p_t,b) and has the same gradient
    (the weights carry none)."""
    per_sample = kl_per_sample(soften(teacher_logits, temperature), soften(student_logits, temperature))
    return temperature ** 2 * (weights.to(per_sample.dtype) * per_sample).mean()


# ---- data-free distillation
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
