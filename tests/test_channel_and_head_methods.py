"""SRD (the teacher's classifier on the student's feature), ICKD (inter-channel correlation), CWD
(channel-wise spatial distributions) and MGD (masked generation): their losses against independent
float64 references written as numpy loops, and the methods: gradients, the frozen teacher and its
classifier, the mask stream, config errors, and the four CIFAR-100 pairs on fake data (slow)."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from kdexp import losses as L
from kdexp.engine.optim import build_optimizer
from kdexp.engine.plan import plan
from kdexp.engine.teacher import FrozenTeacher
from kdexp.errors import ConfigError
from kdexp.methods import Batch, get_method
from kdexp.methods.srd import find_classifier
from kdexp.models import get_model, skeleton
from kdexp.models.taps import default_layers, run_with_features
from kdexp.train import run
from tests.test_feature_methods import cache, cfg_of, setup  # noqa: F401  (fixtures)
from tests.test_zoo import PRESETS, preset_cfg  # noqa: F401  (the preset_cfg fixture)

RNG = np.random.default_rng(2021)
METHODS = ("srd", "ickd", "cwd", "mgd")


def t64(a, grad=False):
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


def rand(*shape, scale=1.0):
    return RNG.standard_normal(shape) * scale


def softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


# --------------------------------------------------------------------------- SRD

def srd_reference(fs, ft, zs, zt, mode, T):
    b, d = fs.shape
    fm = sum((fs[i, j] - ft[i, j]) ** 2 for i in range(b) for j in range(d)) / (b * d)
    if mode == "mse":
        sr = sum((zs[i, k] - zt[i, k]) ** 2 for i in range(b) for k in range(zs.shape[1])) / zs.size
    else:
        sr = 0.0
        for i in range(b):
            p, q = softmax(zt[i] / T), softmax(zs[i] / T)
            sr += sum(p[k] * math.log(p[k] / q[k]) for k in range(len(p)))
        sr = T * T * sr / b
    return fm, sr


@pytest.mark.parametrize("b,d,k", [(4, 6, 5), (1, 3, 2), (7, 16, 10)])
@pytest.mark.parametrize("mode,T", [("mse", 1.0), ("kl", 1.0), ("kl", 4.0)])
def test_srd_terms_match_the_reference(b, d, k, mode, T):
    fs, ft, zs, zt = rand(b, d), rand(b, d), rand(b, k, scale=3), rand(b, k, scale=3)
    fm, sr = L.srd_terms(t64(fs), t64(ft), t64(zs), t64(zt), mode, T)
    ref_fm, ref_sr = srd_reference(fs, ft, zs, zt, mode, T)
    assert fm.item() == pytest.approx(ref_fm, rel=1e-12)
    assert sr.item() == pytest.approx(ref_sr, rel=1e-10)
    total = L.srd_loss(t64(fs), t64(ft), t64(zs), t64(zt), mode, T, fm_weight=2.0, sr_weight=0.5)
    assert total.item() == pytest.approx(2.0 * ref_fm + 0.5 * ref_sr, rel=1e-10)


@pytest.mark.parametrize("mode,T", [("mse", 4.0), ("kl", 1.0), ("kl", 4.0)])
def test_srd_is_finite_for_logits_of_100(mode, T):
    zs = torch.tensor([[100.0, -100.0, 0.0], [-100.0, 100.0, 50.0]], requires_grad=True)
    zt = torch.tensor([[-100.0, 100.0, 0.0], [100.0, -100.0, -50.0]])
    fs = torch.randn(2, 4, requires_grad=True)
    fm, sr = L.srd_terms(fs, torch.randn(2, 4), zs, zt, mode, T)
    (fm + sr).backward()
    assert torch.isfinite(fm) and torch.isfinite(sr) and sr > 0
    assert torch.isfinite(zs.grad).all() and torch.isfinite(fs.grad).all()
    assert L.srd_terms(fs, fs, zt, zt, mode, T)[1].item() == pytest.approx(0.0, abs=1e-6)


def test_srd_rejects_an_unknown_sr_loss():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="sr_loss"):
        L.srd_terms(x, x, x, x, "l1")


# --------------------------------------------------------------------------- ICKD

def ickd_reference(fs, ft):
    b, c = ft.shape[:2]
    total = 0.0
    for n in range(b):
        grams = []
        for f in (fs[n].reshape(c, -1), ft[n].reshape(c, -1)):
            g = np.array([[float(np.dot(f[i], f[j])) for j in range(c)] for i in range(c)])
            grams.append(np.array([row / math.sqrt(sum(v * v for v in row)) for row in g]))
        total += ((grams[0] - grams[1]) ** 2).sum()
    return total / (c * b)


@pytest.mark.parametrize("s_shape,t_shape", [((3, 4, 5, 5), (3, 4, 5, 5)), ((2, 6, 3, 3), (2, 6, 4, 2)),
                                             ((1, 2, 2, 3), (1, 2, 2, 3))])
def test_ickd_matches_the_reference(s_shape, t_shape):
    fs, ft = rand(*s_shape), rand(*t_shape)
    assert L.ickd_loss(t64(fs), t64(ft)).item() == pytest.approx(ickd_reference(fs, ft), rel=1e-10)
    assert L.ickd_loss(t64(ft), t64(ft)).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("scale", [1e-20, 1e-3, 1e3, 1e20])
def test_ickd_is_scale_free_and_finite_at_extreme_scales(scale):
    fs, ft = torch.randn(3, 4, 3, 3), torch.randn(3, 4, 3, 3)
    base = L.ickd_loss(fs, ft)
    s = (fs * scale).requires_grad_()
    loss = L.ickd_loss(s, ft * scale)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert loss.item() == pytest.approx(base.item(), rel=1e-4)


def test_ickd_gradient_equals_float64_finite_differences():
    fs, ft = t64(rand(2, 3, 2, 2), grad=True), t64(rand(2, 3, 2, 2))
    assert torch.autograd.gradcheck(lambda x: L.ickd_loss(x, ft), (fs,))


def test_ickd_needs_matching_channels():
    with pytest.raises(ValueError, match="must match"):
        L.ickd_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4))


# --------------------------------------------------------------------------- CWD

def cwd_reference(fs, ft, tau):
    b, c = fs.shape[:2]
    total = 0.0
    for n in range(b):
        for ch in range(c):
            p, q = softmax(ft[n, ch].ravel() / tau), softmax(fs[n, ch].ravel() / tau)
            total += sum(p[i] * (math.log(p[i]) - math.log(q[i])) for i in range(len(p)))
    return tau * tau * total / (b * c)


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (1, 1, 2, 3), (5, 4, 3, 1)])
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_cwd_matches_the_reference(shape, tau):
    fs, ft = rand(*shape, scale=2), rand(*shape, scale=2)
    assert L.cwd_loss(t64(fs), t64(ft), tau).item() == pytest.approx(cwd_reference(fs, ft, tau), rel=1e-10)
    assert L.cwd_loss(t64(ft), t64(ft), tau).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_cwd_is_finite_for_maps_of_100(tau):
    s = (torch.randn(2, 3, 4, 4).sign() * 100).requires_grad_()
    t = -s.detach()
    loss = L.cwd_loss(s, t, tau)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0 and torch.isfinite(s.grad).all()


def test_cwd_needs_equal_shapes():
    with pytest.raises(ValueError, match="must match"):
        L.cwd_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2))


# --------------------------------------------------------------------------- MGD

@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (1, 5, 2, 2), (6, 2, 3, 1)])
def test_mgd_loss_is_the_squared_error_summed_per_sample(shape):
    g, t = rand(*shape), rand(*shape)
    per_sample = [sum(float(v) ** 2 for v in (g[n] - t[n]).ravel()) for n in range(shape[0])]
    assert L.mgd_loss(t64(g), t64(t)).item() == pytest.approx(sum(per_sample) / shape[0], rel=1e-12)
    x = torch.full(shape, 100.0, requires_grad=True)
    loss = L.mgd_loss(x, -x.detach())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------- methods on digits

# the fixtures of the feature methods' tests: composed configs, a module-wide teacher cache, setup()


def batch_of(data, n=32):
    idx = torch.arange(n)
    return Batch(data.x_train[idx], data.y_train[idx], idx)


OWN_PARTS = {"srd": ["connector"], "ickd": ["embed"], "cwd": ["align"], "mgd": ["align", "generation"]}


@pytest.mark.parametrize("name", METHODS)
def test_gradients_reach_the_student_and_the_methods_parts_but_not_the_teacher(setup, name):
    cfg, data, teacher, method = setup(name, "method.w_ce=0")  # the method's term alone
    parts = [getattr(method, a) for a in OWN_PARTS[name]]
    own = [p for m in parts for p in m.parameters()]
    assert own, f"{name}: the student's 16 channels differ from the teacher's 32..64: a connector is needed"
    opt = {id(p) for g in build_optimizer(method.param_groups(cfg.optim), cfg.optim).param_groups for p in g["params"]}
    assert {id(p) for p in own} <= opt and not {id(p) for p in teacher.model.parameters()} & opt
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    method.train()
    terms = method.losses(batch_of(data))
    assert set(terms) == {name} and torch.isfinite(terms[name]) and terms[name] > 0
    terms[name].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in own)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student.parameters())
    # every part learns (CWD's softmax over positions ignores a per-channel shift: its BN bias gets 0)
    assert all(any(p.grad.abs().sum() > 0 for p in m.parameters()) for m in parts)
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.model.state_dict().items())


def test_srd_uses_the_teachers_classifier_outside_the_method(setup):
    cfg, data, teacher, method = setup("srd", "method.w_ce=0", "method.fm_weight=0")  # the SR term alone
    head = teacher.model[3]  # cnn: Sequential(features, Flatten, Dropout, Linear)
    assert method.teacher_head is head
    assert not {id(p) for p in head.parameters()} & {id(p) for p in method.parameters()}
    assert not any(k.startswith("teacher") for k in method.state_dict())
    method.train()
    batch = batch_of(data)
    loss = method.losses(batch)["srd"]
    # the SR term by hand: the teacher's Linear on the connected student embedding vs the teacher's logits
    _, feats = run_with_features(method.student, batch.x, method.s_layers)
    by_hand = (head(method.connector(feats[method.s_layers[0]])) - teacher.logits(batch)).pow(2).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in head.parameters())  # frozen: the gradient flows through it only
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.connector.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student.parameters())


def test_srd_kl_form_honours_the_temperature(setup):
    _, data, teacher, method = setup("srd", "method.sr_loss=kl", "method.fm_weight=0", "method.temperature=2")
    method.eval()
    batch = batch_of(data)
    with torch.no_grad():
        _, feats = run_with_features(method.student, batch.x, method.s_layers)
        z = method.teacher_head(method.connector(feats[method.s_layers[0]]))
        expected = L.kd_loss(z, teacher.logits(batch), 2.0)
        assert method.feature_loss(*[method.features(batch)[i] for i in (1, 3)], batch).item() == \
            pytest.approx(expected.item(), rel=1e-5)


HEADS = {"resnet20": "fc", "resnet8x4": "fc", "wrn_16_2": "fc", "vgg8": "classifier", "mobilenetv2": "classifier",
         "shufflenet_v1": "linear", "shufflenet_v2": "linear", "lenet5": "12", "mlp": "3", "cnn": "3",
         "resnet18": "fc", "mobilenet_v3_small": "classifier"}  # its classifier: Linear, Hardswish, Dropout, Linear


@pytest.mark.parametrize("arch", HEADS)
def test_the_classifier_of_every_zoo_model_is_found(arch):
    in_shape = (1, 8, 8) if arch in ("mlp", "cnn", "lenet5") else (3, 32, 32)
    torch.manual_seed(0)
    model = get_model(arch, in_shape, 10).eval()
    layer = default_layers(model, "embedding")[0]
    name, head = find_classifier(model, layer, in_shape)
    x = torch.randn(3, *in_shape)
    with torch.no_grad():
        logits, feats = run_with_features(model, x, [layer])
        assert torch.allclose(head(feats[layer].flatten(1)), logits, atol=1e-5)
    assert name == HEADS[arch]
    # the run plan builds methods on skeletons (meta device): the shapes decide there
    assert find_classifier(skeleton(arch, in_shape, 10), layer, in_shape)[0] == name


class FunctionalHead(nn.Module):
    """A model whose classifier is no module (F.linear on a parameter): nothing to apply to the student."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
        self.weight = nn.Parameter(torch.randn(10, 16))

    def forward(self, x):
        return nn.functional.linear(self.body(x), self.weight)


def test_srd_says_when_the_teachers_classifier_cannot_be_found(setup):
    model = FunctionalHead()
    with pytest.raises(ConfigError, match="method.teacher_head"):
        find_classifier(model, "body.2", (1, 8, 8))
    cfg, data, teacher, _ = setup("srd")
    student = get_model("cnn", data.in_shape, 10, channels=[16, 32, 32])
    with pytest.raises(ConfigError, match="method.teacher_head='nope'"):
        get_method("srd")(cfg_with(cfg, teacher_head="nope"), student, teacher)
    with pytest.raises(ConfigError, match="maps its feature 0.4"):  # a stage, not the classifier's input
        get_method("srd")(cfg_with(cfg, teacher_layers=["0.4"], student_layers=["0.4"]), student, teacher)
    functional = FrozenTeacher(model, in_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match="tried: body.1"):
        get_method("srd")(cfg_with(cfg, teacher_layers=["body.2"]), student, functional)


def cfg_with(cfg, **keys):
    from omegaconf import OmegaConf

    node = OmegaConf.create(OmegaConf.to_container(cfg.method))
    for k, v in keys.items():
        node[k] = v
    return node


def test_mgd_masks_come_from_its_own_resumable_stream(setup):
    cfg, data, teacher, method = setup("mgd", "method.mask_ratio=0.4")
    x = torch.zeros(64, 32, 4, 4)
    rng = torch.get_rng_state()
    first = [method.draw_mask(x) for _ in range(3)]
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG is untouched
    assert first[0].shape == (64, 32, 1, 1) and set(first[0].unique().tolist()) == {0.0, 1.0}
    assert abs(1 - first[0].mean().item() - 0.4) < 0.05  # the masked fraction is the ratio
    assert not torch.equal(first[0], first[1])  # a new mask every step
    state = method.state_dict()
    later = [method.draw_mask(x) for _ in range(2)]
    resumed = get_method("mgd")(cfg.method, get_model("cnn", data.in_shape, 10, channels=[16, 32, 32]), teacher)
    resumed.load_state_dict(state)  # as after a crash: the stream continues where the checkpoint left it
    assert all(torch.equal(a, resumed.draw_mask(x)) for a in later)
    spatial = get_method("mgd")(cfg_with(cfg, mask="spatial"), get_model("cnn", data.in_shape, 10), teacher)
    assert spatial.draw_mask(x).shape == (64, 1, 4, 4)


def test_mgd_masked_student_feature_feeds_the_generation_block(setup):
    _, data, _, method = setup("mgd", "method.mask_ratio=0")  # nothing masked: generation(align(s)) vs t
    batch = batch_of(data)
    method.eval()
    with torch.no_grad():
        _, s, _, t = method.features(batch)
        expected = L.mgd_loss(method.generation(method.align(s[0])), t[0])
        assert method.feature_loss(s, t, batch).item() == pytest.approx(expected.item(), rel=1e-6)


def test_cwd_needs_no_connector_when_the_shapes_match(setup):
    _, data, teacher, method = setup("cwd", "student=cnn")  # the teacher's own architecture
    assert not list(method.align.parameters())
    _, s, _, t = method.features(batch_of(data))
    assert method.feature_loss(s, t, None).item() == pytest.approx(L.cwd_loss(s[0], t[0], 4.0).item())


@pytest.mark.parametrize("name,override,key", [("cwd", "method.tau=0", "method.tau"),
                                               ("mgd", "method.mask_ratio=1.0", "method.mask_ratio"),
                                               ("mgd", "method.mask=pixel", "method.mask"),
                                               ("srd", "method.sr_loss=l1", "method.sr_loss"),
                                               ("srd", "method.fm_weight=-1", "method.fm_weight")])
def test_bad_values_name_their_key(cfg_of, name, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        plan(cfg_of(f"method={name}", override))


@pytest.mark.parametrize("name", ["ickd", "cwd", "mgd"])
def test_map_methods_refuse_a_student_without_maps(cfg_of, name):
    with pytest.raises(ConfigError, match=r"spatial feature maps.*student options that fit: .*cnn"):
        plan(cfg_of(f"method={name}", "student=mlp"))


# --------------------------------------------------------------------------- CIFAR-100 pairs (slow)

@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("method", METHODS)
def test_every_cifar_pair_trains_two_steps_on_fake_data(preset_cfg, tmp_path, preset, method):  # noqa: F811
    cfg = preset_cfg(preset, "dataset=fake", "epochs=1", "teacher.epochs=1", "progress=false", f"method={method}")
    run(cfg, str(tmp_path / "run"))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["status"] == "done"
    assert 0 < m["history"][0][f"train/loss_{method}"] < float("inf")
