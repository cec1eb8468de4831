#!/usr/bin/env python
"""kdexp performance benchmark: ratios measured in ONE process, each against its target.

    python scripts/bench.py            # a few minutes on 2 CPU cores
    python scripts/bench.py --quick    # smaller workload: a smoke test of the script

Workload (notes/performance.md): the Keras demo pair, CNN teacher (conv 32-64-64) -> MLP
student (784-64 sigmoid-10), 28x28 inputs held in memory (`dataset=fake`: random tensors;
throughput does not depend on the values), batch 128, Adam, hardware=cpu, 1 torch thread.

  (a) kdexp KD epoch throughput / a minimal hand-written PyTorch KD loop doing the same work
      (slices of a permutation, (1-alpha) CE + alpha T^2 KL with F.kl_div, Adam; the teacher's
      logits computed once, as kdexp's default teacher cache does)                      >= 0.9
  (a') the same with the teacher online in both (teacher.cache=false)                   >= 0.9
  (b) cached KD epoch time / `ce` epoch time (same student, data, batch size)          <= 1.15
  (c) teacher trainings in an 8-run sweep (kd x 4 T x 2 alpha, empty teacher cache)     == 1
  (d) fused sweep of the same 8 runs (the trainer of hydra/sweeper=fused) / the 8 runs
      one after the other (whole runs: data, teacher from the cache, training, eval,
      logging, checkpoints)                                                             <= 0.15
  (d') the same for 8 dkd runs (its own terms under vmap, kdexp.engine.fused)            <= 0.5
  (e) kdexp KD throughput / torchdistill 1.1 KD (DistillationBox, teacher online, its KDLoss)
      on the same models, data, batch size and optimizer                                >= 15
  (e') the same against torchdistill with its own teacher-output cache (CacheableDataset: one
      file per sample, written in the first epoch and loaded by the loader after)        >= 2
  (f) streamed CE epoch / in-memory CE epoch on the same data (dataset.in_memory=false, the
      DataLoader's workers reading every sample: the loader's overhead)                 reported
  (g) streamed KD epoch, teacher logits from the on-disk cache / streamed CE epoch     <= 1.15
      (the teacher's one-off pass that fills the cache is reported apart); (g') the same with
      every batch gathered from the memory map (a view above teacher.cache_max_gb)       <= 1.15
  (f) and (g) are wall-clock ratios whatever --clock says: the workers' CPU time is not this
  process's.
  (h) `--device cuda`: instead of (a)-(g), the CIFAR-100 pair resnet32x4 -> resnet8x4 with
      hardware=cuda (bf16 AMP, channels_last) on CIFAR-100-shaped data: cached KD epoch / CE epoch
      and images/s (whole runs, wall clock); a fused sweep does not apply to this BatchNorm pair.
      `--pair cifar100` runs it on the CPU (a check of its code path).                    reported

Method: everything in this process after a warm-up. (a) and (b) alternate single epochs of
kdexp's fit loop (the code `kdexp.train.run` times as time/epoch_s) for kd, ce and the
hand-written loop, `--rounds` times, in alternating order; each ratio is the median of the
per-round ratios. Timings are this process's CPU time by default (`--clock cpu`; stable when
other jobs share the cores; `--clock wall` for elapsed time). Exits 1 if a ratio misses its target.
"""
import argparse
import copy
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

import kdexp.train  # noqa: E402,F401  (registers the configs)
from kdexp import config_dir  # noqa: E402
from kdexp.data import load_dataset  # noqa: E402
from kdexp.engine.fit import fit  # noqa: E402
from kdexp.engine.plan import plan  # noqa: E402
from kdexp.engine.source import source_for  # noqa: E402
from kdexp.engine.steppers import MethodStepper  # noqa: E402
from kdexp.engine.teacher import provide_teacher  # noqa: E402
from kdexp.engine.teacher_cache import cached_teacher  # noqa: E402
from kdexp.models import get_model  # noqa: E402
from kdexp.seeding import derive_seed  # noqa: E402

log = logging.getLogger("bench")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small workload: checks that the script runs")
    p.add_argument("--samples", type=int, default=None, help="training samples (default 10000; quick 3000)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per timed run (default 4; quick 3)")
    p.add_argument("--reps", type=int, default=1, help="repetitions of (d), the whole-sweep comparison (default 1)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved epochs per variant in (a), (b) (default 20; quick 4)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: stable timings on a shared machine; 0: torch's default)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="cpu (default): this process's CPU time, robust when other jobs share the cores; wall: elapsed")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the streamed runs in (f), (g)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: (h), the CIFAR-100 pair with hardware=cuda (bf16 AMP, channels_last), instead of (a)-(g)")
    p.add_argument("--pair", choices=("demo", "cifar100"), default=None,
                   help="demo: (a)-(g) on the Keras demo pair (default on cpu); cifar100: (h) on resnet32x4 -> resnet8x4 "
                        "(default on cuda; on cpu it checks (h)'s code path, slowly)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--workdir", default=None, help="run directories and teacher cache (default: a temp dir)")
    return p.parse_args()


def torchdistill_cache():
    """torchdistill's teacher-output cache (its CacheableDataset), or None: 1.1.5 removed it."""
    import torchvision.datasets  # noqa: F401  (torchdistill's dataset registry reads it at import)
    try:
        from torchdistill.datasets.wrapper import CacheableDataset
    except ImportError:
        return None
    return CacheableDataset


def torchdistill_kd_epochs(data, teacher, student, epochs: int, clock, T: float = 4.0, alpha: float = 0.9,
                           cache_dir=None):
    """torchdistill 1.1's DistillationBox with its KDLoss, the loop of its examples: the teacher online,
    or (`cache_dir`) its own teacher-output cache, the dataset wrapped in its CacheableDataset (the first
    epoch writes every sample's teacher output to <cache_dir>/<index>.pt, the later ones load them in
    the loader instead of running the teacher).
    Pitfalls handled (notes/performance.md): KDLoss's alpha weights CE, so alpha=1-alpha_kd gives
    kdexp's w_ce * CE + alpha * T^2 * KL; its loader yields (x, y, supp) triples; the box never
    calls teacher.eval(); it edits its config in place (deep copy); forward_proc must be set."""
    from torch.utils.data import RandomSampler, TensorDataset
    from torchdistill.core.distillation import DistillationBox

    dataset = TensorDataset(data.x_train, data.y_train)
    if cache_dir is not None:  # a wrapper that already yields (x, y, supp): no second one
        dataset = torchdistill_cache()(dataset, cache_dir)
    config = {
        "num_epochs": epochs,
        "train_data_loader": {"dataset_id": "train", "requires_supp": cache_dir is None,
                              "sampler": {"class_or_func": RandomSampler,
                                          "kwargs": {"generator": torch.Generator().manual_seed(0)}},
                              "kwargs": {"batch_size": 128, "num_workers": 0}},
        "teacher": {"forward_proc": "forward_batch_only", "sequential": [], "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only", "sequential": [], "requires_grad": True},
        "optimizer": {"key": "Adam", "kwargs": {"lr": 0.01}},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {"weight": 1.0, "criterion": {
            "key": "KDLoss", "kwargs": {"student_module_path": ".", "student_module_io": "output",
                                        "teacher_module_path": ".", "teacher_module_io": "output",
                                        "temperature": T, "alpha": 1.0 - alpha, "reduction": "batchmean"}}}}}},
    }
    box = DistillationBox(teacher, student, {"train": dataset},
                          copy.deepcopy(config), torch.device("cpu"), None, False, 1)
    box.teacher_model.eval()
    times = []
    for epoch in range(epochs):
        t0 = clock()
        box.pre_epoch_process(epoch=epoch)
        for x, y, supp in box.train_data_loader:
            loss = box.forward_process(x, y, supp)
            box.post_forward_process(loss=loss)
        times.append(clock() - t0)
    return times


class Bench:
    def __init__(self, args):
        self.quick = args.quick
        self.n = args.samples or (3000 if args.quick else 10000)
        self.epochs = args.epochs or (3 if args.quick else 4)
        self.reps = args.reps
        self.rounds = args.rounds or (4 if args.quick else 20)  # interleaved epochs of (a) and (b)
        self.stream_rounds = max(2, self.rounds // 2)  # interleaved epochs of (f) and (g)
        self.workers = args.workers
        self.work = args.workdir or tempfile.mkdtemp(prefix="kdexp-bench-")
        self.cache = os.path.join(self.work, "cache")
        self.cpu = args.clock == "cpu"
        self.clock = time.process_time if self.cpu else time.perf_counter
        self.epoch_key = "time/epoch_cpu_s" if self.cpu else "time/epoch_s"
        self.counter = 0
        self.results = []

    # -- configs and runs ------------------------------------------------------------------------
    def cfg(self, *overrides, cache=None, base=None):
        """The composed config of a bench run: `base` (default: the demo pair's workload) + `overrides`."""
        base = base if base is not None else ["dataset=fake", "dataset.shape=[1,28,28]", "dataset.num_classes=10", f"dataset.train_size={self.n}",
                "dataset.val_size=1000", "teacher=cnn", "student=mlp", "batch_size=128", "eval_batch_size=1000",
                "teacher.epochs=1", "teacher.batch_size=128", "hardware=cpu", f"hardware.threads={torch.get_num_threads()}",
                "progress=false", f"epochs={self.epochs}", f"paths.cache_dir={cache or self.cache}",
                f"paths.data_dir={self.work}/data"]
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose("config", overrides=[*base, *overrides])

    def run_dir(self, name):
        self.counter += 1
        return os.path.join(self.work, "runs", f"{self.counter:03d}-{name}")

    def run(self, *overrides, cache=None, base=None, cfg=None):
        """One kdexp run through the entrypoint's run() (of `cfg`, composed from `overrides` unless
        given); -> metrics.json."""
        d = self.run_dir("_".join(o.replace("/", "-") for o in overrides) or "default")
        kdexp.train.run(cfg if cfg is not None else self.cfg(*overrides, cache=cache, base=base), d, overrides)
        with open(os.path.join(d, "metrics.json")) as f:
            return json.load(f)

    def steady(self, history):
        """Median epoch time after the first epoch (warm-up)."""
        times = [h[self.epoch_key] for h in history]
        return statistics.median(times[1:] if len(times) > 1 else times)

    def report(self, key, what, value, target, op, detail=""):
        """One ratio against its target; op "reported": a figure without a target (always passes)."""
        ok = op == "reported" or (value >= target if op == ">=" else value <= target if op == "<=" else value == target)
        target_text = "reported, no target" if op == "reported" else f"{op} {target}"
        self.results.append({"key": key, "what": what, "value": value, "target": target_text, "pass": ok,
                             "detail": detail})
        fmt = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"({key}) {what}: {fmt}  target {target_text}  {'' if op == 'reported' else 'PASS' if ok else 'FAIL'}" +
              (f"\n      {detail}" if detail else ""), flush=True)

    # -- hand-written reference loop -----------------------------------------------------------------
    def hand_models(self, data):
        """The same architectures as the kdexp runs (kdexp's model builders), a frozen teacher."""
        torch.manual_seed(0)
        teacher = get_model("cnn", data.in_shape, 10, channels=[32, 64, 64]).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        student = get_model("mlp", data.in_shape, 10, hidden=64, activation="sigmoid")
        return teacher, student

    def hand_kd(self, data, teacher, student, cached: bool, epochs: int, T=4.0, alpha=0.9):
        """Minimal PyTorch KD loop: slices of a permutation, (1-alpha)*CE + alpha*T^2*KL (F.kl_div),
        Adam; the teacher's logits computed once (cached) or every step. -> epoch times."""
        x, y, n, bs = data.x_train, data.y_train, len(data.x_train), 128
        opt = torch.optim.Adam(student.parameters(), lr=0.01)
        gen = torch.Generator().manual_seed(0)
        t_all = None
        if cached:
            with torch.no_grad():
                t_all = torch.cat([teacher(x[i:i + 128]) for i in range(0, n, 128)])
        times = []
        for _ in range(epochs):
            t0 = self.clock()
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, bs):
                idx = perm[i:i + bs]
                xb, yb = x[idx], y[idx]
                if cached:
                    t = t_all[idx]
                else:
                    with torch.no_grad():
                        t = teacher(xb)
                s = student(xb)
                kl = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="batchmean", log_target=True)
                loss = (1 - alpha) * F.cross_entropy(s, yb) + alpha * T * T * kl
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            times.append(self.clock() - t0)
        return times

    # -- the ratios ----------------------------------------------------------------------------------
    def build(self, cfg, teacher, data=None, key=None):
        """The method as a run assembles it (student init seed, teacher-output cache per the plan;
        `key`: the teacher's, for its outputs on disk)."""
        data = data or self.data
        p = plan(cfg)
        torch.manual_seed(derive_seed(cfg.seed, "student/init"))
        student = get_model(cfg.student.arch, data.in_shape, data.num_classes, **cfg.student.args)
        t = cached_teacher(teacher, p.cache, data, key, self.cache)[0] if p.requires.uses_teacher else None
        return p.method_cls(cfg.method, student, t)

    def kdexp_epoch(self, method, cfg, seed, data=None, source=None, key=None):
        """One epoch of kdexp's fit loop -> its epoch time (time/epoch_cpu_s or time/epoch_s; `key`
        overrides). `source`: one kept across epochs (a streaming source keeps its workers)."""
        data = data or self.data
        source = source or source_for(data, batch_size=cfg.batch_size, seed=seed)
        return fit(MethodStepper(method, data), source, optim_cfg=cfg.optim, epochs=1)[0][key or self.epoch_key]

    def a_b(self):
        cfg_kd, cfg_ce = self.cfg("method=kd"), self.cfg("method=ce")
        cfg_online = self.cfg("method=kd", "teacher.cache=false")
        self.data = load_dataset(cfg_kd.dataset)
        teacher, _ = provide_teacher(plan(cfg_kd), self.data)  # trained once (teacher.epochs=1) and cached
        kd, ce = self.build(cfg_kd, teacher), self.build(cfg_ce, teacher)
        _, student = self.hand_models(self.data)
        t_hand = teacher.model
        rounds = self.rounds
        times = {"kd": [], "ce": [], "hand": []}
        variants = [("kd", lambda r: self.kdexp_epoch(kd, cfg_kd, r)), ("ce", lambda r: self.kdexp_epoch(ce, cfg_ce, r)),
                    ("hand", lambda r: self.hand_kd(self.data, t_hand, student, True, 1)[0])]
        for r in range(rounds + 1):  # round 0: warm-up (and the teacher cache's one-off pass)
            for name, epoch in (variants if r % 2 else variants[::-1]):  # alternate the order
                times[name].append(epoch(r))
        med = {k: statistics.median(v[1:]) for k, v in times.items()}
        self.kd_s = med["kd"]

        def paired(num, den):  # per-round ratios: each from epochs measured side by side
            ratios = sorted(x / y for x, y in zip(times[num][1:], times[den][1:]))
            q = len(ratios) // 4
            return statistics.median(ratios), f"quartiles {ratios[q]:.3f}-{ratios[-1 - q]:.3f} over {len(ratios)} rounds"

        value, spread = paired("hand", "kd")
        self.report("a", "kdexp KD epoch throughput / hand-written KD loop (teacher outputs cached, kdexp's default)",
                    value, 0.9, ">=", f"{spread}; kdexp {self.n / med['kd']:,.0f} samples/s, hand-written "
                    f"{self.n / med['hand']:,.0f} samples/s (medians)")
        value, spread = paired("kd", "ce")
        self.report("b", "cached KD epoch time / ce epoch time (same student, data, batch size)", value, 1.15, "<=",
                    f"{spread}; kd {med['kd'] * 1000:.0f} ms, ce {med['ce'] * 1000:.0f} ms per epoch of {self.n} samples")
        online = self.build(cfg_online, teacher)
        times["kd_online"], times["hand_online"] = [], []
        variants = [("kd_online", lambda r: self.kdexp_epoch(online, cfg_online, r)),
                    ("hand_online", lambda r: self.hand_kd(self.data, t_hand, student, False, 1)[0])]
        online_rounds = max(2, self.rounds // 4)  # online epochs are ~30x longer
        for r in range(online_rounds + 1):
            for name, epoch in (variants if r % 2 else variants[::-1]):
                times[name].append(epoch(r))
        self.kd_online_s = statistics.median(times["kd_online"][1:])
        hand_on_s = statistics.median(times["hand_online"][1:])
        value, spread = paired("hand_online", "kd_online")
        self.report("a'", "kdexp KD epoch throughput / hand-written KD loop, both with the teacher online "
                    "(teacher.cache=false)", value, 0.9, ">=",
                    f"{spread}; kdexp "
                    f"{self.n / self.kd_online_s:,.0f} samples/s, hand-written {self.n / hand_on_s:,.0f} samples/s; "
                    f"the cache makes kdexp KD {self.kd_online_s / self.kd_s:.1f}x faster")

    def sweep_configs(self, method="kd"):
        return [(f"method={method}", f"method.temperature={t}", f"method.alpha={a}") for t in (1, 2, 4, 8)
                for a in (0.5, 0.9)]

    def c_d(self):
        fresh = os.path.join(self.work, "cache-sweep")
        epochs = f"epochs={self.epochs}"
        sources = [self.run(*o, epochs, cache=fresh)["teacher"]["source"] for o in self.sweep_configs()]
        self.report("c", "teacher trainings in an 8-run sweep (kd x 4 temperatures x 2 alphas, empty teacher cache)",
                    sources.count("trained"), 1, "==",
                    f"teacher source per run: {sources.count('trained')} trained, {sources.count('cache')} cache")
        self.fused_vs_separate("d", "kd", 0.15, fresh)
        self.fused_vs_separate("d'", "dkd", 0.5, fresh)

    def fused_vs_separate(self, key, method, target, cache):
        """A fused sweep of 8 `method` runs (4 T x 2 alpha) / the same 8 runs one after the other."""
        from kdexp.engine import fused

        epochs = f"epochs={self.epochs}"
        ratios, walls = [], []
        for _ in range(self.reps):
            # both sides' configs composed before their clocks start (Hydra composes each job's
            # config in either sweep)
            cfgs = [(o, self.cfg(*o, epochs, cache=cache)) for o in self.sweep_configs(method)]
            w0, t0 = time.perf_counter(), self.clock()
            for o, cfg in cfgs:
                self.run(*o, cfg=cfg)
            sep, sep_wall = self.clock() - t0, time.perf_counter() - w0
            jobs = [fused.Job(self.cfg(*o, epochs, cache=cache), self.run_dir("fused"), o, i)
                    for i, o in enumerate(self.sweep_configs(method))]
            w0, t0 = time.perf_counter(), self.clock()
            values = fused.train_group(jobs)
            fus, fus_wall = self.clock() - t0, time.perf_counter() - w0
            if any(math.isnan(v) for v in values):
                raise RuntimeError(f"a fused run failed: {values}")
            ratios.append(fus / sep)
            walls.append((fus_wall, sep_wall))
        self.report(key, f"fused sweep of 8 {method} students / 8 separate runs (whole runs, teacher cached)",
                    statistics.median(ratios), target, "<=",
                    f"per rep: {', '.join(f'{v:.3f}' for v in ratios)}; wall clock: " +
                    ", ".join(f"fused {f:.1f} s vs separate {s:.1f} s" for f, s in walls) + f"; {epochs} each")

    def e(self):
        try:
            import torchdistill  # noqa: F401
        except ImportError:
            print("(e) torchdistill side by side: SKIPPED - torchdistill is not installed "
                  "(pip install -e '.[bench]' installs it)", flush=True)
            return
        logging.getLogger("torchdistill").setLevel(logging.WARNING)
        teacher, student = self.hand_models(self.data)
        td = torchdistill_kd_epochs(self.data, teacher, copy.deepcopy(student), 2, self.clock)[-1]
        self.report("e", "kdexp KD throughput / torchdistill KD throughput (same models, data, batch, optimizer)",
                    td / self.kd_s, 15.0, ">=",
                    f"kdexp {self.n / self.kd_s:,.0f} samples/s (teacher cache on, the default), torchdistill "
                    f"{self.n / td:,.0f} samples/s (DistillationBox, teacher online); with teacher.cache=false kdexp "
                    f"is {td / self.kd_online_s:.2f}x torchdistill")
        if torchdistill_cache() is None:
            print(f"(e') torchdistill with its teacher-output cache: SKIPPED - torchdistill {torchdistill.__version__} "
                  f"has no CacheableDataset (1.1.5 removed it; pip install -e '.[bench]' installs 1.1.4)", flush=True)
            return
        cache_dir = os.path.join(self.work, "torchdistill-cache")
        times = torchdistill_kd_epochs(self.data, teacher, copy.deepcopy(student), 3, self.clock, cache_dir=cache_dir)
        cached = statistics.median(times[1:])  # epoch 1 runs the teacher and writes the cache
        self.report("e'", "kdexp KD throughput / torchdistill KD throughput with torchdistill's own teacher-output "
                    "cache (CacheableDataset)", cached / self.kd_s, 2.0, ">=",
                    f"kdexp {self.n / self.kd_s:,.0f} samples/s, torchdistill {self.n / cached:,.0f} samples/s from "
                    f"its cache (epochs 2-3; its filling epoch took {times[0]:.1f} s: {len(os.listdir(cache_dir))} "
                    f"files of one sample's outputs each)")


    def f_g(self):
        """Streamed data: the loader's overhead (f) and KD from the on-disk cache vs CE, both streamed (g)."""
        over = ["dataset.in_memory=false", f"dataset.workers={self.workers}"]
        cfg_mem, cfg_ce, cfg_kd = self.cfg("method=ce"), self.cfg("method=ce", *over), self.cfg("method=kd", *over)
        cfg_map = self.cfg("method=kd", *over, "teacher.cache_max_gb=1e-9")  # above the budget: batches from the memory map
        mem, lazy = load_dataset(cfg_mem.dataset), load_dataset(cfg_ce.dataset)
        teacher, info = provide_teacher(plan(cfg_kd), lazy)
        variants = {"ce_mem": (self.build(cfg_mem, teacher, mem), cfg_mem, mem),
                    "ce_stream": (self.build(cfg_ce, teacher, lazy), cfg_ce, lazy),
                    "kd_stream": (self.build(cfg_kd, teacher, lazy, info["key"]), cfg_kd, lazy),
                    "kd_mapped": (self.build(cfg_map, teacher, lazy, info["key"]), cfg_map, lazy)}
        sources = {k: source_for(d, batch_size=c.batch_size, seed=1) for k, (_, c, d) in variants.items()}
        times = {k: [] for k in variants}
        order = list(variants)
        for r in range(self.stream_rounds + 1):  # round 0: warm-up, the workers' start, the cache's one-off pass
            for name in (order if r % 2 else order[::-1]):
                method, cfg, data = variants[name]
                times[name].append(self.kdexp_epoch(method, cfg, r, data, sources[name], key="time/epoch_s"))
        med = {k: statistics.median(v[1:]) for k, v in times.items()}

        def paired(num, den):
            ratios = sorted(x / y for x, y in zip(times[num][1:], times[den][1:]))
            q = len(ratios) // 4
            return statistics.median(ratios), f"quartiles {ratios[q]:.3f}-{ratios[-1 - q]:.3f} over {len(ratios)} rounds"

        value, spread = paired("ce_stream", "ce_mem")
        self.report("f", f"streamed CE epoch / in-memory CE epoch (same data, {self.workers} DataLoader workers, wall "
                    "clock)", value, None, "reported", f"{spread}; in memory {self.n / med['ce_mem']:,.0f} samples/s, "
                    f"streamed {self.n / med['ce_stream']:,.0f} samples/s")
        summaries = [variants[k][0].teacher.summary() for k in ("kd_stream", "kd_mapped")]
        summary = max(summaries, key=lambda m: m["disk"]["computed"])  # the one that computed the store; the other opened it
        value, spread = paired("kd_stream", "ce_stream")
        self.report("g", "streamed KD epoch, teacher logits read from the on-disk cache / streamed CE epoch (wall "
                    "clock)", value, 1.15, "<=", f"{spread}; kd {med['kd_stream'] * 1000:.0f} ms, ce "
                    f"{med['ce_stream'] * 1000:.0f} ms per epoch of {self.n} samples; the teacher's one-off pass "
                    f"(reported apart, not in the epochs): {summary['fill_s']:.2f} s, "
                    f"{summary['disk']['views']['train']['MB']:.1f} MB on disk; (g) reads it whole into memory "
                    f"(within teacher.cache_max_gb)")
        value, spread = paired("kd_mapped", "ce_stream")
        self.report("g'", "the same, every batch's logits gathered from the memory map (views above "
                    "teacher.cache_max_gb, e.g. ImageNet's)", value, 1.15, "<=",
                    f"{spread}; kd {med['kd_mapped'] * 1000:.0f} ms per epoch")


    def h(self, device: str):
        """(h) The CIFAR-100 pair (resnet32x4 -> resnet8x4, experiment=cifar100_resnet32x4_resnet8x4's
        recipe on CIFAR-100-shaped fake data, unaugmented so that the teacher's outputs are cached) as
        users run it on `device` (cuda: hardware=cuda, bf16 AMP, channels_last): whole runs, alternating
        kd and ce, each run's median epoch after its first; images/s of cached KD, CE and online KD. A fused
        sweep does not apply (the plan's reason is printed): resnet8x4 has BatchNorm, and fused
        students train in float32."""
        hardware = (["hardware=cuda", "hardware.amp=bf16", "hardware.channels_last=true"] if device == "cuda" else
                    ["hardware=cpu", f"hardware.threads={torch.get_num_threads()}"])
        n = self.n
        base = ["experiment=cifar100_resnet32x4_resnet8x4", "dataset=fake", "dataset.shape=[3,32,32]",
                "dataset.num_classes=100", f"dataset.train_size={n}", "dataset.val_size=1000", "dataset.augment=none",
                "teacher.epochs=1", "eval_batch_size=1000", "progress=false", f"epochs={self.epochs}",
                f"paths.cache_dir={self.cache}", f"paths.data_dir={self.work}/data", *hardware]
        key = "time/epoch_s"  # wall clock: a GPU's work is not this process's CPU time
        epochs = {"kd": [], "ce": [], "kd_online": []}
        for r in range(2):
            for name in (("kd", "ce") if r % 2 else ("ce", "kd")):
                history = self.run(f"method={name}", base=base)["history"]
                epochs[name].append(statistics.median(h[key] for h in history[1:] or history))
        history = self.run("method=kd", "teacher.cache=false", base=base)["history"]
        epochs["kd_online"].append(statistics.median(h[key] for h in history[1:] or history))
        med = {k: statistics.median(v) for k, v in epochs.items()}
        where = "cuda, bf16 AMP, channels_last" if device == "cuda" else "cpu"
        self.report("h", f"CIFAR-100 pair resnet32x4 -> resnet8x4 on {where}: cached KD epoch / CE epoch (whole runs, "
                    "median epoch)", med["kd"] / med["ce"], None, "reported",
                    f"images/s: KD cached {n / med['kd']:,.0f}, CE {n / med['ce']:,.0f}, KD online "
                    f"{n / med['kd_online']:,.0f}; {n} training images, batch 64, {self.epochs} epochs a run")
        reason = plan(self.cfg("method=kd", base=base)).fuse_reason
        print(f"(h) fused 8 / 8 runs: not applicable to this pair: {reason}", flush=True)


def main():
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    b = Bench(args)
    pair = args.pair or ("cifar100" if args.device == "cuda" else "demo")
    workload = ("3x32x32, resnet32x4 -> resnet8x4, batch 64" if pair == "cifar100" else
                "1x28x28, CNN teacher -> MLP student, batch 128")
    timing = ("2 rounds of whole runs, wall time" if pair == "cifar100" else
              f"{b.rounds} rounds, {'CPU time' if b.cpu else 'wall time'}")
    print(f"kdexp bench: {b.n} samples {workload}, {b.epochs} epochs per run, {timing}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), workdir {b.work}", flush=True)
    t0 = time.perf_counter()
    if pair == "cifar100":
        b.h(args.device)
    else:
        b.a_b()
        b.c_d()
        b.e()
        b.f_g()
    failed = [r["key"] for r in b.results if not r["pass"]]
    print(f"{len(b.results) - len(failed)}/{len(b.results)} ratios meet their targets"
          + (f"; missed: {', '.join(failed)}" if failed else "") + f" ({time.perf_counter() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"samples": b.n, "epochs": b.epochs, "rounds": b.rounds, "results": b.results}, f, indent=2)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
