"""Deep mutual learning (Zhang et al. CVPR 2018, arXiv 1706.00384): a cohort of peer students
trained together, each on CE + KL to the others; no pretrained teacher."""
from dataclasses import dataclass
from typing import Dict, Optional

import torch.nn as nn

from kdexp.errors import ConfigError
from kdexp.losses import mutual_kl_loss
from kdexp.methods.base import Method, Requirements, SofteningConfig, register_method
from kdexp.models.registry import rebuild


@dataclass
class DMLConfig(SofteningConfig):
    name: str = "dml"
    temperature: float = 1.0  # the paper matches plain softmax outputs
    alpha: float = 1.0  # weight of each peer's mean KL to the others
    w_ce: Optional[float] = 1.0
    peers: int = 2  # cohort size, the student included


@register_method("dml", config=DMLConfig)
class DML(Method):
    """Zhang et al. CVPR 2018, no teacher: peer students trained together, on each other's outputs (KL)

    Each peer k minimizes w_ce * CE_k + alpha * 1/(K-1) * sum_{l != k} T^2 * KL(p_l || p_k);
    all peers step together, each treating the others' predictions as fixed targets
    (`kdexp.losses.mutual_kl_loss`). The peers are new instances of the student's architecture
    (`kdexp.models.rebuild`: its builder, arch and args again), so they are initialized as the
    architecture initializes itself, each with its own draw; the student is peer 0 (val/acc) and
    the others are evaluated every epoch as val/acc_peer1, val/acc_peer2, ... Logged terms sum
    over the peers."""
    requires = Requirements(teacher="none", ignores=("beta",))

    def __init__(self, cfg, student, teacher=None):
        super().__init__(cfg, student, teacher)
        if cfg.peers < 2:
            raise ConfigError(f"method.peers={cfg.peers} is out of range: mutual learning needs >= 2")
        # Built from the global RNG right after the student, so the cohort is deterministic.
        self.peers = nn.ModuleList(rebuild(student, "method=dml (its peers)") for _ in range(cfg.peers - 1))

    def cohort(self):
        return [self.student, *self.peers]

    def eval_models(self) -> Dict[str, nn.Module]:
        return {f"peer{i}": peer for i, peer in enumerate(self.peers, start=1)}

    def losses(self, batch):
        logits = [model(batch.x) for model in self.cohort()]
        terms = {}
        if self.w_ce:
            terms["ce"] = sum(self.ce(z, batch.y)["ce"] for z in logits)
        if self.cfg.alpha:
            terms["dml"] = self.cfg.alpha * mutual_kl_loss(self.soft_inputs(*logits), self.cfg.temperature)
        return terms
