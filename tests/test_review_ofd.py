"""ReviewKD (ABF fusion + hierarchical context loss) and OFD (BN margins + partial L2): the losses
against independent float64 references (numpy loops, a numeric integral of the Gaussian), the
BatchNorm lookup behind OFD's margins, the methods' gradients, and runs on the CIFAR-100 pairs."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from kdexp import losses as L
from kdexp.engine.plan import plan
from kdexp.engine.teacher import FrozenTeacher
from kdexp.errors import ConfigError
from kdexp.methods import Batch, get_method
from kdexp.methods.base import warmup_ramp
from kdexp.methods.ofd import OFDConfig
from kdexp.methods.reviewkd import ReviewKDConfig
from kdexp.models import get_model
from kdexp.models.taps import default_layers, producing_batchnorms
from kdexp.train import run
from tests.conftest import composer
from tests.test_zoo import PRESETS, preset_cfg  # noqa: F401  (the fixture)

RNG = np.random.default_rng(2021)


def t64(a):
    return torch.tensor(a, dtype=torch.float64)


# --------------------------------------------------------------------------- HCL

def adaptive_pool_np(x, out):
    """numpy adaptive average pooling (B,C,H,W) -> (B,C,out,out) with PyTorch's bin edges."""
    b, c, h, w = x.shape
    y = np.zeros((b, c, out, out))
    for i in range(out):
        h0, h1 = (i * h) // out, -((-(i + 1) * h) // out)
        for j in range(out):
            w0, w1 = (j * w) // out, -((-(j + 1) * w) // out)
            y[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return y


def hcl_reference(fs_list, ft_list, levels):
    total = 0.0
    for fs, ft in zip(fs_list, ft_list):
        used = [lv for lv in levels if lv < min(fs.shape[2], fs.shape[3])]
        weights = [0.5 ** (k + 1) for k in range(len(used))]
        value = np.mean((fs - ft) ** 2)
        for lv, wt in zip(used, weights):
            value += wt * np.mean((adaptive_pool_np(fs, lv) - adaptive_pool_np(ft, lv)) ** 2)
        total += value / (1.0 + sum(weights))
    return total


@pytest.mark.parametrize("shapes,levels", [
    ([(2, 3, 8, 8)], (4, 2, 1)),
    ([(3, 4, 5, 7)], (4, 2, 1)),  # bins that do not divide the map
    ([(2, 2, 16, 16), (2, 5, 4, 4), (2, 6, 2, 2), (2, 7, 1, 1)], (4, 2, 1)),  # a whole ReviewKD stack
    ([(1, 3, 6, 6)], (3, 1)),
    ([(2, 3, 4, 4)], ()),
])
def test_hcl_loss_matches_pooled_mse_pyramid(shapes, levels):
    fs = [RNG.standard_normal(s) for s in shapes]
    ft = [RNG.standard_normal(s) * 2 + 0.5 for s in shapes]
    got = L.hcl_loss([t64(a) for a in fs], [t64(a) for a in ft], levels)
    assert got.item() == pytest.approx(hcl_reference(fs, ft, levels), rel=1e-10)
    assert L.hcl_loss([t64(a) for a in ft], [t64(a) for a in ft], levels).item() == pytest.approx(0.0, abs=1e-14)


def test_hcl_loss_weights_of_an_8x8_map():
    fs, ft = torch.zeros(1, 1, 8, 8, dtype=torch.float64), torch.ones(1, 1, 8, 8, dtype=torch.float64)
    # every level's MSE is 1: (1 + 1/2 + 1/4 + 1/8) / (1 + 1/2 + 1/4 + 1/8) = 1; a 2x2 map uses only l=1
    assert L.hcl_loss([fs], [ft]).item() == pytest.approx(1.0)
    fs[..., :4, :] = 1.0  # full-res MSE 1/2, pooled 4x4: 1/2, 2x2: 1/2, 1x1: 1/4
    assert L.hcl_loss([fs], [ft]).item() == pytest.approx((0.5 + 0.25 + 0.125 + 0.25 / 8) / 1.875)


def test_hcl_loss_large_values_and_bad_inputs():
    fs = (torch.randn(2, 3, 4, 4) * 100).requires_grad_()
    loss = L.hcl_loss([fs], [torch.randn(2, 3, 4, 4) * 100])
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(fs.grad).all()
    with pytest.raises(ValueError, match="one shape"):
        L.hcl_loss([torch.zeros(1, 2, 4, 4)], [torch.zeros(1, 2, 2, 2)])
    with pytest.raises(ValueError, match="equally long"):
        L.hcl_loss([torch.zeros(1, 2, 4, 4)], [])


# --------------------------------------------------------------------------- OFD margin and partial L2

def negative_mean_numeric(m, s):
    """E[x | x < 0] for x ~ N(m, s^2) by the trapezoid rule on a fine grid, and P(x < 0)."""
    lo = min(m, 0.0) - 12 * s
    x = np.linspace(lo, 0.0, 400001)
    pdf = np.exp(-0.5 * ((x - m) / s) ** 2) / (s * np.sqrt(2 * np.pi))
    mass = np.trapezoid(pdf, x)
    with np.errstate(invalid="ignore", divide="ignore"):  # no mass on the grid: the caller takes -3 std
        return np.trapezoid(x * pdf, x) / mass, mass


@pytest.mark.parametrize("m,s", [(0.0, 1.0), (0.3, 0.7), (-1.2, 0.5), (1.5, 0.6), (2.0, 2.5), (0.05, -0.8),
                                 (-3.0, 0.1), (2.5, 0.9)])
def test_ofd_margin_is_the_mean_of_the_negative_part(m, s):
    ref, mass = negative_mean_numeric(m, abs(s))
    assert mass > 2e-3  # these cases are away from the -3 std fallback
    got = L.ofd_margin(torch.tensor([m], dtype=torch.float64), torch.tensor([s], dtype=torch.float64))
    assert got.item() == pytest.approx(ref, rel=1e-6, abs=1e-9)
    assert got.item() < 0


def test_ofd_margin_fallback_shape_and_extremes():
    # P(x < 0) <= 0.001: -3 std (the authors' rule); m/s = 3.2 -> P = 6.9e-4
    ref_mass = negative_mean_numeric(3.2, 1.0)[1]
    assert ref_mass < 1e-3
    mean = torch.tensor([3.2, 10.0, 0.0, -5.0, 1.0])
    std = torch.tensor([1.0, 0.5, 2.0, 1e-30, 0.0])  # a zero std: a point mass
    got = L.ofd_margin(mean, std)
    assert got.shape == (5,) and got.dtype == torch.float32 and torch.isfinite(got).all()
    assert got[0].item() == pytest.approx(-3.0) and got[1].item() == pytest.approx(-1.5)
    assert got[2].item() == pytest.approx(-2.0 * np.sqrt(2 / np.pi), rel=1e-6)  # half-normal mean
    assert got[3].item() == pytest.approx(-5.0) and got[4].item() == pytest.approx(0.0, abs=1e-10)


def partial_l2_reference(s, t, margin):
    """mdistiller's three cases written out per element, summed, over the batch size."""
    total = 0.0
    for idx in np.ndindex(*s.shape):
        sv, tv, mv = s[idx], t[idx], margin[idx[1]]
        if tv <= mv:
            total += (sv - mv) ** 2 if sv > mv else 0.0
        elif tv <= 0:
            total += (sv - tv) ** 2 if sv > tv else 0.0
        else:
            total += (sv - tv) ** 2
    return total / s.shape[0]


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (3, 5), (1, 2, 3, 5), (4, 6, 2, 2)])
def test_ofd_partial_l2_matches_the_case_analysis(shape):
    s, t = RNG.standard_normal(shape) * 1.5, RNG.standard_normal(shape)
    margin = -np.abs(RNG.standard_normal(shape[1])) - 0.1
    got = L.ofd_partial_l2(t64(s), t64(t), t64(margin))
    assert got.item() == pytest.approx(partial_l2_reference(s, t, margin), rel=1e-12)


def test_ofd_partial_l2_zero_where_the_student_is_below_a_discarded_response():
    t = torch.tensor([[-2.0, -0.5, 0.7]])
    margin = torch.tensor([-1.0, -1.0, -1.0])
    s = torch.tensor([[-3.0, -0.8, 0.7]], requires_grad=True)  # below the margin, below t, equal to t
    loss = L.ofd_partial_l2(s, t, margin)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros(1, 3))
    s2 = torch.tensor([[0.0, 0.0, 0.0]])  # above: (0 - (-1))^2 + (0 + 0.5)^2 + 0.7^2
    assert L.ofd_partial_l2(s2, t, margin).item() == pytest.approx(1 + 0.25 + 0.49)
    big = (torch.randn(2, 3, 2, 2) * 100).requires_grad_()
    value = L.ofd_partial_l2(big, torch.randn(2, 3, 2, 2) * 100, margin)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(big.grad).all()
    with pytest.raises(ValueError, match="channels"):
        L.ofd_partial_l2(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), margin)


# --------------------------------------------------------------------------- the BatchNorm behind a feature

class Residual(nn.Module):
    """relu(x + bn(conv(x))): the branch is the second operand."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU()

    def forward(self, x):
        return self.relu(x + self.bn(self.conv(x)))


def test_producing_batchnorms_follows_the_graph():
    shape = (3, 16, 16)
    cases = {"resnet20": ["layer1.2.bn2", "layer2.2.bn2", "layer3.2.bn2"],  # bn2 + identity shortcut
             "resnet8": ["layer1.0.bn2", "layer2.0.bn2", "layer3.0.bn2"],  # bn2 + downsample BN: the branch
             "wrn_16_2": ["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"],  # the taps are BNs
             "vgg8": ["block1.1", "block2.1", "block3.1", "block4.1"],  # a Sequential ending in a BN
             "cnn": [None, None, None]}
    for arch, expected in cases.items():
        model = get_model(arch, shape, 10)
        assert producing_batchnorms(model, default_layers(model, "preact"), shape) == expected, arch
    model = nn.Sequential(nn.Conv2d(3, 2, 1), Residual(), Residual())
    assert producing_batchnorms(model, ["1.relu:in", "2.relu:in", "2.relu", "0"], shape) == \
        ["1.bn", "2.bn", None, None]  # through the sum to the nearer BN; a ReLU's output is none's
    with torch.device("meta"):  # the run plan's skeletons
        model = get_model("resnet20", shape, 10)
    assert producing_batchnorms(model, default_layers(model, "preact"), shape)[0] == "layer1.2.bn2"
    assert model.training  # mode restored


# --------------------------------------------------------------------------- methods

def build(name, cfg, student_arch, teacher_arch, in_shape=(1, 8, 8), student_args=None, teacher_bn_seed=None):
    torch.manual_seed(0)
    teacher_model = get_model(teacher_arch, in_shape, 10)
    if teacher_bn_seed is not None:  # BN parameters as a trained teacher's: varied signs and scales
        g = torch.Generator().manual_seed(teacher_bn_seed)
        for m in teacher_model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.data = torch.randn(m.num_features, generator=g)
                m.bias.data = torch.randn(m.num_features, generator=g)
    teacher = FrozenTeacher(teacher_model, in_shape)
    student = get_model(student_arch, in_shape, 10, **(student_args or {}))
    return get_method(name)(cfg, student, teacher), teacher


def grads_reach(method, teacher, modules, in_shape=(1, 8, 8), n=6):
    x, y = torch.randn(n, *in_shape), torch.randint(0, 10, (n,))
    method.train()
    terms = method.losses(Batch(x, y, torch.arange(n)))
    sum(terms.values()).backward()
    for what, module in modules.items():
        params = list(module.parameters())
        assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params), what
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    return terms


def test_reviewkd_gradients_reach_the_student_and_every_abf():
    method, teacher = build("reviewkd", ReviewKDConfig(), "cnn", "resnet20", student_args={"channels": (8, 16, 16)})
    assert method.s_layers == ["0.1", "0.4", "0.7", "1"]  # stage ends (post-ReLU) + the embedding
    assert method.t_layers == ["layer1.2.out_relu:in", "layer2.2.out_relu:in", "layer3.2.out_relu:in", "flatten"]
    assert method.abfs[-1].attention is None and all(a.attention is not None for a in method.abfs[:-1])
    assert method.abfs[0].reduce[0].out_channels == 64  # mid: min(512, the deepest student level's 64 = 16 * 2 * 2)
    terms = grads_reach(method, teacher, {"student": method.student, "abfs": method.abfs})
    assert set(terms) == {"ce", "review"}
    assert not {id(p) for p in teacher.model.parameters()} & {id(p) for p in method.parameters()}


def test_reviewkd_fuses_to_the_teachers_shapes_across_sizes_and_warms_up():
    shape = (3, 32, 32)
    method, teacher = build("reviewkd", ReviewKDConfig(), "vgg8", "resnet20", in_shape=shape)
    x = torch.randn(2, *shape)
    _, s, _, t = method.features(Batch(x, torch.zeros(2, dtype=torch.long), torch.arange(2)))
    assert [tuple(f.shape[2:]) for f in s[:-1]] == [(8, 8), (4, 4), (4, 4)]  # vgg8's last 4 levels
    fused = method.fuse(s)
    assert [f.shape for f in fused] == [torch.Size([2, 16, 32, 32]), torch.Size([2, 32, 16, 16]),
                                        torch.Size([2, 64, 8, 8]), torch.Size([2, 64, 1, 1])]
    method.eval()
    values = []
    for epoch in (0, 9, 19, 30):
        method.epoch = epoch
        values.append(method.feature_loss(s, t, None).item())
    assert values[1] == pytest.approx(10 * values[0], rel=1e-5)
    assert values[2] == pytest.approx(20 * values[0], rel=1e-5) and values[3] == pytest.approx(values[2], rel=1e-6)
    assert [warmup_ramp(e, 20) for e in (0, 19, 40)] == [0.05, 1.0, 1.0] and warmup_ramp(0, 0) == 1.0


def test_reviewkd_config_errors():
    with pytest.raises(ConfigError, match="the student's layers 2 .* are vectors"):
        build("reviewkd", ReviewKDConfig(), "mlp", "resnet20")
    for key, value in (("warmup_epochs", -1), ("max_mid_channels", 0), ("levels", [2, 0])):
        with pytest.raises(ConfigError, match=f"method.{key}"):
            build("reviewkd", ReviewKDConfig(**{key: value}), "cnn", "resnet20")


def test_ofd_margins_come_from_the_teachers_batchnorms():
    method, teacher = build("ofd", OFDConfig(), "cnn", "resnet20", teacher_bn_seed=3,
                            student_args={"channels": (8, 16, 16)})
    modules = dict(teacher.model.named_modules())
    assert method.t_layers == ["layer1.2.out_relu:in", "layer2.2.out_relu:in", "layer3.2.out_relu:in"]
    for margin, name, c in zip(method.margins(), ["layer1.2.bn2", "layer2.2.bn2", "layer3.2.bn2"], (16, 32, 64)):
        bn = modules[name]
        assert margin.shape == (c,)
        for k in range(c):
            m, s = bn.bias[k].item(), abs(bn.weight[k].item())
            ref, mass = negative_mean_numeric(m, s)
            assert margin[k].item() == pytest.approx(ref if mass > 1e-3 else -3 * s, rel=1e-4, abs=1e-6)
    assert {"margin0", "margin1", "margin2"} <= dict(method.named_buffers()).keys()
    assert method.measured == []  # every margin from a BatchNorm: prepare measures nothing
    terms = grads_reach(method, teacher, {"student": method.student, "connectors": method.connectors})
    assert set(terms) == {"ce", "ofd"} and terms["ofd"] > 0


def test_ofd_on_wrn_and_vgg_teachers_and_a_smaller_student_map():
    shape = (3, 16, 16)
    method, teacher = build("ofd", OFDConfig(), "resnet8", "wrn_16_2", in_shape=shape, teacher_bn_seed=1)
    bn1 = teacher.model.bn1
    assert torch.allclose(method.margins()[-1], L.ofd_margin(bn1.bias.detach(), bn1.weight.detach().abs()))
    grads_reach(method, teacher, {"connectors": method.connectors}, in_shape=shape)
    method, teacher = build("ofd", OFDConfig(), "resnet8", "vgg8", in_shape=shape)
    assert [c.t_shape for c in method.connectors] == [(256, 4, 4), (512, 2, 2), (512, 2, 2)]
    grads_reach(method, teacher, {"connectors": method.connectors}, in_shape=shape)


def test_ofd_without_a_teacher_batchnorm_measures_the_margins_on_training_inputs(tmp_path):
    """The digits CNN teacher has no BatchNorm: each channel's margin is the Gaussian formula on the
    mean and std of its measured pre-ReLU responses (independent numpy statistics here)."""
    method, teacher = build("ofd", OFDConfig(margin_samples=40), "cnn", "cnn")
    assert method.measured == [0, 1, 2]

    class Data:
        x_train = torch.randn(50, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    method.prepare(Data, torch.device("cpu"))
    from kdexp.models.taps import run_with_features
    _, feats = run_with_features(teacher.model, Data.x_train[:40], method.t_layers, "teacher")
    for margin, layer in zip(method.margins(), method.t_layers):
        f = feats[layer].double().numpy()
        per = np.moveaxis(f, 1, 0).reshape(f.shape[1], -1)
        mean, std = per.mean(1), per.std(1, ddof=1)
        ref = L.ofd_margin(torch.tensor(mean), torch.tensor(std))
        assert torch.allclose(margin.double(), ref, rtol=1e-4, atol=1e-6)
        assert (margin < 0).all()
    state = method.state_dict()  # saved with the run, so a resumed run keeps the measured margins
    assert all(torch.equal(state[f"margin{i}"], m) for i, m in enumerate(method.margins()))
    with pytest.raises(ConfigError, match="method.margin_samples=1"):
        build("ofd", OFDConfig(margin_samples=1), "cnn", "cnn")
    assert plan(composer(tmp_path)("method=ofd", "student=cnn")).name == "ofd"  # the default CNN teacher


def test_warmup_warning(tmp_path):
    p = plan(composer(tmp_path)("method=reviewkd", "student=cnn", "epochs=3"))
    assert any("warmup_epochs=20 is longer than the run (epochs=3): the review (HCL) terms" in w for w in p.warnings)


# --------------------------------------------------------------------------- CIFAR-100 pairs

@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("method", ["reviewkd", "ofd"])
def test_review_and_ofd_on_every_cifar_pair_of_fake_data(preset_cfg, tmp_path, preset, method):  # noqa: F811
    cfg = preset_cfg(preset, "dataset=fake", "epochs=1", "teacher.epochs=1", "progress=false", f"method={method}")
    run(cfg, str(tmp_path / "run"))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    term = {"reviewkd": "review", "ofd": "ofd"}[method]
    assert m["status"] == "done" and 0 < m["history"][0][f"train/loss_{term}"] < float("inf")
