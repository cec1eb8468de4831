#!/usr/bin/env python
"""kdexp performance benchmark: ratios measured in ONE process, each against its target.

    python scripts/bench.py            # ~5 min on 2 CPU cores
    python scripts/bench.py --quick    # smaller workload, a smoke test of the script

Workload (notes/performance.md): the Keras demo pair, CNN teacher (conv 32-64-64) -> MLP
student (784-64 sigmoid-10), 28x28 inputs held in memory (`dataset=fake`: random tensors;
throughput does not depend on the values), batch 128, Adam, hardware=cpu.

  (a) kdexp KD epoch throughput / a minimal hand-written PyTorch KD loop doing the same work
      (slicing a permutation, CE + T^2 KL; teacher outputs computed once, as kdexp's default
      teacher cache does); also reported for the online teacher (teacher.cache=false)  >= 0.9
  (b) cached KD epoch time / `ce` epoch time (same student, data, batches)            <= 1.15
  (c) teacher trainings in an 8-run sweep (kd x T x alpha, fresh cache)                == 1
  (d) fused sweep of 8 students (hydra/sweeper=fused's trainer) / 8 separate runs,
      wall time, teacher already cached                                                <= 0.5
  (e) kdexp KD throughput / torchdistill 1.1 KD (DistillationBox, online teacher)
      on the same models and data                                                      >= 15
Epoch times are medians over epochs after the first (warm-up), runs interleaved; exits 1 if a
ratio misses its target.
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
from kdexp.models import get_model  # noqa: E402

log = logging.getLogger("bench")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small workload: checks that the script runs")
    p.add_argument("--samples", type=int, default=None, help="training samples (default 20000; quick 4000)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per timed run (default 4; quick 3)")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 2; quick 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--workdir", default=None, help="run directories and teacher cache (default: a temp dir)")
    return p.parse_args()


class Bench:
    def __init__(self, args):
        self.quick = args.quick
        self.n = args.samples or (4000 if args.quick else 20000)
        self.epochs = args.epochs or 3 if args.quick else args.epochs or 4
        self.reps = args.reps or (1 if args.quick else 2)
        self.work = args.workdir or tempfile.mkdtemp(prefix="kdexp-bench-")
        self.cache = os.path.join(self.work, "cache")
        self.counter = 0
        self.results = []

    # -- configs and runs ------------------------------------------------------------------------
    def cfg(self, *overrides, cache=None):
        base = ["dataset=fake", "dataset.shape=[1,28,28]", "dataset.num_classes=10", f"dataset.train_size={self.n}",
                "dataset.val_size=1000", "teacher=cnn", "student=mlp", "batch_size=128", "eval_batch_size=1000",
                "teacher.epochs=1", "teacher.batch_size=128", "hardware=cpu", "progress=false",
                f"epochs={self.epochs}", f"paths.cache_dir={cache or self.cache}", f"paths.data_dir={self.work}/data"]
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose("config", overrides=[*base, *overrides])

    def run_dir(self, name):
        self.counter += 1
        return os.path.join(self.work, "runs", f"{self.counter:03d}-{name}")

    def run(self, *overrides, cache=None):
        """One kdexp run through the entrypoint's run(); -> (metrics.json, run dir)."""
        d = self.run_dir("_".join(o.replace("/", "-") for o in overrides) or "default")
        kdexp.train.run(self.cfg(*overrides, cache=cache), d, overrides)
        with open(os.path.join(d, "metrics.json")) as f:
            return json.load(f), d

    @staticmethod
    def steady(history):
        """Median epoch time after the first epoch (warm-up)."""
        times = [h["time/epoch_s"] for h in history]
        return statistics.median(times[1:] if len(times) > 1 else times)

    def report(self, key, what, value, target, op, detail=""):
        ok = value >= target if op == ">=" else value <= target if op == "<=" else value == target
        self.results.append({"key": key, "what": what, "value": value, "target": f"{op} {target}", "pass": ok,
                             "detail": detail})
        fmt = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"({key}) {what}: {fmt}  target {op} {target}  {'PASS' if ok else 'FAIL'}" +
              (f"   [{detail}]" if detail else ""), flush=True)

    # -- hand-written reference loops ----------------------------------------------------------------
    def hand_models(self, data):
        torch.manual_seed(0)
        teacher = get_model("cnn", data.in_shape, 10, channels=[32, 64, 64]).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        student = get_model("mlp", data.in_shape, 10, hidden=64, activation="sigmoid")
        return teacher, student

    def hand_kd(self, data, teacher, student, cached: bool, epochs: int, T=4.0, alpha=0.9):
        """Minimal PyTorch KD loop: slices of a permutation, CE + alpha*T^2*KL, Adam. -> epoch times."""
        x, y, n, bs = data.x_train, data.y_train, len(data.x_train), 128
        opt = torch.optim.Adam(student.parameters(), lr=0.01)
        gen = torch.Generator().manual_seed(0)
        t_all = None
        if cached:
            with torch.no_grad():
                t_all = torch.cat([teacher(x[i:i + 128]) for i in range(0, n, 128)])
        times = []
        for _ in range(epochs):
            t0 = time.perf_counter()
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
            times.append(time.perf_counter() - t0)
        return times

    # -- the ratios ----------------------------------------------------------------------------------
    def a_b(self):
        data = load_dataset(self.cfg().dataset)
        teacher, student = self.hand_models(data)
        self.run("method=kd")  # trains and caches the teacher; warms everything up
        kd, ce, hand, kd_online, hand_online = [], [], [], [], []
        for _ in range(self.reps):
            kd.append(self.steady(self.run("method=kd")[0]["history"]))
            ce.append(self.steady(self.run("method=ce")[0]["history"]))
            hand.append(statistics.median(self.hand_kd(data, teacher, copy.deepcopy(student), True, self.epochs)[1:]))
        online_epochs = 2
        for _ in range(self.reps):
            m, _ = self.run("method=kd", "teacher.cache=false", f"epochs={online_epochs}")
            kd_online.append(self.steady(m["history"]))
            hand_online.append(statistics.median(self.hand_kd(data, teacher, copy.deepcopy(student), False,
                                                              online_epochs)[1:]))
        kd_s, ce_s, hand_s = statistics.median(kd), statistics.median(ce), statistics.median(hand)
        self.kd_s, self.kd_online_s = kd_s, statistics.median(kd_online)
        self.report("a", "kdexp KD epoch throughput / hand-written KD loop (cached teacher outputs)", hand_s / kd_s,
                    0.9, ">=", f"kdexp {self.n / kd_s:,.0f} samples/s, hand-written {self.n / hand_s:,.0f} samples/s")
        ho = statistics.median(hand_online)
        self.report("a'", "kdexp KD epoch throughput / hand-written KD loop (online teacher, teacher.cache=false)",
                    ho / self.kd_online_s, 0.9, ">=",
                    f"kdexp {self.n / self.kd_online_s:,.0f} samples/s, hand-written {self.n / ho:,.0f} samples/s")
        self.report("b", "cached KD epoch time / ce epoch time", kd_s / ce_s, 1.15, "<=",
                    f"kd {kd_s * 1000:.0f} ms, ce {ce_s * 1000:.0f} ms per epoch of {self.n} samples")

    def sweep_configs(self):
        return [("method=kd", f"method.temperature={t}", f"method.alpha={a}") for t in (1, 2, 4, 8) for a in (0.5, 0.9)]

    def c_d(self):
        from kdexp.engine import fused

        fresh = os.path.join(self.work, "cache-sweep")
        epochs = f"epochs={max(2, self.epochs - 1)}"
        sources = [self.run(*o, epochs, cache=fresh)[0]["teacher"]["source"] for o in self.sweep_configs()]
        self.report("c", "teacher trainings in an 8-run sweep", sources.count("trained"), 1, "==",
                    f"sources: {sources.count('trained')} trained, {sources.count('cache')} from the cache")
        separate, fused_s = [], []
        for _ in range(self.reps):
            t0 = time.perf_counter()
            for o in self.sweep_configs():
                self.run(*o, epochs, cache=fresh)
            separate.append(time.perf_counter() - t0)
            jobs = [fused.Job(self.cfg(*o, epochs, cache=fresh), self.run_dir("fused"), o, i)
                    for i, o in enumerate(self.sweep_configs())]
            t0 = time.perf_counter()
            values = fused.train_group(jobs)
            fused_s.append(time.perf_counter() - t0)
            assert all(not math.isnan(v) for v in values), values
        sep, fus = statistics.median(separate), statistics.median(fused_s)
        self.report("d", "fused sweep of 8 students / 8 separate runs (wall time)", fus / sep, 0.5, "<=",
                    f"fused {fus:.1f} s, separate {sep:.1f} s ({epochs}, teacher cached)")

    def e(self):
        try:
            import torchdistill  # noqa: F401
        except ImportError:
            print("(e) torchdistill side by side: SKIPPED - torchdistill is not installed "
                  "(pip install 'kdexp[bench]' installs it)", flush=True)
            return
        from tdbox import torchdistill_kd_epochs

        data = load_dataset(self.cfg().dataset)
        teacher, student = self.hand_models(data)
        times = []
        for _ in range(self.reps):
            times += torchdistill_kd_epochs(data, teacher, copy.deepcopy(student), epochs=2)[1:]
        td = statistics.median(times)
        self.report("e", "kdexp KD throughput / torchdistill KD throughput", td / self.kd_s, 15.0, ">=",
                    f"kdexp {self.n / self.kd_s:,.0f} samples/s (cached teacher), torchdistill {self.n / td:,.0f} "
                    f"samples/s (online teacher); kdexp with teacher.cache=false: {td / self.kd_online_s:.2f}x")


def main():
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    b = Bench(args)
    print(f"kdexp bench: {b.n} samples 1x28x28, CNN teacher -> MLP student, batch 128, {b.epochs} epochs per run, "
          f"{b.reps} rep(s), torch {torch.__version__}, {torch.get_num_threads()} threads, workdir {b.work}", flush=True)
    t0 = time.perf_counter()
    b.a_b()
    b.c_d()
    b.e()
    failed = [r["key"] for r in b.results if not r["pass"]]
    print(f"{len(b.results) - len(failed)}/{len(b.results)} ratios meet their targets"
          + (f"; missed: {', '.join(failed)}" if failed else "") + f" ({time.perf_counter() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"samples": b.n, "epochs": b.epochs, "reps": b.reps, "results": b.results}, f, indent=2)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
