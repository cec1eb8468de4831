"""Relation-based distillation: the student matches relations between the samples of a batch
(similarities, distances, angles, rankings, correlations) or, for CRD, contrasts its
embedding of a sample against the teacher's embeddings of many others. SP, PKT, RKD, CC,
CRD, DarkRank. Defaults, layers and the CE/KD/beta combination as in kdexp.methods.feature.
"""
import logging
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from kdexp.errors import ConfigError
from kdexp.losses import cc_loss, crd_nce_loss, darkrank_loss, pkt_loss, rkd_loss, sp_loss
from kdexp.methods.base import register_method
from kdexp.methods.feature import FeatureConfig, FeatureMethod
from kdexp.models.connectors import Embed, flat_dim

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- SP

@dataclass
class SPConfig(FeatureConfig):
    name: str = "sp"
    beta: float = 3000.0  # the paper's gamma for CIFAR (also RepDistiller's -b 3000)


@register_method("sp", config=SPConfig)
class SP(FeatureMethod):
    """Tung & Mori ICCV 2019: the teacher's sample-to-sample similarities in the batch (Gram, L2)

    Similarity-preserving KD (Tung & Mori ICCV 2019): the batch's row-normalized Gram matrix of
    the last stage output (B x B, so any shapes pair up) matches the teacher's."""
    pick = "last"
    term = "sp"

    def feature_loss(self, s, t, batch):
        return sp_loss(s[0], t[0])


# ------------------------------------------------------------------------------------- PKT

@dataclass
class PKTConfig(FeatureConfig):
    name: str = "pkt"
    beta: float = 500.0  # ~ RepDistiller's 30000 / batch 64: our loss is a KL per anchor, theirs a mean over B^2


@register_method("pkt", config=PKTConfig)
class PKT(FeatureMethod):
    """Passalis & Tefas ECCV 2018: the teacher's sample-to-sample probabilities on embeddings (KL)

    Probabilistic knowledge transfer (Passalis & Tefas ECCV 2018): conditional probabilities of
    the other samples given each sample, from a cosine kernel on the penultimate embeddings;
    KL from the teacher's to the student's."""
    role = "embedding"
    term = "pkt"

    def feature_loss(self, s, t, batch):
        return pkt_loss(s[0], t[0])


# ------------------------------------------------------------------------------------- RKD

@dataclass
class RKDConfig(FeatureConfig):
    name: str = "rkd"
    beta: float = 1.0
    w_dist: float = 25.0  # the paper's lambda_RKD-D for classification
    w_angle: float = 50.0  # lambda_RKD-A


@register_method("rkd", config=RKDConfig)
class RKD(FeatureMethod):
    """Park et al. CVPR 2019: the teacher's distance and angle relations between samples (Huber)

    Relational KD (Park et al. CVPR 2019): distance-wise (pairwise distances over their mean)
    and angle-wise (angles of sample triplets) relations of the penultimate embeddings, Huber
    loss, weighted w_dist and w_angle."""
    role = "embedding"
    term = "rkd"

    def feature_loss(self, s, t, batch):
        return rkd_loss(s[0], t[0], self.cfg.w_dist, self.cfg.w_angle)


# ------------------------------------------------------------------------------------- CC

@dataclass
class CCConfig(FeatureConfig):
    name: str = "cc"
    beta: float = 100.0  # chosen on digits (no CIFAR value is published for this normalization)
    gamma: float = 0.4  # the Gaussian RBF kernel's gamma (the paper's setting)
    order: int = 2  # P: terms of its Taylor expansion


@register_method("cc", config=CCConfig)
class CC(FeatureMethod):
    """Peng et al. ICCV 2019: the teacher's correlations between the samples' embeddings (RBF kernel)

    Correlation congruence (Peng et al. ICCV 2019): the B x B correlation matrix of the
    L2-normalized penultimate embeddings under a Gaussian RBF kernel (2nd-order Taylor
    expansion) matches the teacher's; the embeddings are compared as they are (no projection
    head), so the dimensions need not agree."""
    role = "embedding"
    term = "cc"

    def feature_loss(self, s, t, batch):
        return cc_loss(s[0], t[0], self.cfg.gamma, self.cfg.order)


# ------------------------------------------------------------------------------------- DarkRank

@dataclass
class DarkRankConfig(FeatureConfig):
    name: str = "darkrank"
    beta: float = 0.01  # the full-list NLL grows like log((B-1)!) (~170 at B=64): 0.01 starts it near CE (digits)
    score_scale: float = 3.0  # the score's alpha: S = -alpha * distance^beta (paper: alpha = 3)
    score_power: float = 3.0  # the score's beta (paper: 3)
    list_len: Optional[int] = None  # candidates per query: null = all B-1 others, else the teacher's top n
    soft: bool = False  # False: hard transfer (teacher's ranking's likelihood); True: KL over all n! rankings


@register_method("darkrank", config=DarkRankConfig)
class DarkRank(FeatureMethod):
    """Chen et al. AAAI 2018: the teacher's ranking of cross-sample similarities (listwise)

    DarkRank (Chen, Wang & Zhang AAAI 2018): listwise transfer of cross-sample similarities.
    Each sample of the batch queries the others; the teacher's distances on the L2-normalized
    penultimate embeddings rank them, and the student maximizes the Plackett-Luce likelihood of
    that ranking under its own scores -alpha * d^beta (hard transfer), or matches the teacher's
    distribution over all rankings (soft transfer, short lists)."""
    role = "embedding"
    term = "darkrank"

    def build(self, s_shapes, t_shapes):
        cfg = self.cfg
        if cfg.list_len is not None and cfg.list_len < 2:
            raise ConfigError(f"method.list_len={cfg.list_len}: needs at least 2 candidates (or null for all)")
        if cfg.soft and (cfg.list_len is None or cfg.list_len > 8):
            raise ConfigError("method.soft=true enumerates all n! rankings: set method.list_len to 8 or less")

    def feature_loss(self, s, t, batch):
        cfg = self.cfg
        return darkrank_loss(F.normalize(s[0].flatten(1), dim=1), F.normalize(t[0].flatten(1), dim=1),
                             cfg.score_scale, cfg.score_power, cfg.list_len, cfg.soft)


# ------------------------------------------------------------------------------------- CRD

@dataclass
class CRDConfig(FeatureConfig):
    name: str = "crd"
    beta: float = 0.8  # the paper's / RepDistiller's -b 0.8
    feat_dim: int = 128  # projection (embedding) dimension
    nce_k: int = 16384  # negatives per positive
    nce_t: float = 0.07  # temperature of the critic exp(<u, v> / t)
    nce_m: float = 0.5  # momentum of the memory bank update
    nce_mode: str = "exact"  # exact: negatives from other classes (RepDistiller's default); instance: any other sample


@register_method("crd", config=CRDConfig)
class CRD(FeatureMethod):
    """Tian et al. ICLR 2020: the teacher's embeddings, contrasted with other samples' (memory bank, NCE)

    Contrastive representation distillation (Tian et al. ICLR 2020). The penultimate
    embeddings of student and teacher are projected (Linear + L2 norm, both heads trained with
    the student) to feat_dim. A memory bank per side holds one embedding per training sample
    (indexed by Batch.idx), updated with momentum nce_m after every step. The student's
    embedding of a sample is contrasted with the teacher's bank entry of the same sample against
    nce_k negatives (and vice versa) with the NCE loss; Z is fixed from the first batch (as the
    reference code). `prepare` allocates the banks for the training set."""
    role = "embedding"
    term = "crd"

    def build(self, s_shapes, t_shapes):
        cfg = self.cfg
        if cfg.feat_dim < 1 or cfg.nce_k < 1 or cfg.nce_t <= 0 or not 0.0 <= cfg.nce_m < 1.0:
            raise ConfigError(f"method=crd: feat_dim >= 1, nce_k >= 1, nce_t > 0 and 0 <= nce_m < 1 are required "
                              f"(got {cfg.feat_dim}, {cfg.nce_k}, {cfg.nce_t}, {cfg.nce_m})")
        if cfg.nce_mode not in ("exact", "instance"):
            raise ConfigError(f"method.nce_mode={cfg.nce_mode!r}: one of exact, instance")
        self.embed_s = Embed(flat_dim(s_shapes[0]), cfg.feat_dim)
        self.embed_t = Embed(flat_dim(t_shapes[0]), cfg.feat_dim)
        # Sized by prepare() for the training set; a checkpoint's banks resize them on load.
        self.register_buffer("memory_s", torch.zeros(0, cfg.feat_dim))  # student embeddings
        self.register_buffer("memory_t", torch.zeros(0, cfg.feat_dim))  # teacher embeddings
        self.register_buffer("memory_labels", torch.zeros(0, dtype=torch.long))  # for nce_mode=exact
        self.register_buffer("z", torch.full((2,), -1.0))  # NCE normalizers (student, teacher side); <0: unset
        self.register_load_state_dict_pre_hook(self._resize_banks)
        self._class_index: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None

    def _resize_banks(self, module, state_dict, prefix, *args):
        for name in ("memory_s", "memory_t", "memory_labels"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=getattr(self, name).device))
        self._class_index = None

    def prepare(self, data, device):
        cfg = self.cfg
        if cfg.nce_mode == "exact" and getattr(data, "labeled", None) is not None:
            raise ConfigError("method.nce_mode=exact picks negatives by label; with dataset.label_fraction < 1 "
                              "use method.nce_mode=instance")
        n, d = len(data.x_train), cfg.feat_dim
        stdv = 1.0 / math.sqrt(d / 3)  # the reference code's initialization: uniform in [-stdv, stdv]
        self.memory_s = torch.rand(n, d, device=device) * 2 * stdv - stdv
        self.memory_t = torch.rand(n, d, device=device) * 2 * stdv - stdv
        self.memory_labels = data.y_train.to(device).clone()
        self.z.fill_(-1.0)
        self._class_index = None

    def sample_negatives(self, idx: torch.Tensor) -> torch.Tensor:
        """(B,) sample indices -> (B, nce_k) negative indices, uniform with replacement over the
        other samples (instance) or over the samples of other classes (exact)."""
        n, k = self.memory_s.shape[0], self.cfg.nce_k
        u = torch.rand(len(idx), k, device=idx.device)
        if self.cfg.nce_mode == "instance":
            if n < 2:
                raise ConfigError("method=crd needs at least 2 training samples")
            r = (u * (n - 1)).long().clamp_max(n - 2)
            return r + (r >= idx.unsqueeze(1)).long()
        if self._class_index is None:
            labels = self.memory_labels
            order = torch.argsort(labels, stable=True)
            counts = torch.bincount(labels, minlength=int(labels.max()) + 1)
            self._class_index = (order, counts, torch.cumsum(counts, 0) - counts)
        order, counts, starts = self._class_index
        y = self.memory_labels[idx]
        others = (n - counts[y]).unsqueeze(1)
        if (others == 0).any():
            raise ConfigError("method=crd nce_mode=exact: a class has no negatives (one class only)")
        r = torch.minimum((u * others).long(), others - 1)
        r = r + (r >= starts[y].unsqueeze(1)).long() * counts[y].unsqueeze(1)  # skip the anchor's own class
        return order[r]

    @staticmethod
    def _scores(v: torch.Tensor, memory: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
        """<v_b, memory[contrast[b, j]]> -> (B, K+1), through whichever is smaller: the gathered
        rows (B, K+1, D) or the full score matrix (B, N)."""
        if contrast.numel() * memory.shape[1] <= v.shape[0] * memory.shape[0]:
            return torch.bmm(memory[contrast], v.unsqueeze(2)).squeeze(2)
        return (v @ memory.t()).gather(1, contrast)

    def _update(self, name: str, idx: torch.Tensor, v: torch.Tensor) -> None:
        # out of place: the old bank may be saved for the backward pass of this step
        bank = getattr(self, name)
        new = F.normalize(bank[idx] * self.cfg.nce_m + v * (1.0 - self.cfg.nce_m), dim=1)
        setattr(self, name, bank.index_copy(0, idx, new))

    def feature_loss(self, s, t, batch):
        cfg = self.cfg
        n = self.memory_s.shape[0]
        if n == 0:
            raise ConfigError("method=crd: the memory banks are empty; call method.prepare(data, device) first")
        if int(batch.idx.max()) >= n:
            raise ConfigError(f"method=crd: sample index {int(batch.idx.max())} outside the memory bank of {n}")
        v_s, v_t = self.embed_s(s[0]), self.embed_t(t[0])
        contrast = torch.cat([batch.idx.unsqueeze(1), self.sample_negatives(batch.idx)], 1)  # positive first
        out_s = torch.exp(self._scores(v_s, self.memory_t, contrast) / cfg.nce_t)  # student anchor, teacher bank
        out_t = torch.exp(self._scores(v_t, self.memory_s, contrast) / cfg.nce_t)  # teacher anchor, student bank
        with torch.no_grad():
            if self.z[0] < 0:
                self.z[0] = out_s.mean() * n
                self.z[1] = out_t.mean() * n
                log.info("crd: normalization constants Z set to %.1f (student side), %.1f (teacher side)",
                         self.z[0].item(), self.z[1].item())
        loss = crd_nce_loss(out_s / self.z[0], n) + crd_nce_loss(out_t / self.z[1], n)
        with torch.no_grad():
            self._update("memory_s", batch.idx, v_s.detach())
            self._update("memory_t", batch.idx, v_t.detach())
        return loss
