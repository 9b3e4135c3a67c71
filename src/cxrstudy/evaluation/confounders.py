"""Reference rules that know only a confounder, and view-matched versions of the scorecard's metrics.

A scorecard metric compares two labels on some films. Projection (AP or PA), age and sex differ between
those labels in the sources, so a rule that knows nothing of the lungs can score well. On the same films
as the metric, and with the same metric, this module scores:

* ``view_only``: AP vs PA as the only input (films of unknown view left out, their number stated). The rule
  takes the direction that fits these films better (AP → the first label, or AP → the second): an upper
  bound on what projection alone says.
* ``demographics_only``: a patient-grouped cross-validated logistic model on age and sex, a missing value
  being its own level.
* ``confounders_only``: the same model on view, age and sex together.
* ``mask_shape_only`` (when the films carry them): the same model on eight numbers of the lung mask's shape
  (box size, aspect and centre, lung area, left/right balance, shape score), which a lung-field view shows.
* ``view_matched``: the model's own score where projection cannot help: the ROC-AUC over (positive,
  negative) pairs of the same view only; accuracy and balanced accuracy averaged over the AP and PA strata
  that hold both labels, with each stratum's films.

Intervals are 95% percentile intervals of the patient-group bootstrap.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from cxrstudy.evaluation.metrics import compute_metrics
from cxrstudy.stats import bootstrap_weights, group_array, grouped_cv_predict, percentile_interval

#: Known projections; every other value of the manifest's ``view`` is unknown.
VIEWS: tuple[str, ...] = ("AP", "PA")
#: Which summary of compute_metrics each scorecard metric is.
METRIC_KIND: dict[str, str] = {
    "ieee8023_covid_vs_pneumonia_auc": "auc",
    "nih_pneumonia_vs_normal_auc": "auc",
    "actualmed_covid_vs_normal_balanced_accuracy": "balanced_accuracy",
    "paper_task_accuracy": "accuracy",
}
#: The confounder-only rules, in the order results.json lists them (``mask_shape_only`` when the films carry
#: their lung masks' shape numbers, ``mask_shape_*`` columns).
RULES: tuple[str, ...] = ("view_only", "demographics_only", "confounders_only", "mask_shape_only")
#: Prefix of the lung-mask shape columns (``lungs.stage.with_mask_shape``).
MASK_SHAPE_PREFIX = "mask_shape_"
#: Most folds of the grouped cross-validation of the demographic and confounder models.
N_SPLITS = 5
LEVEL = 0.95


def _num(x: object) -> float | None:
    """A JSON-ready float, None for None / NaN / inf."""
    if x is None:
        return None
    x = float(x)
    return x if np.isfinite(x) else None


def binary_metric(
    rows: pd.DataFrame, score: np.ndarray, positive: str, negative: str, kind: str, n_bootstrap: int, seed: int
) -> dict:
    """``kind`` (auc, balanced_accuracy, accuracy) of ``positive`` vs ``negative`` from a score in [0, 1]
    (P(positive); the prediction is its arg-max against 1 - score), with its patient-group interval."""
    probs = np.column_stack([score, 1.0 - np.asarray(score, dtype=float)])
    res = compute_metrics(rows["label"], probs, [positive, negative], rows["patient_group"], n_bootstrap, seed)
    iv = res["per_class"][positive]["roc_auc"] if kind == "auc" else res[kind]
    return {"value": _num(iv["value"]), "ci_low": _num(iv["ci_low"]), "ci_high": _num(iv["ci_high"]), "n": len(rows)}


def _not_computed(note: str, n: int = 0) -> dict:
    """A rule that cannot be scored, with the reason."""
    return {"value": None, "ci_low": None, "ci_high": None, "n": int(n), "note": note}


def views_of(rows: pd.DataFrame) -> np.ndarray:
    """Each film's projection, ``unknown`` unless AP or PA."""
    v = rows["view"].astype(str).to_numpy() if "view" in rows.columns else np.full(len(rows), "unknown")
    return np.where(np.isin(v, VIEWS), v, "unknown")


def view_only(rows: pd.DataFrame, positive: str, negative: str, kind: str, n_bootstrap: int, seed: int) -> dict:
    """The metric of the rule "AP → one label, PA → the other" on the films of known view, in the direction
    that fits them better; ``rule`` names it, ``n_unknown`` counts the films left out."""
    views = views_of(rows)
    known = rows[views != "unknown"].reset_index(drop=True)
    n_unknown = int((views == "unknown").sum())
    if known["label"].nunique() < 2:
        out = _not_computed(f"films of known view hold only {sorted(known['label'].unique())}", len(known))
        return {**out, "n_unknown": n_unknown}
    ap = (views_of(known) == "AP").astype(float)
    best: dict | None = None
    for label, score in ((positive, ap), (negative, 1.0 - ap)):
        res = binary_metric(known, score, positive, negative, kind, n_bootstrap, seed)
        if best is None or (res["value"] or 0.0) > (best["value"] or 0.0):
            other = negative if label == positive else positive
            best = {**res, "rule": f"AP -> {label}, PA -> {other}"}
    return {**best, "n_unknown": n_unknown}  # type: ignore[dict-item]


def confounder_design(rows: pd.DataFrame, view: bool = True, demographics: bool = True) -> np.ndarray:
    """Design matrix of the confounder models: view one-hot (AP, PA, unknown); age (median-filled) with a
    known-age indicator; sex one-hot (M, F, missing)."""
    cols: list[np.ndarray] = []
    if view:
        v = views_of(rows)
        cols += [(v == level).astype(float) for level in (*VIEWS, "unknown")]
    if demographics:
        age = pd.to_numeric(rows["age"], errors="coerce") if "age" in rows.columns else pd.Series(np.nan, rows.index)
        known = age.notna()
        cols += [known.to_numpy(float), age.fillna(age.median() if known.any() else 0.0).to_numpy(float)]
        sex = rows["sex"].astype(str).to_numpy() if "sex" in rows.columns else np.full(len(rows), "")
        cols += [(sex == "M").astype(float), (sex == "F").astype(float), (~np.isin(sex, ("M", "F"))).astype(float)]
    return np.column_stack(cols)


def cv_rule(
    rows: pd.DataFrame, X: np.ndarray, positive: str, negative: str, kind: str, n_bootstrap: int, seed: int
) -> dict:
    """The metric of a logistic model on ``X`` scored out of fold (patient-grouped, stratified CV)."""
    groups = rows.groupby("label")["patient_group"].nunique().reindex([positive, negative]).fillna(0)
    n_splits = int(min(N_SPLITS, groups.min()))
    if n_splits < 2:
        return _not_computed(f"needs >= 2 patient groups per label; have {groups.astype(int).to_dict()}", len(rows))
    y = rows["label"].astype(str).to_numpy()
    probs, labels = grouped_cv_predict(X, y, rows["patient_group"].astype(str).to_numpy(), n_splits, seed)
    return binary_metric(rows, probs[:, labels.index(positive)], positive, negative, kind, n_bootstrap, seed)


def _weighted_stat(
    stat: Callable[[np.ndarray], np.ndarray], groups: np.ndarray, n_bootstrap: int, seed: int
) -> dict:
    """A statistic of per-film weights (B, n) -> (B,), at weight 1 and over the patient-group bootstrap."""
    point = float(stat(np.ones((1, len(groups))))[0])
    reps = [stat(W) for W in bootstrap_weights(groups, n_bootstrap, seed)]
    return percentile_interval(point, np.concatenate(reps) if reps else np.array([]), LEVEL)


def view_matched(
    rows: pd.DataFrame, score: np.ndarray, positive: str, negative: str, kind: str, n_bootstrap: int, seed: int
) -> dict:
    """The model's metric within projection: same-view pair AUC, or accuracy / balanced accuracy averaged
    over the view strata holding both labels (``strata``: films per stratum)."""
    views, s = views_of(rows), np.asarray(score, dtype=float)
    pos = rows["label"].to_numpy() == positive
    strata = [v for v in VIEWS if pos[views == v].any() and (~pos[views == v]).any()]
    if not strata:
        out = _not_computed("no view stratum holds both labels")
        return {k: out[k] for k in ("value", "ci_low", "ci_high")} | {"n_pairs": 0, "strata": {}, "note": out["note"]}
    if kind == "auc":
        blocks = []
        for v in strata:
            p, n = np.flatnonzero(pos & (views == v)), np.flatnonzero(~pos & (views == v))
            concordance = (s[p][:, None] > s[n][None, :]) + 0.5 * (s[p][:, None] == s[n][None, :])
            blocks.append((p, n, concordance))

        def stat(W: np.ndarray) -> np.ndarray:
            num = sum(np.einsum("bp,pn,bn->b", W[:, p], c, W[:, n]) for p, n, c in blocks)
            den = sum(W[:, p].sum(axis=1) * W[:, n].sum(axis=1) for p, n, _ in blocks)
            return np.divide(num, den, out=np.full(len(W), np.nan), where=den > 0)

        n_pairs = int(sum(len(p) * len(n) for p, n, _ in blocks))
    else:
        pred = s >= 0.5
        hit = pred == pos

        def stat(W: np.ndarray) -> np.ndarray:
            values = []
            for v in strata:
                m = views == v
                if kind == "accuracy":
                    values.append(_ratio(W[:, m] @ hit[m], W[:, m].sum(axis=1)))
                else:
                    sens = _ratio(W[:, m & pos] @ hit[m & pos], W[:, m & pos].sum(axis=1))
                    spec = _ratio(W[:, m & ~pos] @ hit[m & ~pos], W[:, m & ~pos].sum(axis=1))
                    values.append((sens + spec) / 2)
            return np.mean(values, axis=0)

        n_pairs = int(np.isin(views, strata).sum())
    iv = _weighted_stat(stat, group_array(rows["patient_group"], len(rows)), n_bootstrap, seed)
    return {
        "value": _num(iv["value"]),
        "ci_low": _num(iv["ci_low"]),
        "ci_high": _num(iv["ci_high"]),
        "n_pairs": n_pairs,
        "strata": {v: int((views == v).sum()) for v in strata},
    }


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den is 0."""
    return np.divide(num, den, out=np.full(len(den), np.nan), where=den > 0)


def confounder_block(
    rows: pd.DataFrame,
    score: np.ndarray | None,
    positive: str,
    negative: str,
    kind: str,
    n_bootstrap: int,
    seed: int,
) -> dict:
    """``confounders`` of one scorecard entry: the three confounder-only rules on its films and, with the
    model's ``score``, its view-matched value."""
    rows = rows.reset_index(drop=True)
    out = {
        "view_only": view_only(rows, positive, negative, kind, n_bootstrap, seed),
        "demographics_only": cv_rule(
            rows, confounder_design(rows, view=False), positive, negative, kind, n_bootstrap, seed
        ),
        "confounders_only": cv_rule(rows, confounder_design(rows), positive, negative, kind, n_bootstrap, seed),
    }
    shape = [c for c in rows.columns if c.startswith(MASK_SHAPE_PREFIX)]
    if shape:
        X = rows[shape].apply(pd.to_numeric, errors="coerce")
        out["mask_shape_only"] = cv_rule(
            rows, X.fillna(X.median()).fillna(0.0).to_numpy(float), positive, negative, kind, n_bootstrap, seed
        )
    if score is not None:
        out["view_matched"] = view_matched(rows, score, positive, negative, kind, n_bootstrap, seed)
    return out


def best_rule(block: dict | None) -> tuple[str | None, float | None]:
    """The confounder-only rule with the highest value in a ``confounders`` block, and that value."""
    scored = [(name, (block or {}).get(name, {}).get("value")) for name in RULES]
    scored = [(n, v) for n, v in scored if v is not None]
    return max(scored, key=lambda nv: nv[1]) if scored else (None, None)


def lung_view_frame(films: pd.DataFrame) -> pd.DataFrame:
    """The lung-mask shape numbers as the lung views frame a film (the lung box centred on a square canvas):
    box width and height as fractions of the canvas, aspect kept, centre fixed, lung area as a share of the
    canvas, balance and shape score unchanged."""
    w_px = films["mask_shape_box_width"].astype(float) * films["width"].astype(float)
    h_px = films["mask_shape_box_height"].astype(float) * films["height"].astype(float)
    side = np.maximum(w_px, h_px).clip(lower=1.0)
    area = films["mask_shape_area"].astype(float) * films["width"].astype(float) * films["height"].astype(float)
    return pd.DataFrame({
        "mask_shape_box_width": w_px / side, "mask_shape_box_height": h_px / side,
        "mask_shape_box_aspect": films["mask_shape_box_aspect"].astype(float), "mask_shape_box_cx": 0.5,
        "mask_shape_box_cy": 0.5, "mask_shape_area": area / side**2,
        "mask_shape_lr_balance": films["mask_shape_lr_balance"].astype(float),
        "mask_shape_score": films["mask_shape_score"].astype(float),
    }, index=films.index)


def mask_shape_check(
    manifest: pd.DataFrame, positive: str = "covid", negative: str = "normal", n_bootstrap: int = 1000, seed: int = 0
) -> dict | None:
    """How well the lung mask's shape alone tells ``positive`` from ``negative``: balanced accuracy of the
    patient-grouped CV logistic model on the eight ``mask_shape_*`` numbers, on every film of the two labels
    outside the held-out hospital, in the film's coordinates (``film``) and as the lung views frame the film
    (``lung_view``, :func:`lung_view_frame`); None without the numbers."""
    shape = [c for c in manifest.columns if c.startswith(MASK_SHAPE_PREFIX)]
    if not shape:
        return None
    rows = manifest[manifest["label"].isin([positive, negative]) & (manifest["split"] != "holdout")]
    rows = rows[rows[shape].apply(pd.to_numeric, errors="coerce").notna().all(axis=1)].reset_index(drop=True)
    film = rows[shape].astype(float).to_numpy()
    view = lung_view_frame(rows)[shape].to_numpy(float)
    return {
        "contrast": f"{positive} vs {negative}",
        "metric": "balanced_accuracy",
        "features": shape,
        "film": cv_rule(rows, film, positive, negative, "balanced_accuracy", n_bootstrap, seed),
        "lung_view": cv_rule(rows, view, positive, negative, "balanced_accuracy", n_bootstrap, seed),
    }
