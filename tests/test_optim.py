"""kdexp's optimizers (kdexp.engine.optimizers) against torch.optim's: the same parameters bit for
bit on the CPU, the same state_dict keys, and no torch._dynamo import (why they exist)."""
import subprocess
import sys

import pytest
import torch

from kdexp.engine.optimizers import SGD, Adam

CASES = {  # name -> (ours, torch's)
    "adam": (lambda ps: Adam(ps, lr=0.01), lambda ps: torch.optim.Adam(ps, lr=0.01)),
    "adam_wd": (lambda ps: Adam(ps, lr=0.01, weight_decay=0.1), lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1)),
    "adamw": (lambda ps: Adam(ps, lr=0.01, weight_decay=0.1, decoupled=True),
              lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1)),
    "sgd": (lambda ps: SGD(ps, lr=0.1), lambda ps: torch.optim.SGD(ps, lr=0.1)),
    "sgd_momentum": (lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4),
                     lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4)),
    "sgd_nesterov": (lambda ps: SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
                     lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)),
}


SHAPES = [(5, 3), (7,), (2, 2, 3)]
STEPS = 25


def _params():
    g = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape in SHAPES]


def _grads():
    g = torch.Generator().manual_seed(2)
    return [[torch.randn(*shape, generator=g) for shape in SHAPES] for _ in range(STEPS)]


def _start(make, ps):
    """The optimizer on two parameter groups (the second with its own lr) and a cosine schedule."""
    opt = make([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.05}])
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)


def _steps(opt, sched, ps, grads, start, stop):
    """Steps start..stop-1; the second parameter gets no gradient on every third step (its state
    then lags the others')."""
    for i in range(start, stop):
        opt.zero_grad()
        for j, (p, grad) in enumerate(zip(ps, grads[i])):
            if not (j == 1 and i % 3 == 0):
                p.grad = grad.clone()
        opt.step()
        sched.step()


def _run(make):
    ps = _params()
    opt, sched = _start(make, ps)
    _steps(opt, sched, ps, _grads(), 0, STEPS)
    return ps, opt


@pytest.mark.parametrize("name", sorted(CASES))
def test_bit_equal_to_torch_optim(name):
    ours, theirs = CASES[name]
    a, opt_a = _run(ours)
    b, opt_b = _run(theirs)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        assert sa["state"][k].keys() == sb["state"][k].keys()
        for key in sa["state"][k]:
            assert torch.equal(sa["state"][k][key], sb["state"][k][key]), (k, key)


@pytest.mark.parametrize("name", ["adam", "sgd_momentum"])
@pytest.mark.parametrize("first", ["ours", "torch"])
def test_a_checkpoint_resumes_bit_equal(name, first):
    """The state_dicts after 10 steps, loaded into a fresh optimizer and schedule, continue as if
    never stopped; torch's own optimizer's state_dict loads too (checkpoints from before)."""
    ours, theirs = CASES[name]
    whole, _ = _run(ours)
    ps, grads = _params(), _grads()
    opt, sched = _start(ours if first == "ours" else theirs, ps)
    _steps(opt, sched, ps, grads, 0, 10)
    saved = opt.state_dict(), sched.state_dict()
    opt, sched = _start(ours, ps)
    opt.load_state_dict(saved[0])
    sched.load_state_dict(saved[1])
    _steps(opt, sched, ps, grads, 10, STEPS)
    for x, y in zip(ps, whole):
        assert torch.equal(x, y)


def test_bad_hyperparameters_are_refused():
    with pytest.raises(ValueError, match="betas"):
        Adam(_params(), lr=0.1, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="nesterov"):
        SGD(_params(), lr=0.1, nesterov=True)


def test_no_torch_dynamo_import():
    """The point of kdexp's optimizers: an eager run never imports torch._dynamo (1.2 s)."""
    code = ("import sys, torch\n"
            "from kdexp.engine.optim import build_optimizer, build_scheduler\n"
            "from omegaconf import OmegaConf\n"
            "for name in ('adam', 'adamw', 'sgd', 'dot'):\n"
            "    p = torch.nn.Parameter(torch.ones(3))\n"
            "    cfg = OmegaConf.create(dict(name=name, lr=0.1, momentum=0.9, nesterov=False, delta=0.05,\n"
            "                                weight_decay=1e-4, schedule='cosine'))\n"
            "    opt = build_optimizer([p], cfg)\n"
            "    sched = build_scheduler(opt, cfg, 3)\n"
            "    p.sum().backward()\n"
            "    opt.step(); sched.step(); opt.zero_grad(); opt.load_state_dict(opt.state_dict())\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
