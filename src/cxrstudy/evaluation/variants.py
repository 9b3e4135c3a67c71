"""Each variant against its baseline on the same films: paired, patient-clustered differences of the goal metrics.

For a (task, backbone, scenario, decomposition) with a baseline and variants, both out-of-fold wholes
(``evaluation.cv.oof_runs``) score the same films. Per metric (S1 ieee8023 COVID-19 vs pneumonia ROC-AUC and S4
NIH pneumonia vs normal ROC-AUC where the task scores both classes, S2 Actualmed balanced accuracy on the folds'
ensembles, and the paper's task accuracy beside them), the difference variant minus baseline gets a 95% interval
from one class-stratified patient bootstrap over the films both scored. The fold spread enters too: each fold's
own difference on its own films, and a combined interval whose half-width adds the bootstrap's and the folds'
standard error in quadrature. ``reading`` is better (combined interval above zero), worse (below) or
undetermined.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from cxrstudy.evaluation.metrics import paired_difference_ci
from cxrstudy.runspec import RunSpec

#: (goal, metric, split, source or None, positive, negative, statistic) of each compared metric.
METRICS: tuple[tuple[str, str, str, str | None, str, str, str], ...] = (
    ("S1", "ieee8023_covid_vs_pneumonia_auc", "test", "ieee8023", "covid", "pneumonia", "roc_auc"),
    ("S2", "actualmed_covid_vs_normal_balanced_accuracy", "holdout", None, "covid", "normal", "balanced_accuracy"),
    ("S4", "nih_pneumonia_vs_normal_auc", "test", "nih", "pneumonia", "normal", "roc_auc"),
    ("paper", "paper_task_accuracy", "test", None, "covid", "normal", "accuracy"),
)


def _source_names(preds: pd.DataFrame, manifest: pd.DataFrame) -> pd.Series:
    return preds["image"].map(manifest.drop_duplicates("image").set_index("image")["source_name"])


def _rows(run: dict, manifest: pd.DataFrame, split: str, source: str | None, pos: str, neg: str) -> pd.DataFrame:
    """One run's rows of a metric (split, source, the two labels), with the pair score P(pos) / (P(pos) + P(neg))."""
    p = run["predictions"]
    if f"prob_{pos}" not in p.columns or f"prob_{neg}" not in p.columns:
        return p.iloc[0:0]
    rows = p[(p["split"] == split) & p["label"].isin([pos, neg])]
    if source is not None:
        rows = rows[_source_names(rows, manifest).to_numpy() == source]
    total = rows[f"prob_{pos}"] + rows[f"prob_{neg}"]
    return rows.assign(score=np.where(total > 0, rows[f"prob_{pos}"] / total.where(total > 0, 1), 0.5))


def _statistic(y: np.ndarray, score: np.ndarray, pos: str, stat: str) -> float | None:
    """One fold's value of a metric from the pair score."""
    if len(set(y)) < 2:
        return None
    truth = (y == pos).astype(int)
    if stat == "roc_auc":
        return float(roc_auc_score(truth, score))
    pred = (score >= 0.5).astype(int)
    return float(balanced_accuracy_score(truth, pred) if stat == "balanced_accuracy" else (pred == truth).mean())


def _fold_differences(a: dict, b: dict, manifest: pd.DataFrame, metric: tuple) -> list[float]:
    """Per fold: the fold models' difference on that fold's own rows (S2: on the held-out hospital)."""
    _, _, split, source, pos, neg, stat = metric
    out = []
    for fa, fb in zip(a.get("fold_runs", ()), b.get("fold_runs", ()), strict=False):
        ra, rb = _rows(fa, manifest, split, source, pos, neg), _rows(fb, manifest, split, source, pos, neg)
        common = sorted(set(ra["image"]) & set(rb["image"]))
        if not common:
            continue
        ra, rb = ra.set_index("image").loc[common], rb.set_index("image").loc[common]
        va = _statistic(ra["label"].to_numpy(), ra["score"].to_numpy(), pos, stat)
        vb = _statistic(rb["label"].to_numpy(), rb["score"].to_numpy(), pos, stat)
        if va is not None and vb is not None:
            out.append(va - vb)
    return out


def paired_difference(
    a: dict, b: dict, manifest: pd.DataFrame, metric: tuple, n_bootstrap: int = 1000, seed: int = 0
) -> dict | None:
    """Variant ``a`` minus baseline ``b`` on one metric (module docstring); None when they share no such films."""
    goal, name, split, source, pos, neg, stat = metric
    ra, rb = _rows(a, manifest, split, source, pos, neg), _rows(b, manifest, split, source, pos, neg)
    common = sorted(set(ra["image"]) & set(rb["image"]))
    if not common or ra.set_index("image").loc[common, "label"].nunique() < 2:
        return None
    ra, rb = ra.set_index("image").loc[common].reset_index(), rb.set_index("image").loc[common].reset_index()
    probs = [np.column_stack([r["score"], 1 - r["score"]]) for r in (ra, rb)]
    diff = paired_difference_ci(ra["label"], probs[0], probs[1], [pos, neg], ra["patient_group"], stat, n_bootstrap, seed)
    folds = _fold_differences(a, b, manifest, metric)
    out = {
        "goal": goal,
        "metric": name,
        "statistic": stat,
        "n": len(common),
        "n_patients": int(ra["patient_group"].nunique()),
        "difference": {k: diff.get(k) for k in ("value", "ci_low", "ci_high", "n_boot", "note")},
        "per_fold": folds,
    }
    combined = _combined(diff, folds)
    out["combined"] = combined
    lo, hi = combined.get("ci_low"), combined.get("ci_high")
    out["reading"] = "undetermined" if lo is None else "better" if lo > 0 else "worse" if hi < 0 else "undetermined"
    return out


def _combined(diff: dict, folds: Sequence[float]) -> dict:
    """The bootstrap interval widened by the folds' standard error (half-widths added in quadrature)."""
    value, lo, hi = diff.get("value"), diff.get("ci_low"), diff.get("ci_high")
    if value is None or lo is None or hi is None:
        return {"value": value, "ci_low": None, "ci_high": None}
    se = float(np.std(folds, ddof=1) / np.sqrt(len(folds))) if len(folds) > 1 else 0.0
    below, above = value - lo, hi - value
    z = 1.959963984540054
    return {
        "value": value,
        "ci_low": value - float(np.hypot(below, z * se)),
        "ci_high": value + float(np.hypot(above, z * se)),
        "fold_se": se,
    }


def variant_differences(
    runs: Sequence[dict], manifest: pd.DataFrame, n_bootstrap: int = 1000, seed: int = 0
) -> list[dict]:
    """Every variant against its baseline (same task, backbone, scenario, decomposition, seed) on each metric
    both score."""
    by_key = {RunSpec.from_record(r["info"]).config_key: r for r in runs}
    out = []
    for key, run in by_key.items():
        spec = RunSpec.from_record(run["info"])
        if spec.variant == "baseline":
            continue
        base = by_key.get((*key[:-1], "baseline"))
        if base is None:
            continue
        for metric in METRICS:
            d = paired_difference(run, base, manifest, metric, n_bootstrap, seed)
            if d is not None:
                out.append({"task": spec.task, "scenario": spec.scenario, "decomposition": spec.decomposition,
                            "variant": spec.variant, **d})
    return out
