"""Logit-level and teacher-free methods: gradients go only where they should, teacher-from-student, ensembles,
weak teachers, transfer sets, experiment presets, and one epoch of each method on digits."""
import json

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from kdexp import config_dir
from kdexp.config import validate
from kdexp.data import load_dataset
from kdexp.engine.plan import plan, resolve_teachers
from kdexp.engine.source import InMemorySource, make_batch
from kdexp.engine.teacher import EnsembleModel, FrozenTeacher, _train, provide_teacher, teacher_key
from kdexp.errors import ConfigError
from kdexp.losses import discriminator_loss, soften
from kdexp.methods import UNLABELED, Batch, get_method, list_methods
from kdexp.models import get_model
from kdexp.train import run
from tests.conftest import composer

LOGIT_LEVEL = ["logit_mse", "lsr", "tfkd_self", "tfkd_reg", "dkd", "dist", "dml", "meal_v2"]
TEACHER_BASED = ["logit_mse", "tfkd_self", "dkd", "dist", "meal_v2"]
# a small, quick teacher: these tests check wiring, not accuracy
FAST = ["epochs=1", "teacher.epochs=2", "teacher.args.channels=[8,8,8]", "progress=false"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """compose(*overrides) with one teacher cache for the whole module (each teacher trains once)."""
    root = tmp_path_factory.mktemp("logit_methods")
    yield composer(root), root
    GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def digits():
    from kdexp.config import DatasetConfig
    return load_dataset(OmegaConf.merge(OmegaConf.structured(DatasetConfig), {"name": "digits"}))


def small_teacher(seed=0):
    torch.manual_seed(seed)
    return FrozenTeacher(get_model("cnn", (1, 8, 8), 10, channels=(4, 4, 4)))


def method_cfg(name, **kw):
    cls = get_method(name)
    from kdexp.methods import METHODS
    return OmegaConf.merge(OmegaConf.structured(METHODS.meta(name)["config"]), kw), cls


def batch_of(data, n=32, labeled=None):
    idx = torch.arange(n)
    return Batch(data.x_train[:n], data.y_train[:n], idx, labeled)


@pytest.mark.parametrize("name", TEACHER_BASED)
def test_gradients_reach_the_student_not_the_teacher(name, digits):
    cfg, cls = method_cfg(name)
    torch.manual_seed(1)
    student = get_model("mlp", digits.in_shape, 10)
    teacher = small_teacher()
    before = [p.clone() for p in teacher.model.parameters()]
    method = cls(cfg, student, teacher)
    assert not {id(p) for p in teacher.model.parameters()} & {id(p) for p in method.parameters()}
    method.epoch = 30  # past the DKD warm-up
    terms = method.losses(batch_of(digits))
    assert terms and all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.model.parameters()))


@pytest.mark.parametrize("name", ["lsr", "tfkd_reg", "dml"])
def test_teacher_free_methods_need_no_teacher(name, digits):
    cfg, cls = method_cfg(name)
    assert not cls.requires.uses_teacher
    method = cls(cfg, get_model("mlp", digits.in_shape, 10), None)
    terms = method.losses(batch_of(digits))
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in method.parameters())


def test_method_terms_and_weights(digits):
    """Each method's logged terms and how alpha/beta/w_ce weigh them."""
    teacher = small_teacher()
    b = batch_of(digits)
    expect = {"logit_mse": {"mse"}, "lsr": {"lsr"}, "tfkd_self": {"ce", "kd"}, "tfkd_reg": {"ce", "reg"},
              "dkd": {"ce", "tckd", "nckd"}, "dist": {"ce", "inter", "intra"}, "dml": {"ce", "dml"},
              "meal_v2": {"kd", "adv"}}
    for name, keys in expect.items():
        cfg, cls = method_cfg(name)
        torch.manual_seed(0)
        one = cls(cfg, get_model("mlp", digits.in_shape, 10), teacher).losses(b)
        assert set(one) == keys, name
        if name != "lsr":  # halving alpha halves the alpha-weighted term (lsr ignores alpha)
            cfg2, _ = method_cfg(name, alpha=cfg.alpha / 2, w_ce=cfg.w_ce if cfg.w_ce is not None else 1 - cfg.alpha)
            torch.manual_seed(0)
            half = cls(cfg2, get_model("mlp", digits.in_shape, 10), teacher).losses(b)
            key = {"logit_mse": "mse", "tfkd_self": "kd", "tfkd_reg": "reg", "dkd": "tckd", "dist": "inter",
                   "dml": "dml", "meal_v2": "kd"}[name]
            assert half[key].item() == pytest.approx(one[key].item() / 2, rel=1e-5), name


def test_dkd_warmup_and_targets_of_unlabeled_samples(digits):
    cfg, cls = method_cfg("dkd")
    teacher = small_teacher()
    torch.manual_seed(0)
    method = cls(cfg, get_model("mlp", digits.in_shape, 10), teacher)
    factors = []
    for e in (0, 9, 19, 50):
        method.epoch = e
        factors.append(method.warmup_factor())
    assert factors == [1 / 20, 10 / 20, 1.0, 1.0]
    b = batch_of(digits)
    method.epoch = 0
    first = method.losses(b)
    method.epoch = 19
    full = method.losses(b)
    assert first["tckd"].item() == pytest.approx(full["tckd"].item() / 20, rel=1e-5)
    # unlabeled samples: the target class is the teacher's top class, not the hidden label
    t_top = teacher.logits(b).argmax(-1)
    hidden = Batch(b.x, torch.full_like(b.y, UNLABELED), b.idx, torch.zeros_like(b.y, dtype=torch.bool))
    as_top = Batch(b.x, t_top, b.idx)
    h, top = method.losses(hidden), method.losses(as_top)
    assert h["nckd"].item() == pytest.approx(top["nckd"].item(), rel=1e-6) and h["ce"].item() == 0.0


def test_dml_peers_are_trained_and_evaluated(digits):
    cfg, cls = method_cfg("dml", peers=3)
    torch.manual_seed(0)
    method = cls(cfg, get_model("mlp", digits.in_shape, 10))
    assert set(method.eval_models()) == {"peer1", "peer2"}
    ws = [m[1].weight for m in method.cohort()]
    assert not torch.equal(ws[0], ws[1]) and not torch.equal(ws[1], ws[2])  # own initializations
    ids = [id(p) for m in method.cohort() for p in m.parameters()]
    assert sorted(ids) == sorted(id(p) for p in method.parameters())
    sum(method.losses(batch_of(digits)).values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())
    with pytest.raises(ConfigError, match="peers"):
        cls(method_cfg("dml", peers=1)[0], get_model("mlp", digits.in_shape, 10))


def test_meal_v2_discriminator_groups_and_gradient_reversal(digits):
    cfg, cls = method_cfg("meal_v2", disc_lr=0.003, disc_weight_decay=0.01)
    teacher = small_teacher()
    torch.manual_seed(0)
    student = get_model("mlp", digits.in_shape, 10)
    method = cls(cfg, student, teacher)
    groups = method.param_groups(OmegaConf.create({"lr": 0.01}))
    d_params = list(method.discriminator.parameters())
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in d_params}
    assert groups[1]["lr"] == 0.003 and groups[1]["weight_decay"] == 0.01 and "lr" not in groups[0]
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in method.parameters())  # each parameter once
    b = batch_of(digits)
    adv = method.losses(b)["adv"]
    adv.backward()
    # the discriminator descends its loss; the student gets the reversed gradient of the same loss
    s = student(b.x)
    real = method.discriminator(soften(teacher.logits(b), 1.0).exp())
    plain = cfg.beta * discriminator_loss(real, method.discriminator(soften(s, 1.0).exp()))
    g_student = torch.autograd.grad(plain, list(student.parameters()), retain_graph=True)
    g_disc = torch.autograd.grad(plain, d_params)
    for p, g in zip(student.parameters(), g_student):
        assert torch.allclose(p.grad, -g, atol=1e-6)
    for p, g in zip(d_params, g_disc):
        assert torch.allclose(p.grad, g, atol=1e-6)


def test_transfer_set_mask_batches_and_ce(shared):
    compose_cfg, _ = shared
    cfg = compose_cfg("dataset.label_fraction=0.1")
    data = load_dataset(cfg.dataset)
    n = len(data.x_train)
    assert data.labeled.sum().item() == int(0.1 * n)
    per_class = torch.bincount(data.y_train[data.labeled], minlength=10)
    assert per_class.min() >= 13 and per_class.max() <= 15  # stratified: ~14 of each
    assert torch.equal(data.labeled, load_dataset(cfg.dataset).labeled)  # fixed by split_seed
    # label-free methods see every input; ce only the labeled ones, for the same number of steps
    steps = 23
    kd = get_method("kd")(cfg.method, get_model("mlp", data.in_shape, 10), None)
    assert (plan(cfg).batch_pool, plan(compose_cfg("dataset.label_fraction=0.1", "method=ce")).batch_pool) == \
        ("all", "labeled")
    all_batches = InMemorySource(data, batch_size=64, seed=0, pool="all").indices()
    assert len(all_batches) == steps and sorted(torch.cat(all_batches).tolist()) == list(range(n))
    ce_batches = InMemorySource(data, batch_size=64, seed=0, pool="labeled").indices()
    assert len(ce_batches) == steps and all(data.labeled[i].all() for i in ce_batches)
    assert max(len(i) for i in ce_batches) == 64
    # unlabeled samples reach methods with y = UNLABELED; CE averages over the labeled ones only
    idx = torch.arange(64)
    batch = make_batch(data, idx)
    assert torch.equal(batch.y == UNLABELED, ~data.labeled[:64])
    logits = torch.randn(64, 10)
    got = kd.ce(logits, batch.y)["ce"]
    ref = (1 - cfg.method.alpha) * F.cross_entropy(logits[data.labeled[:64]], data.y_train[:64][data.labeled[:64]])
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    none = kd.ce(logits, torch.full((64,), UNLABELED))["ce"]
    assert none.item() == 0.0
    with pytest.raises(ConfigError, match="label_fraction"):
        validate(compose_cfg("dataset.label_fraction=0"))
    with pytest.raises(ConfigError, match="label_fraction"):
        load_dataset(compose_cfg("dataset.label_fraction=0.001").dataset)


def test_teacher_key_stop_at_acc_and_label_fraction(shared, digits):
    compose_cfg, _ = shared
    base = compose_cfg()
    key = teacher_key(base.teacher, base.dataset, digits)
    stopped = compose_cfg("teacher.stop_at_acc=0.5")
    assert teacher_key(stopped.teacher, stopped.dataset, digits) != key
    fewer = compose_cfg("teacher.epochs=3")
    assert teacher_key(fewer.teacher, fewer.dataset, digits) != key
    partial = compose_cfg("dataset.label_fraction=0.1")  # the teacher sees every label either way
    assert teacher_key(partial.teacher, partial.dataset, digits) == key
    with pytest.raises(ConfigError, match="teacher.stop_at_acc"):
        validate(compose_cfg("teacher.stop_at_acc=1.5"))


def test_stop_at_acc_stops_after_the_first_epoch_that_reaches_it(shared, digits):
    compose_cfg, _ = shared
    stop = compose_cfg("teacher.epochs=5", "teacher.stop_at_acc=0.01", "teacher.args.channels=[4,4,4]")
    one = compose_cfg("teacher.epochs=1", "teacher.args.channels=[4,4,4]")
    (a, history), (b, _) = _train(stop.teacher, digits, 1024, False), _train(one.teacher, digits, 1024, False)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert [h["epoch"] for h in history] == [1]  # the history ends where the training stopped


def test_tfkd_self_teacher_has_the_students_architecture(shared, digits):
    compose_cfg, _ = shared
    cfg = compose_cfg(*FAST, "method=tfkd_self", "student.args.hidden=16")
    teacher, info = provide_teacher(plan(cfg), digits)
    student = get_model("mlp", digits.in_shape, 10, hidden=16)
    assert {k: v.shape for k, v in teacher.model.state_dict().items()} == \
        {k: v.shape for k, v in student.state_dict().items()}
    plain = compose_cfg(*FAST, "method=kd")
    assert info["key"] != teacher_key(plain.teacher, plain.dataset, digits)
    again, info2 = provide_teacher(plan(cfg), digits)
    assert (info["source"], info2["source"]) == ("trained", "cache") and info2["key"] == info["key"]
    with pytest.raises(ConfigError, match="ensemble"):
        plan(compose_cfg(*FAST, "method=tfkd_self", "teachers=[cnn]"))


def test_resolve_teachers_names_overrides_and_errors():
    a, b, c = resolve_teachers(["lenet5", {"base": "cnn", "seed": 3, "epochs": 2},
                                {"arch": "mlp", "args": {"hidden": 8}}])
    assert a.arch == "lenet5" and a.optim.lr == 0.001  # its own recipe from conf/teacher/lenet5.yaml
    assert b.arch == "cnn" and b.seed == 3 and b.epochs == 2 and b.args.dropout == 0.4
    assert c.arch == "mlp" and c.args.hidden == 8 and c.epochs == 20  # schema defaults
    with pytest.raises(ConfigError, match=r"teachers\[0\].*unknown teacher option 'cnnn'"):
        resolve_teachers(["cnnn"])
    with pytest.raises(ConfigError, match=r"teachers\[0\]"):
        resolve_teachers([{"base": "cnn", "epoch": 3}])
    with pytest.raises(ConfigError, match=r"teachers\[1\].epochs"):
        resolve_teachers(["cnn", {"base": "cnn", "epochs": 0}])
    with pytest.raises(ConfigError, match="no arch"):
        resolve_teachers([{"epochs": 3}])


def test_ensemble_averages_softmax_outputs(shared, digits):
    compose_cfg, _ = shared
    cfg = compose_cfg(*FAST, "method=meal_v2",
                      "teachers=[{base:cnn,epochs:2,args:{channels:[8,8,8]}},{base:lenet5,epochs:1}]")
    teacher, info = provide_teacher(plan(cfg), digits)
    assert isinstance(teacher.model, EnsembleModel) and len(info["members"]) == 2
    assert [m["arch"] for m in info["members"]] == ["cnn", "lenet5"] and info["key"].startswith("ensemble-")
    x = digits.x_val[:16]
    mean = torch.stack([torch.softmax(m(x), -1) for m in teacher.model.members]).mean(0)
    assert torch.allclose(teacher.model(x).exp(), mean, atol=1e-6)
    assert not any(p.requires_grad for p in teacher.model.parameters())
    _, again = provide_teacher(plan(cfg), digits)
    assert again["source"] == "cache" and again["key"] == info["key"]


PRESETS = ["keras_mnist_demo", "tfkd_self", "tfkd_reg", "tfkd_reversed", "tfkd_defective", "kd_transfer_set",
           "logit_methods", "meal_v2_ensemble"]


@pytest.mark.parametrize("name", PRESETS)
def test_experiment_presets_compose_and_sweep_registered_methods(shared, name):
    compose_cfg, _ = shared
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
    validate(cfg)
    params = cfg.hydra.sweeper.params
    for method in str(params.method).split(","):
        assert method in list_methods()
    assert str(params.seed) == "0,1,2"
    assert cfg.method.name in list_methods()


def test_experiment_values_win_and_cli_still_overrides(shared):
    compose_cfg, _ = shared
    demo = compose_cfg("experiment=keras_mnist_demo")
    assert (demo.method.name, demo.method.temperature, demo.method.alpha) == ("kd", 10.0, 0.5)
    assert demo.student.arch == "mlp" and demo.student.args.hidden == 64 and demo.teacher.arch == "cnn"
    assert compose_cfg("experiment=keras_mnist_demo", "method.temperature=2").method.temperature == 2.0
    assert compose_cfg("experiment=keras_mnist_demo", "method=ce").method.name == "ce"
    rev = compose_cfg("experiment=tfkd_reversed")
    assert (rev.teacher.arch, rev.student.arch) == ("mlp", "cnn")
    assert compose_cfg("experiment=tfkd_defective").teacher.epochs == 3
    assert compose_cfg("experiment=kd_transfer_set").dataset.label_fraction == 0.03
    assert len(compose_cfg("experiment=meal_v2_ensemble").teachers) == 3


@pytest.mark.slow  # every method's end-to-end run is also in test_every_method (default run)
@pytest.mark.parametrize("name", LOGIT_LEVEL)
def test_one_epoch_on_digits(shared, name):
    compose_cfg, root = shared
    run_dir = root / "runs" / name
    acc = run(compose_cfg(*FAST, f"method={name}"), str(run_dir))
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "done" and 0.0 <= acc <= 1.0
    h = m["history"][0]
    assert any(k.startswith("train/loss_") for k in h)
    assert m["teacher"]["source"] in (("none",) if name in ("lsr", "tfkd_reg", "dml") else ("trained", "cache"))
    if name == "dml":
        assert "val/acc_peer1" in h


def test_one_epoch_meal_v2_with_an_ensemble_and_kd_on_a_transfer_set(shared):
    compose_cfg, root = shared
    ens = "teachers=[{base:cnn,epochs:2,args:{channels:[8,8,8]}},{base:lenet5,epochs:1}]"
    run(compose_cfg(*FAST, "method=meal_v2", ens), str(root / "runs" / "meal_ens"))
    m = json.loads((root / "runs" / "meal_ens" / "metrics.json").read_text())
    assert m["status"] == "done" and len(m["teacher"]["members"]) == 2
    for method in ("kd", "ce"):
        run(compose_cfg(*FAST, f"method={method}", "dataset.label_fraction=0.1"), str(root / "runs" / f"ts_{method}"))
        assert json.loads((root / "runs" / f"ts_{method}" / "metrics.json").read_text())["status"] == "done"


@pytest.mark.slow
def test_transfer_set_gap_on_digits(shared):
    """At 3 % labels, kd on all inputs beats ce on the labeled part by a wide margin."""
    compose_cfg, root = shared
    accs = {m: run(compose_cfg("experiment=kd_transfer_set", f"method={m}", "progress=false"),
                   str(root / "runs" / f"gap_{m}")) for m in ("ce", "kd")}
    assert accs["kd"] > accs["ce"] + 0.1, accs
