#!/usr/bin/env python
"""Summarize a multirun (or any folder of kdexp runs) as a table.

    python scripts/summarize.py outputs/multirun/2026-11-29_10-00-00
    python scripts/summarize.py outputs --sort best/val/acc --csv results.csv
    python scripts/summarize.py outputs/multirun/X --seeds-only   # only the mean +- std table

When `seed` is one of the overrides, a second table gives mean +- std over seeds for each
combination of the other overrides (failed runs are left out of the means and counted).

One row per run directory (a folder with metrics.json): the overrides that differ
between runs, status, final and best metrics, and where the teacher came from.
"""
import argparse
import csv
import json
import os
import statistics
import sys

HIDDEN_KEYS = ("paths.", "hydra.", "dataset.root", "dataset.path", "teacher.checkpoint")
METRICS = ("val/acc", "best/val/acc", "val/loss", "train/loss", "teacher/val/acc", "teacher", "epoch_s")


def find_runs(root: str):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("tb", "checkpoints", ".hydra"))
        if "metrics.json" in filenames:
            yield dirpath


def parse_overrides(items):
    out = {}
    for item in items:
        key, _, value = item.lstrip("+~").partition("=")
        if not key.startswith(HIDDEN_KEYS):
            out[key] = value
    return out


def load_row(run_dir: str, root: str) -> dict:
    with open(os.path.join(run_dir, "metrics.json")) as f:
        m = json.load(f)
    final, best, teacher = m.get("final", {}), m.get("best", {}), m.get("teacher", {})
    row = {"run": os.path.relpath(run_dir, root), **parse_overrides(m.get("overrides", []))}
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


def seed_table(rows, override_keys, metrics=("val/acc", "best/val/acc", "teacher/val/acc")):
    """Rows grouped by every override except seed -> (columns, table rows) with mean +- std."""
    keys = [k for k in override_keys if k != "seed"]
    groups = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    columns = [*keys, "seeds", "failed", *(f"{m} (mean ± std)" for m in metrics)]
    out = []
    for combo, members in groups.items():
        done = [r for r in members if str(r["status"]).startswith("done")]
        cells = list(combo) + [len(members), len(members) - len(done)]
        for m in metrics:
            vals = [r[m] for r in done if isinstance(r.get(m), (int, float))]
            if not vals:
                cells.append(None)
            else:
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cells.append(f"{statistics.mean(vals):.4f} ± {sd:.4f}")
        out.append(cells)
    out.sort(key=lambda c: c[len(keys) + 2] or "", reverse=True)
    return columns, out


def print_markdown(columns, rows) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for r in rows:
        print("| " + " | ".join(fmt(c) for c in r) + " |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="a multirun folder, a run folder or any folder of runs")
    p.add_argument("--sort", default="val/acc", help="column to sort by, descending (default val/acc)")
    p.add_argument("--ascending", action="store_true")
    p.add_argument("--csv", help="also write the per-run table to this CSV file")
    p.add_argument("--seeds-only", action="store_true", help="print only the mean +- std over seeds table")
    args = p.parse_args(argv)
    if not os.path.isdir(args.root):
        print(f"summarize: {args.root} is not a folder", file=sys.stderr)
        return 2
    rows = [load_row(d, args.root) for d in find_runs(args.root)]
    if not rows:
        print(f"summarize: no runs (metrics.json) under {args.root}", file=sys.stderr)
        return 1
    override_keys = sorted({k for r in rows for k in r} - set(METRICS) - {"run", "status"})
    columns = ["run", *override_keys, "status", *METRICS]
    if args.sort not in columns:
        print(f"summarize: --sort {args.sort!r} is not a column; choose from {columns}", file=sys.stderr)
        return 2
    present = [r for r in rows if isinstance(r.get(args.sort), (int, float))]
    missing = [r for r in rows if not isinstance(r.get(args.sort), (int, float))]
    rows = sorted(present, key=lambda r: r[args.sort], reverse=not args.ascending) + missing
    if not args.seeds_only:
        print_markdown(columns, [[r.get(c) for c in columns] for r in rows])
    if "seed" in override_keys:
        if not args.seeds_only:
            print()
        print_markdown(*seed_table(rows, override_keys))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows({c: r.get(c) for c in columns} for r in rows)
    failed = sum(not str(r["status"]).startswith("done") for r in rows)
    print(f"\n{len(rows)} runs, {failed} not done", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
