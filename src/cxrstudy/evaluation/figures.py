"""The evaluation figures of notebook 05, saved under ``reports/<profile>/evaluation/``.

``HEADLINE_FIGURE``, ``SCORECARD_FIGURE`` and ``SHORTCUT_FIGURE`` are also shown on the profile's index.html.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cxrstudy import config
from cxrstudy.evaluation.frames import per_source_table
from cxrstudy.evaluation.headline import headline_table
from cxrstudy.evaluation.metrics import probs_from_frame, reliability_curve, split_rows
from cxrstudy.runspec import RunSpec

#: Folder of the evaluation figures, relative to ``reports/<profile>/``.
FIGURE_DIR = "evaluation"
#: Every run's test accuracy with its interval against the paper's accuracy.
HEADLINE_FIGURE = "accuracy_vs_paper.png"
#: Masking experiment, leave-one-source-out and same-hospital accuracies with their intervals.
SHORTCUT_FIGURE = "shortcut_checks.png"
#: The confound-free scorecard: every metric per run and variant with its interval and goal.
SCORECARD_FIGURE = "scorecard.png"


def _grid(n: int, size: tuple[float, float]) -> tuple[object, Iterator]:
    """A figure with one panel per run (at most four per row); unused panels switched off."""
    import matplotlib.pyplot as plt

    ncols = min(4, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes.flat


def _save(fig, path: Path, paths: dict[str, Path]) -> None:
    """Save and close ``fig`` and record it under its file stem."""
    from cxrstudy import plots

    plots.save_figure(fig, path, close=True)
    paths[path.stem] = path


def _per_run_grid(
    runs: Sequence[dict], size: tuple[float, float], draw: Callable[[object, dict], None], path: Path
) -> Path:
    """One panel per run drawn by ``draw(ax, run)``, saved to ``path``."""
    from cxrstudy import plots

    fig, axes = _grid(len(runs), size)
    for ax, run in zip(axes, runs, strict=False):
        draw(ax, run)
    fig.tight_layout()
    plots.save_figure(fig, path, close=True)
    return path


def _learning_curve(ax, run: dict) -> None:
    """Train/valid loss and valid accuracy of one run from its history.csv."""
    hist_path = Path(run["dir"]) / "history.csv"
    if hist_path.is_file():
        h = pd.read_csv(hist_path)
        ax.plot(h["epoch"], h["train_loss"], "o-", ms=3, label="train loss")
        ax.plot(h["epoch"], h["valid_loss"], "s-", ms=3, label="valid loss")
        ax2 = ax.twinx()
        ax2.plot(h["epoch"], h["valid_accuracy"], "^--", ms=3, color="C3")
        ax2.set_ylim(0, 1.02)
        ax.legend(fontsize=6)
    ax.set_title(RunSpec.from_record(run["info"]).label(), fontsize=7)
    ax.set_xlabel("epoch", fontsize=7)


def _interval_rows(items: Sequence[tuple[str, dict | None]]) -> pd.DataFrame:
    """Table (label, value, ci_low, ci_high) of labelled metric dicts, leaving out missing values."""
    rows = [
        {"label": label, **{k: m.get(k) for k in ("value", "ci_low", "ci_high")}}
        for label, m in items
        if isinstance(m, dict) and m.get("value") is not None
    ]
    return pd.DataFrame(rows, columns=["label", "value", "ci_low", "ci_high"])


def headline_figure(entries: Sequence[dict], path: Path) -> Path:
    """Every run's test accuracy with its 95% interval (one panel per task) against the published figures."""
    from cxrstudy import plots

    table = headline_table(entries)
    panels = {
        task: _interval_rows(
            [(RunSpec.from_record(r).label(task=False), r["accuracy"]) for r in table if r["task"] == task]
        )
        for task in dict.fromkeys(r["task"] for r in table)
    }
    fig = plots.plot_intervals(
        panels,
        {"paper": config.PAPER_ACCURACY, "DeTraC": config.DETRAC_ACCURACY},
        "test accuracy (95% CI, patient-group bootstrap)",
        f"Test accuracy per run against the paper's {100 * config.PAPER_ACCURACY:.2f}%",
    )
    plots.save_figure(fig, path, close=True)
    return path


def evaluation_figures(runs: Sequence[dict], entries: Sequence[dict], fig_dir: Path) -> dict[str, Path]:
    """Save the evaluation figures under ``fig_dir`` (name -> path): confusion_matrices, reliability and
    learning_curves (grids over runs), roc_pr_<run_id>, per_source_accuracy, accuracy_vs_paper."""
    from cxrstudy import plots

    fig_dir = Path(fig_dir)
    paths: dict[str, Path] = {}
    if not runs:
        return paths
    by_id = {e["run_id"]: e for e in entries}

    def entry(run: dict) -> dict:
        """The results.json entry of a run."""
        return by_id[run["info"]["run_id"]]

    def confusion(ax, run: dict) -> None:
        """Confusion matrix of a run's test split."""
        e = entry(run)
        plots.plot_confusion(e["test"]["confusion_matrix"], e["classes"], RunSpec.from_record(e).label(), ax=ax)

    def reliability(ax, run: dict) -> None:
        """Reliability diagram of a run's test split."""
        e, test = entry(run), split_rows(run["predictions"], "test")
        curve = reliability_curve(test["label"], probs_from_frame(test, e["classes"]), e["classes"])
        plots.plot_reliability(curve, e["test"]["ece"], RunSpec.from_record(e).label(), ax=ax)

    for name, size, draw in (
        ("confusion_matrices", (3.0, 2.8), confusion),
        ("reliability", (3.6, 3.6), reliability),
        ("learning_curves", (3.4, 2.6), _learning_curve),
    ):
        paths[name] = _per_run_grid(runs, size, draw, fig_dir / f"{name}.png")
    for run in runs:
        e, test = entry(run), split_rows(run["predictions"], "test")
        fig = plots.plot_roc_pr(
            test["label"].to_numpy(), probs_from_frame(test, e["classes"]), e["classes"], e["run_id"]
        )
        _save(fig, fig_dir / f"roc_pr_{e['run_id']}.png", paths)
    table = per_source_table(runs)
    if not table.empty:
        _save(
            plots.plot_per_source_heatmap(table, "test accuracy per source and label"),
            fig_dir / "per_source_accuracy.png",
            paths,
        )
    paths["accuracy_vs_paper"] = headline_figure(entries, fig_dir / HEADLINE_FIGURE)
    return paths


def shortcut_panels(checks: dict) -> dict[str, pd.DataFrame]:
    """Tables of the shortcut-check figure: masking experiment, leave-one-source-out, same hospital."""
    masking = [
        (name, (checks.get(key) or {}).get("accuracy"))
        for key, name in (
            ("unmasked", "whole image"),
            ("masked_lungs", "lungs masked"),
            ("lungs_only", "lungs only"),
        )
    ]
    loso = [
        (f"without {e['held_out']} ({' and '.join(e.get('labels') or [])}, n={e.get('n')})", e["accuracy"])
        for e in checks.get("leave_one_source_out") or []
        if "accuracy" in e
    ]
    sh = checks.get("same_hospital") or {}
    same = [(f"{sh.get('source')} (n={sh.get('n')})", (sh.get("probe") or {}).get("accuracy"))]
    return {
        "masking experiment: linear head on frozen features, test split": _interval_rows(masking),
        "leave one source out: head trained without the source, tested on it": _interval_rows(loso),
        "same hospital: grouped cross-validation within the source": _interval_rows(same),
    }


def _nonempty(panels: dict[str, pd.DataFrame], path: Path) -> tuple[Path, dict[str, pd.DataFrame]]:
    """The panels with rows; with none, a stale figure at ``path`` is removed."""
    path = Path(path)
    panels = {k: t for k, t in panels.items() if len(t)}
    if not panels:
        path.unlink(missing_ok=True)
    return path, panels


def shortcut_figure(checks: dict, path: Path) -> Path | None:
    """Save the shortcut-check figure; with nothing to plot, remove a stale one and return None."""
    from cxrstudy import plots

    path, panels = _nonempty(shortcut_panels(checks), path)
    if not panels:
        return None
    fig = plots.plot_intervals(
        panels,
        {"chance (two balanced classes)": 0.5},
        "accuracy (95% CI, patient-group bootstrap)",
        "Shortcut checks: what a linear head reads from the images",
    )
    plots.save_figure(fig, path, close=True)
    return path


def config_label(cfg: dict) -> str:
    """``scenario decomp|nodecomp [variant] (task, n seeds)`` of a ``seeds`` summary entry (figure rows)."""
    label = f"{cfg['scenario']} {'decomp' if cfg['decomposition'] else 'nodecomp'}"
    label += f" [{cfg['variant']}]" if cfg["variant"] != "baseline" else ""
    n = cfg["n_seeds"]
    return label + f" ({cfg['task']}, {n} seed{'s' if n != 1 else ''}"


def scorecard_panels(summary: Sequence[dict]) -> dict[str, pd.DataFrame]:
    """One table per goal (label, value, ci_low, ci_high, target, op) from results.json ``scorecard_summary``:
    a row per configuration, the seed mean with the range of its seeds' 95% intervals as the bar."""
    from cxrstudy.evaluation.scorecard import GOALS

    panels = {}
    for goal in GOALS:
        rows = []
        for cfg in summary:
            g = next((x for x in cfg.get("goals") or [] if x["goal"] == goal.goal), None)
            if g is None:
                continue
            probe = "probe" in ((cfg.get("metrics") or {}).get(goal.metric) or {}).get("methods", [])
            rows.append(
                {
                    "label": config_label(cfg) + (", probe)" if probe else ")"),
                    "value": g["mean"],
                    "ci_low": g["interval_low"],
                    "ci_high": g["interval_high"],
                    "target": g["target"],
                    "op": goal.op,
                }
            )
        title = f"{goal.goal} {goal.metric} ({goal.op} " + (
            f"majority + {100 * goal.margin:.0f} points)" if goal.relative_to else f"{goal.target:.4g})"
        )
        panels[title] = pd.DataFrame(rows, columns=["label", "value", "ci_low", "ci_high", "target", "op"])
    return panels


def scorecard_figure(summary: Sequence[dict], path: Path) -> Path | None:
    """Save the scorecard figure (one panel per goal, a row per configuration) from results.json
    ``scorecard_summary``; with no entries, remove a stale one and return None."""
    from cxrstudy import plots

    path, panels = _nonempty(scorecard_panels(summary), path)
    if not panels:
        return None
    fig = plots.plot_scorecard(
        panels,
        "seed mean; bar: lowest to highest bound of the seeds' 95% intervals (patient-group bootstrap, unseen films)",
        "Confound-free scorecard per configuration over seeds: dashed lines are the goals",
    )
    plots.save_figure(fig, path, close=True)
    return path
