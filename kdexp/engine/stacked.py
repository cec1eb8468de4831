"""The forward of N students with stacked parameters (a fused group, kdexp.engine.fused): one call
for all N, logits (N, B, C).

Any student runs under `torch.func.vmap` of `functional_call`. A student that is a chain of
linear layers and elementwise activations (the `mlp` student: Flatten, Linear, Sigmoid, Linear)
runs as explicit matrix products instead, features first ((N, features, B) activations), because
vmap's batching of `linear` costs it: it multiplies an expanded copy of the shared input per
student and returns each weight's gradient transposed, which autograd then copies into a
contiguous .grad. Here the first layer is one (N*out, D) x (D, B) product over the shared batch and
every weight's gradient comes out of its product contiguous (measured, 8 students of 784-64-10 on
batches of 128, one thread: forward and backward 2.7 ms against vmap's 3.8 ms). Same values as
vmap up to float rounding (the products sum in another order)."""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

# modules that act elementwise, so they apply to features-first activations as they are
ELEMENTWISE = (nn.Identity, nn.Sigmoid, nn.ReLU, nn.Tanh, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU)

Forward = Callable[[Dict[str, torch.Tensor], Dict[str, torch.Tensor], torch.Tensor, bool], torch.Tensor]


def stacked_forward(template: nn.Module, in_shape: Sequence[int]) -> Forward:
    """forward(params, buffers, x, shared) -> (N, B, C) logits of the N students whose parameters
    are stacked in `params` (name -> (N, *shape)). x: (B, *in_shape) when the students share the
    batch (`shared`), else (N, B, *in_shape)."""
    chain = linear_chain(template, in_shape)
    if chain is not None:
        return lambda params, buffers, x, shared: _chain_forward(chain, params, x, shared)
    from torch.func import functional_call, vmap

    def one(params, buffers, x):
        return functional_call(template, (params, buffers), (x,))

    batched = {shared: vmap(one, in_dims=(0, 0, None if shared else 0)) for shared in (True, False)}
    return lambda params, buffers, x, shared: batched[shared](params, buffers, x)


def linear_chain(template: nn.Module, in_shape: Sequence[int]) -> Optional[List[Tuple[str, object]]]:
    """The steps of a student that is a Sequential of an optional leading Flatten, Linear layers and
    elementwise activations, on inputs that are vectors once flattened, without hooks: ("flatten",
    None), ("linear", its name) or ("act", the module); None for any other student."""
    if type(template) is not nn.Sequential or next(template.buffers(), None) is not None:
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in template.modules()):
        return None  # the products below call no module's hooks
    steps: List[Tuple[str, object]] = []
    for i, (name, m) in enumerate(template.named_children()):
        if type(m) is nn.Flatten and i == 0 and m.start_dim == 1 and m.end_dim == -1:
            steps.append(("flatten", None))
        elif type(m) is nn.Linear:
            steps.append(("linear", name))
        elif type(m) in ELEMENTWISE or (type(m) is nn.Dropout and m.p == 0):
            steps.append(("act", m))
        else:
            return None
    vectors = len(in_shape) == 1 or (steps and steps[0][0] == "flatten")
    return steps if vectors and any(kind == "linear" for kind, _ in steps) else None


def _chain_forward(chain, params, x: torch.Tensor, shared: bool) -> torch.Tensor:
    h, first = x, True  # h: the input until the first linear layer, then (N, features, B)
    for kind, ref in chain:
        if kind == "flatten":
            h = h.flatten(1 if shared else 2)
        elif kind == "act":
            h = ref(h)
        else:
            w, b = params[f"{ref}.weight"], params.get(f"{ref}.bias")  # (N, out, in), (N, out)
            n, out, d = w.shape
            if first and shared:  # every student's first layer in one product over the shared batch
                w2 = w.reshape(n * out, d)
                h = (torch.mm(w2, h.t()) if b is None else torch.addmm(b.reshape(n * out, 1), w2, h.t()))
                h = h.view(n, out, -1)
            else:
                h = h.transpose(1, 2) if first else h  # per-student input (N, B, D) -> (N, D, B)
                h = torch.bmm(w, h) if b is None else torch.baddbmm(b.unsqueeze(-1), w, h)
            first = False
    return h.transpose(1, 2)
