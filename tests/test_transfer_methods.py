"""Transfer-learning and domain-adaptation methods: ts_adapt, ts_adapter, cqd, dann, finetune, progressive, multitask, data_distill.
Unit checks through the fit loop (no labels used where none should be, frozen parts stay frozen)
and one end-to-end epoch per method on digits through kdexp.train.run."""
import copy
import json
from dataclasses import replace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from kdexp import config_dir
from kdexp.config import DatasetConfig, DomainConfig
from kdexp.data import load_dataset
from kdexp.engine.teacher import FrozenTeacher
from kdexp.errors import ConfigError
from kdexp.methods import Batch, get_method
from kdexp.models import get_model
from kdexp.train import run
from tests.conftest import fit_method

# small CNNs and short recipes: each end-to-end run takes a few seconds
FAST = ["dataset.classes=[6,9]", "teacher.epochs=2", "teacher.args.channels=[8,16]", "epochs=1", "progress=false",
        "hardware=cpu", "hardware.threads=1"]  # one thread: tiny models, and no oversubscription on shared cores
SMALL_CNN = ["student=cnn", "student.args.channels=[8,16]"]  # unless the test picks its student
OPTIM = OmegaConf.create({"name": "adam", "lr": 0.01, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0,
                          "schedule": "none", "milestones": [], "gamma": 0.1})


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("teachers")  # teachers trained once for the whole module


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


def method_cfg(name, **kw):
    from kdexp.methods import METHODS

    return OmegaConf.merge(OmegaConf.structured(METHODS.meta(name)["config"]), kw)


def digits69(domain=None, **kw):
    d = OmegaConf.merge(OmegaConf.structured(DatasetConfig), {"name": "digits", "classes": [6, 9], **kw})
    return load_dataset(d, None if domain is None else OmegaConf.merge(OmegaConf.structured(DomainConfig),
                                                                       {"transforms": [domain]}))


def small_cnn(seed, classes=2):
    torch.manual_seed(seed)
    return get_model("cnn", (1, 8, 8), classes, channels=[8, 16])


def train(method, data, epochs=1, seed=0):
    return fit_method(method, data, optim_cfg=OPTIM, epochs=epochs, batch_size=32, seed=seed)


def read(path):
    with open(path) as f:
        return json.load(f)


# -- ts_adapt / ts_adapter ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ts_adapt", "ts_adapter"])
def test_ts_methods_use_no_labels(name):
    """Scrambled training labels give bit-identical students: T/S adaptation never reads them."""
    data = digits69("vflip")
    teacher = FrozenTeacher(small_cnn(1), data.in_shape)
    students = []
    scrambled = data.y_train[torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(0))]
    assert not torch.equal(scrambled, data.y_train)
    for y in (data.y_train, scrambled):
        torch.manual_seed(0)
        method = get_method(name)(method_cfg(name, match="soft", temperature=2.0), small_cnn(2), teacher)
        train(method, replace(data, y_train=y))
        students.append(method.student.state_dict())
    assert students[0].keys() == students[1].keys()
    assert all(torch.equal(students[0][k], students[1][k]) for k in students[0])
    start = get_method(name)(method_cfg(name), small_cnn(2), teacher).student.state_dict()
    assert any(not torch.equal(start[k], students[0][k]) for k in start)  # it did train


def test_ts_adapt_starts_from_the_teacher_and_learns_the_target_view():
    data = digits69("vflip")
    teacher_model = small_cnn(1)
    train(get_method("ce")(method_cfg("ce"), teacher_model), data.source_only(), epochs=8)
    teacher = FrozenTeacher(teacher_model, data.in_shape)
    method = get_method("ts_adapt")(method_cfg("ts_adapt"), small_cnn(2), teacher)
    assert all(torch.equal(a, b) for a, b in zip(method.student.state_dict().values(),
                                                 teacher_model.state_dict().values()))
    hist = train(method, data, epochs=8)
    t_target = (teacher_model(data.x_val_target).argmax(-1) == data.y_val).float().mean().item()
    assert hist[-1]["val/acc_target"] > t_target + 0.3  # the T/S student adapts, without target labels
    assert hist[-1]["val/acc"] == hist[-1]["val/acc_target"] and "val/acc_source" in hist[-1]
    with pytest.raises(ConfigError, match="teacher's architecture"):
        get_method("ts_adapt")(method_cfg("ts_adapt"), get_model("mlp", (1, 8, 8), 2), teacher)
    with pytest.raises(ConfigError, match="w_ce must be 0"):
        get_method("ts_adapt")(method_cfg("ts_adapt", w_ce=0.5), small_cnn(2), teacher)


@pytest.mark.parametrize("adapter", ["linear", "conv1x1", "conv3x3"])
def test_ts_adapter_trains_only_the_identity_initialized_adapter(adapter):
    data = digits69("vflip")
    model = small_cnn(1)
    model[2].p = 0.5  # dropout in the frozen copy must stay off
    teacher = FrozenTeacher(model, data.in_shape)
    method = get_method("ts_adapter")(method_cfg("ts_adapter", adapter=adapter), small_cnn(2), teacher)
    x = data.x_val[:16]
    assert torch.allclose(method.student(x), teacher.model(x), atol=1e-5)  # identity at the start
    frozen_before = copy.deepcopy(method.student.frozen.state_dict())
    adapter_before = copy.deepcopy(method.student.adapter.state_dict())
    trainable = {id(p) for g in method.param_groups(OPTIM) for p in g["params"]}
    assert trainable == {id(p) for p in method.student.adapter.parameters()}
    train(method, data)
    assert not method.student.frozen.training
    assert all(torch.equal(v, method.student.frozen.state_dict()[k]) for k, v in frozen_before.items())
    assert any(not torch.equal(v, method.student.adapter.state_dict()[k]) for k, v in adapter_before.items())


# -- finetune -----------------------------------------------------------------------------------
def test_finetune_copies_reinitializes_and_freezes_with_batchnorm():
    torch.manual_seed(0)
    teacher_model = get_model("resnet8", (1, 8, 8), 2)
    teacher = FrozenTeacher(teacher_model, (1, 8, 8))
    torch.manual_seed(1)
    student = get_model("resnet8", (1, 8, 8), 2)
    cfg = method_cfg("finetune", freeze_first=2, reinit=["fc"], beta=0.1, l2_new=0.01)
    method = get_method("finetune")(cfg, student, teacher)
    t = teacher_model.state_dict()
    s0 = copy.deepcopy(student.state_dict())
    assert all(torch.equal(s0[k], t[k]) for k in t if not k.startswith("fc."))
    assert not torch.equal(s0["fc.weight"], t["fc.weight"])  # re-initialized
    assert method.frozen == ["conv1", "bn1", "layer1.0.conv1", "layer1.0.bn1"]  # 2 convs with their norms
    data = digits69()
    hist = train(method, data)
    method.train()
    s1 = student.state_dict()
    for k in s0:
        if k.startswith(("conv1.", "bn1.", "layer1.0.conv1.", "layer1.0.bn1.")):
            assert torch.equal(s0[k], s1[k]), k  # weights and BatchNorm running statistics
    assert not torch.equal(s0["layer1.0.bn2.running_mean"], s1["layer1.0.bn2.running_mean"])
    assert not torch.equal(s0["fc.weight"], s1["fc.weight"])
    assert {"train/loss_ce", "train/loss_l2sp", "train/loss_l2_new"} <= set(hist[0])
    assert not student.bn1.training and not student.layer1[0].bn1.training and student.layer1[0].bn2.training


def test_finetune_config_errors():
    teacher = FrozenTeacher(small_cnn(1), (1, 8, 8))
    with pytest.raises(ConfigError, match="teacher's architecture"):
        get_method("finetune")(method_cfg("finetune"), get_model("lenet5", (1, 8, 8), 2), teacher)
    with pytest.raises(ConfigError, match="method.reinit"):  # a head for another number of classes
        get_method("finetune")(method_cfg("finetune"), small_cnn(2, classes=3), teacher)
    get_method("finetune")(method_cfg("finetune", reinit=["3"]), small_cnn(2, classes=3), teacher)
    with pytest.raises(ConfigError, match="overlaps the frozen"):
        get_method("finetune")(method_cfg("finetune", freeze=["0"], reinit=["0.0"]), small_cnn(2), teacher)
    with pytest.raises(ConfigError, match=r"no module\(s\) \['conv9'\]"):
        get_method("finetune")(method_cfg("finetune", freeze=["conv9"]), small_cnn(2), teacher)
    with pytest.raises(ConfigError, match="only 3 Conv/Linear"):
        get_method("finetune")(method_cfg("finetune", freeze_first=5), small_cnn(2), teacher)


# -- progressive --------------------------------------------------------------------------------
def test_progressive_old_column_frozen_and_laterals_used():
    teacher_model = small_cnn(1)
    teacher = FrozenTeacher(teacher_model, (1, 8, 8))
    new = small_cnn(2)
    method = get_method("progressive")(method_cfg("progressive"), new, teacher)
    net = method.student
    assert net.layers == ["0.3", "3"]  # every Conv/Linear but the first
    x = digits69().x_val[:8]
    with torch.no_grad():
        for lat in net.laterals.values():
            for p in lat.parameters():
                p.zero_()
        assert torch.allclose(net(x), new(x))  # zero laterals: the new column alone
        for lat in net.laterals.values():
            lat.bias.fill_(0.5)  # the head's lateral adds its bias (and, in general, U h'_{i-1})
        assert not torch.allclose(net(x), new(x))
    before = copy.deepcopy(net.old.state_dict())
    train(get_method("progressive")(method_cfg("progressive"), small_cnn(3), teacher), digits69())
    m2 = get_method("progressive")(method_cfg("progressive"), small_cnn(3), teacher)
    lat_before = copy.deepcopy(m2.student.laterals.state_dict())
    train(m2, digits69())
    assert all(torch.equal(v, m2.student.old.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(v, teacher_model.state_dict()[k]) for k, v in before.items())
    assert any(not torch.equal(v, m2.student.laterals.state_dict()[k]) for k, v in lat_before.items())
    with pytest.raises(ConfigError, match="old column"):
        get_method("progressive")(method_cfg("progressive"), get_model("mlp", (1, 8, 8), 2), teacher)


# -- dann -----------------------------------------------------------------------------------------
def test_dann_reverses_the_domain_gradient_into_the_features():
    data = digits69("rotate")
    torch.manual_seed(0)
    cfg = method_cfg("dann", w_ce=0.0, lambda_schedule="constant", lambda_max=0.3)
    method = get_method("dann")(cfg, get_model("mlp", (1, 8, 8), 2), None)
    method.prepare(data, "cpu")
    batch = Batch.sampled("train", data.x_train[:16], data.y_train[:16], torch.arange(16),
                          x_target=data.x_train_target[:16])
    terms = method.losses(batch)
    assert set(terms) == {"domain"}
    terms["domain"].backward()
    grl = {n: None if p.grad is None else p.grad.clone() for n, p in method.named_parameters()}
    method.zero_grad()
    # the same loss without the reversal layer: the discriminator's gradient is equal, the features' is -1/0.3 x
    from kdexp.losses import domain_classification_loss
    from kdexp.models.taps import run_with_features

    _, f = run_with_features(method.student, torch.cat([batch.x, batch.x_target]), [method.layer])
    d = method.discriminator(f[method.layer])
    domain_classification_loss(d[:16], d[16:]).backward()
    for n, p in method.named_parameters():
        if n.startswith("student.3"):  # the head is not on the domain path
            assert grl[n] is None and p.grad is None
            continue
        expected = p.grad if n.startswith("discriminator") else -0.3 * p.grad
        assert torch.allclose(grl[n], expected, atol=1e-6), n
    method.progress = 0.0
    assert get_method("dann")(method_cfg("dann"), get_model("mlp", (1, 8, 8), 2)).reversal_factor() == 0.0


# -- multitask ------------------------------------------------------------------------------------
def test_multitask_heads_labels_and_metrics():
    data = load_dataset(OmegaConf.merge(OmegaConf.structured(DatasetConfig), {"name": "digits"}))
    tasks = [{"name": "parity", "labels": [0, 1] * 5},
             {"name": "low", "labels": [0, 1, 2, 3, 4, -1, -1, -1, -1, -1], "weight": 0.5}]
    torch.manual_seed(0)
    method = get_method("multitask")(method_cfg("multitask", tasks=tasks), get_model("mlp", (1, 8, 8), 10))
    method.prepare(data, "cpu")
    assert method.heads["parity"][1].out_features == 2 and method.heads["low"][1].out_features == 5
    y = torch.tensor([0, 3, 7, -1])
    assert method._aux_labels("low", y).tolist() == [0, 3, -1, -1]
    assert method._aux_labels("parity", y).tolist() == [0, 1, 1, -1]
    hist = train(method, data, epochs=3)
    assert {"train/loss_ce", "train/loss_task_parity", "train/loss_task_low", "val/acc_parity",
            "val/acc_low"} <= set(hist[-1])
    assert hist[-1]["val/acc_parity"] > 0.75 and hist[-1]["val/acc_low"] > 0.6
    bad = get_method("multitask")(method_cfg("multitask", tasks=[{"name": "p", "labels": [0, 1, 0]}]),
                                  get_model("mlp", (1, 8, 8), 10))
    with pytest.raises(ConfigError, match="maps 3 classes but the dataset has 10"):
        bad.prepare(data, "cpu")
    with pytest.raises(ConfigError, match="unknown key"):
        get_method("multitask")(method_cfg("multitask", tasks=[{"name": "p", "labels": [0], "w": 1}]),
                                get_model("mlp", (1, 8, 8), 10))


# -- data distillation ----------------------------------------------------------------------------
def test_data_distill_pseudo_labels_only_confident_unlabeled_samples():
    data = digits69(label_fraction=0.2)
    teacher_model = small_cnn(1)
    train(get_method("ce")(method_cfg("ce"), teacher_model), data, epochs=5)
    teacher = FrozenTeacher(teacher_model, data.in_shape)
    method = get_method("data_distill")(method_cfg("data_distill", threshold=0.8), small_cnn(2), teacher)
    method.prepare(data, "cpu")
    p = method.pseudo
    assert (p[data.labeled] == -1).all()  # labeled samples keep their own labels
    assert (p[~data.labeled] >= 0).sum() > 0.5 * (~data.labeled).sum()
    # independent check of one kept sample: mean softmax over the five shifted views >= threshold
    i = int((p >= 0).nonzero()[0])
    from kdexp.data.domain import shift

    lo = float(data.x_train.min())
    views = [data.x_train[i:i + 1]] + [shift(data.x_train[i:i + 1], dx, dy, lo)
                                       for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1))]
    probs = torch.stack([teacher_model(v).softmax(-1)[0] for v in views]).mean(0)
    assert probs.max() >= 0.8 and probs.argmax() == p[i]
    assert method.extra_metrics(data)["train/pseudo_label_acc"] > 0.9
    restored = get_method("data_distill")(method_cfg("data_distill"), small_cnn(2), teacher)
    restored.load_state_dict(method.state_dict())  # resume: the pseudo-labels come with the checkpoint
    assert torch.equal(restored.pseudo, p) and restored.extra_metrics(data) == method.extra_metrics(data)


def test_data_distill_without_a_transfer_set_fails_in_the_plan(cfg_of):
    from kdexp.engine.plan import plan

    with pytest.raises(ConfigError, match="dataset.label_fraction < 1"):
        plan(cfg_of("method=data_distill"))


# -- end to end through the runner -------------------------------------------------------------------
E2E = {
    "ts_adapt": ["method=ts_adapt", "domain=vflip"],
    "ts_adapter": ["method=ts_adapter", "domain=vflip", "method.match=soft", "method.temperature=2"],
    "cqd": ["method=cqd", "domain=lowres", "student=mlp"],
    "dann": ["method=dann", "domain=rotate", "optim.name=sgd", "optim.schedule=dann"],
    "finetune": ["method=finetune", "teacher.classes=[0,1]", "method.reinit=[3]", "method.freeze_first=1",
                 "method.beta=0.01"],
    "progressive": ["method=progressive", "teacher.classes=[0,1]"],
    "multitask": ["method=multitask", "student=mlp", "method.tasks=[{name: swap, labels: [1, 0]}]"],
    "data_distill": ["method=data_distill", "dataset.label_fraction=0.3", "teacher.labeled_only=true",
                     "method.threshold=0.5"],
}


@pytest.mark.parametrize("name", sorted(E2E))
def test_one_epoch_end_to_end(name, cfg_of, tmp_path):
    acc = run(cfg_of(*E2E[name]), str(tmp_path / "run"))
    m = read(tmp_path / "run" / "metrics.json")
    assert m["status"] == "done" and 0.0 <= acc <= 1.0
    h = m["history"][-1]
    if "domain=none" not in E2E[name] and any(o.startswith("domain=") for o in E2E[name]):
        assert h["val/acc"] == h["val/acc_target"] and 0 <= h["val/acc_source"] <= 1
        if name != "dann":  # dann trains no teacher
            assert {"teacher/val/acc_source", "teacher/val/acc_target"} <= set(m["final"])
            assert m["final"]["teacher/val/acc"] == m["final"]["teacher/val/acc_target"]
    else:
        assert "val/acc_source" not in h


def test_domain_runs_log_teacher_views_and_reuse_the_unshifted_teacher(cfg_of, tmp_path):
    run(cfg_of("method=kd", "domain=vflip"), str(tmp_path / "a"))
    run(cfg_of("method=kd"), str(tmp_path / "b"))
    a, b = read(tmp_path / "a" / "metrics.json"), read(tmp_path / "b" / "metrics.json")
    assert a["teacher"]["key"] == b["teacher"]["key"]  # trained on the source view = the unshifted data
    assert a["teacher"]["val/acc_source"] == b["teacher"]["val/acc"]
    assert a["teacher"]["val/acc"] == a["teacher"]["val/acc_target"] != a["teacher"]["val/acc_source"]
    assert a["hparams"]["domain"] == "vflip"
    assert a["teacher_cache"]["views"] == ["train"]
    run(cfg_of("method=kd", "domain=vflip", "domain.train_view=target"), str(tmp_path / "c"))
    assert read(tmp_path / "c" / "metrics.json")["teacher_cache"]["views"] == ["train_target"]
    # single-view methods train on the source view by default; domain.train_view=target on the target
    run(cfg_of("method=ce", "domain=vflip", "epochs=4"), str(tmp_path / "src"))
    run(cfg_of("method=ce", "domain=vflip", "epochs=4", "domain.train_view=target"), str(tmp_path / "tgt"))
    src, tgt = read(tmp_path / "src" / "metrics.json")["final"], read(tmp_path / "tgt" / "metrics.json")["final"]
    assert src["val/acc_source"] > src["val/acc_target"] and tgt["val/acc_target"] > tgt["val/acc_source"]


def test_teacher_key_includes_pretraining_classes_and_labeled_only(cfg_of, tmp_path):
    from kdexp.engine.plan import plan
    from kdexp.engine.teacher import provide_teacher

    cfg = cfg_of("method=finetune", "teacher.classes=[0,1,2]", "method.reinit=[3]")  # a new head for 2 classes
    data = load_dataset(cfg.dataset)
    teacher, info = provide_teacher(plan(cfg), data)
    plain = provide_teacher(plan(cfg_of("method=finetune")), data)[1]
    assert teacher.model[-1].out_features == 3 and info["key"] != plain["key"]
    lab = cfg_of("dataset.label_fraction=0.3", "teacher.labeled_only=true")
    assert provide_teacher(plan(lab), load_dataset(lab.dataset))[1]["key"] not in (plain["key"], info["key"])


@pytest.mark.parametrize("overrides,match", [
    (["method=ts_adapt"], "needs a domain shift"),
    (["method=dann"], "needs a domain shift"),
    (["method=kd", "teacher.classes=[0,1]"], "teacher.classes"),
])
def test_method_domain_config_errors(overrides, match, cfg_of, tmp_path):
    with pytest.raises(ConfigError, match=match):
        run(cfg_of(*overrides), str(tmp_path / "run"))
    assert read(tmp_path / "run" / "metrics.json")["status"] == "failed"


class _Stop(Exception):
    pass


@pytest.mark.parametrize("name", ["dann", "multitask"])
def test_resume_restores_lazily_built_parts(name):
    """A run interrupted after epoch 2 of 4 and resumed from its checkpoint state (the discriminator /
    task heads are built at the first forward, which resume skips) ends like an uninterrupted one."""
    data = digits69("rotate") if name == "dann" else digits69()
    cfg = method_cfg(name) if name == "dann" else method_cfg(name, tasks=[{"name": "swap", "labels": [1, 0]}])
    optim = OmegaConf.merge(OPTIM, {"name": "sgd", "schedule": "dann"})

    def make():
        torch.manual_seed(0)
        m = get_method(name)(cfg, get_model("mlp", (1, 8, 8), 2))
        return m

    full = make()
    full.prepare(data, "cpu")
    expected = fit_method(full, data, optim_cfg=optim, epochs=4, batch_size=32, seed=0)
    saved = {}

    def stop_after_two(epoch, metrics, state):
        if epoch == 1:
            saved.update(copy.deepcopy(state))
            raise _Stop()

    first = make()
    first.prepare(data, "cpu")
    with pytest.raises(_Stop):
        fit_method(first, data, optim_cfg=optim, epochs=4, batch_size=32, seed=0, on_epoch=stop_after_two)
    resumed = make()  # no prepare: as the runner does on resume
    history = fit_method(resumed, data, optim_cfg=optim, epochs=4, batch_size=32, seed=0, state=saved)
    assert [h["train/loss"] for h in history] == [h["train/loss"] for h in expected]
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), full.state_dict().values()))
