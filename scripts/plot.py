#!/usr/bin/env python
"""Draw a sweep as PNGs.

    python scripts/plot.py outputs/multirun/2026-11-29_10-00-00 [--out DIR] [--metric val/acc]

Writes, where the sweep has the data for them:
  acc_vs_temperature.png   final metric vs method.temperature, one line per method (mean +- std over seeds)
  alpha_temperature.png    heatmap of the metric over method.alpha x method.temperature, one panel per method
  learning_curves.png      val/acc and train/loss per epoch, read from each run's TensorBoard events
  source_target.png        val/acc_source vs val/acc_target per run (domain-shift runs)
"""
import argparse
import json
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


IGNORES_T = {"ce"}  # baselines that do not use temperature/alpha: a flat dashed reference line


def load_runs(root: Path):
    runs = []
    for path in sorted(root.rglob("metrics.json")):
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if m.get("status") != "done":
            continue
        hp = m.get("hparams", {})
        runs.append({"dir": path.parent, "name": str(path.parent.relative_to(root)), "method": hp.get("method.name"),
                     "temperature": hp.get("method.temperature"), "alpha": hp.get("method.alpha"),
                     "seed": hp.get("seed"), "final": m.get("final", {})})
    return runs


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def plot_acc_vs_temperature(runs, metric, out: Path):
    """One line per method (per method and alpha when alpha varies); seeds are averaged."""
    alphas = {r["alpha"] for r in runs if r["method"] != "ce"}
    by = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r["temperature"] is not None and metric in r["final"]:
            label = r["method"] if len(alphas) < 2 or r["method"] in IGNORES_T else f"{r['method']} alpha={r['alpha']:g}"
            by[label][r["temperature"]].append(r["final"][metric])
    temps = sorted({t for ts in by.values() for t in ts})
    if len(temps) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, ts in sorted(by.items()):
        xs = sorted(ts)
        stats = [mean_std(ts[x]) for x in xs]
        ax.errorbar(xs, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3, label=label,
                    linestyle="--" if label in IGNORES_T else "-")
    ax.set_xscale("log")
    ax.set_xticks(temps, [f"{t:g}" for t in temps])
    ax.minorticks_off()
    ax.set_xlabel("method.temperature")
    ax.set_ylabel(f"final {metric}")
    ax.set_title(f"{metric} vs temperature per method (mean ± std over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out / "acc_vs_temperature.png")


def plot_alpha_temperature(runs, metric, out: Path):
    by = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r["method"] not in IGNORES_T and r["temperature"] is not None and r["alpha"] is not None \
                and metric in r["final"]:
            by[r["method"]][(r["alpha"], r["temperature"])].append(r["final"][metric])
    by = {m: cells for m, cells in by.items()
          if len({a for a, _ in cells}) > 1 and len({t for _, t in cells}) > 1}
    if not by:
        return None
    fig, axes = plt.subplots(1, len(by), figsize=(4.5 * len(by), 4), squeeze=False)
    for ax, (method, cells) in zip(axes[0], sorted(by.items())):
        alphas, temps = sorted({a for a, _ in cells}), sorted({t for _, t in cells})
        grid = [[statistics.mean(cells[(a, t)]) if (a, t) in cells else float("nan") for t in temps] for a in alphas]
        im = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_xticks(range(len(temps)), [f"{t:g}" for t in temps])
        ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_xlabel("method.temperature")
        ax.set_ylabel("method.alpha")
        ax.set_title(f"{method}: final {metric}")
        fig.colorbar(im, ax=ax)
    return _save(fig, out / "alpha_temperature.png")


def read_scalars(tb_dir: Path, tags):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    ea.Reload()
    have = set(ea.Tags().get("scalars", []))
    out = {}
    for tag in tags:
        if tag in have:
            by_step = {e.step: e.value for e in ea.Scalars(tag)}  # last value wins for a repeated step
            out[tag] = sorted(by_step.items())
    return out


def plot_learning_curves(runs, out: Path):
    tags = ("val/acc", "train/loss")
    curves = [(r["name"], read_scalars(r["dir"] / "tb", tags)) for r in runs if (r["dir"] / "tb").is_dir()]
    curves = [(n, c) for n, c in curves if c]
    if not curves:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, c in curves:
        for ax, tag in zip(axes, tags):
            pts = [(s, v) for s, v in c.get(tag, []) if s > 0]
            if pts:
                ax.plot(*zip(*pts), label=name if len(curves) <= 12 else None)
    for ax, tag in zip(axes, tags):
        ax.set_xlabel("epoch")
        ax.set_ylabel(tag)
        ax.set_title(f"learning curves: {tag} (from TensorBoard events)")
        ax.grid(alpha=0.3)
    if len(curves) <= 12:
        axes[0].legend(fontsize=7)
    return _save(fig, out / "learning_curves.png")


def plot_source_target(runs, out: Path):
    rows = [(r["name"], r["final"]["val/acc_source"], r["final"]["val/acc_target"]) for r in runs
            if "val/acc_source" in r["final"] and "val/acc_target" in r["final"]]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r[1] for r in rows], width=0.4, label="source (val/acc_source)")
    ax.bar([x + 0.2 for x in xs], [r[2] for r in rows], width=0.4, label="target (val/acc_target)")
    ax.set_xticks(list(xs), [r[0] for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("final accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("source vs target accuracy per run")
    ax.legend()
    return _save(fig, out / "source_target.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="a multirun folder (or any folder of runs)")
    p.add_argument("--out", help="folder for the PNGs (default: ROOT/plots)")
    p.add_argument("--metric", default="val/acc", help="final metric to plot (default val/acc)")
    args = p.parse_args(argv)
    root = Path(args.root)
    runs = load_runs(root)
    if not runs:
        print(f"plot: no finished runs (metrics.json with status done) under {root}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else root / "plots"
    out.mkdir(parents=True, exist_ok=True)
    made = [f(runs, args.metric, out) for f in (plot_acc_vs_temperature, plot_alpha_temperature)]
    made += [plot_learning_curves(runs, out), plot_source_target(runs, out)]
    for path in made:
        if path:
            print(path)
    skipped = 4 - sum(bool(m) for m in made)
    if skipped:
        print(f"plot: {skipped} plot(s) skipped: the sweep does not vary what they need "
              f"(temperature; alpha x temperature; domain runs)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
