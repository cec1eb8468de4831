"""Correctness of method wiring that no loss test sees: the teacher of a semi-supervised method never
learns the labels hidden from the student, mutual-learning peers are initialized by their
architecture, `method.alpha` may be a free weight where CE's weight does not derive from it, probes
at build time leave BatchNorm statistics alone, and the stated relation between kdexp's AT/AB terms
and the authors' code holds numerically."""
import copy
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from kdexp.config import validate
from kdexp.data import load_dataset
from kdexp.engine.plan import plan
from kdexp.engine.teacher import FrozenTeacher, teacher_key
from kdexp.errors import ConfigError
from kdexp.methods import METHODS, get_method
from kdexp.models import get_model
from kdexp.models.taps import feature_shapes, list_features

TRANSFER_SET = ["method=data_distill", "dataset.label_fraction=0.05"]


def method_cfg(name, **kw):
    return OmegaConf.merge(OmegaConf.structured(METHODS.meta(name)["config"]), kw)


# -- the teacher of a method that learns from unlabeled samples ----------------------------------
def test_data_distill_teacher_trains_on_the_labeled_part_by_default(compose_cfg):
    default = plan(compose_cfg(*TRANSFER_SET), TRANSFER_SET)
    assert default.teachers[0].labeled_only is True and default.warnings == []
    assert compose_cfg(*TRANSFER_SET).teacher.labeled_only is None  # resolved in the plan, not in the config
    # methods that only use the unlabeled samples for teacher-driven terms keep Hinton et al.'s teacher
    kd = ["method=kd", "dataset.label_fraction=0.05"]
    assert plan(compose_cfg(*kd), kd).teachers[0].labeled_only is False
    # the cache key (what the teacher is trained on) is the explicit labeled_only=true one
    explicit = plan(compose_cfg(*TRANSFER_SET, "teacher.labeled_only=true"))
    oracle = plan(compose_cfg(*TRANSFER_SET, "teacher.labeled_only=false"))
    data = load_dataset(default.cfg.dataset)
    keys = [teacher_key(p.teachers[0], p.cfg.dataset, data) for p in (default, explicit, oracle)]
    assert keys[0] == keys[1] != keys[2]


def test_an_oracle_teacher_is_warned_about(compose_cfg):
    overrides = [*TRANSFER_SET, "teacher.labeled_only=false"]
    p = plan(compose_cfg(*overrides), overrides)
    assert p.teachers[0].labeled_only is False
    assert any("teacher.labeled_only=false" in w and "hides from the student" in w for w in p.warnings)
    members = [*TRANSFER_SET, "teachers=[cnn,{base: cnn, seed: 1, labeled_only: false}]"]
    p = plan(compose_cfg(*members), members)
    assert [t.labeled_only for t in p.teachers] == [True, False]
    assert [w.split(":")[0] for w in p.warnings if "hides" in w] == ["teachers[1].labeled_only=false"]


# -- mutual learning peers ------------------------------------------------------------------------
def _conv_weights(model):
    return {n: p.detach() for n, p in model.named_parameters() if p.dim() == 4}


def test_dml_peers_are_initialized_as_the_architecture_initializes_itself():
    torch.manual_seed(0)
    student = get_model("resnet8", (3, 32, 32), 100)
    method = get_method("dml")(method_cfg("dml", peers=3), student)
    s = _conv_weights(student)
    for peer in method.peers:
        p = _conv_weights(peer)
        for name, w in s.items():
            noise = 4 / np.sqrt(2 * w.numel())  # 4 standard errors of a std estimated from numel draws
            assert abs(p[name].std().item() / w.std().item() - 1) < noise, name
            assert not torch.equal(p[name], w), name
    assert not torch.equal(method.peers[0].conv1.weight, method.peers[1].conv1.weight)
    # exactly the architecture's own draw, continuing the RNG after the student
    torch.manual_seed(0)
    get_model("resnet8", (3, 32, 32), 100)
    expected = get_model("resnet8", (3, 32, 32), 100)
    assert all(torch.equal(a, b) for a, b in zip(expected.state_dict().values(), method.peers[0].state_dict().values()))


def test_rebuild_needs_a_model_built_by_get_model():
    from kdexp.models import rebuild

    model = get_model("torch.nn:Linear", (4,), 2, in_features=4, out_features=3)
    fresh = rebuild(copy.deepcopy(model))  # a deepcopy keeps the recipe
    assert isinstance(fresh, nn.Linear) and fresh.weight.shape == (3, 4) and not torch.equal(fresh.weight, model.weight)
    with pytest.raises(ConfigError, match="method=dml.*get_model"):
        get_method("dml")(method_cfg("dml"), nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))


# -- method.alpha ---------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [["method=kd", "method.alpha=9", "method.w_ce=0.1"],
                                       ["method=dkd", "method.alpha=2"], ["method=dml", "method.alpha=3"],
                                       ["method=cqd", "method.alpha=5"], ["method=dist", "method.alpha=2"]])
def test_alpha_above_one_is_a_free_weight_when_w_ce_is_set(compose_cfg, overrides):
    validate(compose_cfg(*overrides))


@pytest.mark.parametrize("overrides", [["method=kd", "method.alpha=1.5"], ["method=tfkd_reg", "method.alpha=2"]])
def test_alpha_above_one_with_w_ce_null_names_both_keys(compose_cfg, overrides):
    with pytest.raises(ConfigError, match=r"method\.alpha=.*method\.w_ce is null"):
        validate(compose_cfg(*overrides))


def test_negative_alpha_is_rejected_whatever_w_ce(compose_cfg):
    with pytest.raises(ConfigError, match=r"method\.alpha=-0\.1 is out of range: must be >= 0"):
        validate(compose_cfg("method=dkd", "method.alpha=-0.1"))


# -- probes leave BatchNorm statistics alone -------------------------------------------------------
def _buffers(model):
    return {n: b.clone() for n, b in model.named_buffers()}


def _bn_student():
    torch.manual_seed(0)
    model = get_model("resnet8", (3, 8, 8), 10)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    return model.train()


def _data(labeled=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, 8, 8, generator=g) * 3 + 2  # far from BatchNorm's initial statistics
    return types.SimpleNamespace(x_train=x, y_train=torch.arange(40) % 10, num_classes=10, labeled=labeled)


@pytest.mark.parametrize("name", ["dann", "multitask"])
def test_prepare_probes_keep_the_students_batchnorm_statistics(name):
    student = _bn_student()
    method = get_method(name)(method_cfg(name), student)
    before = _buffers(student)
    method.prepare(_data(), "cpu")
    after = _buffers(student)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), \
        [k for k in before if not torch.equal(before[k], after[k])][:3]
    assert student.training and all(m.training for m in method.modules())  # train mode restored


def test_data_distill_prepare_keeps_the_teachers_and_students_statistics():
    teacher_model, student = _bn_student(), _bn_student()
    teacher = FrozenTeacher(teacher_model, (3, 8, 8))
    method = get_method("data_distill")(method_cfg("data_distill", threshold=0.0), student, teacher)
    t_before, s_before = _buffers(teacher_model), _buffers(student)
    method.prepare(_data(labeled=torch.arange(40) < 10), "cpu")
    assert all(torch.equal(t_before[k], b) for k, b in _buffers(teacher_model).items())
    assert all(torch.equal(s_before[k], b) for k, b in _buffers(student).items())


def test_feature_probes_keep_statistics_and_each_modules_own_mode():
    model = _bn_student()
    model.layer1.eval()  # e.g. a frozen block: it must stay in eval mode after a probe
    before = _buffers(model)
    feature_shapes(model, ["layer2"], (3, 8, 8))
    list_features(model, (3, 8, 8))
    assert all(torch.equal(before[k], b) for k, b in _buffers(model).items())
    assert model.training and model.layer2.training and not model.layer1.training
    assert not any(m.training for m in model.layer1.modules())


# -- AT and AB against the authors' code -------------------------------------------------------------
def _small_pair(name):
    torch.manual_seed(0)
    teacher = FrozenTeacher(get_model("cnn", (1, 8, 8), 10, channels=(4, 4, 4)), (1, 8, 8))
    return get_method(name)(method_cfg(name), get_model("cnn", (1, 8, 8), 10, channels=(4, 4, 4)), teacher)


def _authors_at(fs, ft):
    """szagoruyko/attention-transfer: at(x) = l2-normalize(mean_c x^2) per sample; at_loss = mean
    over batch and positions of the squared difference (numpy, float64)."""
    def at(x):
        q = (x ** 2).mean(axis=1).reshape(len(x), -1)
        return q / np.sqrt((q ** 2).sum(axis=1, keepdims=True))
    diff = at(fs) - at(ft)
    return (diff ** 2).mean(), np.sqrt((diff ** 2).sum(axis=1))


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (8, 5, 8, 8), (16, 4, 7, 3), (3, 6, 16, 16)])
def test_at_term_relation_to_the_authors_code(shape):
    method = _small_pair("at")
    g = torch.Generator().manual_seed(sum(shape))
    fs = torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)
    ft = torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 0.5
    ours = method.feature_loss([fs], [ft], None)
    theirs, d = _authors_at(fs.detach().numpy(), ft.numpy())
    assert ours.item() / theirs == pytest.approx(d.mean() / (2 * (d ** 2).mean()), rel=1e-9)
    # per sample, the gradient is 1/(4 d_b) times the authors' (the same direction)
    (g_ours,) = torch.autograd.grad(ours, fs)
    fs2 = fs.detach().clone().requires_grad_(True)
    q = lambda x: torch.nn.functional.normalize(x.pow(2).mean(1).flatten(1), dim=1)  # noqa: E731
    (g_theirs,) = torch.autograd.grad((q(fs2) - q(ft)).pow(2).mean(), fs2)
    ratio = (g_ours.flatten(1) * g_theirs.flatten(1)).sum(1) / g_theirs.flatten(1).pow(2).sum(1)
    assert np.allclose(ratio.numpy(), 1 / (4 * d), rtol=1e-8)
    assert torch.allclose(g_ours.flatten(1), ratio[:, None] * g_theirs.flatten(1), rtol=1e-8, atol=1e-14)


def _authors_ab(s_list, t_list, margin=1.0):
    """bhheo/AB_distillation: sum over every neuron of the alternative loss per layer, / batch,
    layer l of n times 2^(l-n+1), the total times 3/1000 (numpy, float64)."""
    n, total = len(s_list), 0.0
    for i, (s, t) in enumerate(zip(s_list, t_list)):
        hinge = (s + margin) ** 2 * ((s > -margin) & (t <= 0)) + (s - margin) ** 2 * ((s <= margin) & (t > 0))
        total += 2.0 ** (i - n + 1) * hinge.sum() / len(s)
    return total * 3 / 1000


def test_ab_term_relation_to_the_authors_code():
    method = _small_pair("ab")  # student and teacher of one shape: identity connectors
    g = torch.Generator().manual_seed(0)
    # layer sizes halving from layer to layer, as in the authors' WRN: 2^(l-n+1) N_l is constant
    shapes = [(6, 16, 8, 8), (6, 32, 4, 4), (6, 64, 2, 2)]
    s = [torch.randn(*sh, generator=g, dtype=torch.float64) * 1.5 for sh in shapes]
    t = [torch.randn(*sh, generator=g, dtype=torch.float64) for sh in shapes]
    # per layer: the authors' layer l is 3 N_l / 1000 times kdexp's (one layer: weight 1 in both)
    means = []
    for x, y in zip(s, t):
        means.append(method.feature_loss([x], [y], None).item())
        assert _authors_ab([x.numpy()], [y.numpy()]) == pytest.approx(3 * x[0].numel() / 1000 * means[-1], rel=1e-10)
    # all layers: kdexp weighs the per-neuron means 1/4, 1/2, 1; the authors' code equally, by 3 * 256 / 1000
    ours = method.feature_loss(s, t, None).item()
    theirs = _authors_ab([x.numpy() for x in s], [x.numpy() for x in t])
    assert ours == pytest.approx(means[0] / 4 + means[1] / 2 + means[2], rel=1e-10)
    assert theirs == pytest.approx(3 * 256 / 1000 * sum(means), rel=1e-10)
