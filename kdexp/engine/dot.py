"""DOT, the Distillation-Oriented Trainer (Zhao et al. ICCV 2023, arXiv 2307.08436): SGD that keeps
one momentum buffer for the task-loss gradient and one for the distillation-loss gradient, with a
smaller momentum beta - delta on the task and a larger one beta + delta on distillation, so that the
distillation loss is optimized harder (`optim.name=dot`, `optim.momentum` = beta, `optim.delta`).

In kdexp a method's loss terms are a dict: the task term is the one named "ce" (`Method.ce`),
every other term is distillation. The fit loop (kdexp.engine.fit) backwards the two sums separately
(`DOT.backward`): the distillation gradient lands in a *slot* per parameter (a leaf tensor of the
parameter's shape that shares its storage, so it costs no memory beyond its gradient), the task
gradient in the parameter's own .grad. The slots are the optimizer's second half of param_groups,
so everything that walks an optimizer's gradients handles both without knowing DOT: zero_grad,
the AMP GradScaler (unscale, inf/NaN checks that skip the step), the DDP all-reduce
(kdexp.engine.hardware). LR schedulers set both halves' lr alike; the step reads the first half's.

The update per parameter p follows the authors' code (mdistiller/engine/dot.py):
- both gradients present: b_task = (beta - delta) b_task + g_task + wd p,
  b_dist = (beta + delta) b_dist + g_dist, p -= lr (b_task + b_dist);
- one present (p gets only a task or only a distillation gradient, e.g. a method-owned connector,
  CTKD's temperature): that buffer with momentum beta, weight decay added to that gradient;
- a buffer starts as its first gradient (as torch.optim.SGD), dampening 0, no Nesterov variant.
With delta = 0 this is torch.optim.SGD(momentum=beta) on the summed gradient, and a fit with one
kind of term only (a teacher on CE, a first stage) is exactly SGD with momentum beta.
Convention vs the authors' code: a parameter with only a distillation gradient gets its weight
decay on every step (theirs skips it on the first step); the two buffers are applied in one
p -= lr (b_task + b_dist) (theirs: two in-place subtractions, equal up to rounding). Both buffers are
in the optimizer's state_dict (`momentum_buffer`, `distillation_momentum_buffer`), so checkpoints
resume them.
"""
from typing import Dict, Optional, Tuple

import torch

from kdexp.engine.optimizers import EagerOptimizer

TASK_TERM = "ce"  # the task loss term's name (Method.ce); every other term is distillation


def split_terms(terms: Dict[str, torch.Tensor]) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(task, distillation): the "ce" term and the sum of the others, each None when it has no
    gradient to give (absent, or a constant)."""
    task = terms.get(TASK_TERM)
    rest = [v for k, v in terms.items() if k != TASK_TERM and v.requires_grad]
    distill = sum(rest[1:], rest[0]) if rest else None
    return (task if task is not None and task.requires_grad else None), distill


def _slot(p: torch.Tensor) -> torch.Tensor:
    """A leaf of p's shape and storage that only ever holds p's distillation gradient."""
    return p.detach().requires_grad_(p.requires_grad)


class DOT(EagerOptimizer):
    """SGD with separate task and distillation momentum buffers (module docstring). `params` as
    for torch.optim.SGD (tensors or groups, a group may set its own lr/weight_decay)."""

    def __init__(self, params, lr: float, momentum: float = 0.9, delta: float = 0.075, weight_decay: float = 0.0):
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"DOT: lr={lr} must be > 0 and weight_decay={weight_decay} >= 0")
        if not 0.0 <= delta <= momentum or momentum + delta >= 1.0:
            raise ValueError(f"DOT: momentum={momentum}, delta={delta}: need 0 <= delta <= momentum and "
                             f"momentum + delta < 1 (the two momenta beta - delta, beta + delta in [0, 1))")
        super().__init__(params, dict(lr=lr, momentum=momentum, delta=delta, weight_decay=weight_decay))
        self.n_groups = len(self.param_groups)
        for group in list(self.param_groups):
            twin = {k: v for k, v in group.items() if k != "params"}
            self.add_param_group({**twin, "params": [_slot(p) for p in group["params"]], "distillation": True})

    def pairs(self):
        """(group, [(parameter, its distillation slot)]) for each of the caller's groups."""
        for group, twin in zip(self.param_groups[:self.n_groups], self.param_groups[self.n_groups:]):
            yield group, list(zip(group["params"], twin["params"]))

    def backward(self, terms: Dict[str, torch.Tensor], scale=lambda loss: loss) -> None:
        """Backward the distillation sum into the slots, then the task term into .grad (the
        authors' order; the graph is kept for the second pass). `scale`: the AMP loss scaling.
        Gradients already there (none after zero_grad) are accumulated into."""
        task, distill = split_terms(terms)
        if distill is not None:
            pairs = [pair for _, group_pairs in self.pairs() for pair in group_pairs]
            held = [p.grad for p, _ in pairs]  # what .grad held before: the task's, put back below
            for p, _ in pairs:
                p.grad = None
            scale(distill).backward(retain_graph=task is not None)
            for (p, slot), before in zip(pairs, held):
                if p.grad is not None:
                    slot.grad = p.grad if slot.grad is None else slot.grad + p.grad
                p.grad = before
        if task is not None:
            scale(task).backward()

    def update_groups(self):  # under EagerOptimizer.step's no_grad
        for group, pairs in self.pairs():
            beta, delta, wd, lr = group["momentum"], group["delta"], group["weight_decay"], group["lr"]
            for p, slot in pairs:
                grads = [(key, g, m) for key, g, m in (("momentum_buffer", p.grad, beta - delta),
                                                        ("distillation_momentum_buffer", slot.grad, beta + delta))
                         if g is not None]
                if not grads:
                    continue
                if len(grads) == 1:  # one kind of gradient: the mean momentum (authors' code)
                    grads[0] = (grads[0][0], grads[0][1], beta)
                if wd:  # once, on the task gradient when there is one
                    key, g, m = grads[0]
                    grads[0] = (key, g.add(p, alpha=wd), m)
                p.add_(sum(self._buffer(p, key, g, m) for key, g, m in grads), alpha=-lr)

    def _buffer(self, p, key: str, grad: torch.Tensor, momentum: float) -> torch.Tensor:
        state = self.state[p]
        buf = state.get(key)
        if buf is None:
            buf = state[key] = torch.clone(grad).detach()
        else:
            buf.mul_(momentum).add_(grad)
        return buf
