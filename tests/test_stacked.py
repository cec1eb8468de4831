"""The stacked forward of a fused group's N students (kdexp.engine.stacked): the explicit products
for linear chains and vmap for other students give each student's own forward and gradients."""
import pytest
import torch
import torch.nn as nn

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
