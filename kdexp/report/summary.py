"""Summarize a sweep (or any folder of kdexp runs) as tables: one row per run, and per group of
seeds the numbers a KD paper reports, with the difference to a baseline and its uncertainty.

    kdexp-summarize outputs/multirun/2026-11-29_10-00-00        (or: python scripts/summarize.py ...)
    kdexp-summarize outputs --sort best/val/acc --csv results.csv
    kdexp-summarize SWEEP --seeds-only --baseline method=ce      # only the statistics table
    kdexp-summarize SWEEP --baseline method=ce --format latex    # markdown (default), csv or latex

Per run: the overrides, status, final and best metrics, and where the teacher came from.
Per group (runs that share every override but `seed`; runs not done are counted, not averaged):
n, mean +- std of `final` (val/acc at the last epoch) and `best` (val/acc at the best epoch) with
the mean best epoch, `test` (test/acc) when runs have it; with --baseline, the difference to the
baseline group with a 95 % confidence interval and a p-value (Welch's t-test; a seeded bootstrap
when scipy is not importable).
"""
# Reads metrics.json files only: nothing of torch or the engine, so a sweep can be summarized on
# a laptop that has neither the data nor a GPU.
import argparse
import csv
import json
import math
import os
import re
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from kdexp.errors import ConfigError, KdexpError

HIDDEN_KEYS = ("paths.", "hydra.", "logger", "dataset.root", "dataset.path", "teacher.checkpoint")
METRICS = ("val/acc", "best/val/acc", "val/loss", "train/loss", "teacher/val/acc", "teacher", "epoch_s")

# Statistics-table columns -> where metrics.json holds them (section, key). `best` is val/acc at
# the epoch that `best.metric` chose, not necessarily the highest val/acc.
NUMBERS = {
    "final": ("final", "val/acc"),
    "best": ("best", "val/acc"),
    "best_epoch": ("best", "epoch"),
    "test": ("final", "test/acc"),
    "teacher": ("teacher", "val/acc"),
}
SHOWN_AS = {"best_epoch": "best ep"}
ALWAYS_SHOWN = ("final", "best")  # the others only when some run has them
COMPARABLE = ("final", "best", "test")
LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


# ---------------------------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    path: str  # relative to the summarized folder
    overrides: Dict[str, str]  # key -> value as typed, hidden keys (paths, hydra) dropped
    metrics: dict  # metrics.json as written

    @property
    def done(self) -> bool:
        return self.metrics.get("status") == "done"

    def number(self, column: str) -> Optional[float]:
        """The run's value of a statistics column, None when its metrics.json lacks it."""
        section, key = NUMBERS[column]
        value = (self.metrics.get(section) or {}).get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def find_runs(root: str):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("tb", "checkpoints", ".hydra"))
        if "metrics.json" in filenames:
            yield dirpath


def parse_overrides(items) -> Dict[str, str]:
    """["method.temperature=4", "+x=1", "paths.cache_dir=..."] -> {"method.temperature": "4", "x": "1"}:
    the overrides that say what a run ran (HIDDEN_KEYS say where it wrote or read)."""
    out = {}
    for item in items:
        key, _, value = item.lstrip("+~").partition("=")
        if not key.startswith(HIDDEN_KEYS):
            out[key] = value
    return out


def load_runs(root: str) -> List[Run]:
    """Every run directory under `root`; a metrics.json that cannot be read is reported and
    skipped, so one broken run does not hide a sweep."""
    runs = []
    for run_dir in find_runs(root):
        try:
            with open(os.path.join(run_dir, "metrics.json")) as f:
                m = json.load(f)
        except (OSError, ValueError) as e:
            print(f"summarize: skipping {run_dir}: unreadable metrics.json ({e})", file=sys.stderr)
            continue
        runs.append(Run(os.path.relpath(run_dir, root), parse_overrides(m.get("overrides", [])), m))
    return runs


def run_row(run: Run) -> dict:
    """The per-run table's row: overrides, status (+ the error's start), final and best metrics."""
    m = run.metrics
    final, best, teacher = m.get("final") or {}, m.get("best") or {}, m.get("teacher") or {}
    row = {"run": run.path, **run.overrides}
    row.update({
        "status": m.get("status", "?") + (f" ({m['error'][:60]})" if m.get("error") else ""),
        "val/acc": final.get("val/acc"), "best/val/acc": best.get("val/acc"), "val/loss": final.get("val/loss"),
        "train/loss": final.get("train/loss"), "teacher/val/acc": teacher.get("val/acc"),
        "teacher": teacher.get("source"), "epoch_s": (m.get("timings") or {}).get("time/epoch_s"),
    })
    return row


def fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------------------------
# Groups of seeds and their statistics
# ---------------------------------------------------------------------------------------------

@dataclass
class Group:
    where: Dict[str, Optional[str]]  # the value of every group key; None: not overridden
    runs: List[Run]

    @property
    def done(self) -> List[Run]:
        return [r for r in self.runs if r.done]

    def values(self, column: str) -> List[float]:
        return [v for v in (r.number(column) for r in self.done) if v is not None]

    @property
    def seeds(self) -> frozenset:
        return frozenset(r.overrides.get("seed") for r in self.done)

    @property
    def ignores(self) -> Optional[frozenset]:
        """The method.* keys its runs' method ignores (metrics.json plan.ignores: the method's
        requirements), None when no run recorded them (runs made before kdexp kept them)."""
        recorded = [(r.metrics.get("plan") or {}).get("ignores") for r in self.runs]
        if all(i is None for i in recorded):
            return None
        return frozenset(f"method.{k}" for i in recorded if i is not None for k in i)

    def order(self) -> Tuple[str, ...]:
        """A sort key that orders groups the same way on every call (None before any value)."""
        return tuple("" if v is None else f"~{v}" for v in self.where.values())


def group_runs(runs: Sequence[Run], keys: Sequence[str]) -> List[Group]:
    """Runs that agree on every key in `keys` (every override but seed) form one group."""
    groups: Dict[tuple, Group] = {}
    for r in runs:
        where = {k: r.overrides.get(k) for k in keys}
        groups.setdefault(tuple(where.values()), Group(where, [])).runs.append(r)
    return sorted(groups.values(), key=Group.order)


@dataclass(frozen=True)
class Stat:
    n: int
    mean: Optional[float]
    std: Optional[float]  # sample std (n - 1); None below n = 2: one run has no spread


def describe(values: Sequence[float]) -> Stat:
    if not values:
        return Stat(0, None, None)
    return Stat(len(values), statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None)


@dataclass(frozen=True)
class Comparison:
    """mean(group) - mean(baseline), with a LEVEL confidence interval and a two-sided p-value where
    the data allow one (`why` says why not)."""
    diff: Optional[float]
    low: Optional[float] = None
    high: Optional[float] = None
    p: Optional[float] = None
    test: str = ""  # "welch" or "bootstrap"
    why: str = ""


def welch_terms(a: Sequence[float], b: Sequence[float]) -> Tuple[float, float, float]:
    """(mean difference, its standard error, Welch-Satterthwaite degrees of freedom): the
    unequal-variance t statistic is diff / se with df degrees of freedom."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return statistics.mean(a) - statistics.mean(b), se, df


def welch(a: Sequence[float], b: Sequence[float], t_dist, level: float = LEVEL) -> Comparison:
    """Welch's t-test and interval; `t_dist` is scipy.stats.t (its ppf and sf)."""
    diff, se, df = welch_terms(a, b)
    half = float(t_dist.ppf(0.5 + level / 2, df)) * se
    return Comparison(diff, diff - half, diff + half, float(2 * t_dist.sf(abs(diff) / se, df)), "welch")


def bootstrap(a: Sequence[float], b: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
              seed: int = BOOTSTRAP_SEED, level: float = LEVEL) -> Comparison:
    """Percentile interval of the mean difference from resampling each group with replacement, and
    a two-sided p-value from resamples of both groups shifted to their pooled mean (a world where
    the means are equal: Efron & Tibshirani 1993, sec. 16.4). Seeded, so a table is reproducible."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)

    def mean_differences(x, y):
        xs = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
        return xs - y[rng.integers(0, len(y), size=(resamples, len(y)))].mean(axis=1)

    diff = float(a.mean() - b.mean())
    low, high = np.quantile(mean_differences(a, b), [(1 - level) / 2, (1 + level) / 2])
    pooled = np.concatenate([a, b]).mean()
    null = mean_differences(a - a.mean() + pooled, b - b.mean() + pooled)
    extreme = np.count_nonzero(np.abs(null) >= abs(diff) - 1e-12)
    return Comparison(diff, float(low), float(high), (extreme + 1) / (resamples + 1), "bootstrap")


def student_t():
    """scipy.stats.t, or None without scipy (then intervals come from the bootstrap)."""
    try:
        from scipy import stats
    except ImportError:
        return None
    return stats.t


def compare(a: Sequence[float], b: Sequence[float]) -> Comparison:
    """Group values `a` against baseline values `b`."""
    if not a or not b:
        return Comparison(None, why="no done run with this number in " + ("the group" if not a else "the baseline"))
    diff = statistics.mean(a) - statistics.mean(b)
    if len(a) < 2 or len(b) < 2:
        return Comparison(diff, why=f"n={len(a)} vs baseline n={len(b)}: an interval needs n >= 2 in both")
    if statistics.pstdev(a) == 0 and statistics.pstdev(b) == 0:
        return Comparison(diff, why="no spread in either group: every run gave the same number")
    t_dist = student_t()
    return welch(a, b, t_dist) if t_dist is not None else bootstrap(a, b)


# ---------------------------------------------------------------------------------------------
# Which baseline group a group is compared with
# ---------------------------------------------------------------------------------------------

def parse_baseline(items: Sequence[str]) -> Dict[str, str]:
    """--baseline values ("method=ce", "method=ce,student=mlp", repeated) -> {key: value}. A comma
    starts a new pair only when what follows holds "=", so `dataset.classes=[6,9]` stays whole."""
    pairs: List[str] = []
    for item in items:
        for chunk in item.split(","):
            if "=" in chunk or not pairs:
                pairs.append(chunk)
            else:
                pairs[-1] += "," + chunk
    spec = {}
    for pair in pairs:
        key, eq, value = pair.strip().partition("=")
        if not eq or not key:
            raise ConfigError(f"--baseline {pair!r}: expected key=value, e.g. method=ce")
        if key == "seed":
            raise ConfigError("--baseline seed=...: seeds are what a group averages over; name another key")
        spec[key] = value
    return spec


def spec_text(spec: Dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in spec.items())


def baseline_groups(groups: Sequence[Group], spec: Dict[str, str]) -> List[Group]:
    """The groups that match every key=value of the baseline; a key or value that no run has is a
    one-line error naming the values the runs have."""
    for key, value in spec.items():
        present = sorted({g.where[key] for g in groups if key in g.where and g.where[key] is not None})
        if not present:
            keys = sorted({k for g in groups for k in g.where})
            raise ConfigError(f"--baseline {key}={value}: {key} is not an override of these runs; "
                              f"overrides: {', '.join(keys) or '(none)'}")
        if value not in present:
            raise ConfigError(f"--baseline {key}={value} matches no run; {key} has: {', '.join(present)}")
    matched = [g for g in groups if all(g.where.get(k) == v for k, v in spec.items())]
    if not matched:
        raise ConfigError(f"--baseline {spec_text(spec)} matches no run: "
                          "each value occurs, but never together")
    return matched


def where_text(group: Group, keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={'(not set)' if group.where[k] is None else group.where[k]}" for k in keys)


def pool_or_pick(candidates: List[Group]) -> Tuple[List[Group], Optional[str]]:
    """Baseline groups with disjoint seeds are pooled (more runs of the same recipe); two that share
    a seed are the same experiment repeated (e.g. ce at two temperatures it ignores), so pooling
    would count one run twice: then the one with the most done runs is used (ties: the first in
    table order), and the note says which."""
    if len(candidates) == 1:
        return candidates, None
    differ = [k for k in candidates[0].where if len({c.where[k] for c in candidates}) > 1]
    listed = "; ".join(where_text(c, differ) for c in candidates)
    if all(not (x.seeds & y.seeds) for x, y in combinations(candidates, 2)):
        return candidates, f"baseline pooled over {listed} (disjoint seeds)"
    pick = min(candidates, key=lambda c: (-len(c.done), c.order()))
    return [pick], (f"baseline groups {listed} share seeds (the same experiment repeated), not pooled: "
                    f"compared with {where_text(pick, differ)}")


def match_baseline(group: Group, candidates: List[Group], keys: Sequence[str]) -> Tuple[List[Group], List[str]]:
    """The baseline group(s) for `group`: those that agree with it on every key in `keys` (the
    overrides the baseline does not name). A key whose value the baseline was never run at is
    skipped, with a note, when the baseline's method ignores it or has no such key (ce at one
    temperature only, or none; dkd's method.warmup_epochs against ce); any other (a dataset, a
    student) leaves the group without a baseline: -> ([], notes). Runs that did not record what their
    method ignores are compared as in the first case."""
    notes = []
    ignored = set().union(*(c.ignores for c in candidates)) if all(c.ignores is not None for c in candidates) else None
    for k in keys:
        values = {c.where[k] for c in candidates}
        if group.where[k] in values:
            candidates = [c for c in candidates if c.where[k] == group.where[k]]
            continue
        others = "|".join(sorted("(not set)" if v is None else v for v in values))
        if ignored is not None and k not in ignored and not (k.startswith("method.") and values == {None}):
            return [], notes + [f"no baseline run at {where_text(group, [k])} (baseline: {k}={others}): not compared"]
        notes.append(f"no baseline run at {where_text(group, [k])}: compared with {k}={others}")
    chosen, note = pool_or_pick(candidates)
    return chosen, notes + ([note] if note else [])


# ---------------------------------------------------------------------------------------------
# The statistics table
# ---------------------------------------------------------------------------------------------

@dataclass
class Row:
    group: Group
    stats: Dict[str, Stat]
    is_baseline: bool = False
    comparison: Optional[Comparison] = None  # None without --baseline and on baseline rows
    notes: List[str] = field(default_factory=list)


def statistics_rows(groups: Sequence[Group], columns: Sequence[str], spec: Dict[str, str],
                    compared: str) -> List[Row]:
    """One row per group, best `final` first; with a baseline spec, each non-baseline row holds its
    comparison with the matching baseline group(s) on the `compared` column."""
    bases = baseline_groups(groups, spec) if spec else []
    others = [k for k in (groups[0].where if groups else {}) if k not in spec]
    rows = []
    for g in groups:
        row = Row(g, {c: describe(g.values(c)) for c in columns}, is_baseline=any(g is b for b in bases))
        if bases and not row.is_baseline:
            chosen, row.notes = match_baseline(g, bases, others)
            if not chosen:
                rows.append(row)
                continue
            row.comparison = compare(g.values(compared), [v for b in chosen for v in b.values(compared)])
            if row.comparison.why:
                row.notes.append(f"no CI/p: {row.comparison.why}")
        rows.append(row)
    return sorted(rows, key=lambda r: (r.stats["final"].mean is None, -(r.stats["final"].mean or 0.0)))


def agreement(labels: Sequence[str]) -> str:
    """One label when all runs agree, else each label with its number of runs."""
    counts = Counter(labels)
    if len(counts) == 1:
        return labels[0]
    return "runs disagree: " + "; ".join(f"{label} ({n} run{'s' * (n != 1)})" for label, n in counts.most_common())


def best_chooser(run: Run) -> str:
    """The metric (and mode) that picked the run's best epoch; runs from before metrics.json named
    it were chosen by val/acc."""
    best = run.metrics.get("best") or {}
    return best.get("metric", "val/acc") + (f" ({best['mode']})" if best.get("mode") else "")


def header_notes(runs: Sequence[Run], columns: Sequence[str]) -> List[str]:
    """What each number is and on which split, read from the runs' own metrics.json."""
    done = [r for r in runs if r.done] or list(runs)
    what = ["final = val/acc at the last epoch",
            f"best = val/acc at the best epoch by {agreement([best_chooser(r) for r in done])}"]
    what += ["best ep = mean best epoch"] if "best_epoch" in columns else []
    what += ["test = test/acc after the last epoch"] if "test" in columns else []
    splits = [r.metrics.get("splits") or {} for r in done]
    lines = ["; ".join(what),
             "val split: " + agreement([s.get("val", "not recorded in metrics.json") for s in splits])]
    if "test" in columns:
        lines.append("test split: " + agreement([s.get("test", "not recorded in metrics.json") for s in splits]))
    lines.append("mean ± std over each group's done runs (sample std); n = done runs; "
                 "not done = failed, interrupted or running (counted, not averaged)")
    return lines


def footer_notes(rows: Sequence[Row], spec: Dict[str, str], compared: str) -> List[str]:
    if not spec:
        return []
    tests = {r.comparison.test for r in rows if r.comparison and r.comparison.test}
    how = {"welch": "Welch's t-test (Welch-Satterthwaite df, t quantile)",
           "bootstrap": f"bootstrap ({BOOTSTRAP_RESAMPLES:,} resamples, seed {BOOTSTRAP_SEED}: percentile CI, "
                        "two-sided p; scipy is not importable)"}
    methods = " / ".join(how[t] for t in sorted(tests)) or "none computed"
    return [f"Δ = mean {compared} of the group - mean {compared} of its baseline ({spec_text(spec)}) at the same "
            f"other overrides; {int(LEVEL * 100)}% CI and p: {methods}"]


def shown_columns(runs: Sequence[Run], compared: str) -> List[str]:
    have = {c for c in NUMBERS for r in runs if r.done and r.number(c) is not None}
    return [c for c in NUMBERS if c in ALWAYS_SHOWN or c in have or c == compared]


def stat_text(stat: Stat, n: int, digits: int = 4, spread: bool = True) -> str:
    """mean ± std; a single run shows its value alone; a number some runs lack says its own n."""
    if stat.mean is None:
        return "-"
    text = f"{stat.mean:.{digits}f}" + (f" ± {stat.std:.{digits}f}" if spread and stat.std is not None else "")
    return text + (f" (n={stat.n})" if stat.n != n else "")


def comparison_texts(row: Row, marks: str) -> List[str]:
    if row.is_baseline:
        return ["baseline", "", ""]
    c = row.comparison or Comparison(None)  # None: no baseline run matches the group
    diff = "-" if c.diff is None else f"{c.diff:+.4f}"
    ci = "-" if c.low is None else f"[{c.low:+.4f}, {c.high:+.4f}]"
    p = "-" if c.p is None else ("<0.001" if c.p < 0.001 else f"{c.p:.3f}")
    return [diff + marks, ci, p]


def display_table(rows: Sequence[Row], keys: Sequence[str], columns: Sequence[str], spec: Dict[str, str],
                  compared: str) -> Tuple[List[str], List[List[str]], List[str]]:
    """(header, cells, numbered footnotes) as text, shared by the markdown and LaTeX renderings."""
    header = [*keys, "n", "not done", *(SHOWN_AS.get(c, c) for c in columns)]
    if spec:
        header += [f"Δ {compared} vs {spec_text(spec)}", f"{int(LEVEL * 100)}% CI", "p"]
    notes: List[str] = []
    cells = []
    for r in rows:
        n = len(r.group.done)
        line = [fmt(r.group.where[k]) for k in keys] + [str(n), str(len(r.group.runs) - n)]
        line += [stat_text(r.stats[c], n) if c != "best_epoch" else stat_text(r.stats[c], n, 1, spread=False)
                 for c in columns]
        if spec:
            for note in r.notes:
                notes += [] if note in notes else [note]
            line += comparison_texts(r, "".join(f" [{notes.index(x) + 1}]" for x in r.notes))
        cells.append(line)
    return header, cells, [f"[{i}] {note}" for i, note in enumerate(notes, 1)]


def markdown(header: Sequence[str], cells: Sequence[Sequence[str]]) -> List[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(line) + " |" for line in cells])


TEX_SPECIALS = {c: "\\" + c for c in "&%$#_{}"}
TEX_SPECIALS.update({"\\": r"\textbackslash{}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"})
TEX_SYMBOLS = {"±": r"$\pm$", "Δ": r"$\Delta$", "<": "$<$", ">": "$>$"}


def tex(text: str) -> str:
    """Table text as LaTeX: specials escaped (method.w_ce -> method.w\\_ce), ± and Δ as math,
    footnote marks [1] as superscripts."""
    out = "".join(TEX_SPECIALS.get(ch, TEX_SYMBOLS.get(ch, ch)) for ch in text)
    return re.sub(r" ?\[(\d+)\]", r"$^{\1}$", out)


def latex(header: Sequence[str], cells: Sequence[Sequence[str]], n_keys: int) -> List[str]:
    """A booktabs `tabular`: override columns left-aligned, numbers right-aligned."""
    lines = [r"\begin{tabular}{" + "l" * n_keys + "r" * (len(header) - n_keys) + "}", r"\toprule",
             " & ".join(tex(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(tex(c) for c in line) + r" \\" for line in cells]
    return lines + [r"\bottomrule", r"\end{tabular}"]


def csv_records(rows: Sequence[Row], keys: Sequence[str], columns: Sequence[str], spec: Dict[str, str]) -> List[dict]:
    """The statistics table as numbers at full precision (no rounding, no ±), one dict per group."""
    out = []
    for r in rows:
        rec = {**{k: r.group.where[k] for k in keys}, "n": len(r.group.done),
               "not_done": len(r.group.runs) - len(r.group.done)}
        for c in columns:
            rec.update({f"{c}_mean": r.stats[c].mean, f"{c}_std": r.stats[c].std, f"{c}_n": r.stats[c].n})
        if spec:
            c = r.comparison or Comparison(None)
            rec.update({"baseline": r.is_baseline, "diff": c.diff, "ci_low": c.low, "ci_high": c.high, "p": c.p,
                        "ci_method": c.test, "note": "; ".join(r.notes)})
        out.append(rec)
    return out


def print_statistics(runs: Sequence[Run], groups: Sequence[Group], keys: Sequence[str], spec: Dict[str, str],
                     compared: str, form: str) -> None:
    """The statistics table in `form` (markdown, csv or latex) on stdout; csv keeps stdout for the
    table and sends the notes to stderr."""
    columns = shown_columns(runs, compared)
    rows = statistics_rows(groups, columns, spec, compared)
    head, foot = header_notes(runs, columns), footer_notes(rows, spec, compared)
    if form == "csv":
        records = csv_records(rows, keys, columns, spec)
        w = csv.DictWriter(sys.stdout, fieldnames=list(records[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(records)
        print("\n".join(head + foot), file=sys.stderr)
        return
    header, cells, notes = display_table(rows, keys, columns, spec, compared)
    if form == "latex":
        print("\n".join([f"% {line}" for line in head] + latex(header, cells, len(keys))
                        + [f"% {line}" for line in foot + notes]))
    else:
        print("\n".join(head + [""] + markdown(header, cells) + ([""] + foot + notes if foot or notes else [])))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="a multirun folder, a run folder or any folder of runs")
    p.add_argument("--sort", default="val/acc", help="per-run table: column to sort by, descending (default val/acc)")
    p.add_argument("--ascending", action="store_true")
    p.add_argument("--csv", help="also write the per-run table to this CSV file")
    p.add_argument("--seeds-only", action="store_true", help="print only the statistics table (groups of seeds)")
    p.add_argument("--baseline", action="append", default=[], metavar="KEY=VALUE",
                   help="the baseline group, e.g. method=ce (comma-separated or repeated for several keys): "
                        "each group gets its difference to it with a 95%% CI and a p-value")
    p.add_argument("--compare", choices=COMPARABLE, default="final",
                   help="the number compared with the baseline (default final)")
    p.add_argument("--format", choices=("markdown", "csv", "latex"), default="markdown",
                   help="statistics table format; csv and latex print that table alone on stdout")
    return p.parse_args(argv)


def print_runs(runs: Sequence[Run], columns: Sequence[str], args) -> None:
    """The per-run table (markdown on stdout unless --seeds-only; --csv FILE as well)."""
    rows = [run_row(r) for r in runs]
    present = [r for r in rows if isinstance(r.get(args.sort), (int, float))]
    missing = [r for r in rows if not isinstance(r.get(args.sort), (int, float))]
    rows = sorted(present, key=lambda r: r[args.sort], reverse=not args.ascending) + missing
    if not args.seeds_only and args.format == "markdown":
        print("\n".join(markdown(columns, [[fmt(r.get(c)) for c in columns] for r in rows])))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows({c: r.get(c) for c in columns} for r in rows)


def summarize(args) -> int:
    if not os.path.isdir(args.root):
        print(f"summarize: {args.root} is not a folder", file=sys.stderr)
        return 2
    runs = load_runs(args.root)
    if not runs:
        print(f"summarize: no runs (metrics.json) under {args.root}", file=sys.stderr)
        return 1
    override_keys = sorted({k for r in runs for k in r.overrides})
    columns = ["run", *override_keys, "status", *METRICS]
    if args.sort not in columns:
        print(f"summarize: --sort {args.sort!r} is not a column; choose from {columns}", file=sys.stderr)
        return 2
    spec = parse_baseline(args.baseline)
    if args.compare == "test" and not any(r.number("test") is not None for r in runs):
        raise ConfigError("--compare test: no run has test/acc in metrics.json; choose final or best")
    keys = [k for k in override_keys if k != "seed"]
    groups = group_runs(runs, keys)
    if spec:
        baseline_groups(groups, spec)  # a bad baseline fails before any table is printed
    print_runs(runs, columns, args)
    if "seed" in override_keys or spec or args.seeds_only or args.format != "markdown":
        if not args.seeds_only and args.format == "markdown":
            print()
        print_statistics(runs, groups, keys, spec, args.compare, args.format)
    failed = sum(not r.done for r in runs)
    print(f"\n{len(runs)} runs, {failed} not done", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """Console script `kdexp-summarize` and scripts/summarize.py; returns the exit status
    (0 done, 1 no runs, 2 a bad argument) instead of exiting, so tests can call it."""
    try:
        return summarize(parse_args(argv))
    except KdexpError as e:
        print(f"summarize: {e}", file=sys.stderr)
        return 2
