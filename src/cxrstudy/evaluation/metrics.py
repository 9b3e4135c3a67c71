"""Test-set metrics with patient-group bootstrap intervals, calibration and paired comparisons.

All functions are pure (numpy / scikit-learn / scipy). Conventions:

* ``classes`` fixes the column order of ``probs`` and the integer code of each label.
* The bootstrap (``cxrstudy.stats``) resamples whole **patient groups** with replacement (as many
  groups as the test set has); an image enters a replicate as often as its group was drawn (per-image
  integer weights). Intervals are percentile intervals. A replicate in which a metric is undefined (e.g. a class has no images, or no
  image is predicted as that class, for precision) is skipped for that metric only; ``n_boot`` says
  how many replicates were used. Percentile intervals are reported as they are: with skewed or
  degenerate resamples the point estimate can lie just outside its interval.
* ROC-AUC and PR-AUC (average precision, scikit-learn's step definition) are one-vs-rest per class;
  the headline ``roc_auc`` / ``pr_auc`` are their unweighted mean over the task's classes. They are
  computed by a vectorised weighted implementation checked against scikit-learn in the tests
  (scikit-learn's per-call overhead made 1,000 replicates x several runs too slow on 2 CPU cores).
* Paired comparisons: :func:`clustered_mcnemar` (McNemar on patient clusters, Obuchowski 1998) and
  :func:`paired_difference_ci` (one shared patient-group bootstrap); ``stats.holm`` adjusts a family of
  p-values. :func:`mcnemar` is the plain image-level test.
* ECE: top-label confidence in ``n_bins`` equal-width bins on [0, 1] (last bin closed),
  ``sum_b n_b / n * |accuracy_b - confidence_b|``. Brier: scikit-learn's multi-class Brier score
  with ``scale_by_half=True`` (in [0, 1]; equals the usual binary Brier score for two classes).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import brier_score_loss

from cxrstudy.stats import (
    bootstrap_weights,
    group_array,
    not_estimable,
    patients_per_class,
    percentile_interval,
)

#: Below this many discordant pairs McNemar's test uses the exact binomial distribution.
MCNEMAR_EXACT_BELOW = 25
#: Scalar metrics that :func:`paired_difference_ci` can compare.
SCALAR_METRICS: tuple[str, ...] = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "pr_auc")
PER_CLASS_METRICS: tuple[str, ...] = ("sensitivity", "specificity", "precision", "f1", "roc_auc", "pr_auc")


def encode_labels(labels: Sequence, classes: Sequence[str], what: str = "label") -> np.ndarray:
    """Class names (or integer codes) to integer codes in ``classes`` order; unknown values raise."""
    arr = np.asarray(labels)
    if arr.dtype.kind in "iu":
        bad = (arr < 0) | (arr >= len(classes))
        if bad.any():
            raise ValueError(f"{what} code {arr[bad][0]} out of range for classes {list(classes)}")
        return arr.astype(int)
    index = {c: i for i, c in enumerate(classes)}
    out = np.empty(len(arr), dtype=int)
    for i, value in enumerate(arr.tolist()):
        if value not in index:
            raise ValueError(f"{what} {value!r} (row {i}) is not one of the classes {list(classes)}")
        out[i] = index[value]
    return out


def _check_probs(probs: np.ndarray, n: int, k: int) -> np.ndarray:
    """Validate a probability matrix: shape (n, k), finite, in [0, 1]."""
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or probs.shape != (n, k):
        raise ValueError(f"probs has shape {probs.shape}; expected ({n}, {k}) for {n} labels and {k} classes")
    if not np.isfinite(probs).all() or (probs < -1e-6).any() or (probs > 1 + 1e-6).any():  # float32 composition
        raise ValueError("probs must be finite probabilities in [0, 1]")
    sums = probs.sum(axis=1)
    if n and not np.allclose(sums, 1.0, atol=1e-3):
        bad = int(np.argmax(np.abs(sums - 1.0)))
        raise ValueError(f"probs rows must sum to 1; row {bad} sums to {sums[bad]:.4f}")
    return np.clip(probs, 0.0, 1.0) / sums[:, None] if n else probs  # float32 round-off


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with NaN where den == 0 (an undefined metric in that replicate)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _weighted_ranking_metrics(scores: np.ndarray, positive: np.ndarray, W: np.ndarray) -> tuple:
    """Weighted ROC-AUC and average precision of one score for every weight row of ``W`` (B, n).

    Ties in ``scores`` are grouped (one threshold per distinct score), as in scikit-learn.
    Returns two (B,) arrays, NaN where undefined (no positive, or for ROC no negative, weight).
    """
    order = np.argsort(-scores, kind="mergesort")
    s = scores[order]
    pos = positive[order].astype(float)
    Ws = W[:, order]
    tp = np.cumsum(Ws * pos, axis=1)
    fp = np.cumsum(Ws * (1.0 - pos), axis=1)
    # last index of each tie group of distinct scores
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp, fp = tp[:, last], fp[:, last]
    p_tot, n_tot = tp[:, -1:], fp[:, -1:]
    tpr = _safe_div(tp, p_tot)
    fpr = _safe_div(fp, n_tot)
    tpr0 = np.concatenate([np.zeros((len(W), 1)), tpr], axis=1)
    fpr0 = np.concatenate([np.zeros((len(W), 1)), fpr], axis=1)
    roc = np.sum(np.diff(fpr0, axis=1) * (tpr0[:, 1:] + tpr0[:, :-1]) / 2.0, axis=1)
    precision = np.nan_to_num(_safe_div(tp, tp + fp))
    ap = np.sum(np.diff(tpr0, axis=1) * precision, axis=1)
    roc = np.where((p_tot[:, 0] > 0) & (n_tot[:, 0] > 0), roc, np.nan)
    ap = np.where(p_tot[:, 0] > 0, ap, np.nan)
    return roc, ap


def _metrics_for_weights(y: np.ndarray, pred: np.ndarray, probs: np.ndarray, W: np.ndarray) -> dict:
    """Every bootstrapped metric for each weight row of ``W`` (B, n): name -> (B,) array (NaN = undefined)."""
    k = probs.shape[1]
    onehot_pairs = np.zeros((len(y), k * k))
    onehot_pairs[np.arange(len(y)), y * k + pred] = 1.0
    C = (W @ onehot_pairs).reshape(len(W), k, k)  # C[b, true, pred]
    total = C.sum(axis=(1, 2))
    tp = np.diagonal(C, axis1=1, axis2=2)
    support = C.sum(axis=2)
    predicted = C.sum(axis=1)
    fn, fp = support - tp, predicted - tp
    tn = total[:, None] - tp - fn - fp
    out: dict[str, np.ndarray] = {}
    sens = _safe_div(tp, support)
    spec = _safe_div(tn, tn + fp)
    prec = _safe_div(tp, predicted)
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
    out["accuracy"] = _safe_div(tp.sum(axis=1), total)
    # a replicate with a class missing leaves the balanced accuracy undefined (NaN propagates)
    out["balanced_accuracy"] = sens.mean(axis=1)
    out["macro_f1"] = np.where(np.isnan(sens).any(axis=1), np.nan, np.nan_to_num(f1).mean(axis=1))
    rocs, aps = [], []
    for c in range(k):
        roc, ap = _weighted_ranking_metrics(probs[:, c], y == c, W)
        rocs.append(roc)
        aps.append(ap)
        out[f"sensitivity/{c}"] = sens[:, c]
        out[f"specificity/{c}"] = spec[:, c]
        out[f"precision/{c}"] = prec[:, c]
        out[f"f1/{c}"] = f1[:, c]
        out[f"roc_auc/{c}"] = roc
        out[f"pr_auc/{c}"] = ap
    out["roc_auc"] = np.mean(rocs, axis=0)
    out["pr_auc"] = np.mean(aps, axis=0)
    return out


def _prepare(y_true, probs, classes, pred) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encode labels / predictions and validate probabilities."""
    y = encode_labels(y_true, classes)
    probs = _check_probs(probs, len(y), len(classes))
    p = probs.argmax(axis=1) if pred is None else encode_labels(pred, classes, what="prediction")
    if len(p) != len(y):
        raise ValueError(f"pred has {len(p)} entries for {len(y)} labels")
    return y, probs, p


def compute_metrics(
    y_true: Sequence,
    probs: np.ndarray,
    classes: Sequence[str],
    groups: Sequence | None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    pred: Sequence | None = None,
    n_bins: int = 10,
) -> dict:
    """All test metrics with class-stratified patient-group bootstrap CIs (``groups=None``: resample images
    instead); with fewer than ``stats.MIN_PATIENTS_PER_CLASS`` patients in a class every interval is left out and
    ``not_estimable`` says why.

    ``pred`` overrides the arg-max prediction (e.g. DeTraC's hard rule); probabilities still drive
    the ranking metrics and calibration. Returns a JSON-ready dict (see docs/results_schema.md).
    """
    classes = list(classes)
    y, probs, p = _prepare(y_true, probs, classes, pred)
    if len(y) == 0:
        raise ValueError("no images to evaluate")
    g = group_array(groups, len(y))
    point = _metrics_for_weights(y, p, probs, np.ones((1, len(y))))
    reps: dict[str, list[np.ndarray]] = {name: [] for name in point}
    for W in bootstrap_weights(g, n_bootstrap, seed, strata=y):
        for name, values in _metrics_for_weights(y, p, probs, W).items():
            reps[name].append(values)
    merged = {name: np.concatenate(v) if v else np.array([]) for name, v in reps.items()}
    res: dict = {
        "n": int(len(y)),
        "n_groups": int(len(np.unique(g))),
        "n_patients": int(len(np.unique(g))),
        "patients_per_class": patients_per_class(np.asarray(classes)[y], g),
        "classes": classes,
    }
    for name in SCALAR_METRICS:
        res[name] = percentile_interval(point[name][0], merged[name], level)
    res["per_class"] = {
        cls: {
            "support": int((y == c).sum()),
            **{m: percentile_interval(point[f"{m}/{c}"][0], merged[f"{m}/{c}"], level) for m in PER_CLASS_METRICS},
        }
        for c, cls in enumerate(classes)
    }
    res["ece"] = ece(y, probs, classes, n_bins=n_bins)
    res["brier"] = brier(y, probs, classes)
    res["confusion_matrix"] = confusion(y, p, classes).tolist()
    res["bootstrap"] = {
        # with one image per group, resampling groups is resampling images
        "unit": "patient_group" if res["n_groups"] < res["n"] else "image",
        "stratified_by": "label",
        "n_requested": int(n_bootstrap),
        "seed": int(seed),
        "level": level,
        "method": "percentile",
    }
    if why := not_estimable(np.asarray(classes)[y], g):
        res["not_estimable"] = why
        for iv in [*(res[m] for m in SCALAR_METRICS), *(d[m] for d in res["per_class"].values() for m in PER_CLASS_METRICS)]:
            iv.update(ci_low=None, ci_high=None, note=why)
    return res


def confusion(y_true: Sequence, pred: Sequence, classes: Sequence[str]) -> np.ndarray:
    """Confusion matrix (rows = true class, columns = predicted class, ``classes`` order)."""
    y = encode_labels(y_true, classes)
    p = encode_labels(pred, classes, what="prediction")
    k = len(classes)
    return np.bincount(y * k + p, minlength=k * k).reshape(k, k)


def reliability_curve(
    y_true: Sequence, probs: np.ndarray, classes: Sequence[str], n_bins: int = 10
) -> pd.DataFrame:
    """Top-label reliability table: per equal-width confidence bin, count, mean confidence, accuracy."""
    y = encode_labels(y_true, classes)
    probs = _check_probs(probs, len(y), len(classes))
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        m = bins == b
        rows.append(
            {
                "bin_lower": edges[b],
                "bin_upper": edges[b + 1],
                "count": int(m.sum()),
                "confidence": float(conf[m].mean()) if m.any() else np.nan,
                "accuracy": float(correct[m].mean()) if m.any() else np.nan,
            }
        )
    return pd.DataFrame(rows)


def ece(y_true: Sequence, probs: np.ndarray, classes: Sequence[str], n_bins: int = 10) -> float:
    """Expected calibration error of the top-label confidence (equal-width bins, see module doc)."""
    curve = reliability_curve(y_true, probs, classes, n_bins=n_bins)
    used = curve[curve["count"] > 0]
    n = used["count"].sum()
    return float((used["count"] / n * (used["accuracy"] - used["confidence"]).abs()).sum())


def brier(y_true: Sequence, probs: np.ndarray, classes: Sequence[str]) -> float:
    """Multi-class Brier score scaled by half (scikit-learn), in [0, 1]."""
    y = encode_labels(y_true, classes)
    probs = _check_probs(probs, len(y), len(classes))
    return float(brier_score_loss(y, probs, labels=list(range(len(classes))), scale_by_half=True))


def mcnemar(pred_a: Sequence, pred_b: Sequence, y_true: Sequence) -> dict:
    """McNemar's test of two classifiers on the same images: exact binomial below 25 discordant pairs,
    else chi-square with continuity correction. Inputs are aligned label arrays (any comparable type).
    """
    a, b, y = (np.asarray(v) for v in (pred_a, pred_b, y_true))
    if not (len(a) == len(b) == len(y)):
        raise ValueError(f"McNemar needs aligned arrays; got lengths {len(a)}, {len(b)}, {len(y)}")
    a_only = int(((a == y) & (b != y)).sum())
    b_only = int(((a != y) & (b == y)).sum())
    n = a_only + b_only
    if n == 0:
        stat, p, method = 0.0, 1.0, "no discordant pairs"
    elif n < MCNEMAR_EXACT_BELOW:
        stat = float(min(a_only, b_only))
        p = float(stats.binomtest(a_only, n, 0.5).pvalue)
        method = "exact binomial"
    else:
        stat = (abs(a_only - b_only) - 1.0) ** 2 / n
        p = float(stats.chi2.sf(stat, df=1))
        method = "chi-square, continuity corrected"
    return {
        "n": int(len(y)),
        "a_only_correct": a_only,
        "b_only_correct": b_only,
        "statistic": float(stat),
        "p_value": p,
        "method": method,
    }


def clustered_mcnemar(pred_a: Sequence, pred_b: Sequence, y_true: Sequence, groups: Sequence | None) -> dict:
    """McNemar's test on patient clusters (Obuchowski 1998, Stat Med 17:1495): chi-square (1 df) of the
    paired difference in accuracy with a cluster-robust variance; ``groups=None``: each image a cluster."""
    a, b, y = (np.asarray(v) for v in (pred_a, pred_b, y_true))
    if not (len(a) == len(b) == len(y)):
        raise ValueError(f"McNemar needs aligned arrays; got lengths {len(a)}, {len(b)}, {len(y)}")
    g = group_array(groups, len(y))
    _, codes = np.unique(g, return_inverse=True)
    a_only = ((a == y) & (b != y)).astype(float)
    b_only = ((a != y) & (b == y)).astype(float)
    d_i = np.bincount(codes, a_only - b_only)  # per cluster: a-only minus b-only correct
    n_i = np.bincount(codes).astype(float)
    n, k = float(len(y)), len(n_i)
    out = {
        "n": int(n),
        "n_clusters": int(k),
        "a_only_correct": int(a_only.sum()),
        "b_only_correct": int(b_only.sum()),
        "unit": "patient_group",
    }
    diff = d_i.sum()
    var_sum = float(np.sum((d_i - n_i * diff / n) ** 2)) * k / (k - 1) if k > 1 else 0.0
    if a_only.sum() + b_only.sum() == 0:
        stat, p, method = 0.0, 1.0, "no discordant pairs"
    elif var_sum <= 0:
        stat, p, method = float("inf"), None, "clustered (Obuchowski): zero variance, no p-value"
    else:
        stat = float(diff**2 / var_sum)
        p = float(stats.chi2.sf(stat, df=1))
        method = "chi-square, clustered on patient groups (Obuchowski 1998)"
    return {**out, "statistic": stat if np.isfinite(stat) else None, "p_value": p, "method": method}


def paired_difference_ci(
    y_true: Sequence,
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    classes: Sequence[str],
    groups: Sequence | None,
    metric: str = "accuracy",
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    pred_a: Sequence | None = None,
    pred_b: Sequence | None = None,
) -> dict:
    """Difference ``metric(a) - metric(b)`` on the same images, CI from one shared patient-group bootstrap."""
    if metric not in SCALAR_METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {SCALAR_METRICS}")
    classes = list(classes)
    y, pa_probs, pa = _prepare(y_true, probs_a, classes, pred_a)
    _, pb_probs, pb = _prepare(y_true, probs_b, classes, pred_b)
    g = group_array(groups, len(y))
    ones = np.ones((1, len(y)))
    point = (
        _metrics_for_weights(y, pa, pa_probs, ones)[metric]
        - _metrics_for_weights(y, pb, pb_probs, ones)[metric]
    )
    reps = [
        _metrics_for_weights(y, pa, pa_probs, W)[metric] - _metrics_for_weights(y, pb, pb_probs, W)[metric]
        for W in bootstrap_weights(g, n_bootstrap, seed, strata=y)
    ]
    out = percentile_interval(point[0], np.concatenate(reps) if reps else np.array([]), level)
    out["metric"] = metric
    if why := not_estimable(np.asarray(classes)[y], g):
        out.update(ci_low=None, ci_high=None, note=why)
    return out


# --------------------------------------------------------------------------- predictions.csv helpers


def prob_columns(classes: Sequence[str]) -> list[str]:
    """Names of the composed probability columns of predictions.csv, in ``classes`` order."""
    return [f"prob_{c}" for c in classes]


def probs_from_frame(df: pd.DataFrame, classes: Sequence[str], where: str = "predictions") -> np.ndarray:
    """The (n, k) probability matrix of a predictions frame; missing columns raise naming ``where``."""
    cols = prob_columns(classes)
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{where}: missing probability columns {missing}")
    return df[cols].to_numpy(dtype=float)


def split_rows(df: pd.DataFrame, split: str) -> pd.DataFrame:
    """Rows of one split."""
    return df[df["split"] == split].reset_index(drop=True)


def split_accuracy(df: pd.DataFrame, split: str) -> float | None:
    """Arg-max accuracy on one split (None when the split is empty)."""
    rows = split_rows(df, split)
    return float((rows["pred"] == rows["label"]).mean()) if len(rows) else None


def evaluate_predictions(
    df: pd.DataFrame,
    classes: Sequence[str],
    n_bootstrap: int = 1000,
    seed: int = 0,
    where: str = "predictions",
) -> dict:
    """Metrics of a predictions frame (label, patient_group, prob_<class>…, [pred_hard]).

    With a ``pred_hard`` column (decomposition runs), ``hard_rule`` adds the accuracy and balanced
    accuracy of DeTraC's hard rule on the same bootstrap.
    """
    for col in ("label", "patient_group"):
        if col not in df.columns:
            raise ValueError(f"{where}: missing column {col!r}")
    probs = probs_from_frame(df, classes, where)
    res = compute_metrics(df["label"], probs, classes, df["patient_group"], n_bootstrap, seed)
    if "pred_hard" in df.columns and df["pred_hard"].notna().all():
        hard = compute_metrics(
            df["label"], probs, classes, df["patient_group"], n_bootstrap, seed, pred=df["pred_hard"]
        )
        res["hard_rule"] = {k: hard[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}
    return res


def per_source_accuracy(df: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Accuracy and image count per (source, label) of a predictions frame (arg-max prediction)."""
    probs = probs_from_frame(df, classes)
    correct = probs.argmax(axis=1) == encode_labels(df["label"], classes)
    out = (
        pd.DataFrame({"source": df["source"].to_numpy(), "label": df["label"].to_numpy(), "correct": correct})
        .groupby(["source", "label"], as_index=False)
        .agg(n=("correct", "size"), accuracy=("correct", "mean"))
    )
    return out
