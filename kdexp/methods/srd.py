"""SRD: knowledge distillation via softmax regression representation learning (Yang et al. ICLR 2021,
"Knowledge Distillation via Softmax Regression Representation Learning", authors' code
jingyang2017/KD_SRRL). The student's penultimate representation, through a connector to the
teacher's width, must (1) match the teacher's penultimate feature and (2) work with the TEACHER's
frozen classifier: the teacher's head applied to it must give the teacher's logits.

(Not the "SRD" of torchdistill, which is Miles & Mikolajczyk's projector-based distillation.)
"""
import logging
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from kdexp.errors import ConfigError
from kdexp.losses import srd_loss
from kdexp.methods.base import register_method
from kdexp.methods.feature import FeatureConfig, FeatureMethod
from kdexp.models.connectors import Connector, flat_dim
from kdexp.models.taps import probing, run_with_features

log = logging.getLogger(__name__)

# Where classifiers usually live: RepDistiller/kdexp CIFAR nets (fc, classifier, linear), torchvision
# (fc, classifier), timm (head, fc, classifier); then the model's last nn.Linear (kdexp's Sequential
# cnn/mlp/lenet5).
HEAD_NAMES = ("fc", "classifier", "linear", "head")
SR_LOSSES = ("mse", "kl")


def _candidates(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    children = dict(model.named_children())
    found = [(n, children[n]) for n in HEAD_NAMES if n in children]
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears and all(m is not linears[-1][1] for _, m in found):
        found.append(linears[-1])
    return found


def _reproduces(head: nn.Module, embedding: torch.Tensor, logits: torch.Tensor) -> bool:
    """Whether `head(embedding)` gives `logits` (shapes only on the meta device: a skeleton has no values)."""
    try:
        out = head(embedding)
    except (RuntimeError, TypeError, ValueError):  # it does not take this input (another layer's head)
        return False
    if not isinstance(out, torch.Tensor) or out.shape != logits.shape:
        return False
    if logits.device.type == "meta":
        return True
    tol = 1e-3 * max(1.0, float(logits.abs().max()))
    return bool(torch.allclose(out, logits, rtol=1e-3, atol=tol))


def find_classifier(model: nn.Module, layer: str, in_shape, name: Optional[str] = None,
                    what: str = "teacher") -> Tuple[str, nn.Module]:
    """(module name, module) of `model`'s classifier: the module that maps the feature tapped at
    `layer` (flattened per sample) to the model's logits. `name` picks it by module name; otherwise
    fc / classifier / linear / head / the last nn.Linear, the first that reproduces the model's
    logits on a probe batch (`probing`: eval mode, no gradients; a generator of its own, so the global
    RNG is untouched).
    Raises a ConfigError naming method.teacher_head when none does."""
    modules = dict(model.named_modules())
    if name is not None and (not name or name not in modules):
        raise ConfigError(f"method.teacher_head={name!r}: the {what} has no such module; its modules: "
                          f"{', '.join(n for n in modules if n)}")
    candidates = [(name, modules[name])] if name else _candidates(model)
    device = next(iter(model.parameters()), torch.zeros(())).device
    x = torch.randn(4, *in_shape, generator=torch.Generator().manual_seed(0)).to(device)
    with probing(model):
        logits, feats = run_with_features(model, x, [layer], what)
        embedding = feats[layer].flatten(1)
        for cand_name, module in candidates:
            if _reproduces(module, embedding, logits):
                return cand_name, module
    tried = ", ".join(n for n, _ in candidates) or "none (no nn.Linear)"
    raise ConfigError(f"method=srd applies the {what}'s classifier to the student's feature, but no module of the "
                      f"{what} ({type(model).__name__}) maps its feature {layer} {tuple(feats[layer].shape[1:])} "
                      f"to its logits (tried: {tried}); set method.teacher_head=<module name> (and "
                      f"method.teacher_layers=[<that module's input>]) for this {what}")


@dataclass
class SRDConfig(FeatureConfig):
    name: str = "srd"
    beta: float = 1.0  # weight of fm_weight * fm + sr_weight * sr (the authors' --weight 1)
    fm_weight: float = 1.0  # feature matching (the paper's alpha; 1 in the authors' code)
    sr_weight: float = 1.0  # softmax regression (the paper's beta; 1 in the authors' code)
    sr_loss: str = "mse"  # mse: the logits' element-mean MSE (the authors' code) | kl: T^2 * KL at method.temperature
    teacher_head: Optional[str] = None  # module name of the teacher's classifier; null: found (fc, classifier, ...)


@register_method("srd", config=SRDConfig)
class SRD(FeatureMethod):
    """Yang et al. ICLR 2021: the teacher's embedding and its classifier's logits on the student's

    SRD / SRRL (Yang et al. ICLR 2021): a connector (Linear + BN on the flattened penultimate
    embedding) maps the student's embedding s to the teacher's width; term = beta * (fm_weight *
    MSE(r(s), t_emb) + sr_weight * SR), SR comparing W_t(r(s)), the teacher's frozen classifier on
    the connected student embedding, with the teacher's logits (MSE, or KL at method.temperature
    with sr_loss=kl). Gradients flow through the classifier into the connector and the student;
    the classifier stays the teacher's: frozen, outside method.parameters() and the checkpoint.

    Differences from the authors' code: their connector is a 1x1 conv + BN + ReLU on the last
    stage's map before the average pooling; here it is kdexp's Connector on the pooled embedding
    (the `embedding` tap), so any architecture with such a tap works."""
    role = "embedding"
    term = "srd"

    def build(self, s_shapes, t_shapes):
        cfg = self.cfg
        if cfg.sr_loss not in SR_LOSSES:
            raise ConfigError(f"method.sr_loss={cfg.sr_loss!r}; one of {', '.join(SR_LOSSES)}")
        if cfg.fm_weight < 0 or cfg.sr_weight < 0:
            raise ConfigError(f"method.fm_weight={cfg.fm_weight} and method.sr_weight={cfg.sr_weight} must be >= 0")
        if cfg.sr_loss == "kl" and cfg.temperature <= 0:
            raise ConfigError(f"method.temperature={cfg.temperature} must be > 0 (sr_loss=kl)")
        self.connector = Connector((flat_dim(s_shapes[0]),), (flat_dim(t_shapes[0]),))
        head_name, head = find_classifier(self.teacher.model, self.t_layers[0], self.teacher.in_shape,
                                          cfg.teacher_head)
        # The teacher's own module, kept off the module tree (like the teacher itself): no parameters(),
        # no state_dict entry; its weights are frozen with the teacher.
        object.__setattr__(self, "teacher_head", head)
        log.info("srd: the teacher's classifier is its module %r", head_name)

    def features(self, batch):
        s_logits, s_f, t_logits, t_f = super().features(batch)
        return s_logits, s_f, t_logits, t_f + [t_logits]  # the SR target travels with the teacher's features

    def feature_loss(self, s, t, batch):
        cfg = self.cfg
        t_emb, t_logits = t
        s_emb = self.connector(s[0].flatten(1))
        head_logits = self.teacher_head(s_emb)
        if cfg.sr_loss == "kl":
            head_logits, t_logits = self.soft_inputs(head_logits, t_logits)
        return srd_loss(s_emb, t_emb, head_logits, t_logits, cfg.sr_loss, cfg.temperature,
                        cfg.fm_weight, cfg.sr_weight)
