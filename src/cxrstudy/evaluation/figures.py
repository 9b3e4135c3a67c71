"""The evaluation figures of notebook 05, saved under ``reports/<profile>/evaluation/``.

``HEADLINE_FIGURE``, ``SCORECARD_FIGURE`` and ``SHORTCUT_FIGURE`` are also shown on the profile's index.html.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

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


# --------------------------------------------------------------------------- plotting primitives


def plot_roc_pr(y_true, probs, classes, title: str | None = None) -> Figure:
    """One-vs-rest ROC and precision-recall curves per class (scikit-learn curves)."""
    import numpy as np
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    y = np.asarray(y_true)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8.4, 3.6))
    for j, c in enumerate(classes):
        pos = y == c
        if pos.all() or not pos.any():
            continue
        fpr, tpr, _ = roc_curve(pos, probs[:, j])
        a1.plot(fpr, tpr, label=f"{c} (AUC {auc(fpr, tpr):.3f})")
        prec, rec, _ = precision_recall_curve(pos, probs[:, j])
        a2.step(rec, prec, where="post", label=f"{c} (prevalence {pos.mean():.2f})")
    a1.plot([0, 1], [0, 1], ":", color="grey")
    a1.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (one-vs-rest)")
    a2.set(xlabel="recall", ylabel="precision", title="precision-recall", ylim=(0, 1.02))
    for a in (a1, a2):
        a.legend(fontsize=7, loc="lower right" if a is a1 else "lower left")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


def plot_reliability(
    curve: pd.DataFrame, ece: float | None = None, title: str | None = None, ax: Axes | None = None
) -> Axes:
    """Reliability diagram from ``metrics.reliability_curve``: accuracy vs confidence per bin, counts as bars."""
    ax = plt.subplots(figsize=(3.8, 3.6))[1] if ax is None else ax
    used = curve[curve["count"] > 0]
    width = float((curve["bin_upper"] - curve["bin_lower"]).iloc[0])
    ax.bar(
        used["bin_lower"],
        used["accuracy"],
        width=width,
        align="edge",
        edgecolor="k",
        alpha=0.7,
        label="accuracy in bin",
    )
    ax.plot(used["confidence"], used["accuracy"], "o", color="C3", ms=4, label="mean confidence")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="confidence (top class)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02))
    ttl = (title or "") + (f"\nECE {ece:.3f}" if ece is not None else "")
    ax.set_title(ttl.strip(), fontsize=8)
    ax.legend(fontsize=7, loc="upper left")
    return ax


def plot_per_source_heatmap(table: pd.DataFrame, title: str | None = None) -> Figure:
    """Heat map of accuracy, rows = runs, columns = source/label; ``table`` is already pivoted (NaN = none)."""
    import seaborn as sns

    longest = max((len(str(i)) for i in table.index), default=10)
    fig, ax = plt.subplots(figsize=(2.5 + 0.07 * longest + 1.0 * table.shape[1], 2.0 + 0.45 * table.shape[0]))
    sns.heatmap(
        table, annot=True, fmt=".2f", cmap="RdYlGn", vmin=0, vmax=1, ax=ax, cbar_kws={"label": "accuracy"}
    )
    ax.tick_params(axis="x", labelrotation=30)
    ax.set_xlabel("source / label")
    ax.set_ylabel("")
    ax.tick_params(labelsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def _image_grid(n: int, ncols: int) -> tuple[Figure, object]:
    """A figure of ``n`` image panels, ``ncols`` wide at most, axes switched off."""
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.4 * ncols, 2.6 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes


def plot_saliency_regions(images, cams, titles, regions, ncols: int = 4) -> Figure:
    """Images with their Grad-CAM overlaid (jet, 45%) and each film's lung region (boolean, map grid) outlined."""
    import numpy as np

    fig, axes = _image_grid(len(images), ncols)
    for ax, img, cam, t, region in zip(axes.flat, images, cams, titles, regions, strict=False):
        ax.imshow(np.asarray(img.resize((cam.shape[1], cam.shape[0]))), cmap="gray")
        ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        if region is not None and np.asarray(region).any() and not np.asarray(region).all():
            ax.contour(np.asarray(region, dtype=float), levels=[0.5], colors="white", linewidths=0.8, linestyles="--")
        ax.set_title(t, fontsize=7)
    fig.tight_layout()
    return fig


def plot_intervals(
    panels: dict[str, pd.DataFrame],
    reference: dict[str, float] | None = None,
    xlabel: str = "accuracy (95% CI, patient bootstrap)",
    title: str | None = None,
) -> Figure:
    """Points with horizontal 95% error bars (tables of label, value, ci_low, ci_high; fractions), one panel
    per table, reference values as vertical lines; the x axis spans intervals and references within [0, 1]."""
    import numpy as np

    panels = {k: t for k, t in panels.items() if len(t)}
    rows = [len(t) for t in panels.values()] or [1]
    fig, axes = plt.subplots(
        len(rows), 1, figsize=(6.8, 0.9 + 0.3 * sum(rows) + 0.5 * len(rows)), sharex=True, squeeze=False,
        gridspec_kw={"height_ratios": rows},
    )
    lows = [float(np.nanmin(t[["value", "ci_low"]].to_numpy(dtype=float))) for t in panels.values()]
    lows += list((reference or {}).values())
    lo = max(0.0, min(lows, default=0.0) - 0.05)
    for ax, (name, t) in zip(axes[:, 0], panels.items(), strict=False):
        y = np.arange(len(t))
        v = t["value"].to_numpy(dtype=float)
        err = np.vstack([v - t["ci_low"].to_numpy(dtype=float), t["ci_high"].to_numpy(dtype=float) - v])
        ax.errorbar(v, y, xerr=np.nan_to_num(err), fmt="o", color="C0", ms=4, capsize=3, lw=1.2)
        ax.set_yticks(y, t["label"], fontsize=7)
        ax.set_ylim(len(t) - 0.5, -0.5)
        ax.grid(axis="x", color="0.9")
        if name:
            ax.set_title(name, fontsize=8, loc="left")
        for i, (ref, val) in enumerate((reference or {}).items()):
            ax.axvline(val, color=f"C{i + 1}", ls="-" if i == 0 else "--", lw=1.2, label=f"{ref} {100 * val:.2f}%")
    axes[-1, 0].set_xlim(lo, 1.0)
    axes[-1, 0].set_xlabel(xlabel, fontsize=8)
    if reference:
        axes[0, 0].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


#: Reference marks of the scorecard figure: column -> legend label and matplotlib style.
REFERENCE_MARKS: dict[str, dict] = {
    "view_only": {"label": "view only (AP/PA)", "kw": {"marker": "x", "color": "C1", "ms": 6, "mew": 1.5}},
    "confounders_only": {"label": "view + age + sex", "kw": {"marker": "d", "color": "C4", "ms": 5, "mfc": "none"}},
    "mask_shape_only": {"label": "lung-mask shape", "kw": {"marker": "s", "color": "C5", "ms": 4, "mfc": "none"}},
    "view_matched": {"label": "model, view-matched", "kw": {"marker": "o", "color": "C2", "ms": 6, "mfc": "none"}},
}


def plot_scorecard(panels: dict[str, pd.DataFrame], xlabel: str = "value (95% CI)", title: str | None = None) -> Figure:
    """One panel per metric: rows (label, value, ci_low, ci_high, target, op) as points with horizontal
    intervals; the goal as a vertical line when all rows share it, else a marker per row; missing values
    are listed as "n/a". Optional columns add reference marks per row: ``view_only`` (the projection rule),
    ``confounders_only`` (view, age and sex) and ``view_matched`` (the model within projection)."""
    import numpy as np

    panels = {k: t for k, t in panels.items() if len(t)}
    rows = [len(t) for t in panels.values()] or [1]
    fig, axes = plt.subplots(
        len(rows), 1, figsize=(7.2, 1.0 + 0.32 * sum(rows) + 0.55 * len(rows)), sharex=True, squeeze=False,
        gridspec_kw={"height_ratios": rows},
    )
    for ax, (name, t) in zip(axes[:, 0], panels.items(), strict=False):
        y = np.arange(len(t))
        v = t["value"].to_numpy(dtype=float)
        lo, hi = t["ci_low"].to_numpy(dtype=float), t["ci_high"].to_numpy(dtype=float)
        err = np.nan_to_num(np.vstack([v - lo, hi - v]))
        ok = np.isfinite(v)
        ax.errorbar(v[ok], y[ok], xerr=err[:, ok], fmt="o", color="C0", ms=4, capsize=3, lw=1.2)
        for yi in y[~ok]:
            ax.text(0.01, yi, "n/a", fontsize=7, va="center", color="0.4")
        targets = t["target"].to_numpy(dtype=float)
        known = targets[np.isfinite(targets)]
        if len(known) and np.allclose(known, known[0]):
            ax.axvline(known[0], color="C3", ls="--", lw=1.2)  # the goal itself is in the panel title
        elif len(known):
            ax.plot(targets, y, "|", color="C3", ms=12, mew=2)  # a goal per row (S3: each configuration's chance + 5)
        for col, style in REFERENCE_MARKS.items():
            if col in t.columns:
                ref = t[col].to_numpy(dtype=float)
                has = np.isfinite(ref)
                ax.plot(ref[has], y[has], linestyle="none", label=style["label"], **style["kw"])
        ax.set_yticks(y, t["label"], fontsize=7)
        ax.set_ylim(len(t) - 0.5, -0.5)
        ax.grid(axis="x", color="0.9")
        ax.set_title(name, fontsize=8, loc="left")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, fontsize=6, loc="lower center", ncol=len(handles), frameon=False)
    axes[-1, 0].set_xlim(0.0, 1.0)
    axes[-1, 0].set_xlabel(xlabel, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.02 if handles else 0, 1, 0.985 if title else 1))
    return fig


# --------------------------------------------------------------------------- figures


def _grid(n: int, size: tuple[float, float]) -> tuple[object, Iterator]:
    """A figure with one panel per run (at most four per row); unused panels switched off."""
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
    """Train/valid loss and valid accuracy of one run from its history.csv (a titled empty panel without it)."""
    from cxrstudy import plots

    hist_path = Path(run["dir"]) / "history.csv"
    if hist_path.is_file():
        plots.plot_learning_curve(pd.read_csv(hist_path), ax, stages=False, small=True)
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
    fig = plot_intervals(
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
        plot_reliability(curve, e["test"]["ece"], RunSpec.from_record(e).label(), ax=ax)

    for name, size, draw in (
        ("confusion_matrices", (3.0, 2.8), confusion),
        ("reliability", (3.6, 3.6), reliability),
        ("learning_curves", (3.4, 2.6), _learning_curve),
    ):
        paths[name] = _per_run_grid(runs, size, draw, fig_dir / f"{name}.png")
    for run in runs:
        e, test = entry(run), split_rows(run["predictions"], "test")
        fig = plot_roc_pr(
            test["label"].to_numpy(), probs_from_frame(test, e["classes"]), e["classes"], e["run_id"]
        )
        _save(fig, fig_dir / f"roc_pr_{e['run_id']}.png", paths)
    table = per_source_table(runs)
    if not table.empty:
        _save(
            plot_per_source_heatmap(table, "test accuracy per source and label"),
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
    fig = plot_intervals(
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
    return label + f" ({cfg['task']}, " + ("out of fold" if n == 1 else f"{n} cross-validations")


def scorecard_panels(summary: Sequence[dict]) -> dict[str, pd.DataFrame]:
    """One table per goal (label, value, ci_low, ci_high, target, op) from results.json ``scorecard_summary``, and
    last the paper's task accuracy against the paper's figure (beside the goals, not one): a row per configuration,
    its out-of-fold value with its 95% interval as the bar (over repeated cross-validations: their mean and the
    range of their intervals)."""
    from cxrstudy.evaluation.scorecard import GOALS, PAPER_REFERENCE

    panels = {}
    for goal in (*GOALS, PAPER_REFERENCE):
        rows = []
        for cfg in summary:
            metric = (cfg.get("metrics") or {}).get(goal.metric) or {}
            g = next((x for x in cfg.get("goals") or [] if x["goal"] == goal.goal), None)
            if goal is PAPER_REFERENCE and metric.get("mean") is not None:
                g = {**metric, "target": goal.target}
            if g is None:
                continue
            probe = "probe" in metric.get("methods", [])
            refs = metric.get("confounders") or {}
            rows.append(
                {
                    "label": config_label(cfg) + (", probe)" if probe else ")"),
                    "value": g["mean"],
                    "ci_low": g["interval_low"],
                    "ci_high": g["interval_high"],
                    "target": g["target"],
                    "op": goal.op,
                    "view_only": (refs.get("view_only") or {}).get("value"),
                    "confounders_only": (refs.get("confounders_only") or {}).get("value"),
                    "mask_shape_only": (refs.get("mask_shape_only") or {}).get("value"),
                    "view_matched": (refs.get("view_matched") or {}).get("mean"),
                }
            )
        title = f"{goal.goal} {goal.metric} ({goal.op} " + (
            f"chance + {100 * goal.margin:.0f} points)" if goal.relative_to else f"{goal.target:.4g})"
        )
        if goal is PAPER_REFERENCE:
            title = f"{goal.metric} (the paper's {100 * goal.target:.2f}%; not a confound-free goal)"
        columns = ["label", "value", "ci_low", "ci_high", "target", "op", *REFERENCE_MARKS]
        panels[title] = pd.DataFrame(rows, columns=columns)
    return panels


def scorecard_figure(summary: Sequence[dict], path: Path) -> Path | None:
    """Save the scorecard figure (one panel per goal, a row per configuration) from results.json
    ``scorecard_summary``; with no entries, remove a stale one and return None."""
    from cxrstudy import plots

    path, panels = _nonempty(scorecard_panels(summary), path)
    if not panels:
        return None
    fig = plot_scorecard(
        panels,
        "out of fold; bar: 95% interval (class-stratified patient bootstrap)",
        "Scorecard per configuration: dashed lines are the goals; marks, rules that know only the confounders",
    )
    plots.save_figure(fig, path, close=True)
    return path
