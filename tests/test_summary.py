"""The summary tables (kdexp.report.summary) on fake run directories: metrics.json files written by
hand in tmp_path, no training. Statistics are checked against formulas written here with math/numpy."""
import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdexp.report import summary
from kdexp.report.summary import bootstrap, compare, main
from tests.conftest import ROOT


def write_run(root: Path, status="done", final=None, best=None, best_epoch=3, test=None, splits=None,
              best_metric=None, ignores=None, **overrides):
    """A run directory named after its overrides, holding the metrics.json a run writes."""
    items = [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    run = root / ",".join(items)
    run.mkdir(parents=True)
    m = {"status": status, "overrides": items + [f"paths.cache_dir={root / 'cache'}"],
         "final": {} if final is None else {"val/acc": final, "val/loss": 0.3, "train/loss": 0.2},
         "best": {} if final is None else {"val/acc": final if best is None else best, "epoch": best_epoch},
         "teacher": {"source": "none", "val/acc": None}}
    if test is not None:
        m["final"]["test/acc"] = test
    if best_metric:
        m["best"].update({"metric": best_metric, "mode": "min"})
    if splits:
        m["splits"] = splits
    if ignores is not None:  # what the run's method ignores, as the run plan records it
        m["plan"] = {"ignores": ignores}
    if status == "failed":
        m["error"] = "ConfigError: boom"
    (run / "metrics.json").write_text(json.dumps(m))
    return run


def summarize(capsys, *argv):
    """main(argv) in-process, as the console script calls it -> (exit status, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def sweep(root: Path, values: dict, **common):
    """One run per (method, seed) with the given final val/acc values {method: [seed 0, seed 1, ...]}."""
    for method, accs in values.items():
        for seed, acc in enumerate(accs):
            write_run(root, final=acc, method=method, seed=seed, **common)
    return root


def statistics_csv(capsys, root, *args):
    rc, out, err = summarize(capsys, root, "--format", "csv", *args)
    assert rc == 0, err
    return list(csv.DictReader(io.StringIO(out)))


# --- Welch's t-test by hand: the t density integrated with Simpson's rule, the quantile by bisection ---

def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom, t >= 0."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    x = np.linspace(0.0, t, 20_001)
    f = c * (1 + x ** 2 / df) ** (-(df + 1) / 2)
    integral = (x[1] - x[0]) / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    return 0.5 - integral


def t_quantile(q: float, df: float) -> float:
    lo, hi = 0.0, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 1 - t_sf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def welch_by_hand(a, b):
    a, b = np.asarray(a), np.asarray(b)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    diff = a.mean() - b.mean()
    half = t_quantile(0.975, df) * se
    return diff, diff - half, diff + half, 2 * t_sf(abs(diff) / se, df)


# --- tests ---

def test_one_seed_shows_its_value_without_plus_minus_and_no_interval(tmp_path, capsys):
    sweep(tmp_path, {"ce": [0.9], "kd": [0.95]})
    rc, out, _ = summarize(capsys, tmp_path, "--seeds-only", "--baseline", "method=ce")
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert rc == 0 and len(table) == 4 and not any("±" in line for line in table), out
    kd = next(line for line in out.splitlines() if line.startswith("| kd |"))
    cells = [c.strip() for c in kd.strip("|").split("|")]
    assert cells[1:4] == ["1", "0", "0.9500"] and cells[-3:] == ["+0.0500 [1]", "-", "-"], kd
    assert "[1] no CI/p: n=1 vs baseline n=1: an interval needs n >= 2 in both" in out
    rc, tex, _ = summarize(capsys, tmp_path, "--baseline", "method=ce", "--format", "latex")
    assert r"\pm" not in tex and "$^{1}$" in tex


def test_two_methods_three_seeds_difference_ci_and_p_equal_welch_by_hand(tmp_path, capsys):
    ce, kd = [0.900, 0.910, 0.925], [0.930, 0.960, 0.945]
    sweep(tmp_path, {"ce": ce, "kd": kd}, epochs=3)
    rows = {r["method"]: r for r in statistics_csv(capsys, tmp_path, "--baseline", "method=ce")}
    diff, low, high, p = welch_by_hand(kd, ce)
    got = rows["kd"]
    assert got["ci_method"] == "welch" and rows["ce"]["baseline"] == "True" and rows["ce"]["diff"] == ""
    for name, want in (("diff", diff), ("ci_low", low), ("ci_high", high), ("p", p)):
        assert float(got[name]) == pytest.approx(want, abs=1e-6), name
    assert float(got["final_mean"]) == pytest.approx(np.mean(kd)) and float(got["final_std"]) == pytest.approx(
        np.std(kd, ddof=1))
    assert 0.001 < p < 0.05 and low > 0  # the case is a clear one: the check above compares real numbers
    rc, out, _ = summarize(capsys, tmp_path, "--seeds-only", "--baseline", "method=ce")
    kd_line = next(line for line in out.splitlines() if line.startswith("| 3 | kd |"))
    assert f"| 3 | 0 | {np.mean(kd):.4f} ± {np.std(kd, ddof=1):.4f} |" in kd_line
    assert f"| {diff:+.4f} | [{low:+.4f}, {high:+.4f}] | {p:.3f} |" in kd_line
    assert "Welch's t-test" in out and "final = val/acc at the last epoch" in out


def test_bootstrap_when_scipy_cannot_be_imported(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)  # `from scipy import stats` now raises ImportError
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    rng = np.random.default_rng(1)
    a, b = 0.95 + 0.01 * rng.standard_normal(8), 0.85 + 0.01 * rng.standard_normal(8)
    big = compare(list(a), list(b))
    assert big.test == "bootstrap" and big.low < 0.10 < big.high and big.p < 0.05
    assert big == bootstrap(list(a), list(b))  # seeded: the same table every time
    same = compare(list(a), list(0.95 + 0.01 * rng.standard_normal(8)))
    assert same.low < 0 < same.high and same.p > 0.05
    sweep(tmp_path, {"ce": list(b[:3]), "kd": list(a[:3])})
    rc, out, _ = summarize(capsys, tmp_path, "--seeds-only", "--baseline", "method=ce")
    assert rc == 0 and "bootstrap (10,000 resamples, seed 0" in out and "Welch" not in out


def test_csv_and_latex_formats(tmp_path, capsys):
    sweep(tmp_path, {"ce": [0.90, 0.91], "kd": [0.93, 0.95]}, method__w_ce=0.5)
    rows = statistics_csv(capsys, tmp_path, "--baseline", "method=ce")
    assert [r["method"] for r in rows] == ["kd", "ce"] and {r["method.w_ce"] for r in rows} == {"0.5"}
    assert float(rows[0]["final_mean"]) == pytest.approx(0.94) and float(rows[0]["ci_low"]) < float(rows[0]["ci_high"])
    rc, tex, _ = summarize(capsys, tmp_path, "--baseline", "method=ce", "--format", "latex")
    lines = tex.splitlines()
    body = lines[lines.index(r"\midrule") + 1:lines.index(r"\bottomrule")]
    assert lines[[i for i, x in enumerate(lines) if x.startswith(r"\begin{tabular}")][0] + 1] == r"\toprule"
    assert r"method.w\_ce" in tex and "method.w_ce" not in tex.replace("% ", "").split(r"\begin")[1]
    assert len(body) == 2 and all(line.endswith(r" \\") for line in body)
    assert r"0.9400 $\pm$ 0.0141" in body[0] and "baseline" in body[1] and r"\end{tabular}" in tex
    assert all(len(line.split(" & ")) == len(body[0].split(" & ")) for line in body)


def test_baseline_that_matches_no_run_is_one_line_naming_the_values(tmp_path, capsys):
    sweep(tmp_path, {"ce": [0.9], "kd": [0.95]})
    rc, out, err = summarize(capsys, tmp_path, "--baseline", "method=cee")
    assert rc == 2 and out == ""
    assert err.strip() == "summarize: --baseline method=cee matches no run; method has: ce, kd"
    rc, _, err = summarize(capsys, tmp_path, "--baseline", "methd=ce")
    assert rc == 2 and "methd is not an override" in err and "method" in err
    script = subprocess.run([sys.executable, str(Path(ROOT) / "scripts" / "summarize.py"), str(tmp_path),
                             "--baseline=method=cee"], capture_output=True, text=True)
    assert script.returncode == 2 and "method has: ce, kd" in script.stderr


def test_baseline_run_at_one_temperature_serves_every_temperature(tmp_path, capsys):
    sweep(tmp_path, {"ce": [0.90, 0.92]}, method__temperature=4)
    sweep(tmp_path, {"kd": [0.93, 0.95]}, method__temperature=1)
    sweep(tmp_path, {"kd": [0.91, 0.93]}, method__temperature=4)
    table = statistics_csv(capsys, tmp_path, "--baseline", "method=ce")
    rows = {(r["method"], r["method.temperature"]): r for r in table}
    assert float(rows["kd", "1"]["diff"]) == pytest.approx(0.03)
    assert float(rows["kd", "4"]["diff"]) == pytest.approx(0.01)
    assert rows["kd", "1"]["note"] == "no baseline run at method.temperature=1: compared with method.temperature=4"
    assert rows["kd", "4"]["note"] == ""


def test_a_baseline_stands_in_only_across_keys_its_method_ignores(tmp_path, capsys):
    """With what each method ignores recorded (plan.ignores), ce at T=4 serves kd at T=1 (ce ignores
    temperature), but ce on digits never serves kd on another dataset: that row is not compared."""
    ce = ["temperature", "alpha", "beta"]
    for seed, acc in enumerate([0.90, 0.92]):
        write_run(tmp_path, final=acc, method="ce", seed=seed, method__temperature=4, dataset="digits", ignores=ce)
    for t, dataset, accs in ((1, "digits", [0.93, 0.95]), (4, "mnist", [0.97, 0.99])):
        for seed, acc in enumerate(accs):
            write_run(tmp_path, final=acc, method="kd", seed=seed, method__temperature=t, dataset=dataset,
                      ignores=["beta"])
    rows = {(r["method"], r["dataset"]): r for r in statistics_csv(capsys, tmp_path, "--baseline", "method=ce")}
    assert float(rows["kd", "digits"]["diff"]) == pytest.approx(0.03)
    assert rows["kd", "mnist"]["diff"] == "" and "not compared" in rows["kd", "mnist"]["note"]


def test_baseline_groups_sharing_seeds_are_not_pooled_and_disjoint_ones_are(tmp_path, capsys):
    sweep(tmp_path / "a", {"ce": [0.90, 0.92, 0.94]}, method__temperature=1)
    sweep(tmp_path / "a", {"ce": [0.80, 0.82]}, method__temperature=4)  # seeds 0, 1 again: the same ce runs
    sweep(tmp_path / "a", {"kd": [0.95, 0.97]}, method__temperature=8)
    kd = next(r for r in statistics_csv(capsys, tmp_path / "a", "--baseline", "method=ce") if r["method"] == "kd")
    assert float(kd["diff"]) == pytest.approx(0.96 - 0.92)  # against T=1 (3 runs) alone
    assert ("share seeds (the same experiment repeated), not pooled: compared with method.temperature=1"
            in kd["note"])
    write_run(tmp_path / "b", final=0.90, method="ce", seed=0)
    write_run(tmp_path / "b", final=0.92, method="ce", seed=1, method__temperature=4)
    sweep(tmp_path / "b", {"kd": [0.95, 0.97]}, method__temperature=8)
    kd = next(r for r in statistics_csv(capsys, tmp_path / "b", "--baseline", "method=ce") if r["method"] == "kd")
    assert float(kd["diff"]) == pytest.approx(0.96 - 0.91) and "pooled over" in kd["note"]


def test_failed_runs_are_counted_not_averaged_and_headers_say_what_a_number_is(tmp_path, capsys):
    val_split = {"val": "20% of train held out", "test": "official test split"}
    sweep(tmp_path, {"kd": [0.90, 0.92]}, epochs=2)
    for r in tmp_path.iterdir():
        m = json.loads((r / "metrics.json").read_text())
        m.update(splits=val_split, best={**m["best"], "metric": "val/loss", "mode": "min"})
        m["final"]["test/acc"] = 0.5
        (r / "metrics.json").write_text(json.dumps(m))
    write_run(tmp_path, status="failed", final=0.10, method="kd", seed=2, epochs=2,
              splits={"val": "official test split"})
    rc, out, _ = summarize(capsys, tmp_path, "--seeds-only")
    assert "| 2 | kd | 2 | 1 | 0.9100 ± 0.0141 |" in out, out
    assert "best = val/acc at the best epoch by val/loss (min)" in out and "test = test/acc" in out
    assert "val split: 20% of train held out" in out and "test split: official test split" in out
    write_run(tmp_path, final=0.93, method="kd", seed=3, epochs=2, splits={"val": "official test split"})
    rc, out, _ = summarize(capsys, tmp_path, "--seeds-only")
    assert "val split: runs disagree: 20% of train held out (2 runs); official test split (1 run)" in out
    assert "0.5000 ± 0.0000 (n=2)" in out  # the run without test/acc is not a zero


def test_reading_summaries_imports_neither_torch_nor_the_engine():
    code = ("import sys, kdexp.report.summary; bad = [m for m in sys.modules if m == 'torch' or "
            "m.startswith(('torch.', 'kdexp.engine', 'kdexp.methods'))]; print(bad); sys.exit(bool(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert summary.main.__module__ == "kdexp.report.summary"  # the console script's target
