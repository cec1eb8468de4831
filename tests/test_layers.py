"""kdexp's shared layers (kdexp.models.layers) give exactly what the torch layers they stand for give."""
import pytest
import torch
import torch.nn as nn

from kdexp.models.layers import MaxPool2d


@pytest.mark.parametrize("args", [dict(kernel_size=2, ceil_mode=True), dict(kernel_size=3, stride=2, padding=1),
                                  dict(kernel_size=2, return_indices=True)])
def test_max_pool_equals_torch_with_and_without_gradients(args):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 9, 7)
    ours, theirs = MaxPool2d(**args), nn.MaxPool2d(**args)
    with torch.no_grad():  # the channels-last path
        a, b = ours(x), theirs(x)
    for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        assert torch.equal(u, v) and u.is_contiguous()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    ya, yb = (ya[0], yb[0]) if isinstance(ya, tuple) else (ya, yb)
    assert torch.equal(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(xa.grad, xb.grad)
