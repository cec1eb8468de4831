"""Teacher-output cache (kdexp.engine.teacher_cache): served outputs equal the online teacher's,
never for another input, and cached runs give the metrics of online runs."""
import json
import time
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdexp.engine.teacher import FrozenTeacher, teacher_key
from kdexp.engine.plan import plan
from kdexp.engine.teacher_cache import TeacherCache, cached_teacher
from kdexp.losses import kd_ce_loss_soft
from kdexp.methods import UNLABELED, Batch, Method
from kdexp.models import get_model
from kdexp.train import run
from tests.conftest import FAST, fit_method


def frozen_cnn(n=300, seed=0):
    torch.manual_seed(seed)
    model = get_model("cnn", (1, 8, 8), 10)
    x = torch.randn(n, 1, 8, 8)
    return FrozenTeacher(model, (1, 8, 8)), x


def batch(x, idx, view="train"):
    return Batch.sampled(view, x[idx], torch.zeros(len(idx), dtype=torch.long), idx)


def test_cached_outputs_equal_online_and_the_teacher_runs_once_per_sample(monkeypatch):
    teacher, x = frozen_cnn()
    cache = TeacherCache(teacher).add_view("train", x)
    calls = []
    forward = teacher.model.forward
    monkeypatch.setattr(teacher.model, "forward", lambda inp: calls.append(len(inp)) or forward(inp))
    for epoch in range(3):
        for idx in torch.randperm(len(x)).split(64):
            got = cache.logits(batch(x, idx))
            with torch.no_grad():
                want = forward(x[idx])
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert sum(calls) == len(x)  # one pass, all samples, in chunks of at most 128
    assert max(calls) <= 128 and cache.hits == 3 * 5 and cache.online_calls == 0
    assert cache.fill_s > 0


def test_other_inputs_are_never_served_from_the_cache():
    teacher, x = frozen_cnn()
    cache = TeacherCache(teacher).add_view("train", x)
    idx = torch.arange(32)
    cache.logits(batch(x, idx))  # fills the "train" view
    other = torch.randn_like(x[:32])  # e.g. an augmented or target-domain input of the same samples
    for b in (Batch(other, torch.zeros(32, dtype=torch.long), idx),  # a Batch a method builds: view None
              Batch.sampled("target", other, torch.zeros(32, dtype=torch.long), idx)):  # a view it does not hold
        with torch.no_grad():
            assert torch.equal(cache.logits(b), teacher.model(other))
    assert cache.online_calls == 2
    cache.add_view("train", x.clone())  # another tensor under the same name drops its outputs
    assert not cache._logits


def test_features_are_cached_per_name_within_the_budget():
    teacher, x = frozen_cnn()
    names = ["0.1", "0.4"]
    idx = torch.arange(40, 80)
    want_logits, want = teacher.features(batch(x, idx), names)
    cache = TeacherCache(teacher).add_view("train", x)
    logits, feats = cache.features(batch(x, idx), names)
    assert torch.allclose(logits, want_logits, atol=1e-5)
    assert all(torch.allclose(feats[n], want[n], atol=1e-5) for n in names)
    assert cache.online_calls == 0 and set(k[1] for k in cache._features) == set(names)
    tight = TeacherCache(teacher, max_bytes=1000).add_view("train", x)  # far too small: online
    logits, feats = tight.features(batch(x, idx), names)
    assert torch.equal(feats["0.1"], want["0.1"]) and tight.online_calls == 1 and not tight._features


def test_soft_targets_are_the_softened_teacher_distribution():
    teacher, x = frozen_cnn()
    cache = TeacherCache(teacher).add_view("train", x)
    idx = torch.tensor([5, 1, 200])
    p, neg_entropy = cache.soft_targets(batch(x, idx), 3.0)
    with torch.no_grad():
        q = torch.softmax(teacher.model(x[idx]) / 3.0, dim=1)
    assert torch.allclose(p, q, atol=1e-5)
    assert torch.allclose(neg_entropy, (q * q.log()).sum(1), atol=1e-5)


def test_cached_outputs_carry_no_graph_under_grad_mode():
    # the lookups run without torch.no_grad(): nothing they return may require grad or hold a graph,
    # from its tables, or online for a view the cache does not hold
    teacher, x = frozen_cnn()
    for p in teacher.model.parameters():
        p.requires_grad_(True)
    cache = TeacherCache(teacher).add_view("train", x)
    idx = torch.tensor([3, 7, 11])
    with torch.enable_grad():
        for view in ("train", "other"):
            out = [cache.logits(batch(x, idx, view)), *cache.soft_targets(batch(x, idx, view), 2.0)]
            logits, feats = cache.features(batch(x, idx, view), ["0.1", "0.4"])
            out += [logits, *feats.values()]
            assert not any(t.requires_grad or t.grad_fn is not None for t in out), view


GPU = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="needs a GPU (torch sees none)")])


@pytest.mark.parametrize("device", ["cpu", GPU])
@pytest.mark.parametrize("with_unlabeled", [False, True])
@pytest.mark.parametrize("b, c, w_ce", [(12, 6, 0.3), (12, 20, 0.3), (12, 6, 0.0), (1, 6, 0.3)])
def test_kd_ce_loss_soft_matches_ce_plus_kd(with_unlabeled, b, c, w_ce, device):
    # 6 classes: the node's classes-first layout on the CPU; 20: the row-wise one (a GPU's for any
    # C); b=1: a (1, C) batch, whose transpose is already contiguous
    torch.manual_seed(0)
    s = torch.randn(b, c, dtype=torch.float64).to(device).requires_grad_(True)  # the same values on either device
    t = torch.randn(b, c, dtype=torch.float64).to(device)
    y = torch.randint(0, c, (b,)).to(device)
    if with_unlabeled:
        y[:b // 3] = UNLABELED
    T, alpha = 2.5, 0.7
    p = torch.softmax(t / T, 1)
    s_before = s.detach().clone()
    ce, kd = kd_ce_loss_soft(s, y, p, (p * p.log()).sum(1), T, w_ce, alpha, UNLABELED, all_labeled=not with_unlabeled)
    # reference written differently: one-hot CE over the labeled rows, F.kl_div on log-probabilities
    keep = y != UNLABELED
    one_hot = F.one_hot(y[keep], c).double()
    ref_ce = w_ce * -(one_hot * torch.log_softmax(s[keep], 1)).sum() / keep.sum()
    ref_kd = alpha * T * T * F.kl_div(torch.log_softmax(s / T, 1), torch.log_softmax(t / T, 1), reduction="batchmean",
                                      log_target=True)
    assert torch.allclose(ce, ref_ce) and torch.allclose(kd, ref_kd)
    g, = torch.autograd.grad(2 * ce + 3 * kd, s)
    ref_g, = torch.autograd.grad(2 * ref_ce + 3 * ref_kd, s)
    assert g.shape == s.shape and torch.allclose(g, ref_g, atol=1e-12)
    assert torch.equal(s.detach(), s_before)  # the logits are not written in place


@pytest.mark.parametrize("with_unlabeled", [False, True])
@pytest.mark.parametrize("c", [6, 20])
def test_kd_ce_loss_soft_groups_equal_their_separate_calls(with_unlabeled, c):
    # a fused sweep's (N, B, C) call with one (T, w_ce, alpha) per group = N separate calls
    torch.manual_seed(1)
    n, b = 3, 10
    s = torch.randn(n, b, c, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, c, (n, b))
    if with_unlabeled:
        y[:, :3] = UNLABELED
    T, w_ce, alpha = [1.0, 2.0, 4.0], [0.5, 0.0, 1.0], [0.5, 1.0, 0.25]
    p = torch.stack([torch.softmax(torch.randn(b, c, dtype=torch.float64) / t, 1) for t in T])
    h = (p * p.log()).sum(-1)
    hp = [torch.tensor(v, dtype=torch.float64) for v in (T, w_ce, alpha)]
    ce, kd = kd_ce_loss_soft(s, y, p, h, *hp, UNLABELED, all_labeled=not with_unlabeled)
    weights = torch.tensor([2.0, 3.0, 0.5], dtype=torch.float64)
    g, = torch.autograd.grad((weights * (ce + kd)).sum(), s)
    for i in range(n):
        si = s[i].detach().requires_grad_(True)
        ce_i, kd_i = kd_ce_loss_soft(si, y[i], p[i], h[i], T[i], w_ce[i], alpha[i], UNLABELED,
                                     all_labeled=not with_unlabeled)
        g_i, = torch.autograd.grad(weights[i] * (ce_i + kd_i), si)
        assert torch.allclose(ce[i], ce_i) and torch.allclose(kd[i], kd_i)
        assert torch.allclose(g[i], g_i, atol=1e-12)


def test_cache_flag_is_not_part_of_the_teacher_key(compose_cfg):
    from kdexp.data import load_dataset

    on, off = compose_cfg(*FAST), compose_cfg(*FAST, "teacher.cache=false")
    data = load_dataset(on.dataset)
    assert teacher_key(on.teacher, on.dataset, data) == teacher_key(off.teacher, off.dataset, data)


def test_methods_that_need_the_teacher_online_get_the_plain_teacher(compose_cfg):
    teacher, x = frozen_cnn()
    data = type("D", (), {"x_train": x, "view": "train"})()

    def handle(*overrides):
        return cached_teacher(teacher, plan(compose_cfg(*FAST, *overrides)).cache, data)

    assert isinstance(handle()[0], TeacherCache)
    got, info = handle("method=jacobian")  # it needs the teacher's input gradient
    assert got is teacher and "cacheable=False" in info["reason"]
    got, info = handle("teacher.cache=false")
    assert got is teacher and info == {"enabled": False, "reason": "teacher.cache=false"}


def test_a_derived_batch_runs_the_teacher_live():
    """Only the sampler names a batch's view: a Batch derived with dataclasses.replace (other inputs
    for the same samples) has none, so the cache never serves it the original inputs' outputs."""
    teacher, x = frozen_cnn()
    cache = TeacherCache(teacher).add_view("train", x)
    idx = torch.arange(16)
    sampled = batch(x, idx)
    flipped = replace(sampled, x=sampled.x.flip(-1))
    assert sampled.view == "train" and flipped.view is None
    live, served = cache.logits(flipped), cache.logits(sampled)
    with torch.no_grad():
        assert torch.equal(live, teacher.model(flipped.x)) and not torch.allclose(live, served)
    assert cache.online_calls == 1 and cache.hits == 1
    with pytest.raises(ValueError):  # the view is not a constructor argument: Batch(..., view=...) fails
        replace(sampled, view="train")


def get_kd():
    from kdexp.methods import get_method

    return get_method("kd")


def test_the_one_off_pass_is_teacher_time_not_epoch_time(compose_cfg):
    from kdexp.data import load_dataset

    class Slow(nn.Module):  # a teacher whose every forward takes 50 ms
        def __init__(self):
            super().__init__()
            self.inner = get_model("cnn", (1, 8, 8), 10)

        def forward(self, x):
            time.sleep(0.05)
            return self.inner(x)

    cfg = compose_cfg(*FAST)
    data = load_dataset(cfg.dataset)
    cache = TeacherCache(FrozenTeacher(Slow(), data.in_shape)).add_view("train", data.x_train)
    method = get_kd()(cfg.method, get_model("mlp", data.in_shape, 10), cache)
    history = fit_method(method, data, optim_cfg=cfg.optim, epochs=2, batch_size=256, seed=0)
    assert cache.fill_s >= 0.05 * (len(data.x_train) // 128)  # 12 chunks of 128: >= 0.6 s
    assert history[0]["time/epoch_s"] < cache.fill_s / 2  # epoch time without the teacher pass


def read(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("method", ["kd", pytest.param("fitnet", marks=pytest.mark.slow)])
def test_cached_and_online_runs_give_the_same_metrics(compose_cfg, tmp_path, method):
    extra = ["method.teacher_layers=[1]"] if method == "fitnet" else []  # the teacher's embedding (a vector)
    cached = run(compose_cfg("epochs=2", "teacher.epochs=2", "progress=false", f"method={method}", *extra),
                 str(tmp_path / "cached"))
    online = run(compose_cfg("epochs=2", "teacher.epochs=2", "progress=false", f"method={method}", *extra,
                             "teacher.cache=false"), str(tmp_path / "online"))
    a, b = read(tmp_path / "cached" / "metrics.json"), read(tmp_path / "online" / "metrics.json")
    assert a["teacher_cache"]["enabled"] and a["teacher_cache"]["hits"] > 0 and a["teacher_cache"]["online_calls"] == 0
    assert b["teacher_cache"] == {"enabled": False, "reason": "teacher.cache=false"}
    assert b["teacher"]["source"] == "cache" and a["teacher"]["key"] == b["teacher"]["key"]
    assert cached == online  # val/acc
    assert set(a["final"]) == set(b["final"])
    # The teacher's own forward differs in the last bits with the batch it runs in (here up to 6e-6 on
    # its features: chunks of 128 vs training batches of 64); FitNets' hint term (beta=100) amplifies
    # that over training steps, KD does not.
    rel = 1e-3 if method == "fitnet" else 1e-5
    for k, v in a["final"].items():
        assert v == pytest.approx(b["final"][k], rel=rel, abs=1e-5), k
