"""The optimizers: kdexp's own (`Adam`, `SGD`; `kdexp.engine.dot.DOT`) on torch.optim.Optimizer's
bookkeeping, so LR schedulers, the AMP GradScaler, checkpoints and anything else that takes a
torch optimizer take them, and their state_dicts are torch.optim.Adam's / SGD's (same keys).
Why not torch.optim.Adam itself: torch.optim wraps `step`, `zero_grad`, `add_param_group` and
the state_dict methods in torch._dynamo hooks whose first call imports torch._dynamo, 1.2 s of
a 5 s default run on 2 CPU cores, in runs that never compile (hardware.compile compiles the
model, never the optimizer step). `EagerOptimizer` keeps torch's undecorated methods, and the
steps below are torch's arithmetic, op for op, in multi-tensor (`torch._foreach_*`) form: on the
CPU bit-equal to torch.optim.Adam/AdamW/SGD (tests/test_optim.py), on a GPU the same fused
multi-tensor kernels torch picks there."""
import torch


def _eager(fn):
    """`fn` without torch.optim's dynamo wrapper (functools.wraps keeps the original)."""
    return getattr(fn, "__wrapped__", fn)


class EagerOptimizer(torch.optim.Optimizer):
    """torch.optim.Optimizer without its torch._dynamo hooks (module docstring). A subclass
    writes `update(group, params, grads)`, one step of a parameter group under no_grad: `params`
    are the group's parameters that have a gradient, `grads` those gradients (DOT,
    kdexp.engine.dot, steps parameter pairs instead: it writes `update_groups`)."""

    add_param_group = _eager(torch.optim.Optimizer.add_param_group)
    zero_grad = _eager(torch.optim.Optimizer.zero_grad)
    state_dict = _eager(torch.optim.Optimizer.state_dict)
    load_state_dict = _eager(torch.optim.Optimizer.load_state_dict)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.update_groups()
        return loss

    def update_groups(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]  # torch's rule: no gradient, no step
            if params:
                self.update(group, params, [p.grad for p in params])


class Adam(EagerOptimizer):
    """Adam (Kingma & Ba 2015); `decoupled=True` is AdamW (Loshchilov & Hutter 2019: the weight
    decay multiplies the parameters, lr * weight_decay, instead of joining the gradient).
    torch.optim.Adam's defaults (betas 0.9, 0.999, eps 1e-8), state ("step", "exp_avg",
    "exp_avg_sq" per parameter) and arithmetic; no amsgrad, no maximize, real parameters."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8,
                 decoupled: bool = False):
        if lr < 0 or weight_decay < 0 or eps < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Adam: lr={lr}, weight_decay={weight_decay}, eps={eps} must be >= 0 and "
                             f"betas={tuple(betas)} in [0, 1)")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      decoupled_weight_decay=decoupled))

    def update(self, group, params, grads):
        states = [self._state(p) for p in params]
        (beta1, beta2), lr, wd, eps = group["betas"], group["lr"], group["weight_decay"], group["eps"]
        steps = [s["step"] for s in states]
        exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        torch._foreach_add_(steps, 1)
        if wd and group["decoupled_weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * wd)
        elif wd:
            grads = torch._foreach_add(grads, params, alpha=wd)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        counts = [s.item() for s in steps]  # steps live on the CPU (as torch's): no device sync
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [(1 - beta2 ** n) ** 0.5 for n in counts])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, [-(lr / (1 - beta1 ** n)) for n in counts])

    def _state(self, p):
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state


class SGD(EagerOptimizer):
    """SGD with momentum (a buffer that starts as the first gradient, dampening 0) and its
    Nesterov variant: torch.optim.SGD's arithmetic and state ("momentum_buffer")."""

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        if lr < 0 or momentum < 0 or weight_decay < 0 or (nesterov and not momentum):
            raise ValueError(f"SGD: lr={lr}, momentum={momentum}, weight_decay={weight_decay} must be >= 0, "
                             f"and nesterov={nesterov} needs momentum > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay))

    def update(self, group, params, grads):
        momentum, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        if wd:
            grads = torch._foreach_add(grads, params, alpha=wd)
        if momentum:
            states = [self.state[p] for p in params]
            old = [(s["momentum_buffer"], g) for s, g in zip(states, grads) if s.get("momentum_buffer") is not None]
            if old:
                torch._foreach_mul_([b for b, _ in old], momentum)
                torch._foreach_add_([b for b, _ in old], [g for _, g in old])
            for s, g in zip(states, grads):
                if s.get("momentum_buffer") is None:
                    s["momentum_buffer"] = g.detach().clone()
            bufs = [s["momentum_buffer"] for s in states]
            grads = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
        torch._foreach_add_(params, grads, alpha=-lr)
