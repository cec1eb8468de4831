"""Draw a sweep as PNGs, from the metrics.json of its run directories.

    kdexp-plot outputs/multirun/2026-11-29_10-00-00 [--out DIR] [--metric val/acc | best/val/acc]

Writes, where the sweep has the data for them:
  learning_curves.png      val/acc and train/loss per epoch: one row of panels per method, one colour
                           per configuration (seeds averaged: mean line, band = std over seeds);
                           a "teacher" row when metrics.json holds the teacher's history
  loss_terms.png           each train/loss_<term> per epoch, one panel per term, same colours
  acc_vs_temperature.png   final metric vs method.temperature per method (error bars = std over seeds);
                           methods that ignore temperature (ce) as a dashed line with a band
  alpha_temperature.png    heatmap of the final metric over method.alpha x method.temperature per method
  source_target.png        final val/acc_source vs val/acc_target per run (domain-shift runs)

The curves come from each run's `history` (one dict per epoch), so any logger works; TensorBoard
events are not read. Imports nothing of the engine, methods or torch: plotting a sweep needs
matplotlib alone.
"""
import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from kdexp.report.summary import parse_overrides  # noqa: E402  (paths and hydra keys are not a run's knobs)

# Keys a configuration is not told apart by: the method has its own panel, seeds are averaged.
NOT_LABELS = ("method", "seed")
# What a method ignores: its Requirements.ignores, recorded in metrics.json (`plan.ignores`); overriding
# it makes no new configuration, and a method that ignores temperature is a reference line in
# acc_vs_temperature. For runs recorded before metrics.json held it: ce's.
IGNORES = {"ce": ("method.temperature", "method.alpha")}
CURVES = ("val/acc", "train/loss")
TERM_PREFIX = "train/loss_"
PNG_DPI = 110

Config = Tuple[str, Tuple[Tuple[str, str], ...]]  # (method, sorted overrides without method and seed)


@dataclass(frozen=True)
class Run:
    """What the figures read of one finished run directory."""
    name: str  # the run directory relative to the sweep folder
    method: str
    overrides: Dict[str, str]  # key -> value, paths and hydra keys left out
    hparams: dict = field(default_factory=dict)
    final: dict = field(default_factory=dict)
    best: dict = field(default_factory=dict)
    history: List[dict] = field(default_factory=list)
    teacher: dict = field(default_factory=dict)
    ignores: Tuple[str, ...] = ()  # the method.* keys its method ignores (method.temperature, ...)

    @property
    def ignores_temperature(self) -> bool:
        return "method.temperature" in self.ignores

    @property
    def config(self) -> Config:
        """The runs that differ only by seed, or by keys their method ignores, share a configuration
        (one line, one colour)."""
        skip = NOT_LABELS + self.ignores
        return self.method, tuple(sorted((k, v) for k, v in self.overrides.items() if k not in skip))


# -- reading ---------------------------------------------------------------------------------------

def read_run(path: Path, root: Path) -> Optional[Run]:
    """The run of one metrics.json; None for unreadable files and runs that are not done."""
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get("status") != "done":
        return None
    hp = m.get("hparams") or {}
    overrides = parse_overrides(m.get("overrides") or [])
    method = str(hp.get("method.name", overrides.get("method", "?")))
    recorded = (m.get("plan") or {}).get("ignores")
    ignores = tuple(f"method.{k}" for k in recorded) if recorded is not None else IGNORES.get(method, ())
    return Run(name=str(path.parent.relative_to(root)), method=method,
               overrides=overrides, hparams=hp, final=m.get("final") or {}, best=m.get("best") or {},
               history=[h for h in m.get("history") or [] if isinstance(h, dict)], teacher=m.get("teacher") or {},
               ignores=ignores)


def load_runs(root: Path) -> List[Run]:
    """Every finished run under `root` (any depth), in path order."""
    runs = (read_run(p, root) for p in sorted(root.rglob("metrics.json")))
    return [r for r in runs if r is not None]


def metric_value(run: Run, metric: str) -> Optional[float]:
    """`val/acc` is the final epoch's value; `best/val/acc` the best epoch's."""
    if metric.startswith("best/"):
        return run.best.get(metric[len("best/"):])
    return run.final.get(metric)


def metric_label(metric: str) -> str:
    """"val/acc" -> "final val/acc", "best/val/acc" -> "best val/acc": which epoch a number is from."""
    return f"best {metric[len('best/'):]}" if metric.startswith("best/") else f"final {metric}"


# -- labels and colours ----------------------------------------------------------------------------

def varying_keys(overrides: Sequence[Mapping[str, str]]) -> List[str]:
    """The override keys whose value differs between runs (absent counts as a value), method and seed
    excepted: the only ones a legend needs to tell the runs apart."""
    keys = sorted({k for o in overrides for k in o if k not in NOT_LABELS})
    return [k for k in keys if len({o.get(k) for o in overrides}) > 1]


def label_keys(configs: Sequence[Config]) -> List[str]:
    """The keys that tell these configurations apart."""
    return varying_keys([dict(overrides) for _, overrides in configs])


def config_label(config: Config, keys: Sequence[str], with_method: bool = False) -> str:
    """"method.temperature=4 method.alpha=0.9" (the varying keys only), the method first if asked."""
    method, overrides = config
    values = dict(overrides)
    parts = ([method] if with_method else []) + [f"{k}={values[k]}" for k in keys if k in values]
    return " ".join(parts) or method


def distinct_colours(n: int) -> list:
    """n colours, no two alike: tab10 while it suffices; tab20 with its 10 strong shades before their
    10 light twins (in its own order neighbours are pairs of one hue); else n samples of a continuous
    map (a resampled colormap has exactly n entries, so none repeats however many runs there are)."""
    if n <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n)]
    if n <= 20:
        return [plt.get_cmap("tab20")(i) for i in (list(range(0, 20, 2)) + list(range(1, 20, 2)))[:n]]
    cmap = matplotlib.colormaps["turbo"].resampled(n)
    return [cmap(i) for i in range(n)]


def config_order(config: Config) -> tuple:
    """Sort key: method, then override values as numbers where they are (temperature 2 before 16)."""
    method, overrides = config
    return method, tuple((k, number_first(v)) for k, v in overrides)


def number_first(value: str) -> tuple:
    try:
        return 0, float(value), ""
    except ValueError:
        return 1, 0.0, value


def assign_colours(runs: Sequence[Run]) -> Dict[Config, tuple]:
    """One colour per configuration over the whole sweep: distinct within every panel, and a run keeps
    its colour from one figure to the next."""
    configs = sorted({r.config for r in runs}, key=config_order)
    return dict(zip(configs, distinct_colours(len(configs))))


def by_config(runs: Sequence[Run]) -> Dict[Config, List[Run]]:
    """configuration -> its runs (the seeds), in config_order."""
    groups: Dict[Config, List[Run]] = defaultdict(list)
    for r in runs:
        groups[r.config].append(r)
    return {c: groups[c] for c in sorted(groups, key=config_order)}


# -- curves ----------------------------------------------------------------------------------------

def series(history: Sequence[dict], key: str) -> Dict[int, float]:
    """{epoch: value} of one metric; entries without it are skipped, a repeated epoch keeps the last."""
    return {int(h.get("epoch", i + 1)): h[key] for i, h in enumerate(history) if h.get(key) is not None}


def seed_curve(histories: Sequence[Sequence[dict]], key: str) -> Tuple[list, list, list]:
    """(epochs, mean, std) over the seeds of one configuration, at each epoch any of them reached."""
    per = [series(h, key) for h in histories]
    xs = sorted({x for s in per for x in s})
    values = [[s[x] for s in per if x in s] for x in xs]
    return xs, [statistics.mean(v) for v in values], [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]


def draw_curve(ax, histories, key, colour, label) -> None:
    """Mean line and a +-std band over seeds (why not one line per seed: the legend keeps one entry
    per configuration and the band shows the seed noise the comparison must beat); nothing without data."""
    xs, mean, std = seed_curve(histories, key)
    if not xs:
        return
    n = len(histories)
    ax.plot(xs, mean, color=colour, marker="." if len(xs) < 30 else None,
            label=f"{label} (n={n})" if n > 1 else label)
    if n > 1:
        ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=colour, alpha=0.18, linewidth=0)


def epoch_axis(ax) -> None:
    """Epochs are whole numbers: no 0.5 ticks on short runs."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)


def legend_right(ax, source) -> None:
    """The legend of panel `source` beside panel `ax` (outside the data, the row's last panel), in
    columns once it would outgrow a row's height."""
    handles, labels = source.get_legend_handles_labels()
    if labels:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7,
                  ncol=1 + (len(labels) - 1) // 14, frameon=False)


def teachers(runs: Sequence[Run]) -> Dict[str, List[dict]]:
    """label -> history of each distinct teacher (by cache key) that metrics.json holds a history of."""
    found = {}
    for r in runs:
        hist = r.teacher.get("history")
        if hist:
            found.setdefault(r.teacher.get("key") or r.teacher.get("source") or r.name, hist)
    if len(found) == 1:
        return {"teacher": next(iter(found.values()))}
    return {f"teacher {str(k)[:8]}": h for k, h in found.items()}


def teacher_reference(ax, runs: Sequence[Run]) -> None:
    """The students' teacher's final val/acc as a dotted line, when the panel's runs share one."""
    accs = {r.teacher.get("val/acc") for r in runs} - {None}
    if len(accs) == 1:
        ax.axhline(accs.pop(), color="0.4", linestyle=":", linewidth=1, label="teacher val/acc")


def learning_curves_figure(runs: Sequence[Run]):
    """Small multiples: a row per method (and one for the teachers), a column per metric in CURVES."""
    runs = [r for r in runs if r.history]
    if not runs:
        return None
    colours = assign_colours(runs)
    methods = sorted({r.method for r in runs})
    teacher_hist = teachers(runs)
    rows = methods + (["teacher"] if teacher_hist else [])
    fig, axes = plt.subplots(len(rows), len(CURVES), figsize=(11, 2.9 * len(rows)), squeeze=False)
    for row, method in zip(axes, methods):
        panel = [r for r in runs if r.method == method]
        groups = by_config(panel)
        keys = label_keys(list(groups))
        for ax, key in zip(row, CURVES):
            for config, group in groups.items():
                draw_curve(ax, [r.history for r in group], key, colours[config], config_label(config, keys))
            if key == "val/acc":
                teacher_reference(ax, panel)
            ax.set_title(f"{method}: {key} per epoch")
        legend_right(row[-1], row[0])
    if teacher_hist:
        for ax, key in zip(axes[-1], CURVES):
            for (label, hist), colour in zip(teacher_hist.items(), distinct_colours(len(teacher_hist))):
                draw_curve(ax, [hist], key, colour, label)
            ax.set_title(f"teacher: {key} per epoch")
        legend_right(axes[-1][-1], axes[-1][0])
    for ax, key in zip(axes.flat, CURVES * len(rows)):
        ax.set_ylabel(key)
        epoch_axis(ax)
    fig.suptitle("learning curves (mean ± std over seeds)")
    return fig


def loss_terms(runs: Sequence[Run]) -> List[str]:
    """The train/loss_<term> keys any run's history holds, e.g. train/loss_ce, train/loss_kd."""
    return sorted({k for r in runs for h in r.history for k in h if k.startswith(TERM_PREFIX)})


def loss_terms_figure(runs: Sequence[Run]):
    """One panel per loss term; a line per configuration in the colour it has in learning_curves."""
    terms = loss_terms(runs)
    if not terms:
        return None
    runs = [r for r in runs if r.history]
    groups = by_config(runs)
    colours, keys = assign_colours(runs), label_keys(list(groups))
    ncols = min(3, len(terms))
    nrows = math.ceil(len(terms) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.3 * nrows), squeeze=False)
    for i, (ax, term) in enumerate(zip(axes.flat, terms)):
        for config, group in groups.items():
            draw_curve(ax, [r.history for r in group], term, colours[config],
                       config_label(config, keys, with_method=True))
        ax.set_title(term)
        if i % ncols == 0:
            ax.set_ylabel("loss term")
        epoch_axis(ax)
    for ax in list(axes.flat)[len(terms):]:
        ax.set_visible(False)
    handles = {label: h for ax in axes.flat for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(list(handles.values()), list(handles), loc="upper left", bbox_to_anchor=(1.0, 0.9), fontsize=7,
               ncol=1 + (len(handles) - 1) // 20, frameon=False)
    fig.suptitle("loss terms per epoch (mean ± std over seeds)")
    return fig


# -- final metrics ---------------------------------------------------------------------------------

def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def seed_counts(counts: Sequence[int]) -> str:
    """"n=3", or "n=2-3" when some points have fewer seeds (failed or missing runs)."""
    lo, hi = min(counts), max(counts)
    return f"n={hi}" if lo == hi else f"n={lo}-{hi}"


def temperature_lines(runs: Sequence[Run], metric: str) -> Dict[str, Dict[float, List[float]]]:
    """label -> {temperature: values over seeds}: one line per method (per method and alpha when
    alpha varies among the methods that use it)."""
    alphas = {r.hparams.get("method.alpha") for r in runs if not r.ignores_temperature}
    lines: Dict[str, Dict[float, List[float]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        t, value = r.hparams.get("method.temperature"), metric_value(r, metric)
        if value is None or (t is None and not r.ignores_temperature):
            continue
        alpha = r.hparams.get("method.alpha")
        split = len(alphas) > 1 and not r.ignores_temperature and alpha is not None
        lines[f"{r.method} alpha={alpha:g}" if split else r.method][t].append(value)
    return lines


def acc_vs_temperature_figure(runs: Sequence[Run], metric: str):
    """Error bars = std over seeds, n in the legend; methods that ignore temperature (Run.ignores) are a
    dashed line at their mean over all their runs with a +-std band, since their temperature means nothing."""
    lines = temperature_lines(runs, metric)
    flat = {r.method for r in runs if r.ignores_temperature}  # their lines are labelled by the method alone
    temps = sorted({t for label, ts in lines.items() if label not in flat for t in ts if t is not None})
    if len(temps) < 2:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    colours = dict(zip(sorted(lines), distinct_colours(len(lines))))
    for label, ts in sorted(lines.items()):
        if label in flat:
            mean, std = mean_std([v for vs in ts.values() for v in vs])
            n = sum(len(vs) for vs in ts.values())
            ax.axhline(mean, color=colours[label], linestyle="--", label=f"{label} (n={n}, ignores temperature)")
            ax.axhspan(mean - std, mean + std, color=colours[label], alpha=0.15, linewidth=0)
            continue
        xs = sorted(ts)
        stats = [mean_std(ts[x]) for x in xs]
        ax.errorbar(xs, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3,
                    color=colours[label], label=f"{label} ({seed_counts([len(ts[x]) for x in xs])})")
    ax.set_xscale("log")
    ax.set_xticks(temps, [f"{t:g}" for t in temps])
    ax.minorticks_off()
    ax.set_xlabel("method.temperature")
    ax.set_ylabel(metric_label(metric))
    ax.set_title(f"{metric_label(metric)} vs temperature (mean ± std over seeds)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    ax.grid(alpha=0.3)
    return fig


def alpha_temperature_cells(runs: Sequence[Run], metric: str) -> Dict[str, Dict[Tuple[float, float], List[float]]]:
    """method -> {(alpha, temperature): values}, for the methods whose sweep varies both."""
    by: Dict[str, Dict[Tuple[float, float], List[float]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        a, t, value = r.hparams.get("method.alpha"), r.hparams.get("method.temperature"), metric_value(r, metric)
        if not r.ignores_temperature and None not in (a, t, value):
            by[r.method][(a, t)].append(value)
    return {m: cells for m, cells in by.items() if len({a for a, _ in cells}) > 1 and len({t for _, t in cells}) > 1}


def alpha_temperature_figure(runs: Sequence[Run], metric: str):
    """A heatmap per method of the metric averaged over seeds, the value written in each cell."""
    by = alpha_temperature_cells(runs, metric)
    if not by:
        return None
    fig, axes = plt.subplots(1, len(by), figsize=(4.5 * len(by), 4), squeeze=False)
    for ax, (method, cells) in zip(axes[0], sorted(by.items())):
        alphas, temps = sorted({a for a, _ in cells}), sorted({t for _, t in cells})
        grid = [[statistics.mean(cells[(a, t)]) if (a, t) in cells else float("nan") for t in temps] for a in alphas]
        im = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if not math.isnan(v):  # dark text on viridis' bright end, white on its dark end
                    ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=8,
                            color="k" if im.norm(v) > 0.6 else "w")
        ax.set_xticks(range(len(temps)), [f"{t:g}" for t in temps])
        ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_xlabel("method.temperature")
        ax.set_ylabel("method.alpha")
        ax.set_title(f"{method}: {metric_label(metric)} (mean over seeds)")
        fig.colorbar(im, ax=ax)
    return fig


def source_target_figure(runs: Sequence[Run]):
    """Bars of the final source and target accuracy per run, runs named by method and what varies."""
    shifted = [r for r in runs if "val/acc_source" in r.final and "val/acc_target" in r.final]
    if not shifted:
        return None
    keys = varying_keys([r.overrides for r in shifted])
    keys += ["seed"] if len({r.overrides.get("seed") for r in shifted}) > 1 else []
    names = [" ".join([r.method] + [f"{k}={r.overrides[k]}" for k in keys if k in r.overrides]) for r in shifted]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(shifted)), 4.5))
    xs = range(len(shifted))
    ax.bar([x - 0.2 for x in xs], [r.final["val/acc_source"] for r in shifted], width=0.4,
           label="source (final val/acc_source)")
    ax.bar([x + 0.2 for x in xs], [r.final["val/acc_target"] for r in shifted], width=0.4,
           label="target (final val/acc_target)")
    ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("final accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("final source vs target accuracy per run")
    ax.legend()
    return fig


def figures_of(runs: Sequence[Run], metric: str) -> dict:
    """file name -> figure, None where the sweep lacks what the figure needs."""
    return {"learning_curves.png": learning_curves_figure(runs), "loss_terms.png": loss_terms_figure(runs),
            "acc_vs_temperature.png": acc_vs_temperature_figure(runs, metric),
            "alpha_temperature.png": alpha_temperature_figure(runs, metric),
            "source_target.png": source_target_figure(runs)}


def save(fig, path: Path) -> Path:
    """bbox_inches="tight" keeps the legends placed beside the panels inside the image."""
    fig.tight_layout()
    fig.savefig(path, dpi=PNG_DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="kdexp-plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="a multirun folder (or any folder of runs)")
    p.add_argument("--out", help="folder for the PNGs (default: ROOT/plots)")
    p.add_argument("--metric", default="val/acc",
                   help="metric of the final-metric plots: val/acc (final epoch, default), best/val/acc, ...")
    args = p.parse_args(argv)
    root = Path(args.root)
    runs = load_runs(root)
    if not runs:
        print(f"plot: no finished runs (metrics.json with status done) under {root}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else root / "plots"
    out.mkdir(parents=True, exist_ok=True)
    figures = figures_of(runs, args.metric)
    for name, fig in figures.items():
        if fig is not None:
            print(save(fig, out / name))
    skipped = [name for name, fig in figures.items() if fig is None]
    if skipped:
        print(f"plot: skipped {', '.join(skipped)}: the sweep lacks what they need (per-epoch history; "
              "loss terms; two temperatures; alpha x temperature; domain-shift runs)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
