"""Transfer learning methods: fine-tuning / layer transfer with L2-SP, progressive networks,
multitask learning with one shared trunk, and data distillation (pseudo-labels from a teacher
ensembled over transforms). Shared helpers: copying the teacher's weights into a student of the
same architecture and freezing modules (no gradient, always in eval mode)."""
import copy
import logging
import types
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdexp.data.stream import LazyInputs, batches_of
from kdexp.errors import ConfigError
from kdexp.losses import l2_loss, l2sp_loss
from kdexp.methods.base import Batch, Method, MethodConfig, Requirements, register_method, UNLABELED
from kdexp.models.taps import default_layers, probing, run_with_features

log = logging.getLogger(__name__)


# -- helpers ----------------------------------------------------------------------------------
def _modules_by_name(model: nn.Module, names: Sequence[str], key: str, what: str = "student") -> List[nn.Module]:
    modules = dict(model.named_modules())
    missing = [n for n in names if not n or n not in modules]
    if missing:
        raise ConfigError(f"{key}: the {what} has no module(s) {missing}; its modules: "
                          f"{', '.join(n for n in modules if n)}")
    return [modules[n] for n in names]


def _under(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def load_teacher_weights(student: nn.Module, teacher, method: str, skip: Sequence[str] = ()) -> None:
    """Copy the frozen teacher's weights into `student` (same architecture), except the state
    under the module names `skip` (e.g. a head that is re-initialized). A student of another
    architecture, or a teacher ensemble, is a ConfigError."""
    if teacher is None:
        raise ConfigError(f"method={method} starts from the teacher's weights but got no teacher")
    src, dst = teacher.model.state_dict(), student.state_dict()
    missing = sorted(k for k in set(dst) - set(src) if not _under(k, skip))
    unexpected = sorted(k for k in set(src) - set(dst) if not _under(k, skip))
    wrong = sorted(k for k in set(src) & set(dst)
                   if not _under(k, skip) and tuple(src[k].shape) != tuple(dst[k].shape))
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what} {keys[:4]}" for what, keys in
                           (("missing in the teacher:", missing), ("not in the student:", unexpected),
                            ("of other shapes:", [f"{k} {tuple(src[k].shape)} vs {tuple(dst[k].shape)}"
                                                  for k in wrong])) if keys)
        raise ConfigError(f"method={method} starts from the teacher's weights, so the student must have the "
                          f"teacher's architecture (the same arch and args, e.g. teacher=cnn student=cnn; not a "
                          f"teachers=[...] ensemble): {detail}" +
                          ("; a layer whose shape differs (e.g. the head for another number of classes) can be "
                           "listed in method.reinit" if wrong and not missing and not unexpected else ""))
    student.load_state_dict({k: v for k, v in src.items() if not _under(k, skip)}, strict=False)


def _always_eval(self, mode: bool = True):
    return nn.Module.train(self, False)


def freeze(module: nn.Module) -> nn.Module:
    """No gradient for `module`'s parameters and eval mode for good (dropout off, BatchNorm running
    statistics fixed), even when a parent is put in training mode."""
    for p in module.parameters():
        p.requires_grad_(False)
    module.train = types.MethodType(_always_eval, module)
    return module.eval()


def first_layers(model: nn.Module, k: int) -> List[str]:
    """Names of the leaf modules with parameters that come before the (k+1)-th Conv/Linear layer in
    module order: the first k layers with the normalization layers between them."""
    names, count = [], 0
    for name, m in model.named_modules():
        if not name or any(True for _ in m.children()) or not any(True for _ in m.parameters(recurse=False)):
            continue
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            count += 1
            if count > k:
                break
        names.append(name)
    if count < k:
        raise ConfigError(f"method.freeze_first={k}: the student has only {count} Conv/Linear layers")
    return names


def _reset(module: nn.Module) -> None:
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


def _embedding_layer(model: nn.Module, layer: Optional[str], key: str) -> str:
    return layer if layer else default_layers(model, "embedding", f"student ({key}: null)")[0]


# -- finetune ---------------------------------------------------------------------------------
@dataclass
class FinetuneConfig(MethodConfig):
    name: str = "finetune"
    w_ce: Optional[float] = 1.0
    alpha: float = 0.0  # no distillation term
    beta: float = 0.0  # L2-SP: beta/2 * ||w - w0||^2 over the trainable pretrained parameters (0: plain fine-tuning)
    l2_new: float = 0.0  # L2-SP: l2_new/2 * ||w||^2 over the re-initialized parameters
    freeze: List[str] = field(default_factory=list)  # module names kept at the pretrained weights
    freeze_first: int = 0  # also freeze the first k Conv/Linear layers (and the norms between them)
    reinit: List[str] = field(default_factory=list)  # modules re-initialized instead of copied (e.g. the head)
    pretrained: bool = True  # false: no weights copied, the student's own initialization (the from-scratch row)


@register_method("finetune", config=FinetuneConfig)
class Finetune(Method):
    """Yosinski et al. 2014, Li et al. 2018: the teacher's weights as start, then the new labels (CE)

    Fine-tuning from the teacher's weights on the labels of the new task/domain: the student (same
    architecture as the teacher) starts from them, `reinit` modules start fresh, `freeze` /
    `freeze_first` modules keep the pretrained weights (layer transfer, Yosinski et al. 2014), and
    L2-SP (Li et al. 2018) pulls the trainable pretrained weights towards their start:
    w_ce * CE + beta/2 * ||w_S - w_S^0||^2 + l2_new/2 * ||w_new||^2. With a domain shift it trains
    on the target view (domain.train_view overrides). The teacher may be pretrained on other
    classes (teacher.classes). pretrained=false copies nothing: the same recipe from scratch."""
    requires = Requirements(teacher="weights", labels="required", views="target",
                            ignores=("temperature", "alpha"))

    def __init__(self, cfg, student, teacher=None):
        super().__init__(cfg, student, teacher)
        if not self.w_ce:
            raise ConfigError("method=finetune with method.w_ce=0 has nothing to learn from; set method.w_ce > 0")
        if cfg.freeze_first < 0:
            raise ConfigError(f"method.freeze_first={cfg.freeze_first} is out of range: must be >= 0")
        reinit, frozen = list(cfg.reinit), list(cfg.freeze)
        _modules_by_name(student, reinit, "method.reinit")
        _modules_by_name(student, frozen, "method.freeze")
        frozen += first_layers(student, cfg.freeze_first) if cfg.freeze_first else []
        both = [n for n in reinit if any(_under(n, [f]) or _under(f, [n]) for f in frozen)]
        if both:
            raise ConfigError(f"method.reinit {both} overlaps the frozen modules {frozen}: a frozen re-initialized "
                              f"layer would stay random")
        if cfg.pretrained:
            load_teacher_weights(student, teacher, "finetune", skip=reinit)
        for m in _modules_by_name(student, reinit, "method.reinit"):
            _reset(m)
        for m in _modules_by_name(student, frozen, "method.freeze"):
            freeze(m)
        self.frozen = frozen
        # L2-SP reference: the pretrained values of the trainable copied parameters
        self._sp = [(n, p) for n, p in student.named_parameters() if p.requires_grad and not _under(n, reinit)]
        self._new = [p for n, p in student.named_parameters() if p.requires_grad and _under(n, reinit)]
        for i, (n, p) in enumerate(self._sp):
            self.register_buffer(f"_w0_{i}", p.detach().clone(), persistent=False)
        trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
        log.info("finetune: %d of %d parameters trainable (frozen: %s, re-initialized: %s)", trainable,
                 sum(p.numel() for p in student.parameters()), frozen or "none", reinit or "none")

    def losses(self, batch):
        terms = self.ce(self.student(batch.x), batch.y)
        if self.cfg.beta and self._sp:
            terms["l2sp"] = self.cfg.beta * l2sp_loss([p for _, p in self._sp],
                                                      [getattr(self, f"_w0_{i}") for i in range(len(self._sp))])
        if self.cfg.l2_new and self._new:
            terms["l2_new"] = self.cfg.l2_new * l2_loss(self._new)
        return terms


# -- progressive networks -----------------------------------------------------------------------
class ProgressiveNet(nn.Module):
    """Two columns (Rusu et al. 2016, arXiv 1606.04671): the frozen old column and a new one. Each
    lateral layer i of the new column gets h_i = W_i h_{i-1} + U_i h'_{i-1}, where h'_{i-1} is the
    OLD column's input of the same layer and U_i a fresh layer of W_i's kind (so shapes match
    for any architecture); the activation follows as in the column itself."""

    def __init__(self, old: nn.Module, new: nn.Module, layers: Sequence[str]):
        super().__init__()
        self.old = freeze(old)
        self.new = new
        self.layers = list(layers)
        mods = _modules_by_name(new, self.layers, "method.layers")
        _modules_by_name(old, self.layers, "method.layers", "old column (teacher)")
        laterals = {}
        for name, m in zip(self.layers, mods):
            lat = copy.deepcopy(m)
            _reset(lat)
            laterals[name.replace(".", "_")] = lat
        self.laterals = nn.ModuleDict(laterals)
        self._old_inputs: Optional[Dict[str, torch.Tensor]] = None
        for name, m in zip(self.layers, mods):
            m.register_forward_hook(self._lateral(name))

    def _lateral(self, name: str):
        def hook(module, inputs, output):
            if self._old_inputs is None:  # the new column run on its own: no lateral input
                return output
            return output + self.laterals[name.replace(".", "_")](self._old_inputs[f"{name}:in"])
        return hook

    def forward(self, x):
        with torch.no_grad():
            _, self._old_inputs = run_with_features(self.old, x, [f"{n}:in" for n in self.layers], "old column")
        try:
            return self.new(x)
        finally:
            self._old_inputs = None


def default_lateral_layers(model: nn.Module) -> List[str]:
    """Every Conv/Linear layer but the first, in module order."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    if len(names) < 2:
        raise ConfigError("method=progressive: the student has fewer than 2 Conv/Linear layers; set method.layers")
    return names[1:]


@dataclass
class ProgressiveConfig(MethodConfig):
    name: str = "progressive"
    w_ce: Optional[float] = 1.0
    alpha: float = 0.0  # no distillation term
    # layers of the new column that receive a lateral connection from the old column's input of the
    # same layer; null: every Conv/Linear layer but the first
    layers: Optional[List[str]] = None


@register_method("progressive", config=ProgressiveConfig)
class Progressive(Method):
    """Rusu et al. 2016: the new labels, a fresh column laterally fed by the frozen teacher (CE)

    Progressive neural network: the teacher (pretrained, possibly on other classes with
    teacher.classes) is the frozen first column; the student (same architecture, fresh
    initialization) is the new column, trained with w_ce * CE on the new task's labels through
    lateral connections from the old column. The deployed model (val/acc) is both columns. With a
    domain shift it trains on the target view."""
    requires = Requirements(teacher="weights", labels="required", views="target",
                            ignores=("temperature", "alpha", "beta"))

    def __init__(self, cfg, student, teacher=None):
        super().__init__(cfg, student, teacher)
        old = copy.deepcopy(teacher.model)
        src, dst = old.state_dict(), student.state_dict()
        if set(src) != set(dst):
            raise ConfigError("method=progressive: the new column (student) must have the old column's (teacher's) "
                              "architecture, e.g. teacher=cnn student=cnn")
        layers = list(cfg.layers) if cfg.layers else default_lateral_layers(student)
        self.student = ProgressiveNet(old, student, layers)

    def losses(self, batch):
        return self.ce(self.student(batch.x), batch.y)


# -- multitask ----------------------------------------------------------------------------------
@dataclass
class MultitaskConfig(MethodConfig):
    name: str = "multitask"
    w_ce: Optional[float] = 1.0  # weight of the main task (the dataset's labels, the student's own head)
    alpha: float = 0.0  # no distillation term
    beta: float = 1.0  # default weight of each auxiliary task
    # auxiliary tasks, each {name: NAME, labels: [...], weight: w (default beta)}: labels is a map over the
    # (remapped) classes 0..k-1, main label c gets auxiliary label labels[c]; -1 = no label for this task
    tasks: List[Any] = field(default_factory=lambda: [{"name": "parity", "labels": [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]}])
    layer: Optional[str] = None  # the trunk's output (a student feature tap); null: the student's embedding


@register_method("multitask", config=MultitaskConfig)
class Multitask(Method):
    """Caruana 1997, no teacher: the labels of the main task and of derived auxiliary tasks (CE)

    One shared trunk, a head per task: the student is the trunk plus the main head (its own last
    layer, on the dataset's labels); each auxiliary task adds a linear head on the trunk's output
    (`layer`) with labels derived from the main ones by a label map (e.g. parity, or the classes
    0-4 and 5-9 as two tasks). Loss: w_ce * CE_main + sum_k w_k * CE_k (w_k: the task's weight or beta).
    Each head's accuracy is logged as val/acc_<task> (the val/acc view)."""
    requires = Requirements(teacher="none", ignores=("temperature", "alpha"))

    def __init__(self, cfg, student, teacher=None):
        super().__init__(cfg, student, teacher)
        if not cfg.tasks:
            raise ConfigError("method=multitask needs at least one auxiliary task in method.tasks")
        self.layer = _embedding_layer(student, cfg.layer, "method.layer")
        self.maps: Dict[str, List[int]] = {}
        self.weights: Dict[str, float] = {}
        heads = {}
        for i, task in enumerate(cfg.tasks):
            where = f"method.tasks[{i}]"
            if not hasattr(task, "get") or not task.get("name") or task.get("labels") is None:
                raise ConfigError(f"{where}={task!r}: give {{name: NAME, labels: [label per class], weight: w}}")
            unknown = sorted(set(task) - {"name", "labels", "weight"})
            if unknown:
                raise ConfigError(f"{where}: unknown key(s) {unknown}; valid: name, labels, weight")
            name, mapping = str(task["name"]), [int(v) for v in task["labels"]]
            if name in self.maps or not name.isidentifier():
                raise ConfigError(f"{where}: task name {name!r} must be a unique identifier")
            if not mapping or max(mapping) < 0 or min(mapping) < -1:
                raise ConfigError(f"{where}: labels {mapping} must be >= 0 (-1: no label)")
            self.maps[name] = mapping
            self.weights[name] = float(task.get("weight", cfg.beta))
            heads[name] = nn.Sequential(nn.Flatten(), nn.LazyLinear(max(mapping) + 1))
        self.heads = nn.ModuleDict(heads)
        for name in self.maps:
            self.register_buffer(f"_map_{name}", torch.tensor(self.maps[name] + [-1]), persistent=False)

    def _aux_labels(self, name: str, y: torch.Tensor) -> torch.Tensor:
        table = getattr(self, f"_map_{name}")  # the last entry (-1) serves UNLABELED (y = -1)
        return table[y]

    def prepare(self, data, device):
        for name, mapping in self.maps.items():
            if len(mapping) != data.num_classes:
                raise ConfigError(f"method.tasks {name!r} maps {len(mapping)} classes but the dataset has "
                                  f"{data.num_classes} (after dataset.classes); give one entry per class")
        # materialize the heads (their input size is the trunk's output), leaving the trunk's
        # BatchNorm statistics untouched
        with probing(self):
            self._forward(data.x_train[:2])

    def _forward(self, x):
        logits, feats = run_with_features(self.student, x, [self.layer], "student")
        return logits, {name: head(feats[self.layer]) for name, head in self.heads.items()}

    def losses(self, batch):
        logits, aux = self._forward(batch.x)
        terms = self.ce(logits, batch.y)
        for name, out in aux.items():
            w = self.weights[name]
            if not w:
                continue
            y = self._aux_labels(name, batch.y)
            n = (y != UNLABELED).sum().clamp_min(1)
            terms[f"task_{name}"] = w * F.cross_entropy(out, y, ignore_index=UNLABELED, reduction="sum") / n
        return terms

    @torch.no_grad()
    def extra_metrics(self, data) -> Dict[str, float]:
        x = data.x_val if data.x_val_target is None else data.x_val_target
        was = self.training
        self.eval()
        correct = {n: 0 for n in self.heads}
        count = {n: 0 for n in self.heads}
        for sel, xb in batches_of(x, 1024):  # streamed inputs: read by the loader's workers, on the host
            _, aux = self._forward(xb.to(data.y_val.device))
            for name, out in aux.items():
                y = self._aux_labels(name, data.y_val[sel])
                keep = y != UNLABELED
                correct[name] += (out.argmax(-1)[keep] == y[keep]).sum().item()
                count[name] += keep.sum().item()
        self.train(was)
        return {f"val/acc_{n}": correct[n] / max(count[n], 1) for n in self.heads}


# -- data distillation --------------------------------------------------------------------------
@dataclass
class DataDistillConfig(MethodConfig):
    name: str = "data_distill"
    w_ce: Optional[float] = 1.0  # weight of CE on the union of labeled and pseudo-labeled samples
    alpha: float = 0.0  # no soft term: hard pseudo-labels
    # transforms the teacher's predictions are ensembled over (kdexp.data.domain names or mappings,
    # applied to the normalized inputs, background = the training set's minimum)
    transforms: List[Any] = field(default_factory=lambda: [
        "none", {"name": "shift", "dx": 1}, {"name": "shift", "dx": -1},
        {"name": "shift", "dy": 1}, {"name": "shift", "dy": -1}])
    threshold: float = 0.9  # keep a pseudo-label when the averaged probability of its class is at least this


@register_method("data_distill", config=DataDistillConfig)
class DataDistill(Method):
    """Radosavovic et al. CVPR 2018: the teacher's pseudo-labels on the unlabeled samples (CE)

    Data distillation (Radosavovic et al. CVPR 2018, arXiv 1712.04440): the teacher's softmax
    outputs on the unlabeled training samples (dataset.label_fraction < 1) are averaged over
    `transforms`; the argmax becomes a hard pseudo-label where its averaged probability reaches
    `threshold`. The student trains with CE on the union of the labeled and pseudo-labeled
    samples (one mean). The hidden labels are used only to log the pseudo-labels' accuracy
    (train/pseudo_label_acc), never for training. The teacher learns from the labeled part alone,
    as in the paper: teacher.labeled_only defaults to true for this method (kdexp.engine.plan);
    teacher.labeled_only=false gives an oracle teacher that saw the hidden labels (the run warns)."""
    requires = Requirements(labels="partial", ignores=("temperature", "alpha", "beta"))

    def __init__(self, cfg, student, teacher):
        super().__init__(cfg, student, teacher)
        if not 0.0 <= cfg.threshold <= 1.0:
            raise ConfigError(f"method.threshold={cfg.threshold} is out of range: must be in [0, 1]")
        from kdexp.data.domain import parse_steps

        self.steps = [parse_steps([t], key=f"method.transforms[{i}]") for i, t in enumerate(cfg.transforms)]
        if not self.steps:
            raise ConfigError("method.transforms is empty: give at least one (none = the image as is)")
        self.register_buffer("pseudo", torch.empty(0, dtype=torch.long))  # per training sample; -1: none
        self.stats: Dict[str, float] = {}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "pseudo"
        if key in state_dict:  # resume: the pseudo-labels of the checkpoint (sized like it)
            self.pseudo = torch.empty_like(state_dict[key], device=self.pseudo.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def prepare(self, data, device):
        from kdexp.data.domain import apply_transforms

        if isinstance(data.x_train, LazyInputs):
            raise ConfigError("method=data_distill transforms the whole unlabeled set in memory, and this data streams "
                              "(dataset.in_memory): set dataset.in_memory=true")
        unl = (~data.labeled).nonzero().squeeze(1)
        x = data.x_train[unl]
        lo, hi = float(data.x_train.min()), float(data.x_train.max())
        probs = 0
        for steps in self.steps:
            xt = apply_transforms(x, steps, "train", (lo, hi))
            out = []
            for i in range(0, len(xt), 1024):
                xb = xt[i:i + 1024]
                batch = Batch(xb, torch.zeros(len(xb), dtype=torch.long, device=xb.device), unl[i:i + 1024])
                out.append(self.teacher.logits(batch).float().softmax(-1))  # view None: online, never cached
            probs = probs + torch.cat(out)
        probs = probs / len(self.steps)
        conf, label = probs.max(-1)
        keep = conf >= self.cfg.threshold
        pseudo = torch.full((len(data.x_train),), UNLABELED, dtype=torch.long, device=data.x_train.device)
        pseudo[unl[keep]] = label[keep]
        self.pseudo = pseudo
        kept = int(keep.sum())
        self.stats = {"train/pseudo_labels": kept / max(len(unl), 1)}
        if not kept:
            log.warning("data_distill: no unlabeled sample reaches method.threshold=%.2f: the student learns from "
                        "the labeled samples alone", self.cfg.threshold)
            return
        acc = (label[keep] == data.y_train[unl][keep]).float().mean().item()
        self.stats["train/pseudo_label_acc"] = acc
        log.info("data_distill: %d of %d unlabeled samples pseudo-labeled (threshold %.2f, %d transforms); "
                 "their accuracy against the hidden labels: %.4f", kept, len(unl), self.cfg.threshold,
                 len(self.steps), acc)

    def get_extra_state(self):  # the pseudo-labels' statistics, so that a resumed run still logs them
        return dict(self.stats)

    def set_extra_state(self, state) -> None:
        self.stats = dict(state)

    def losses(self, batch):
        if len(self.pseudo) == 0:
            raise RuntimeError("data_distill: prepare(data, device) did not run (no pseudo-labels)")
        labeled = batch.labeled if batch.labeled is not None else torch.ones_like(batch.y, dtype=torch.bool)
        y = torch.where(labeled, batch.y, self.pseudo[batch.idx])
        return self.ce(self.student(batch.x), y)

    def extra_metrics(self, data) -> Dict[str, float]:
        return dict(self.stats)
