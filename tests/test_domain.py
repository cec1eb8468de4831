"""Domain shifts (kdexp.data.domain): exact pixel behaviour of each transform, parallel source/target
views in load_dataset and the fit loop's batches, config checks; the transfer losses (T/S, soft CE,
L2-SP, gradient reversal, DANN's domain loss) against independent formulas."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kdexp.config import DatasetConfig, DomainConfig
from kdexp.data import load_dataset
from kdexp.data import domain as D
from kdexp.errors import ConfigError


def ds(**kw):
    return OmegaConf.merge(OmegaConf.structured(DatasetConfig), kw)


def dom(**kw):
    return OmegaConf.merge(OmegaConf.structured(DomainConfig), kw)


@pytest.fixture
def x():
    return torch.rand(3, 2, 6, 6, generator=torch.Generator().manual_seed(0))


# -- transforms ----------------------------------------------------------------------------------
def test_flips_are_exact_pixel_permutations(x):
    v, h = D.vflip(x), D.hflip(x)
    assert v.shape == h.shape == x.shape
    for r in range(6):
        assert torch.equal(v[:, :, r, :], x[:, :, 5 - r, :])
        assert torch.equal(h[:, :, :, r], x[:, :, :, 5 - r])
    assert torch.equal(D.vflip(v), x)
    with pytest.raises(ConfigError, match="needs images"):
        D.vflip(torch.rand(4, 7))


def test_rotate_quarter_turns_exact_and_counter_clockwise(x):
    r = D.rotate(x, 90)
    assert r.shape == x.shape
    for i in range(6):
        for j in range(6):  # counter-clockwise: the top-right corner goes to the top-left
            assert torch.equal(r[:, :, i, j], x[:, :, j, 5 - i])
    assert torch.equal(D.rotate(x, 180), x.flip(-1).flip(-2))
    assert torch.equal(D.rotate(x, -90), D.rotate(x, 270))
    assert torch.equal(D.rotate(x, 360), x)
    wide = torch.rand(2, 1, 4, 6)
    assert torch.equal(D.rotate(wide, 180), wide.flip(-1).flip(-2))  # exact on non-square images too
    assert D.rotate(wide, 90).shape == wide.shape  # size kept (bilinear path)


def test_bilinear_rotation_agrees_with_the_exact_one_and_fills(x):
    assert torch.allclose(D._rotate_bilinear(x, 90.0), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5)
    assert torch.allclose(D._rotate_bilinear(x, -90.0), torch.rot90(x, 3, dims=(-2, -1)), atol=1e-5)
    const = torch.full((1, 1, 8, 8), 0.25)
    assert torch.allclose(D.rotate(const, 33.0, fill=0.25), const, atol=1e-6)
    r = D.rotate(torch.ones(1, 1, 9, 9), 45.0, fill=0.0)
    assert r[0, 0, 4, 4] == pytest.approx(1.0) and r[0, 0, 0, 0] == 0.0  # corners come from outside
    dot = torch.zeros(1, 1, 9, 9)
    dot[0, 0, 4, 8] = 1.0  # right of centre -> above it after a quarter turn counter-clockwise
    assert D._rotate_bilinear(dot, 90.0)[0, 0].argmax().item() == 0 * 9 + 4


def test_shift_moves_content_and_fills(x):
    s = D.shift(x, dx=2, dy=-1, fill=-3.0)
    assert torch.equal(s[:, :, 0:5, 2:6], x[:, :, 1:6, 0:4])
    assert (s[:, :, :, :2] == -3.0).all() and (s[:, :, 5, :] == -3.0).all()
    assert torch.equal(D.shift(x, 0, 0), x)
    assert (D.shift(x, dx=6) == 0).all()


def test_lowres_replaces_blocks_by_their_mean(x):
    lr = D.lowres(x, 2)
    assert lr.shape == x.shape
    for i in range(0, 6, 2):
        for j in range(0, 6, 2):
            block = x[:, :, i:i + 2, j:j + 2]
            assert torch.allclose(lr[:, :, i:i + 2, j:j + 2], block.mean((-2, -1), keepdim=True).expand_as(block))
    assert torch.equal(D.lowres(x, 1), x)
    assert D.lowres(torch.rand(2, 1, 7, 5), 3).shape == (2, 1, 7, 5)
    assert torch.allclose(D.lowres(x, 6), x.mean((-2, -1), keepdim=True).expand_as(x))


def test_blur_is_a_normalized_gaussian(x):
    const = torch.full((2, 3, 7, 7), 0.7)
    assert torch.allclose(D.blur(const, 1.5), const)  # borders replicated
    img = torch.zeros(1, 1, 15, 15)
    img[0, 0, 7, 7] = 1.0
    out = D.blur(img, 1.0, 5)
    assert out.shape == img.shape and out.sum().item() == pytest.approx(1.0, abs=1e-6)
    r = torch.arange(-2, 3, dtype=torch.float32)
    g2 = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / 2)  # the 2-D kernel written directly
    assert torch.allclose(out[0, 0, 5:10, 5:10], g2 / g2.sum(), atol=1e-6)
    assert D.blur(x, 2.0).shape == x.shape  # auto kernel capped at the image size


def test_noise_is_a_fixed_draw_per_sample_and_split(x):
    a, b = D.noise(x, 0.5, seed=3), D.noise(x, 0.5, seed=3)
    assert torch.equal(a, b)  # deterministic view
    assert not torch.equal(a, D.noise(x, 0.5, seed=4))
    assert not torch.equal(a, D.noise(x, 0.5, seed=3, split="val"))
    big = D.noise(torch.zeros(200, 1, 10, 10), 0.5)
    assert big.std().item() == pytest.approx(0.5, rel=0.03) and abs(big.mean().item()) < 0.01


def test_invert(x):
    assert torch.equal(D.invert(x), 1.0 - x)
    assert torch.equal(D.invert(x, 0.0, 16.0), 16.0 - x)
    v = torch.rand(4, 3)  # vectors too
    assert torch.equal(D.invert(v, -1.0, 1.0), -v) and torch.equal(D.invert(D.invert(x)), x)


def test_composition_order_and_parameters(x):
    steps = D.parse_transforms(dom(transforms=["vflip", "invert"]))
    assert torch.equal(D.apply_transforms(x, steps), 1.0 - x.flip(-2))
    steps = D.parse_transforms(dom(transforms=["rotate", {"name": "lowres", "factor": 3}], angle=180.0))
    assert steps == [("rotate", {"angle": 180.0}), ("lowres", {"factor": 3})]
    assert torch.equal(D.apply_transforms(x, steps), D.lowres(D.rotate(x, 180), 3))
    assert D.describe(steps) == "rotate(angle=180.0)+lowres(factor=3)"
    assert D.parse_transforms(dom()) == [] and D.parse_transforms(None) == []
    assert D.parse_transforms(dom(transforms=["none"])) == []


@pytest.mark.parametrize("spec,match", [
    (["flipv"], "unknown domain transform 'flipv'"),
    ([{"name": "rotate", "angel": 3}], r"no parameter\(s\) \['angel'\]"),
    ([{"name": "lowres", "factor": 0}], "factor=0"),
    ([{"name": "blur", "kernel_size": 4}], "odd"),
    ([{"name": "noise", "sigma": -1.0}], "sigma=-1.0"),
    ([3], "give a transform name"),
])
def test_bad_transform_specs_are_config_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        D.parse_transforms(dom(transforms=spec))


# -- parallel data -------------------------------------------------------------------------------
def test_load_dataset_builds_parallel_target_views():
    plain = load_dataset(ds(name="digits", classes=[6, 9]))
    d = load_dataset(ds(name="digits", classes=[6, 9]), dom(transforms=["vflip"]))
    assert plain.x_train_target is None and plain.domain is None
    assert torch.equal(d.x_train, plain.x_train) and torch.equal(d.y_train, plain.y_train)  # source unchanged
    assert d.x_train_target.shape == d.x_train.shape and d.x_val_target.shape == d.x_val.shape
    for i in range(len(d.x_train)):  # sample i of the target view is sample i of the source, flipped
        assert torch.equal(d.x_train_target[i], d.x_train[i].flip(-2))
    assert torch.equal(d.x_val_target, d.x_val.flip(-2)) and d.domain == "vflip"
    assert load_dataset(ds(name="digits"), dom(transforms=[])).x_train_target is None


def test_transforms_act_on_raw_pixels_and_both_views_use_source_statistics():
    raw = load_dataset(ds(name="digits", normalize=False), dom(transforms=["invert"]))
    assert torch.equal(raw.x_train_target, 1.0 - raw.x_train)  # digits are in [0, 1]: 1 - x
    norm = load_dataset(ds(name="digits"), dom(transforms=["invert"]))
    mean, std = raw.x_train.mean(), raw.x_train.std()
    assert torch.allclose(norm.x_train_target * std + mean, 1.0 - raw.x_train, atol=1e-5)
    lr = load_dataset(ds(name="digits", normalize=False), dom(transforms=["lowres"], factor=4))
    assert torch.allclose(lr.x_val_target[:, :, :4, :4], raw.x_val[:, :, :4, :4].mean((-2, -1), keepdim=True)
                          .expand(-1, -1, 4, 4))
    rot = load_dataset(ds(name="digits", normalize=False), dom(transforms=["rotate"], angle=30.0))
    assert rot.x_train_target.min() >= 0.0  # background fill = the raw minimum (0), not a negative value


def test_npz_28x28_six_nine_subset_with_a_domain(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((120, 1, 28, 28)).astype(np.float32)
    y = np.arange(120) % 10
    np.savez(tmp_path / "mnist69.npz", x=x, y=y)
    d = load_dataset(ds(name="npz", path=str(tmp_path / "mnist69.npz"), classes=[6, 9], normalize=False),
                     dom(transforms=["vflip"]))
    assert d.in_shape == (1, 28, 28) and d.num_classes == 2 and len(d.x_train) + len(d.x_val) == 24
    assert torch.equal(d.x_train_target, d.x_train.flip(-2))
    sixes = torch.as_tensor(x[y == 6])
    assert all(any(torch.equal(s, t) for t in sixes) for s in d.x_train[d.y_train == 0])


def test_fit_batches_pair_views_by_index_and_training_views():
    from kdexp.engine.source import make_batch, training_view as training_data

    d = load_dataset(ds(name="digits", classes=[6, 9]), dom(transforms=["hflip"]))
    idx = torch.tensor([5, 0, 17])
    b = make_batch(d, idx)
    assert torch.equal(b.x, d.x_train[idx]) and torch.equal(b.x_target, d.x_train[idx].flip(-1))
    assert b.view == "train"
    src, tgt = training_data(d, "source"), training_data(d, "target")
    assert make_batch(src, idx).x_target is None and torch.equal(make_batch(src, idx).x, d.x_train[idx])
    bt = make_batch(tgt, idx)
    assert torch.equal(bt.x, d.x_train_target[idx]) and bt.view == "train_target" and bt.x_target is None
    assert torch.equal(tgt.x_val_target, d.x_val_target)  # evaluation views kept
    assert training_data(d, "paired") is d
    assert make_batch(load_dataset(ds(name="digits", classes=[6, 9])), idx).x_target is None


def test_every_domain_option_composes_and_validates(compose_cfg):
    import os

    from kdexp import config_dir
    from kdexp.config import validate

    options = sorted(f[:-5] for f in os.listdir(os.path.join(config_dir(), "domain")) if f.endswith(".yaml"))
    assert {"none", "vflip", "hflip", "rotate", "lowres", "blur", "noise", "invert"} <= set(options)
    for name in options:
        cfg = compose_cfg(f"domain={name}")
        validate(cfg)
        assert (D.parse_transforms(cfg.domain) == []) == (name == "none")
    assert compose_cfg().domain.transforms == []  # default: no shift
    with pytest.raises(ConfigError, match="domain.train_view"):
        validate(compose_cfg("domain=vflip", "domain.train_view=both"))
    with pytest.raises(ConfigError, match="unknown domain transform"):
        validate(compose_cfg("domain.transforms=[vflop]"))
    cfg = compose_cfg("domain=rotate", "domain.angle=45", "domain.transforms=[rotate,noise]")
    assert D.describe(D.parse_transforms(cfg.domain)) == "rotate(angle=45.0)+noise(sigma=0.3, seed=0)"


# -- losses ----------------------------------------------------------------------------------------
def test_gradient_reversal_layer():
    from kdexp.losses import gradient_reversal

    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(4, 3)
    y = gradient_reversal(x, 0.7)
    assert torch.equal(y, x)
    (y * w).sum().backward()
    assert torch.allclose(x.grad, -0.7 * w)
    x.grad = None
    (gradient_reversal(x) * w).sum().backward()
    assert torch.allclose(x.grad, -w)


def test_dann_lambda_schedule():
    from kdexp.losses import dann_lambda

    assert dann_lambda(0.0) == 0.0
    assert dann_lambda(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    values = [dann_lambda(p / 10) for p in range(11)]
    assert values == sorted(values) and values[-1] < 1.0


def test_domain_classification_loss_is_bce_source0_target1():
    from kdexp.losses import domain_classification_loss

    s, t = torch.randn(5, 1), torch.randn(7, 1)
    expected = F.binary_cross_entropy(torch.sigmoid(torch.cat([s, t]).double()),
                                      torch.cat([torch.zeros(5, 1), torch.ones(7, 1)]).double())
    assert domain_classification_loss(s, t).item() == pytest.approx(expected.item(), rel=1e-5)


def test_soft_cross_entropy_is_kl_plus_teacher_entropy():
    from kdexp.losses import kd_loss, soft_cross_entropy

    s, t = torch.randn(6, 4).double(), torch.randn(6, 4).double()
    T = 3.0
    p = torch.softmax(t / T, -1)
    entropy = -(p * p.log()).sum(-1).mean()
    assert soft_cross_entropy(s, t, T).item() == pytest.approx((kd_loss(s, t, T) + T ** 2 * entropy).item())
    manual = -(T ** 2) * sum((p[i] * torch.log(torch.softmax(s[i] / T, -1))).sum() for i in range(6)) / 6
    assert soft_cross_entropy(s, t, T).item() == pytest.approx(manual.item())


def test_ts_adapt_loss_variants():
    from kdexp.losses import ts_adapt_loss

    s, t = torch.randn(5, 3).double(), torch.randn(5, 3).double()
    assert ts_adapt_loss(s, t, "logits").item() == pytest.approx(
        (F.mse_loss(s, t, reduction="sum") / 2 / 5).item())
    kl = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="batchmean")
    assert ts_adapt_loss(s, t, "soft", 2.0).item() == pytest.approx(4 * kl.item())
    with pytest.raises(ValueError):
        ts_adapt_loss(s, t, "mse")


def test_l2sp_and_l2():
    from kdexp.losses import l2_loss, l2sp_loss

    a, b = [torch.randn(3, 2), torch.randn(4)], [torch.randn(3, 2), torch.randn(4)]
    flat = torch.cat([(x - y).flatten() for x, y in zip(a, b)])
    assert l2sp_loss(a, b).item() == pytest.approx(0.5 * flat.dot(flat).item(), rel=1e-6)
    assert l2_loss(a).item() == pytest.approx(0.5 * sum((x ** 2).sum().item() for x in a), rel=1e-6)
