"""The stacked forward of a fused group's N students (kdexp.engine.stacked): the explicit products
for linear chains and vmap for other students give each student's own forward and gradients."""
import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from kdexp.engine.stacked import linear_chain, stacked_forward
from kdexp.models import get_model

N, B = 3, 5


def students(build, n=N):
    models = []
    for i in range(n):
        torch.manual_seed(i)
        models.append(build())
    return models


def stack(models):
    names = [k for k, _ in models[0].named_parameters()]
    return {k: torch.stack([dict(m.named_parameters())[k].detach() for m in models]).clone().requires_grad_(True)
            for k in names}


def check_against_each_student(models, in_shape, shared):
    """Logits and gradients of the stacked forward = each student's own."""
    params = stack(models)
    torch.manual_seed(10)
    x = torch.randn(B, *in_shape) if shared else torch.randn(N, B, *in_shape)
    weights = torch.randn(N, B, models[0](x[:1] if shared else x[0, :1]).shape[-1])
    logits = stacked_forward(models[0], in_shape)(params, {}, x, shared)
    assert logits.shape == weights.shape
    (logits * weights).sum().backward()
    for i, m in enumerate(models):
        own = m(x if shared else x[i])
        assert torch.allclose(logits[i], own, atol=1e-5)
        (own * weights[i]).sum().backward()
        for name, p in m.named_parameters():
            assert torch.allclose(params[name].grad[i], p.grad, atol=1e-5), name


@pytest.mark.parametrize("shared", [True, False])
def test_mlp_students_as_explicit_products(shared):
    build = lambda: get_model("mlp", (1, 6, 6), 4, hidden=7, activation="relu", depth=2)  # noqa: E731
    assert linear_chain(build(), (1, 6, 6)) is not None
    check_against_each_student(students(build), (1, 6, 6), shared)


@pytest.mark.parametrize("shared", [True, False])
def test_vector_inputs_and_layers_without_bias(shared):
    build = lambda: nn.Sequential(nn.Linear(6, 8, bias=False), nn.Tanh(), nn.Linear(8, 3), nn.Sigmoid())  # noqa: E731
    assert [kind for kind, _ in linear_chain(build(), (6,))] == ["linear", "act", "linear", "act"]
    check_against_each_student(students(build), (6,), shared)


def test_other_students_run_under_vmap():
    build_cnn = lambda: get_model("cnn", (1, 8, 8), 4, channels=[3, 4])  # noqa: E731
    assert linear_chain(build_cnn(), (1, 8, 8)) is None
    assert linear_chain(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)), (6,)) is None
    assert linear_chain(nn.Sequential(nn.Linear(6, 3)), (2, 6)) is None  # images without a Flatten
    assert linear_chain(nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(6, 3)), (6,)) is None
    hooked = nn.Sequential(nn.Linear(6, 3))
    hooked[0].register_forward_hook(lambda m, i, o: None)
    assert linear_chain(hooked, (6,)) is None  # a hook would not run in the explicit products
    for shared in (True, False):
        check_against_each_student(students(build_cnn), (1, 8, 8), shared)


@pytest.mark.parametrize("shared", [True, False])
def test_conv_students_run_each_layer_as_one_grouped_convolution(shared):
    # vmap's batching rule for conv (torch.func) folds the N students into one convolution per layer:
    # over a shared batch the first layer's N weights stack into N*out channels (groups=1) and later
    # layers take groups=N; per-student batches take groups=N from the first layer on. So a fused
    # group of conv students issues the same number of convolutions as one student, on the CPU and
    # on a GPU alike (cuDNN's grouped kernels there)
    build = lambda: get_model("cnn", (1, 8, 8), 4, channels=[3, 4])  # noqa: E731
    models = students(build)
    params = stack(models)
    x = torch.randn(B, 1, 8, 8) if shared else torch.randn(N, B, 1, 8, 8)
    forward = stacked_forward(models[0], (1, 8, 8))
    calls = []
    real = torch.ops.aten.convolution.default

    class Convolutions(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (real, torch.ops.aten.convolution_backward.default):
                weight = args[1] if func is real else args[2]
                groups = args[8] if func is real else args[9]
                calls.append((func.__name__.split(".")[0], tuple(weight.shape), groups))
            return func(*args, **(kwargs or {}))

    with Convolutions():
        forward(params, {}, x, shared).sum().backward()
    convs = [c for c in calls if c[0] == "convolution"]
    assert len(convs) == 2 and len([c for c in calls if c[0] == "convolution_backward"]) == 2, calls
    first, second = convs
    assert first[1][0] == N * 3 and first[2] == (1 if shared else N), first  # 3 channels per student
    assert second[1][0] == N * 4 and second[2] == N, second
