"""Data-free distillation (kdexp.methods.data_free): DAFL's losses against independent float64
references (numpy, explicit probabilities), its generator, the method's gradient routing (the
generator's terms train only the generator, KD only the student, the teacher nothing), and the
engine's side of inputs="generated": the student never receives a training input."""
import json
import math

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from kdexp import config_dir
from kdexp import losses as L
from kdexp.config import DatasetConfig
from kdexp.data import load_dataset
from kdexp.engine import assemble as assemble_module
from kdexp.engine.plan import plan
from kdexp.engine.source import InMemorySource, withheld_inputs
from kdexp.engine.steppers import MethodStepper
from kdexp.engine.teacher import FrozenTeacher
from kdexp.errors import ConfigError
from kdexp.methods import METHODS, UNLABELED, Batch, Requirements, get_method, requirements
from kdexp.models import get_model
from kdexp.models.generators import DAFLGenerator
from kdexp.train import run
from tests.test_zoo import PRESETS, preset_cfg  # noqa: F401  (the fixture)

RNG = np.random.default_rng(20190401)
DATA_FREE = [n for n in METHODS.names() if requirements(n).generated]
FAST = ["teacher.epochs=2", "teacher.args.channels=[8,16]", "epochs=1", "batch_size=128", "progress=false",
        "hardware=cpu", "hardware.threads=1"]
SMALL_CNN = ["student=cnn", "student.args.channels=[8,16]"]  # unless a test picks its student


def t64(a):
    return torch.tensor(a, dtype=torch.float64)


def np_softmax(row):
    e = np.array([math.exp(v - max(row)) for v in row])
    return e / e.sum()


# --------------------------------------------------------------------------- losses

@pytest.mark.parametrize("shape,scale", [((5, 3), 1.0), ((16, 10), 3.0), ((7, 100), 1.0), ((4, 6), 100.0)])
def test_one_hot_loss_is_cross_entropy_to_the_teachers_own_argmax(shape, scale):
    t = RNG.standard_normal(shape) * scale
    ref = 0.0
    for row in t:
        k = int(np.argmax(row))
        ref += -math.log(np_softmax(row)[k]) if np_softmax(row)[k] > 0 else max(row) - row[k]
    assert L.one_hot_loss(t64(t)).item() == pytest.approx(ref / shape[0], rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("shape", [(4, 7), (3, 5, 4, 4), (2, 256)])
def test_activation_loss_is_minus_the_element_mean_of_absolute_features(shape):
    f = RNG.standard_normal(shape) * 2
    total = sum(abs(v) for v in f.ravel())
    assert L.activation_loss(t64(f)).item() == pytest.approx(-total / f.size, rel=1e-12)


@pytest.mark.parametrize("shape,scale", [((8, 3), 1.0), ((32, 10), 2.0), ((5, 100), 1.0), ((6, 4), 30.0)])
def test_information_entropy_loss_is_minus_the_base10_entropy_of_the_mean_prediction(shape, scale):
    t = RNG.standard_normal(shape) * scale
    pbar = np.zeros(shape[1])
    for row in t:
        pbar += np_softmax(row) / shape[0]
    ref = sum(p * math.log10(p) for p in pbar if p > 0)
    assert L.information_entropy_loss(t64(t)).item() == pytest.approx(ref, rel=1e-10, abs=1e-14)
    assert L.information_entropy_loss(t64(t), log_base=math.e).item() == pytest.approx(ref * math.log(10), rel=1e-10)


def test_information_entropy_loss_is_lowest_when_the_batch_covers_every_class_evenly():
    c = 10
    balanced = torch.eye(c, dtype=torch.float64) * 100  # each sample its own class, confidently
    collapsed = torch.zeros(c, c, dtype=torch.float64)
    collapsed[:, 3] = 100.0  # every sample says class 3
    assert L.information_entropy_loss(balanced).item() == pytest.approx(-math.log10(c), rel=1e-12)
    assert L.information_entropy_loss(collapsed).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_losses_stay_finite_with_logits_of_100_and_classes_nobody_predicts(dtype):
    t = torch.tensor(RNG.standard_normal((6, 10)) * 100, dtype=dtype)
    t[:, 7] = -100.0  # class 7: probability exp(-200)-ish, 0 in float32 (the authors' 0 * log10(0) is NaN)
    t.requires_grad_(True)
    for fn in (L.one_hot_loss, L.information_entropy_loss, L.activation_loss):
        value = fn(t)
        (grad,) = torch.autograd.grad(value, t)
        assert torch.isfinite(value) and torch.isfinite(grad).all(), fn.__name__


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (2, 16, 8, 8), (3, 1, 2, 2)])
def test_attention_mse_loss_is_the_mean_squared_difference_of_normalized_maps(shape):
    s, t = RNG.standard_normal(shape), RNG.standard_normal((shape[0], 5, *shape[2:])) * 3  # channels may differ
    total, b, hw = 0.0, shape[0], shape[2] * shape[3]
    for i in range(b):
        qs = sum(s[i, c].ravel() ** 2 for c in range(s.shape[1]))
        qt = sum(t[i, c].ravel() ** 2 for c in range(t.shape[1]))
        total += sum((u - v) ** 2 for u, v in zip(qs / math.sqrt((qs ** 2).sum()), qt / math.sqrt((qt ** 2).sum())))
    assert L.attention_mse_loss(t64(s), t64(t)).item() == pytest.approx(total / (b * hw), rel=1e-10)
    assert L.attention_mse_loss(t64(s), t64(s)).item() == pytest.approx(0.0, abs=1e-14)


# --------------------------------------------------------------------------- generator

@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (1, 28, 28), (3, 7, 5), (1, 1, 1), (64,), (10,)])
def test_generator_makes_inputs_of_the_data_shape_standardized_per_channel(shape):
    torch.manual_seed(0)
    g = DAFLGenerator(100, shape, width=16)
    x = g(torch.randn(32, 100))
    assert x.shape == (32, *shape) and torch.isfinite(x).all()
    dims = [0, 2, 3] if len(shape) == 3 else [0]
    if x[0].numel() > 1 or len(shape) == 1:  # the output BatchNorm (no affine): zero mean, unit variance
        assert x.mean(dims).abs().max() < 1e-4
        assert (x.var(dims, unbiased=False) - 1).abs().max() < 1e-2


def test_generator_rejects_shapes_it_cannot_make():
    with pytest.raises(ConfigError, match=r"neither images"):
        DAFLGenerator(10, (3, 4))
    with pytest.raises(ConfigError, match="latent_dim"):
        DAFLGenerator(0, (1, 8, 8))


# --------------------------------------------------------------------------- the method

def method_cfg(name="dafl", **kw):
    return OmegaConf.merge(OmegaConf.structured(METHODS.meta(name)["config"]), kw)


def build(name="dafl", in_shape=(1, 8, 8), **kw):
    torch.manual_seed(0)
    teacher = FrozenTeacher(get_model("cnn", in_shape, 10, channels=[8, 16]), in_shape)
    student = get_model("cnn", in_shape, 10, channels=[4, 8])
    return get_method(name)(method_cfg(name, **kw), student, teacher)


def withheld_batch(n, in_shape=(1, 8, 8)):
    return Batch(torch.full((n, *in_shape), float("nan")), torch.full((n,), UNLABELED), torch.arange(n))


def grads_of(module):
    return [p.grad for p in module.parameters()]


@pytest.mark.parametrize("in_shape", [(1, 8, 8), (3, 16, 16)])
def test_dafl_terms_train_only_their_own_part(in_shape):
    """Backward of each term alone: the generator's terms reach the generator only, KD the student
    only; the frozen teacher gets nothing from any."""
    m = build(in_shape=in_shape)
    m.train()
    torch.manual_seed(1)
    terms = m.losses(withheld_batch(16, in_shape))
    assert set(terms) == {"oh", "act", "ie", "kd"} and all(torch.isfinite(v) for v in terms.values())
    for name, value in terms.items():
        m.zero_grad(set_to_none=True)
        value.backward(retain_graph=True)
        g_grads, s_grads = grads_of(m.generator), grads_of(m.student)
        if name == "kd":
            assert all(g is None for g in g_grads) and any(g is not None and g.abs().sum() > 0 for g in s_grads)
        else:
            assert all(g is None for g in s_grads), name
            assert any(g is not None and g.abs().sum() > 0 for g in g_grads), name
        assert all(p.grad is None and not p.requires_grad for p in m.teacher.model.parameters())


def test_dafl_kd_term_is_kd_at_the_temperature_on_the_generated_batch():
    for T, standardize in ((1.0, False), (4.0, False), (2.0, True)):
        m = build(temperature=T, alpha=0.5, logit_standardize=standardize, w_oh=0.0, w_act=0.0, w_ie=0.0)
        m.train()
        torch.manual_seed(3)
        terms = m.losses(withheld_batch(8))
        assert set(terms) == {"kd"}  # zero weights drop the generator's terms
        torch.manual_seed(3)
        x = m.generate(withheld_batch(8))  # the same z draws: the same batch
        s, t = m.student(x), m.teacher.model(x)
        if standardize:
            s, t = L.standardize_logits(s), L.standardize_logits(t)
        assert terms["kd"].item() == pytest.approx(0.5 * L.kd_loss(s, t, T).item(), rel=1e-5)


def test_dafl_generator_terms_are_the_weighted_losses_of_the_teacher_on_the_generated_batch():
    m = build(w_oh=2.0, w_act=0.3, w_ie=7.0)
    m.train()
    torch.manual_seed(5)
    terms = m.losses(withheld_batch(8))
    torch.manual_seed(5)
    x = m.generate(withheld_batch(8))
    from kdexp.models.taps import run_with_features

    t, f = run_with_features(m.teacher.model, x, ["1"])  # the cnn's penultimate embedding (flatten)
    assert m.t_layer == "1"
    assert terms["oh"].item() == pytest.approx(2.0 * L.one_hot_loss(t).item(), rel=1e-5)
    assert terms["act"].item() == pytest.approx(0.3 * L.activation_loss(f["1"]).item(), rel=1e-5)
    assert terms["ie"].item() == pytest.approx(7.0 * L.information_entropy_loss(t).item(), rel=1e-5)


def test_dafl_param_groups_give_the_generator_its_own_lr():
    m = build(generator_lr=0.03)
    optim = OmegaConf.create({"name": "adam", "lr": 0.01})
    groups = m.param_groups(optim)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in m.parameters()) and len(ids) == len(set(ids))
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in m.generator.parameters()}
    assert groups[1]["lr"] == 0.03 and groups[1]["weight_decay"] == 0.0 and "lr" not in groups[0]


def test_dafl_batch_size_follows_the_step_and_batchnorm_gets_two():
    m = build()
    m.train()
    assert m.generate(withheld_batch(5)).shape == (5, 1, 8, 8)
    assert m.generate(withheld_batch(1)).shape == (2, 1, 8, 8)


@pytest.mark.parametrize("kw,match", [({"w_ce": 0.5}, "w_ce"), ({"alpha": 0.0}, "alpha"),
                                      ({"generator_lr": 0.0}, "generator_lr"), ({"w_ie": -1.0}, "w_ie"),
                                      ({"teacher_layers": ["0.1", "1"]}, "one layer"),
                                      ({"teacher_layers": ["nope"]}, "no module")])
def test_dafl_config_errors_name_the_key(kw, match):
    with pytest.raises(ConfigError, match=match):
        build(**kw)


def test_generated_inputs_exclude_labels_paired_views_and_teacherless_methods():
    assert Requirements(inputs="generated").generated
    for bad in ({"labels": "required"}, {"labels": "partial"}, {"views": "paired"}, {"teacher": "none"},
                {"teacher": "self"}):
        with pytest.raises(ValueError, match="inputs='generated'"):
            Requirements(inputs="generated", **bad)
    with pytest.raises(ValueError, match="inputs"):
        Requirements(inputs="noise")


# --------------------------------------------------------------------------- the engine

@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("teachers")


@pytest.fixture
def cfg_of(cache_dir, tmp_path):
    def _compose(*overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose("config", overrides=[f"paths.cache_dir={cache_dir}", f"paths.data_dir={tmp_path}",
                                                *FAST, *([] if any(o.startswith("student=") for o in overrides)
                                                         else SMALL_CNN), *overrides])
    yield _compose
    GlobalHydra.instance().clear()


def test_withheld_inputs_keep_the_step_count_and_the_validation_data_but_nothing_else():
    data = load_dataset(OmegaConf.merge(OmegaConf.structured(DatasetConfig), {"name": "digits"}))
    held = withheld_inputs(data)
    assert held.x_train.shape == data.x_train.shape and held.in_shape == data.in_shape
    assert torch.isnan(held.x_train).all() and (held.y_train == UNLABELED).all()
    assert held.x_train.untyped_storage().nbytes() == held.x_train.element_size()  # an expansion of one value
    assert held.x_val is data.x_val and held.y_val is data.y_val
    source = InMemorySource(held, batch_size=100, seed=0)
    _, steps = source.epoch(0)
    batches = [s.batch for s in steps]
    assert len(batches) == math.ceil(len(data.x_train) / 100) == source.steps
    assert all(torch.isnan(b.x).all() and (b.y == UNLABELED).all() for b in batches)


@pytest.mark.parametrize("name", DATA_FREE)
def test_the_plan_withholds_the_data_and_turns_the_teacher_cache_off(cfg_of, name):
    p = plan(cfg_of(f"method={name}", "dataset.augment=flip", "dataset.label_fraction=0.5"))
    assert p.train_inputs == "generated" and p.describe()["train_inputs"] == "generated"
    assert not p.cache.enabled and "generated inputs" in p.cache.reason
    assert any("dataset.augment=flip" in w for w in p.warnings)
    assert any("dataset.label_fraction" in w for w in p.warnings)
    assert plan(cfg_of("method=kd")).train_inputs == "data"


def test_data_free_methods_refuse_ddp(cfg_of):
    with pytest.raises(ConfigError, match="hardware=ddp"):
        plan(cfg_of("method=dafl", "hardware=ddp"))


def test_a_generator_trained_with_sgd_is_warned_about(cfg_of):
    p = plan(cfg_of("method=dafl", "optim.name=sgd"))
    assert any("generator" in w and "optim.name=sgd" in w for w in p.warnings)
    assert not any("generator" in w for w in plan(cfg_of("method=dafl")).warnings)


def watch_student_inputs(monkeypatch):
    """Every input the student gets in training mode during a run (the validation passes run in eval mode)."""
    seen = []
    real = assemble_module.get_model

    def get_model(*args, **kw):
        model = real(*args, **kw)
        model.register_forward_pre_hook(lambda mod, inputs: seen.append(inputs[0].detach().clone())
                                        if mod.training else None)
        return model

    monkeypatch.setattr(assemble_module, "get_model", get_model)
    return seen


def rows_in(x, train):
    """How many rows of x equal a training input exactly."""
    flat, ref = x.flatten(1), train.flatten(1)
    return int((flat[:, None, :] == ref[None, :, :]).all(-1).any(1).sum())


@pytest.mark.parametrize("name", DATA_FREE + ["kd"])  # kd: the control, whose student does see the data
def test_the_student_never_receives_a_training_input(cfg_of, tmp_path, monkeypatch, name):
    cfg = cfg_of(f"method={name}")
    seen = watch_student_inputs(monkeypatch)
    handed = []  # what the engine hands the method each step (not the teacher's own training, on the data)
    step_losses, cls = MethodStepper.losses, get_method(name)

    def losses(self, batch):
        if isinstance(self.method, cls):
            handed.append(batch.x)
        return step_losses(self, batch)

    monkeypatch.setattr(MethodStepper, "losses", losses)
    acc = run(cfg, str(tmp_path / "run"))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["status"] == "done" and m["teacher"]["source"] in ("trained", "cache") and 0 <= acc <= 1
    train = load_dataset(cfg.dataset).x_train
    steps = math.ceil(len(train) / cfg.batch_size)
    assert len(seen) >= steps  # at least one student forward per step
    leaked = sum(rows_in(x, train) for x in seen)
    if name == "kd":
        assert leaked == len(train)  # the check can fail: a method on the data shows every training row
        return
    assert leaked == 0 and all(torch.isfinite(x).all() for x in seen)  # generated: neither data nor the NaN placeholder
    assert len(handed) == steps and all(torch.isnan(x).all() for x in handed)  # the batches withhold the data
    assert m["plan"]["train_inputs"] == "generated" and m["teacher_cache"]["enabled"] is False


def test_dafl_on_digits_learns_from_the_teacher_alone(cfg_of, tmp_path):
    """Three epochs of generated batches lift the student far above chance (0.1) on the real validation split."""
    acc = run(cfg_of("method=dafl", "epochs=3", "batch_size=64"), str(tmp_path / "r"))
    assert acc > 0.3


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("method", DATA_FREE)
def test_data_free_methods_on_every_cifar_pair_of_fake_data(preset_cfg, tmp_path, preset, method):  # noqa: F811
    cfg = preset_cfg(preset, "dataset=fake", "epochs=1", "teacher.epochs=1", "progress=false", f"method={method}")
    run(cfg, str(tmp_path / "run"))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["status"] == "done" and m["plan"]["train_inputs"] == "generated" and len(m["history"]) == 1


# --------------------------------------------------------------------------- zskt

def student_and_generator_grads(m, value):
    m.zero_grad(set_to_none=True)
    value.backward()
    has = lambda mod: any(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.parameters())  # noqa: E731
    return has(m.student), has(m.generator)


def test_zskt_cycles_generator_steps_then_student_steps_on_one_z():
    m = build("zskt", generator_steps=1, student_steps=2, alpha=0.5, beta=3.0, temperature=2.0)
    m.train()
    torch.manual_seed(0)
    seen = []
    for step in range(6):
        terms = m.losses(withheld_batch(8))
        seen.append(m.z.clone())
        assert set(terms) == {"adv", "kd", "at"} and all(torch.isfinite(v) for v in terms.values())
        generator_step = step % 3 == 0
        assert (terms["adv"] != 0) == generator_step and (terms["kd"] != 0) == (not generator_step)
        student, generator = student_and_generator_grads(m, sum(terms.values()))
        assert (student, generator) == (not generator_step, generator_step), step
        assert all(p.requires_grad for p in m.student.parameters())  # unfrozen again after the generator's step
        assert all(p.grad is None for p in m.teacher.model.parameters())
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2])  # one z per cycle
    assert not torch.equal(seen[2], seen[3]) and torch.equal(seen[3], seen[5])


def test_zskt_terms_are_the_adversarial_kl_and_kl_plus_attention_transfer():
    m = build("zskt", generator_steps=1, student_steps=1, alpha=0.5, beta=3.0, temperature=2.0)
    m.train()
    torch.manual_seed(0)
    adv = m.losses(withheld_batch(8))["adv"]
    x = m.run_generator(m.z)  # the generator has not stepped: the same batch
    assert adv.item() == pytest.approx(-0.5 * L.kd_loss(m.student(x), m.teacher.model(x), 2.0).item(), rel=1e-5)
    terms = m.losses(withheld_batch(8))
    x = m.run_generator(m.z)
    from kdexp.models.taps import run_with_features

    s, sf = run_with_features(m.student, x, m.s_layers)
    t, tf = run_with_features(m.teacher.model, x, m.t_layers)
    at = sum(L.attention_mse_loss(sf[a], tf[b]) for a, b in zip(m.s_layers, m.t_layers))
    assert len(m.s_layers) == 2  # the cnns' stage ends, paired
    assert terms["kd"].item() == pytest.approx(0.5 * L.kd_loss(s, t, 2.0).item(), rel=1e-5)
    assert terms["at"].item() == pytest.approx(3.0 * at.item(), rel=1e-5)


def test_zskt_keeps_its_cycle_in_the_checkpoint_and_redraws_for_another_batch_size():
    m = build("zskt", generator_steps=1, student_steps=3)
    m.train()
    for _ in range(2):
        m.losses(withheld_batch(8))
    other = build("zskt", generator_steps=1, student_steps=3)
    other.load_state_dict(m.state_dict())
    assert other.step_index == 2 and torch.equal(other.z, m.z)
    z = m.z
    m.losses(withheld_batch(5))  # mid-cycle, an epoch's smaller last batch
    assert m.z.shape == (5, 100) and m.step_index == 3 and z.shape == (8, 100)


def test_zskt_config_errors_and_the_plan_asks_for_a_student_with_maps(cfg_of):
    with pytest.raises(ConfigError, match="generator_steps"):
        build("zskt", generator_steps=0)
    with pytest.raises(ConfigError, match="spatial feature maps"):
        plan(cfg_of("method=zskt", "student=mlp"))
