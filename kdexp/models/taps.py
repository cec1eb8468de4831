"""Feature taps: intermediate activations taken by module name with forward hooks, so any
nn.Module works as is (torchvision models included), with no rewriting of its forward.

A tap is a module name from `model.named_modules()` ("layer2", "layer3.1.bn2"), optionally
with the suffix ":in" for the module's (first) input instead of its output: e.g. the input
of a block's final ReLU is the block's pre-activation ("layer1.2.out_relu:in"). When a
module runs several times in one forward (a shared ReLU), the tap keeps the last call.
Captured values are clones, so a later in-place op of the model cannot change them.

    with FeatureTap(model, ["layer1", "layer2"]) as feats:
        logits = model(x)
    feats["layer1"]                                  # (B, C, H, W), differentiable
    list_features(model, (3, 32, 32))                # {name: output shape} of every module
    producing_batchnorms(model, ["layer1.2.out_relu:in"], (3, 32, 32))  # ["layer1.2.bn2"]: the BN behind a tap

Builders of registered models attach default layers per role (`set_feature_layers`): `stem`,
`stages` (the end of each stage, post-activation), `preact` (the same, before the final
activation), `embedding` (the penultimate feature vector). Methods use them when their
`student_layers` / `teacher_layers` config is null.
"""
import contextlib
import itertools
from collections import OrderedDict, deque
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from kdexp.errors import ConfigError

ROLES = ("stem", "stages", "preact", "embedding")


def parse_tap(spec: str) -> Tuple[str, str]:
    """'layer1' -> ('layer1', 'out'); 'layer1.0.relu:in' -> ('layer1.0.relu', 'in')."""
    if spec.endswith(":in"):
        return spec[:-3], "in"
    return spec, "out"


def _first_tensor(value, spec: str) -> torch.Tensor:
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"feature tap {spec!r} does not produce a tensor (got {type(value).__name__})")
    return value


class FeatureTap:
    """Context manager: while open, forwards of `model` store the tapped values in the dict it
    returns (keyed by tap spec). Hooks are removed on exit. Unknown module names raise a
    ConfigError that lists the model's tappable modules (`what` names the model in it)."""

    def __init__(self, model: nn.Module, specs: Sequence[str], what: str = "model"):
        self.model, self.specs, self.what = model, list(specs), what
        self.values: Dict[str, torch.Tensor] = {}
        self._handles: List = []
        modules = dict(model.named_modules())
        missing = [s for s in self.specs if parse_tap(s)[0] not in modules or not parse_tap(s)[0]]
        if missing:
            raise ConfigError(f"{what} has no module(s) {missing} to tap. Tappable modules (add ':in' for a "
                              f"module's input): {', '.join(n for n in modules if n)}")
        self._modules = {s: modules[parse_tap(s)[0]] for s in self.specs}

    def __enter__(self) -> Dict[str, torch.Tensor]:
        self.values.clear()
        for spec, module in self._modules.items():
            if parse_tap(spec)[1] == "in":
                # a pre-hook: an in-place module (ReLU(inplace=True)) overwrites its input
                def pre_hook(mod, inputs, spec=spec):
                    self.values[spec] = _first_tensor(inputs, spec).clone()
                self._handles.append(module.register_forward_pre_hook(pre_hook))
            else:
                def hook(mod, inputs, output, spec=spec):
                    self.values[spec] = _first_tensor(output, spec).clone()
                self._handles.append(module.register_forward_hook(hook))
        return self.values

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def run_with_features(model: nn.Module, x: torch.Tensor, specs: Sequence[str],
                      what: str = "model") -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """One forward of `model` on `x` -> (output, {spec: tapped value}). Fails if a tapped
    module did not run."""
    with FeatureTap(model, specs, what) as values:
        out = model(x)
    missing = [s for s in specs if s not in values]
    if missing:
        raise ConfigError(f"{what}: module(s) {missing} did not run in the forward pass")
    return out, dict(values)


def _device(model: nn.Module) -> torch.device:
    """Where the model's tensors live (its first parameter, else its first buffer; CPU for a
    model with neither): the probe batch goes there, meta for a skeleton."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@contextlib.contextmanager
def probing(*models: nn.Module):
    """For a forward that only learns shapes or materializes lazy layers (at build time, in a
    method's `prepare`): no gradients, and every module of `models` in eval mode, so that
    BatchNorm's running statistics and num_batches_tracked stay as they were and dropout draws no
    random numbers. Each module's own training flag is restored afterwards (a submodule kept in
    eval mode stays in it)."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def _probe(model: nn.Module, in_shape: Tuple[int, ...], specs: Optional[Sequence[str]] = None):
    """Run a zero batch of 2 through `model` (`probing`: eval mode, restored afterwards)."""
    with probing(model):
        x = torch.zeros(2, *in_shape, device=_device(model))
        if specs is not None:
            return run_with_features(model, x, specs)[1]
        shapes: "OrderedDict[str, Tuple[int, ...]]" = OrderedDict()
        handles = []
        for name, module in model.named_modules():
            if not name:
                continue

            def hook(mod, inputs, output, name=name):
                if isinstance(output, torch.Tensor):
                    shapes[name] = tuple(output.shape[1:])
                    shapes.move_to_end(name)  # order of the last call
            handles.append(module.register_forward_hook(hook))
        try:
            model(x)
        finally:
            for h in handles:
                h.remove()
        return shapes


def list_features(model: nn.Module, in_shape: Iterable[int]) -> "OrderedDict[str, Tuple[int, ...]]":
    """Every tappable module of `model` with the shape (without the batch dimension) of its
    output for inputs of shape `in_shape`, in execution order. Modules that do not run (or
    return no tensor) are left out."""
    return _probe(model, tuple(in_shape))


def feature_shapes(model: nn.Module, specs: Sequence[str], in_shape: Iterable[int],
                   what: str = "model") -> List[Tuple[int, ...]]:
    """Shapes (without batch) of the tapped values for inputs of shape `in_shape`. A missing
    name fails with the list of tappable modules and their output shapes."""
    in_shape = tuple(in_shape)
    modules = dict(model.named_modules())
    missing = [s for s in specs if not parse_tap(s)[0] or parse_tap(s)[0] not in modules]
    if missing:
        listing = ", ".join(f"{n} {tuple(s)}" for n, s in list_features(model, in_shape).items())
        raise ConfigError(f"{what} has no module(s) {missing} to tap. Tappable modules (output shape "
                          f"for input {in_shape}; add ':in' for a module's input): {listing}")
    values = _probe(model, in_shape, specs)
    return [tuple(values[s].shape[1:]) for s in specs]


def feature_kind(shape: Sequence[int]) -> str:
    """'map' for a (C, H, W) feature with H * W > 1, 'vector' otherwise ((D,) or (C, 1, 1)). A 1x1
    map carries no spatial structure: spatial terms degenerate on it (attention transfer's
    L2-normalized attention map is then the constant 1 for every sample, its loss identically 0),
    so it counts as a vector of C values, e.g. when choosing a connector or refusing a spatial method."""
    shape = tuple(shape)
    return "map" if len(shape) == 3 and shape[1] * shape[2] > 1 else "vector"


def set_feature_layers(model: nn.Module, *, stages: Sequence[str], preact: Optional[Sequence[str]] = None,
                       embedding: Optional[str] = None, stem: Optional[str] = None) -> nn.Module:
    """Attach the default tap names of a model (used when a method's layer config is null)."""
    model.feature_layers = {"stem": stem, "stages": list(stages),
                            "preact": list(preact) if preact is not None else list(stages),
                            "embedding": embedding}
    return model


def default_layers(model: nn.Module, role: str, what: str = "model") -> List[str]:
    """The model's default tap names for `role` (a list; one name for stem/embedding)."""
    if role not in ROLES:
        raise ValueError(f"unknown feature role {role!r}; one of {ROLES}")
    table = getattr(model, "feature_layers", None)
    value = table.get(role) if table else None
    if not value:
        raise ConfigError(f"{what} ({type(model).__name__}) has no default '{role}' feature layer(s); set "
                          f"them in the method config (student_layers / teacher_layers). List the candidates "
                          f"with kdexp.models.taps.list_features(model, in_shape).")
    return [value] if isinstance(value, str) else list(value)


# Autograd nodes a tapped value may pass through on its way from a BatchNorm's output: the tap's
# own clone, views, and additions (a residual block's `branch + shortcut`).
_NORM_PASS_THROUGH = ("Add", "Clone", "View", "UnsafeView", "ReshapeAlias", "Alias")


def _norm_reached(node, norms: Dict[object, str]) -> Optional[str]:
    """The BatchNorm (name) whose output autograd node `node` is, or leads to through pass-through
    nodes only: the nearest one (breadth first), the first operand's on a tie."""
    queue, seen = deque([node]), set()
    while queue:
        node = queue.popleft()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in norms:
            return norms[node]
        if type(node).__name__.rstrip("0123456789").removesuffix("Backward") in _NORM_PASS_THROUGH:
            queue.extend(nxt for nxt, _ in node.next_functions)
    return None


def producing_batchnorms(model: nn.Module, specs: Sequence[str], in_shape: Iterable[int],
                         what: str = "model") -> List[Optional[str]]:
    """For each tap, the name of the BatchNorm module that produces the tapped value: the value is
    that module's output, or a sum of it and other terms (e.g. a residual block's pre-activation
    `bn2(conv2(.)) + shortcut`): the nearest BatchNorm output, counted in additions, and of equally
    near ones the first operand's (`branch + shortcut`: the branch's, as mdistiller's
    `get_bn_before_relu` for ResNets; `x + branch(x)`: the branch's, one addition nearer).
    None where no BatchNorm output reaches the tap through additions. Found by following the
    autograd graph of one probe forward (eval mode, zero input), so any model works as is."""
    norms: Dict[object, str] = {}  # autograd node of a BatchNorm's output -> module name

    def record(name):
        def hook(mod, inputs, output):
            if isinstance(output, torch.Tensor) and output.grad_fn is not None:
                norms[output.grad_fn] = name
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        with probing(model), torch.enable_grad():  # eval mode, but with the graph it follows
            x = torch.zeros(2, *tuple(in_shape), device=_device(model), requires_grad=True)
            _, values = run_with_features(model, x, specs, what)
    finally:
        for h in handles:
            h.remove()
    return [_norm_reached(values[s].grad_fn, norms) for s in specs]
