"""Feature- and relation-based methods end to end on digits (CNN teacher -> smaller CNN
student), their connectors, the frozen teacher, the CRD memory bank, feature taps."""
import json

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from kdexp import config_dir
from kdexp.data import load_dataset
from kdexp.engine.optim import build_optimizer
from kdexp.engine.assemble import Assembly, pretrain
from kdexp.engine.plan import plan
from kdexp.engine.teacher import FrozenTeacher, provide_teacher
from kdexp.errors import ConfigError
from kdexp.methods import Batch, get_method
from kdexp.models import get_model
from kdexp.models.taps import FeatureTap, default_layers, feature_shapes, list_features, run_with_features
from kdexp.seeding import derive_seed
from kdexp.train import run
from tests.conftest import FAST

METHODS = ["fitnet", "at", "nst", "ab", "ft", "fsp", "sp", "pkt", "rkd", "cc", "vid", "crd", "darkrank", "jacobian"]
STAGED = {"fitnet", "ab", "ft", "fsp"}
SMALL_CNN = ["student=cnn", "student.args.channels=[16,32,32]"]
TERM = {"fitnet": "hint", "at": "at", "nst": "nst", "ab": None, "ft": "ft", "fsp": None, "sp": "sp", "pkt": "pkt",
        "rkd": "rkd", "cc": "cc", "vid": "vid", "crd": "crd", "darkrank": "darkrank", "jacobian": "jacobian"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def cfg_of(cache, tmp_path):
    """cfg_of(*overrides): composed config; the teacher cache is shared by the module's tests."""
    def _compose(*overrides):
        student = [] if any(o.startswith("student=") for o in overrides) else SMALL_CNN
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose("config", overrides=[f"paths.cache_dir={cache}", f"paths.data_dir={tmp_path / 'data'}",
                                                "hardware=cpu", *FAST, *student, *overrides])
    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture
def setup(cfg_of):
    """setup(method, *overrides) -> (cfg, data, teacher, method) without running the fit loop."""
    def _setup(name, *overrides):
        cfg = cfg_of(f"method={name}", *overrides)
        data = load_dataset(cfg.dataset)
        teacher, _ = provide_teacher(plan(cfg), data)
        torch.manual_seed(0)
        student = get_model(cfg.student.arch, data.in_shape, data.num_classes, **cfg.student.args)
        return cfg, data, teacher, get_method(name)(cfg.method, student, teacher)
    return _setup


def batch_of(data, idx):
    idx = torch.as_tensor(idx)
    return Batch(data.x_train[idx], data.y_train[idx], idx)


@pytest.mark.slow  # every method's end-to-end run is also in test_every_method (default run)
@pytest.mark.parametrize("name", METHODS)
def test_method_trains_one_epoch_on_digits(cfg_of, tmp_path, name):
    extra = ["method.init_epochs=1"] if name in STAGED else []
    if name in ("ab", "fsp"):
        extra.append("method.beta=1")  # also exercise the term in the main stage
    cfg = cfg_of(f"method={name}", *extra)
    acc = run(cfg, str(tmp_path / "run"))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["status"] == "done" and 0.0 <= acc <= 1.0
    epoch = m["history"][0]
    term = TERM[name] or {"ab": "ab", "fsp": "fsp"}[name]
    assert f"train/loss_{term}" in epoch and 0 < epoch[f"train/loss_{term}"] < float("inf")
    # the student was trained: its weights moved away from the runner's seeded initialization
    torch.manual_seed(derive_seed(cfg.seed, "student/init"))
    init = get_model(cfg.student.arch, (1, 8, 8), 10, **cfg.student.args).state_dict()
    trained = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["method"]
    assert all(not torch.equal(trained[f"student.{k}"], v) for k, v in init.items() if k.endswith("weight"))


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_method_defaults_reach_high_accuracy_on_digits(cfg_of, tmp_path, name):
    """The defaults, 30 epochs: every method ends well above 0.9 (ce: ~0.98, see the README)."""
    acc = run(cfg_of(f"method={name}", "epochs=30", "teacher.epochs=30"), str(tmp_path / "run"))
    assert acc > 0.93, f"{name}: {acc}"


@pytest.mark.parametrize("name,attr", [("fitnet", "regressor"), ("ab", "connectors"), ("fsp", "connectors"),
                                       ("vid", "regressors"), ("ft", "translator"), ("crd", "embed_s")])
def test_connectors_get_gradients_and_are_in_the_optimizer(setup, name, attr):
    cfg, data, teacher, method = setup(name, "method.beta=1", *(["method.init_epochs=0"] if name in STAGED else []))
    if name == "crd":
        method.prepare(data, "cpu")
    module = getattr(method, attr)
    params = [p for p in module.parameters() if p.requires_grad]
    assert params, f"{name}.{attr} has no trainable parameters"
    opt_params = {id(p) for g in build_optimizer(method.param_groups(cfg.optim), cfg.optim).param_groups
                  for p in g["params"]}
    assert {id(p) for p in params} <= opt_params
    assert not {id(p) for p in teacher.model.parameters()} & opt_params
    before = [p.clone() for p in teacher.model.parameters()]
    method.train()
    sum(method.losses(batch_of(data, range(32))).values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params), f"{name}.{attr}: no gradient"
    assert all(p.grad is None for p in teacher.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.model.parameters()))
    if name == "vid":  # the learned per-channel variances are parameters with gradients
        assert all(r.log_scale.grad is not None for r in method.regressors)


def test_ft_paraphraser_is_pretrained_then_frozen(setup):
    cfg, data, teacher, method = setup("ft", "method.init_epochs=2")
    before = [p.clone() for p in method.paraphraser.parameters()]
    losses = pretrain(method, plan(cfg), Assembly(data, teacher), "cpu")["paraphraser pre-training"]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, method.paraphraser.parameters()))
    assert not any(p.requires_grad for p in method.paraphraser.parameters())
    opt_params = {id(p) for g in method.param_groups(cfg.optim) for p in g["params"]}
    assert not {id(p) for p in method.paraphraser.parameters()} & opt_params


@pytest.mark.parametrize("name", ["ab", "fsp", "fitnet"])
def test_first_stage_lowers_its_loss(setup, name):
    cfg, data, teacher, method = setup(name, "method.init_epochs=3", "method.beta=1")
    batch = batch_of(data, range(256))
    method.train()
    with torch.no_grad():
        before = method.feature_loss(*[method.features(batch)[i] for i in (1, 3)], batch).item()
    (losses,) = pretrain(method, plan(cfg), Assembly(data, teacher), "cpu").values()
    with torch.no_grad():
        after = method.feature_loss(*[method.features(batch)[i] for i in (1, 3)], batch).item()
    assert len(losses) == 3 and after < 0.7 * before


def test_crd_memory_bank_is_updated_at_the_batch_indices(setup):
    cfg, data, teacher, method = setup("crd", "method.nce_k=64")
    method.prepare(data, "cpu")
    n = len(data.x_train)
    assert method.memory_s.shape == (n, 128) and method.memory_t.shape == (n, 128)
    old_s, old_t = method.memory_s.clone(), method.memory_t.clone()
    idx = torch.tensor([3, 700, 12, n - 1, 250])
    batch = batch_of(data, idx)
    method.train()
    s_logits, s, t_logits, t = method.features(batch)
    with torch.no_grad():
        v_s, v_t = method.embed_s(s[0]), method.embed_t(t[0])
    method.feature_loss(s, t, batch)
    m = cfg.method.nce_m
    changed = torch.zeros(n, dtype=torch.bool)
    changed[idx] = True
    assert torch.equal(method.memory_s[~changed], old_s[~changed])
    assert torch.equal(method.memory_t[~changed], old_t[~changed])
    assert torch.allclose(method.memory_s[idx], F.normalize(m * old_s[idx] + (1 - m) * v_s, dim=1), atol=1e-6)
    assert torch.allclose(method.memory_t[idx], F.normalize(m * old_t[idx] + (1 - m) * v_t, dim=1), atol=1e-6)
    assert (method.z > 0).all()  # normalizers fixed from the first batch


@pytest.mark.parametrize("mode", ["exact", "instance"])
def test_crd_negatives(setup, mode):
    cfg, data, teacher, method = setup("crd", f"method.nce_mode={mode}", "method.nce_k=500")
    method.prepare(data, "cpu")
    idx = torch.arange(0, 40)
    neg = method.sample_negatives(idx)
    assert neg.shape == (40, 500) and neg.min() >= 0 and neg.max() < len(data.x_train)
    assert not (neg == idx.unsqueeze(1)).any()
    if mode == "exact":
        assert not (data.y_train[neg] == data.y_train[idx].unsqueeze(1)).any()
        for i in range(40):  # every other class shows up among 500 draws
            assert set(data.y_train[neg[i]].tolist()) == set(range(10)) - {int(data.y_train[idx[i]])}
    else:
        assert (data.y_train[neg] == data.y_train[idx].unsqueeze(1)).any()  # same class allowed


def test_crd_banks_come_back_from_a_checkpoint(setup):
    cfg, data, teacher, method = setup("crd", "method.nce_k=32")
    method.prepare(data, "cpu")
    method.train()
    method.feature_loss(*[method.features(batch_of(data, range(16)))[i] for i in (1, 3)], batch_of(data, range(16)))
    state = method.state_dict()
    fresh = get_method("crd")(cfg.method, get_model("cnn", data.in_shape, 10, channels=[16, 32, 32]), teacher)
    assert fresh.memory_s.shape[0] == 0
    fresh.load_state_dict(state)
    assert torch.equal(fresh.memory_s, method.memory_s) and torch.equal(fresh.z, method.z)
    assert torch.equal(fresh.memory_labels, data.y_train)


def test_jacobian_teacher_gradient_matches_finite_differences(setup):
    from kdexp.methods.gradient import teacher_input_gradient

    cfg, data, teacher, method = setup("jacobian")
    # random inputs: the digits' flat backgrounds give max-pooling ties, where ReLU nets have no gradient
    x, y = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), data.y_train[:3]
    model = teacher.model.double()
    try:
        _, grad, _ = teacher_input_gradient(model, x, y)
        eps = 1e-6
        for pos in [(0, 0, 3, 4), (1, 0, 5, 2), (2, 0, 1, 1)]:
            xp, xm = x.clone(), x.clone()
            xp[pos] += eps
            xm[pos] -= eps
            with torch.no_grad():
                fd = (model(xp)[pos[0], y[pos[0]]] - model(xm)[pos[0], y[pos[0]]]) / (2 * eps)
            assert grad[pos].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-8)
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.float()


def test_layers_from_config_and_errors(setup, cfg_of):
    cfg, data, teacher, method = setup("at", "method.student_layers=[0.4,0.7]", "method.teacher_layers=[0.4,0.7]")
    assert method.s_layers == ["0.4", "0.7"] and method.t_layers == ["0.4", "0.7"]
    cfg, data, teacher, method = setup("at")
    assert method.s_layers == ["0.1", "0.4", "0.7"]  # the cnn's stage ends
    with pytest.raises(ConfigError, match="0.1 \\(16, 8, 8\\)"):  # lists the tappable modules and shapes
        setup("at", "method.student_layers=[nope]", "method.teacher_layers=[0.4]")
    with pytest.raises(ConfigError, match="pair up"):
        setup("at", "method.student_layers=[0.1,0.4]", "method.teacher_layers=[0.4]")
    with pytest.raises(ConfigError, match="one layer pair"):
        setup("fitnet", "method.student_layers=[0.1,0.4]", "method.teacher_layers=[0.1,0.4]")


def test_lenet5_student_pairs_the_last_stages(setup):
    cfg, data, teacher, method = setup("vid", "student=lenet5")
    assert method.s_layers == ["1", "4"] and method.t_layers == ["0.4", "0.7"]


def test_feature_taps():
    model = get_model("cnn", (1, 8, 8), 10)
    shapes = list_features(model, (1, 8, 8))
    assert shapes["0.1"] == (32, 8, 8) and shapes["0.4"] == (64, 4, 4) and shapes["1"] == (256,)
    x = torch.randn(4, 1, 8, 8)
    out, feats = run_with_features(model, x, ["0.4", "0.4:in", "0.5:in"])
    assert torch.equal(out, model(x))
    assert torch.equal(feats["0.4"], F.relu(feats["0.4:in"]))  # ReLU input = pre-activation
    assert torch.equal(feats["0.5:in"], feats["0.4"])
    with pytest.raises(ConfigError, match="0.1, 0.2"):
        FeatureTap(model, ["layer9"], "student")
    assert not model[0][1]._forward_hooks  # hooks removed after the forward
    # an in-place ReLU does not overwrite a tapped input (torchvision blocks use ReLU(inplace=True))
    rn = get_model("resnet18", (3, 16, 16), 5).eval()
    _, f = run_with_features(rn, torch.randn(2, 3, 16, 16), ["layer1.1.relu:in", "layer1"])
    assert (f["layer1.1.relu:in"] < 0).any() and torch.equal(F.relu(f["layer1.1.relu:in"]), f["layer1"])
    assert feature_shapes(rn, default_layers(rn, "preact"), (3, 16, 16))[0] == (64, 4, 4)
    with pytest.raises(ConfigError, match="no default 'stages'"):
        default_layers(torch.nn.Linear(3, 3), "stages")


def test_method_needs_the_input_shape(setup):
    cfg, data, teacher, method = setup("at")
    with pytest.raises(ConfigError, match="in_shape"):
        get_method("at")(cfg.method, get_model("cnn", data.in_shape, 10), FrozenTeacher(teacher.model))
