"""kdexp.report.plots on fake sweeps: run directories with a metrics.json each, no training."""
import json
import subprocess
import sys

import matplotlib.pyplot as plt
import pytest
from matplotlib.colors import to_hex
from matplotlib.ticker import MaxNLocator

from kdexp.report import plots

PNG = b"\x89PNG\r\n\x1a\n"
EPOCHS = 4
TEMPERATURES = (1, 2, 4, 8, 16, 32)


def history(score: float, terms, n: int = EPOCHS):
    """Per-epoch dicts as the recorder writes them: accuracy rising towards `score`, losses falling."""
    return [{"epoch": e, "train/loss": 2.0 / e, **{f"train/loss_{t}": 1.0 / e for t in terms},
             "val/acc": score * e / n, "val/loss": 1.5 / e, "time/epoch_s": 0.01} for e in range(1, n + 1)]


def write_run(root, name, method, seed, temperature=None, alpha=None, *, status="done", teacher=None,
              domain=False):
    """One fake run directory; `overrides` name only what the sweep varied (and a hidden path)."""
    overrides = [f"method={method}", f"seed={seed}", "epochs=4", f"paths.cache_dir={root}/cache"]
    overrides += [f"method.temperature={temperature}"] if temperature is not None else []
    overrides += [f"method.alpha={alpha}"] if alpha is not None else []
    score = 0.9 - 0.01 * (temperature or 0) + 0.02 * seed + (alpha or 0) / 100
    final = {"val/acc": score, "train/loss": 0.5}
    if domain:
        final.update({"val/acc_source": score, "val/acc_target": score - 0.2})
    record = {"status": status, "overrides": overrides,
              "hparams": {"method.name": method, "method.temperature": float(temperature or 4),
                          "method.alpha": float(alpha or 0.9), "seed": seed},
              "history": history(score, ("ce",) if method == "ce" else ("ce", "kd")),
              "final": final, "best": {"val/acc": score + 0.01, "epoch": EPOCHS - 1},
              "teacher": teacher or {"source": "none", "key": None, "val/acc": None}}
    (root / name).mkdir(parents=True)
    (root / name / "metrics.json").write_text(json.dumps(record))


@pytest.fixture
def sweep(tmp_path):
    """kd over 6 temperatures x 2 alphas x 2 seeds (12 configurations, 24 runs) with a teacher history,
    ce over 3 seeds and 2 ignored temperatures, and one failed run that the figures leave out."""
    root = tmp_path / "sweep"
    teacher = {"source": "cache", "key": "abc123def456", "val/acc": 0.97, "history": history(0.97, ("ce",))}
    n = 0
    for t in TEMPERATURES:
        for a in (0.5, 0.9):
            for seed in (0, 1):
                write_run(root, str(n), "kd", seed, t, a, teacher=teacher)
                n += 1
    for seed in (0, 1, 2):
        for t in (1, 4):
            write_run(root, str(n), "ce", seed, t)
            n += 1
    write_run(root, "failed", "kd", 0, 4, 0.9, status="failed")
    return root


def line_colours(ax):
    """The colours of the data lines of a panel (reference lines drawn with axhline are left out)."""
    return [to_hex(line.get_color()) for line in ax.get_lines() if len(line.get_xdata()) > 2]


def test_main_writes_the_figures(sweep, tmp_path):
    out = tmp_path / "plots"
    assert plots.main([str(sweep), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["acc_vs_temperature.png", "alpha_temperature.png", "learning_curves.png", "loss_terms.png"]
    for p in out.iterdir():
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 20_000, p


def test_source_target_for_domain_runs(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path, f"r{seed}", "kd", seed, 4, domain=True)
    assert plots.main([str(tmp_path), "--out", str(tmp_path / "plots")]) == 0
    png = tmp_path / "plots" / "source_target.png"
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000


def test_no_finished_runs_is_an_error(tmp_path, capsys):
    write_run(tmp_path, "r", "kd", 0, 4, status="failed")
    assert plots.main([str(tmp_path)]) == 1
    assert "no finished runs" in capsys.readouterr().err


@pytest.mark.parametrize("n", [1, 10, 12, 20, 21, 45])
def test_distinct_colours(n):
    assert len({to_hex(c) for c in plots.distinct_colours(n)}) == n


def test_twelve_runs_of_a_panel_get_twelve_colours(sweep):
    runs = plots.load_runs(sweep)
    fig = plots.learning_curves_figure(runs)
    kd_acc = next(ax for ax in fig.axes if ax.get_title() == "kd: val/acc per epoch")
    assert len(set(line_colours(kd_acc))) == len(line_colours(kd_acc)) == 12
    plt.close(fig)


def test_seeds_share_a_configuration_and_ignored_keys_make_none():
    kd = [plots.Run("a", "kd", {"method.temperature": "4", "seed": str(s)}) for s in (0, 1)]
    ce = [plots.Run("b", "ce", {"method.temperature": t, "seed": "0"}, ignores=("method.temperature",))
          for t in ("1", "4")]
    colours = plots.assign_colours(kd + ce)
    assert len(colours) == 2 and kd[0].config == kd[1].config and ce[0].config == ce[1].config


def test_what_a_method_ignores_is_read_from_its_recorded_plan(tmp_path):
    for name, plan in (("recorded", {"ignores": ["temperature", "alpha", "beta"]}), ("old", None)):
        m = {"status": "done", "hparams": {"method.name": "lsr" if plan else "ce"}, "overrides": []}
        if plan:
            m["plan"] = plan
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(m))
    runs = {r.name: r for r in plots.load_runs(tmp_path)}
    assert runs["recorded"].ignores == ("method.temperature", "method.alpha", "method.beta")
    assert runs["old"].ignores == plots.IGNORES["ce"] and runs["old"].ignores_temperature


def test_legend_labels_hold_only_the_varying_overrides(sweep):
    runs = [r for r in plots.load_runs(sweep) if r.method == "kd"]
    configs = sorted(plots.by_config(runs))
    keys = plots.label_keys(configs)
    assert keys == ["method.alpha", "method.temperature"]  # not epochs (constant), seed, method, paths
    label = plots.config_label(configs[0], keys)
    assert label.split() == ["method.alpha=0.5", "method.temperature=1"]
    fig = plots.learning_curves_figure(plots.load_runs(sweep))
    labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert labels and not any(s in text for text in labels for s in ("method=", "seed=", "epochs=", "paths."))
    assert "method.alpha=0.5 method.temperature=1 (n=2)" in labels and "ce (n=6)" in labels
    plt.close(fig)


def test_every_epoch_axis_has_integer_ticks(sweep):
    runs = plots.load_runs(sweep)
    for fig in (plots.learning_curves_figure(runs), plots.loss_terms_figure(runs)):
        epoch_axes = [ax for ax in fig.axes if ax.get_visible() and ax.get_xlabel() == "epoch"]
        assert epoch_axes
        for ax in epoch_axes:
            locator = ax.xaxis.get_major_locator()
            assert isinstance(locator, MaxNLocator)
            assert all(float(t).is_integer() for t in locator.tick_values(1, 3))
        plt.close(fig)


def test_learning_curves_have_a_row_per_method_and_one_for_the_teacher(sweep):
    fig = plots.learning_curves_figure(plots.load_runs(sweep))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [f"{row}: {key} per epoch" for row in ("ce", "kd", "teacher") for key in plots.CURVES]
    plt.close(fig)


def test_one_loss_term_panel_per_term(sweep):
    runs = plots.load_runs(sweep)
    assert plots.loss_terms(runs) == ["train/loss_ce", "train/loss_kd"]
    fig = plots.loss_terms_figure(runs)
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["train/loss_ce", "train/loss_kd"]
    ce_panel, kd_panel = (ax for ax in fig.axes if ax.get_visible())
    assert len(line_colours(ce_panel)) == 13 and len(line_colours(kd_panel)) == 12  # ce is one configuration
    plt.close(fig)


def test_acc_vs_temperature_counts_seeds_and_draws_ce_as_a_reference(sweep):
    fig = plots.acc_vs_temperature_figure(plots.load_runs(sweep), "best/val/acc")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sorted(labels) == ["ce (n=6, ignores temperature)", "kd alpha=0.5 (n=2)", "kd alpha=0.9 (n=2)"]
    assert ax.get_ylabel() == "best val/acc" and "best val/acc" in ax.get_title()
    plt.close(fig)


def test_imports_nothing_of_the_engine_or_torch():
    code = ("import sys, kdexp.report.plots; "
            "print([m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith(('kdexp.engine', "
            "'kdexp.methods'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
