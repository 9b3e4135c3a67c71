"""Confound-free scorecard of one configuration: questions that source shortcuts cannot answer for it.

The scorecard reads a configuration's out-of-fold whole (``evaluation.cv.oof_run``): every film is scored by
the fold model that never trained or validated on it, the held-out hospital by the folds' ensemble. A row is
**seen** when its split is ``train`` or ``val`` AND its label is one of the run's classes (run.json ``classes``);
in an out-of-fold whole only the folds' inner-validation rows are, and they are never scored. The probes read
the configuration's out-of-fold penultimate features of the manifest's films outside the held-out hospital
(no probe trains on a held-out film). Model-scored
metrics use the unseen rows of the run's predictions; the probes (source identification within COVID-19
and the probe fallbacks) use the run's penultimate features of unseen manifest films only
(:func:`feature_rows` names them). Intervals are 95% percentile intervals of the patient-group bootstrap
of :mod:`cxrstudy.evaluation.metrics`. Metrics (``metric`` of each entry):

* ``paper_task_accuracy``: COVID-19 vs normal out of fold (the paper's number, beside the scorecard, not a
  confound-free goal: the paper task's normal films come almost all from NIH); three-class runs are restricted to
  covid/normal rows and predict the larger of P(covid) and P(normal).
* ``ieee8023_covid_vs_pneumonia_auc``: ieee8023 COVID-19 films ranked above ieee8023 other-pneumonia
  films by P(covid) / (P(covid) + P(pneumonia)) (binary runs: P(covid)). With fewer than
  :data:`MIN_FILMS` films or :data:`MIN_GROUPS` patient groups of a class among the unseen predicted
  rows, a patient-grouped cross-validated linear probe on the run's penultimate features of the unseen
  ieee8023 covid + pneumonia films answers instead (``method`` = ``probe``), except when the run itself
  scores both classes on films of two or more patient groups each (three-class runs): the probe would see
  the same few films, so the model's ranking is kept with a ``note`` and its wide interval.
* ``actualmed_covid_vs_normal_balanced_accuracy``: held-out Actualmed covid/normal rows, predicting
  the larger of P(covid) and P(normal); both classes are needed.
* ``source_id_within_covid_balanced_accuracy``: balanced accuracy of a 5-fold StratifiedGroupKFold linear probe
  predicting the source of the COVID-19 films outside the held-out hospital (sources with >= ``min_films``
  films) from the configuration's out-of-fold features, against ``chance`` (1 / number of sources), with a
  ``p_value`` from permuting the sources over patient groups, the probe refitted on the same grouped folds
  (``n_permutations``).
* ``nih_pneumonia_vs_normal_auc`` (three-class runs): unseen NIH rows ranked by
  P(pneumonia) / (P(pneumonia) + P(normal)); probe fallback as for ieee8023.

A metric that cannot be computed has ``value`` None and a ``note`` saying why; it is never dropped.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from cxrstudy import config
from cxrstudy.evaluation.metrics import compute_metrics
from cxrstudy.stats import cv_null, group_array, grouped_cv_predict, grouped_splits

#: Field names of a scorecard entry (the results.json contract); ``note`` is added when needed.
FIELDS: tuple[str, ...] = (
    "run_id", "config_id", "variant", "task", "metric", "scope", "value", "ci_low", "ci_high", "n", "n_patients",
    "method",
)
#: Held-out rows below this many films, or ...
MIN_FILMS = 10
#: ... this many patient groups, of either class send a ranking metric to the probe fallback.
MIN_GROUPS = 5
#: Splits a run learned from (a film of these splits is seen when its label is one of the run's classes).
SEEN_SPLITS: frozenset[str] = frozenset({"train", "val"})
#: The films of the source-identification probe.
PROBE_LABEL = "covid"
#: How many probe folds (StratifiedGroupKFold over patient groups).
N_SPLITS = 5
LEVEL = 0.95


#: ``Goal.relative_to`` value that reads the target from the entry's own ``chance``.
CHANCE = "chance"
#: Label permutations of the within-label source probes' null (p-value resolution 1 / (n + 1)).
N_PERMUTATIONS = 19


@dataclass(frozen=True)
class Goal:
    """One goal line: ``metric`` ``op`` ``target`` (S3: target = the entry's ``chance`` + ``margin``)."""

    goal: str
    metric: str
    op: str
    target: float | None
    relative_to: str | None = None
    margin: float = 0.0


GOALS: tuple[Goal, ...] = (
    Goal("S1", "ieee8023_covid_vs_pneumonia_auc", ">=", 0.80),
    Goal("S2", "actualmed_covid_vs_normal_balanced_accuracy", ">=", 0.85),
    Goal("S3", "source_id_within_covid_balanced_accuracy", "<=", None, CHANCE, 0.05),
    Goal("S4", "nih_pneumonia_vs_normal_auc", ">=", 0.85),
)
#: The paper's figure, shown beside the scorecard (not a confound-free goal).
PAPER_REFERENCE = Goal("paper", "paper_task_accuracy", ">=", config.PAPER_ACCURACY)
#: Metrics read on the held-out hospital (``scope`` holdout); every other metric is out of fold.
HOLDOUT_METRICS = frozenset({"actualmed_covid_vs_normal_balanced_accuracy"})


# --------------------------------------------------------------------------------------------- helpers


def _num(x: object) -> float | None:
    """A JSON-ready float, None for None / NaN / inf."""
    if x is None:
        return None
    x = float(x)
    return x if np.isfinite(x) else None


def _result(interval: dict | None, n: int, method: str, note: str | None = None) -> dict:
    """Metric part of an entry from a metrics.py interval (None: not computed, ``note`` required)."""
    iv = interval or {}
    out = {
        "value": _num(iv.get("value")),
        "ci_low": _num(iv.get("ci_low")),
        "ci_high": _num(iv.get("ci_high")),
        "n": int(n),
        "method": method,
    }
    note = "; ".join(x for x in (note, iv.get("note")) if x) or None
    if out["value"] is None and not note:
        note = "metric undefined on these images"
    if note:
        out["note"] = note
    return out


def _none(note: str, n: int = 0, method: str = "model") -> dict:
    """A metric that cannot be computed, with the reason."""
    return _result(None, n, method, note)


def with_source_names(predictions: pd.DataFrame, manifest: pd.DataFrame | None = None) -> pd.DataFrame:
    """Predictions plus ``source_name`` (from the manifest by image, else by ``source`` = owner/repo through
    the manifest or ``data.sources.SOURCES``)."""
    from cxrstudy.data.sources import SOURCES

    df = predictions.reset_index(drop=True).copy()
    if "source_name" in df.columns:
        return df
    by_repo = pd.Series({src.repo: name for name, src in SOURCES.items()}, dtype=object)
    df["source_name"] = None
    if manifest is not None:
        df["source_name"] = df["image"].map(
            manifest.drop_duplicates("image").set_index("image")["source_name"]
        )
        if "source" in manifest.columns:
            by_repo = pd.concat([manifest.drop_duplicates("source").set_index("source")["source_name"], by_repo])
    if "source" in df.columns:
        by_repo = by_repo[~by_repo.index.duplicated()]
        df["source_name"] = df["source_name"].fillna(df["source"].map(by_repo))
    return df


def unseen(frame: pd.DataFrame, classes: Sequence[str] | None = None) -> pd.DataFrame:
    """Rows of ``frame`` (predictions or manifest) a run with ``classes`` never trained or validated on: not
    (split train/val and label among ``classes``; None: every label), nor a copy of such a row's image."""
    seen = frame["split"].astype(str).isin(SEEN_SPLITS)
    if classes is not None:
        seen &= frame["label"].isin(list(classes))
    return frame[~seen & ~frame["image"].isin(set(frame.loc[seen, "image"]))]


def held_out(predictions: pd.DataFrame, classes: Sequence[str] | None = None) -> pd.DataFrame:
    """Rows of a run's predictions it never trained or validated on (:func:`unseen`)."""
    return unseen(predictions, classes)


def _run_classes(run_info: dict) -> tuple[str, ...]:
    """The run's classes (run.json ``classes``, else its task's)."""
    return tuple(run_info.get("classes") or config.task_classes(run_info["task"]))


def _rankings(classes: Sequence[str]) -> list[tuple[str, str, str, str]]:
    """(metric, source, positive, negative) of the ranking metrics a run with ``classes`` is scored on."""
    out = [("ieee8023_covid_vs_pneumonia_auc", "ieee8023", "covid", "pneumonia")]
    if "pneumonia" in classes:
        out.append(("nih_pneumonia_vs_normal_auc", "nih", "pneumonia", "normal"))
    return out


def _pair_rows(frame: pd.DataFrame, source: str, positive: str, negative: str) -> pd.DataFrame:
    """Rows of one source with one of two labels."""
    return frame[(frame["source_name"] == source) & frame["label"].isin([positive, negative])]


def pair_score(df: pd.DataFrame, positive: str, negative: str) -> np.ndarray:
    """P(positive) / (P(positive) + P(negative)); P(positive) alone when the run has no ``negative``
    column; 0.5 where both are zero."""
    p = df[f"prob_{positive}"].to_numpy(dtype=float)
    if f"prob_{negative}" not in df.columns:
        return p
    q = df[f"prob_{negative}"].to_numpy(dtype=float)
    total = p + q
    return np.divide(p, total, out=np.full(len(p), 0.5), where=total > 0)


def _binary_metrics(
    df: pd.DataFrame, score: np.ndarray, positive: str, negative: str, n_bootstrap: int, seed: int
) -> dict:
    """compute_metrics of a two-class problem from a positive-class score in [0, 1]."""
    probs = np.column_stack([score, 1.0 - score])
    return compute_metrics(df["label"], probs, [positive, negative], df["patient_group"], n_bootstrap, seed)


def _too_few(df: pd.DataFrame, classes: Sequence[str]) -> str | None:
    """Why held-out rows are too few for a model-scored ranking metric (None when enough)."""
    for c in classes:
        rows = df[df["label"] == c]
        if len(rows) < MIN_FILMS or rows["patient_group"].nunique() < MIN_GROUPS:
            return (
                f"{len(rows)} held-out {c} films in {rows['patient_group'].nunique()} patient groups "
                f"(< {MIN_FILMS} films or < {MIN_GROUPS} groups)"
            )
    return None


def _with_features(rows: pd.DataFrame, features: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """Rows whose image has a feature row; a note when some had none."""
    has = rows["image"].isin(features.index)
    note = None if has.all() else f"{int((~has).sum())} image(s) without features left out"
    return rows[has].reset_index(drop=True), note


# --------------------------------------------------------------------------------------------- probes


def probe_auc(
    features: pd.DataFrame,
    rows: pd.DataFrame,
    positive: str,
    negative: str,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """Out-of-fold ROC-AUC (``positive`` above ``negative``) of a patient-grouped CV linear probe."""
    return _probe(features, rows, positive, negative, n_bootstrap, seed)[0]


def _probe(
    features: pd.DataFrame, rows: pd.DataFrame, positive: str, negative: str, n_bootstrap: int, seed: int
) -> tuple[dict, pd.DataFrame, np.ndarray | None]:
    """:func:`probe_auc`'s entry, the films it scored and their out-of-fold P(positive) (None: not computed)."""
    rows = rows[rows["label"].isin([positive, negative])]
    rows, missing = _with_features(rows, features)
    groups = rows.groupby("label")["patient_group"].nunique().reindex([positive, negative]).fillna(0)
    n_splits = int(min(N_SPLITS, groups.min()))
    if n_splits < 2:
        note = f"probe needs >= 2 patient groups per class; have {groups.astype(int).to_dict()}"
        return _none(note, len(rows), "probe"), rows, None
    y = rows["label"].to_numpy()
    X = features.loc[rows["image"]].to_numpy(dtype=np.float64)
    probs, labels = grouped_cv_predict(X, y, rows["patient_group"].astype(str).to_numpy(), n_splits, seed)
    score = probs[:, labels.index(positive)]
    res = _binary_metrics(rows, score, positive, negative, n_bootstrap, seed)
    return _result(res["per_class"][positive]["roc_auc"], len(rows), "probe", missing), rows, score


def source_probe(
    features: pd.DataFrame, rows: pd.DataFrame, min_films: int, n_bootstrap: int, seed: int,
    n_permutations: int = N_PERMUTATIONS,
) -> tuple[dict, pd.DataFrame]:
    """How well features name the source of ``rows``' films (sources with >= ``min_films`` films): balanced
    accuracy of the grouped-CV linear probe (class-stratified patient bootstrap) against ``chance`` (1 / sources),
    ``p_value`` from ``n_permutations`` permutations of the sources over patient groups, the probe refitted on the
    observed labels' grouped folds, the largest source's share (``majority``), the sources and their ``reading`` (:func:`reading`)."""
    rows, missing = _with_features(rows, features)
    counts = rows["source_name"].value_counts()
    sources = sorted(counts[counts >= min_films].index)
    rows = rows[rows["source_name"].isin(sources)].reset_index(drop=True)
    if len(sources) < 2:
        note = f"fewer than two sources with >= {min_films} films ({counts.to_dict()})"
        out = _none(note, len(rows), "probe")
        return {**out, "chance": None, "p_value": None, "majority": None, "sources": sources,
                "reading": "not computed"}, rows
    y = rows["source_name"].astype(str).to_numpy()
    g = group_array(rows["patient_group"], len(rows))
    n_splits = int(min(N_SPLITS, len(np.unique(g))))
    X = features.loc[rows["image"]].to_numpy(np.float64)
    splits = grouped_splits(y, g, n_splits, seed)
    probs, labels = grouped_cv_predict(X, y, g, n_splits, seed, splits)
    res = compute_metrics(y, probs, labels, g, n_bootstrap, seed)
    observed = res["balanced_accuracy"]["value"]
    null = cv_null(X, _permuted_groups(y, g, n_permutations, seed), splits, seed)  # the same folds, refitted
    p_value = (1 + sum(v >= observed for v in null)) / (1 + len(null)) if null else None
    entry = {
        **_result(res["balanced_accuracy"], len(rows), "probe", missing),
        "n_patients": res["n_patients"],
        "chance": 1.0 / len(sources),
        "p_value": p_value,
        "n_permutations": len(null),
        "majority": float(counts[sources].max() / counts[sources].sum()),
        "sources": sources,
    }
    entry["reading"] = reading(entry)
    return entry, rows


def _permuted_groups(y: np.ndarray, groups: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """``n`` relabellings of the films that permute the groups' labels (a group keeps one label: its first film's)."""
    _, first, codes = np.unique(groups, return_index=True, return_inverse=True)
    group_label = y[first]
    rng = np.random.default_rng(seed + 1)
    return [rng.permutation(group_label)[codes] for _ in range(n)]


def view_probe(features: pd.DataFrame, films: pd.DataFrame, n_bootstrap: int, seed: int) -> dict:
    """How well the run's features name the projection (AP or PA) of films of one label: balanced accuracy of a
    patient-grouped CV linear probe on the films of known view, with ``chance`` (0.5) and ``majority`` (the
    larger view's share)."""
    from cxrstudy.evaluation.confounders import views_of

    rows = films[views_of(films) != "unknown"]
    rows, missing = _with_features(rows, features)
    views = views_of(rows)
    groups = pd.Series(rows["patient_group"].astype(str).to_numpy()).groupby(views).nunique()
    n_splits = int(min(N_SPLITS, groups.min())) if len(groups) == 2 else 0
    if n_splits < 2:
        out = _none(f"needs both views in >= 2 patient groups each; have {groups.to_dict()}", len(rows), "probe")
        return {**out, "chance": 0.5, "majority": None}
    X = features.loc[rows["image"]].to_numpy(np.float64)
    probs, labels = grouped_cv_predict(X, views, rows["patient_group"].astype(str).to_numpy(), n_splits, seed)
    res = compute_metrics(views, probs, labels, rows["patient_group"], n_bootstrap, seed)
    majority = float(pd.Series(views).value_counts(normalize=True).max())
    return {**_result(res["balanced_accuracy"], len(rows), "probe", missing), "chance": 0.5, "majority": majority}


def reading(entry: dict, margin: float = 0.05) -> str:
    """Plain reading of a source probe against chance: "no source signal" when the whole interval lies within
    ``margin`` of chance, "source signal present" when it lies wholly above, else "undetermined"."""
    if entry.get("value") is None or entry.get("chance") is None:
        return "not computed"
    status = interval_status(entry.get("ci_low"), entry.get("ci_high"), "<=", entry["chance"] + margin)
    return {"met": "no source signal", "missed": "source signal present"}.get(status or "", "undetermined")


def source_id_within_label(
    features: pd.DataFrame,
    manifest: pd.DataFrame,
    min_films: int = 10,
    seed: int = 0,
    n_bootstrap: int = 1000,
    n_permutations: int = N_PERMUTATIONS,
) -> list[dict]:
    """Source identification within each label (:func:`source_probe`: balanced accuracy against chance, with
    its permutation p-value and reading), on the films outside the held-out hospital; the across-label figure
    mostly restates the label, this one does not."""
    out = []
    for label, rows in _outside_holdout(manifest).groupby("label", sort=True):
        entry, _ = source_probe(features, rows, min_films, n_bootstrap, seed, n_permutations)
        out.append({"label": str(label), **entry})
    return out


def _outside_holdout(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows whose split is not ``holdout``: what a probe may train on."""
    return frame[frame["split"].astype(str) != "holdout"]


# --------------------------------------------------------------------------------------------- metrics


#: What a metric's result carries for its confounder block: the entry, its films and the model's score on them.
Scored = tuple[dict, pd.DataFrame | None, np.ndarray | None]


def _paper_task(preds: pd.DataFrame, n_bootstrap: int, seed: int) -> Scored:
    """COVID-19 vs normal accuracy on the test split (argmax of P(covid) vs P(normal))."""
    rows = preds[(preds["split"] == "test") & preds["label"].isin(["covid", "normal"])]
    if len(rows) == 0:
        return _none("no covid/normal test rows in the predictions", len(rows)), None, None
    score = pair_score(rows, "covid", "normal")
    res = _binary_metrics(rows, score, "covid", "normal", n_bootstrap, seed)
    return _result(res["accuracy"], len(rows), "model"), rows, score


def _ranking(
    held: pd.DataFrame,
    probe_films: pd.DataFrame,
    features: pd.DataFrame | None,
    source: str,
    positive: str,
    negative: str,
    n_bootstrap: int,
    seed: int,
) -> Scored:
    """ROC-AUC of ``positive`` above ``negative`` on held-out ``source`` rows, else the probe fallback on
    ``probe_films`` (the run's unseen manifest films)."""
    rows = _pair_rows(held, source, positive, negative)
    why = _too_few(rows, [positive, negative])
    if not _needs_probe(rows, positive, negative):
        score = pair_score(rows, positive, negative)
        res = _binary_metrics(rows, score, positive, negative, n_bootstrap, seed)
        note = (
            None
            if why is None
            else f"few films: {why}; the run scores both classes and a probe would see the same films, so the model's own ranking is kept (read the interval)"
        )
        return _result(res["per_class"][positive]["roc_auc"], len(rows), "model", note), rows, score
    scores = f"prob_{negative}" in held.columns and f"prob_{positive}" in held.columns
    why = why if scores else f"the run does not score {negative if f'prob_{positive}' in held.columns else positive}"
    if features is None:
        return _none(f"{why}; no features for the probe fallback", len(rows), "probe"), None, None
    every = _pair_rows(probe_films, source, positive, negative)
    out, used, score = _probe(features, every, positive, negative, n_bootstrap, seed)
    out["note"] = "; ".join(
        x for x in (f"probe fallback: {why} (a linear probe on its out-of-fold features)", out.get("note")) if x
    )
    return out, used, score


def _scores_both(rows: pd.DataFrame, positive: str, negative: str) -> bool:
    """Whether the run itself ranks ``positive`` against ``negative`` on these rows (it has both classes, and
    each has films from two or more patient groups): then a probe on the same unseen films adds only noise."""
    if f"prob_{positive}" not in rows.columns or f"prob_{negative}" not in rows.columns:
        return False
    return all(rows.loc[rows["label"] == c, "patient_group"].nunique() >= 2 for c in (positive, negative))


def _needs_probe(rows: pd.DataFrame, positive: str, negative: str) -> bool:
    """Whether a ranking metric goes to the probe fallback: too few held-out films and the run cannot rank
    the pair itself (:func:`_too_few`, :func:`_scores_both`)."""
    return _too_few(rows, [positive, negative]) is not None and not _scores_both(rows, positive, negative)


def _actualmed(held: pd.DataFrame, n_bootstrap: int, seed: int) -> Scored:
    """Balanced accuracy of covid vs normal on held-out Actualmed rows."""
    rows = held[(held["source_name"] == "actualmed") & held["label"].isin(["covid", "normal"])]
    if len(rows) == 0:
        return _none("no held-out Actualmed covid/normal rows in the predictions"), None, None
    if rows["label"].nunique() < 2:
        return _none(f"held-out Actualmed rows hold only {sorted(rows['label'].unique())}", len(rows)), None, None
    score = pair_score(rows, "covid", "normal")
    res = _binary_metrics(rows, score, "covid", "normal", n_bootstrap, seed)
    return _result(res["balanced_accuracy"], len(rows), "model"), rows, score


def feature_rows(run_info: dict, predictions: pd.DataFrame | None, manifest: pd.DataFrame) -> pd.DataFrame:
    """Manifest rows (manifest order) whose features :func:`scorecard_for_run` reads for this run: its unseen
    COVID-19 films, its unseen films of known view (the view probe) and, for each ranking metric sent to the
    probe fallback, its unseen films of that source and pair (every ranking's when ``predictions`` is None)."""
    from cxrstudy.evaluation.confounders import views_of

    classes = _run_classes(run_info)
    films = unseen(with_source_names(manifest), classes)
    keep = set(films.loc[films["label"] == PROBE_LABEL, "image"])
    keep |= set(films.loc[views_of(films) != "unknown", "image"])
    held = None if predictions is None else held_out(with_source_names(predictions, manifest), classes)
    for _, source, pos, neg in _rankings(classes):
        if held is None or _needs_probe(_pair_rows(held, source, pos, neg), pos, neg):
            keep |= set(_pair_rows(films, source, pos, neg)["image"])
    return manifest[manifest["image"].isin(keep)].drop_duplicates("image").reset_index(drop=True)


def scorecard_for_run(
    run_info: dict,
    predictions: pd.DataFrame,
    manifest: pd.DataFrame,
    features: pd.DataFrame | None,
    variant: str = "baseline",
    n_bootstrap: int = 1000,
    seed: int = 0,
    n_permutations: int = N_PERMUTATIONS,
    fold_predictions: Sequence[pd.DataFrame] = (),
    memo: dict | None = None,
) -> list[dict]:
    """Every scorecard entry of one configuration (module docstring) on films its models never trained or
    validated on; ``features`` (out-of-fold, indexed by image; :func:`feature_rows` suffice) or None;
    ``fold_predictions``: the fold runs' own predictions (S2 gives each fold's value beside the ensemble's);
    ``memo``: a dict shared across configurations, so that probes on identical features and films (a DFR run and
    its base share the backbone) are computed once."""
    classes = _run_classes(run_info)
    if "fold" in run_info and run_info["fold"] is None:  # an out-of-fold whole: its val rows are other folds' models'
        predictions = predictions[predictions["split"] != "val"]
    preds = with_film_facts(with_source_names(predictions, manifest), manifest)
    held = held_out(preds, classes)
    films = _outside_holdout(unseen(with_source_names(manifest), classes))
    scored: dict[str, Scored] = {"paper_task_accuracy": _paper_task(preds, n_bootstrap, seed)}
    rankings = {m: (src, pos, neg) for m, src, pos, neg in _rankings(classes)}
    scored["ieee8023_covid_vs_pneumonia_auc"] = _ranking(
        held, films, features, *rankings["ieee8023_covid_vs_pneumonia_auc"], n_bootstrap, seed
    )
    scored["actualmed_covid_vs_normal_balanced_accuracy"] = _actualmed(held, n_bootstrap, seed)
    results = {m: s[0] for m, s in scored.items()}
    s2 = results["actualmed_covid_vs_normal_balanced_accuracy"]
    if scored["actualmed_covid_vs_normal_balanced_accuracy"][1] is not None:
        s2["auc"] = _actualmed_auc(*scored["actualmed_covid_vs_normal_balanced_accuracy"][1:], n_bootstrap, seed)
        s2["per_fold"] = [_actualmed_value(with_source_names(p, manifest), classes) for p in fold_predictions]
    if features is None:
        results["source_id_within_covid_balanced_accuracy"] = _none("no features given", method="probe")
    else:
        covid = films[films["label"] == PROBE_LABEL]
        entry, used = _memoized(memo, "source", features, covid, (n_bootstrap, seed, n_permutations),
                                lambda: source_probe(features, covid, 10, n_bootstrap, seed, n_permutations))
        results["source_id_within_covid_balanced_accuracy"] = {**entry, "view_mix": view_mix(used, entry["sources"])}
    if "nih_pneumonia_vs_normal_auc" in rankings:
        scored["nih_pneumonia_vs_normal_auc"] = _ranking(
            held, films, features, *rankings["nih_pneumonia_vs_normal_auc"], n_bootstrap, seed
        )
        results["nih_pneumonia_vs_normal_auc"] = scored["nih_pneumonia_vs_normal_auc"][0]
    else:
        results["nih_pneumonia_vs_normal_auc"] = _none(
            f"task {run_info.get('task')!r} has no pneumonia class"
        )
    if features is not None:
        for label in config.CLASSES:
            rows = films[films["label"] == label]
            results[f"view_id_within_{label}_balanced_accuracy"] = _memoized(
                memo, "view", features, rows, (n_bootstrap, seed), lambda r=rows: view_probe(features, r, n_bootstrap, seed)
            )
    for metric, (_, rows, score) in scored.items():
        if rows is not None and len(rows):
            results[metric]["confounders"] = _confounders(metric, rows, score, manifest, n_bootstrap, seed)
            results[metric].setdefault("n_patients", int(rows["patient_group"].nunique()))
    head = {
        "run_id": run_info.get("run_id", ""),
        "config_id": run_info.get("config_id", run_info.get("run_id", "")),
        "variant": variant,
        "task": run_info.get("task", ""),
    }
    return [
        {**head, "metric": m, "scope": "holdout" if m in HOLDOUT_METRICS else "out_of_fold",
         **{"n_patients": None, **r}}
        for m, r in results.items()
    ]


def _memoized(memo: dict | None, name: str, features: pd.DataFrame, rows: pd.DataFrame, args: tuple,
              compute: Callable[[], Any]) -> Any:
    """``compute()``, or a copy of what it gave for the same probe on the same feature values of the same rows."""
    if memo is None:
        return compute()
    h = hashlib.sha256(f"{name}{args}".encode())
    h.update(pd.util.hash_pandas_object(rows.reset_index(drop=True), index=False).to_numpy().tobytes())
    present = rows.loc[rows["image"].isin(features.index), "image"]
    h.update(f"{len(present)}:{features.shape}".encode())
    h.update(np.ascontiguousarray(features.loc[present].to_numpy(np.float64)).tobytes())
    key = h.hexdigest()
    if key not in memo:
        memo[key] = compute()
    return copy.deepcopy(memo[key])


def _actualmed_value(predictions: pd.DataFrame, classes: Sequence[str]) -> float | None:
    """One fold model's balanced accuracy on the held-out Actualmed films (point value)."""
    rows, score = _actualmed(held_out(predictions, classes), 0, 0)[1:]
    if rows is None:
        return None
    pred = np.where(score >= 0.5, "covid", "normal")
    return float(np.mean([(pred[rows["label"].to_numpy() == c] == c).mean() for c in ("covid", "normal")]))


def _actualmed_auc(rows: pd.DataFrame, score: np.ndarray, n_bootstrap: int, seed: int) -> dict:
    """ROC-AUC of COVID-19 above normal on the held-out Actualmed films, with its interval."""
    res = _binary_metrics(rows, score, "covid", "normal", n_bootstrap, seed)
    return _result(res["per_class"]["covid"]["roc_auc"], len(rows), "model")


#: The two labels each confounder-checked metric compares (positive first).
CONTRAST_LABELS: dict[str, tuple[str, str]] = {
    "paper_task_accuracy": ("covid", "normal"),
    "ieee8023_covid_vs_pneumonia_auc": ("covid", "pneumonia"),
    "actualmed_covid_vs_normal_balanced_accuracy": ("covid", "normal"),
    "nih_pneumonia_vs_normal_auc": ("pneumonia", "normal"),
}
#: Confounder-only rules already scored, by (metric, films, bootstrap): the same films score the same for
#: every run that holds them out.
_RULES_DONE: dict[tuple, dict] = {}


def _confounders(
    metric: str, rows: pd.DataFrame, score: np.ndarray | None, manifest: pd.DataFrame, n_bootstrap: int, seed: int
) -> dict:
    """The ``confounders`` block of one entry (:func:`confounders.confounder_block`) on the metric's films."""
    from cxrstudy.evaluation import confounders as C

    positive, negative = CONTRAST_LABELS[metric]
    rows = with_film_facts(rows, manifest).reset_index(drop=True)
    kind = C.METRIC_KIND[metric]
    key = (metric, tuple(rows["image"]), n_bootstrap, seed)
    if key not in _RULES_DONE:
        _RULES_DONE[key] = C.confounder_block(rows, None, positive, negative, kind, n_bootstrap, seed)
    out = dict(_RULES_DONE[key])
    if score is not None:
        out["view_matched"] = C.view_matched(rows, score, positive, negative, kind, n_bootstrap, seed)
    return out


#: Per-film facts the confounder rules read from the manifest.
FILM_FACTS: tuple[str, ...] = ("view", "age", "sex")


def with_film_facts(frame: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """``frame`` plus the manifest's view, age and sex of each image (empty where the manifest has none) and
    its lung-mask shape numbers when the manifest carries them."""
    df = frame.copy()
    by_image = manifest.drop_duplicates("image").set_index("image")
    for col in (*FILM_FACTS, *(c for c in by_image.columns if c.startswith("mask_shape_"))):
        if col not in df.columns:
            df[col] = df["image"].map(by_image[col]).fillna("") if col in by_image.columns else ""
    return df


def view_mix(films: pd.DataFrame, sources: Sequence[str]) -> dict[str, dict[str, int]]:
    """Films of each source by projection (AP, PA, unknown)."""
    from cxrstudy.evaluation.confounders import views_of

    table = pd.crosstab(films["source_name"].to_numpy(), views_of(films))
    return {
        s: {k: int(table.loc[s].get(k, 0)) if s in table.index else 0 for k in ("AP", "PA", "unknown")}
        for s in sources
    }


def scorecard_frame(entries: Sequence[dict]) -> pd.DataFrame:
    """Entries as a table with the contract's columns first (and ``note``, empty where none)."""
    df = pd.DataFrame(list(entries))
    for col in (*FIELDS, "note"):
        if col not in df.columns:
            df[col] = None
    return df[[*FIELDS, "note", *[c for c in df.columns if c not in (*FIELDS, "note")]]]


def interval_status(ci_low: float | None, ci_high: float | None, op: str, target: float | None) -> str | None:
    """``met`` when the whole 95% interval is on the goal's side of ``target``, ``missed`` when it is wholly
    on the other side, ``undetermined`` when it straddles the target or is unknown (None: no target)."""
    if target is None:
        return None
    if ci_low is None or ci_high is None:
        return "undetermined"
    good, bad = (ci_low >= target, ci_high < target) if op == ">=" else (ci_high <= target, ci_low > target)
    return "met" if good else "missed" if bad else "undetermined"


def goal_status(entry: dict, op: str, target: float | None) -> tuple[str | None, str | None]:
    """A goal's status and, when the confounders keep it from ``met``, why. Met only when the interval is met,
    the view-matched interval is met too, and the interval's lower bound is above the best confounder-only
    rule; missed when the interval or the view-matched interval is missed; else undetermined (always, when the
    metric has no interval: not estimable)."""
    status = interval_status(entry.get("ci_low"), entry.get("ci_high"), op, target)
    block = entry.get("confounders")
    if status is None or not block:
        return status, None
    if entry.get("ci_low") is None:
        return "undetermined", entry.get("note") or "no interval"
    from cxrstudy.evaluation.confounders import best_rule

    vm = block.get("view_matched") or {}
    vm_status = interval_status(vm.get("ci_low"), vm.get("ci_high"), op, target)
    if "missed" in (status, vm_status):
        return "missed", None if status == "missed" else "the view-matched interval is on the wrong side of the goal"
    if status != "met":
        return status, None
    if vm_status != "met":
        return "undetermined", "the view-matched interval does not clear the goal"
    rule, best = best_rule(block)
    if best is not None and op == ">=" and entry["ci_low"] <= best:
        return "undetermined", f"the interval's lower bound is not above the best confounder-only rule ({rule})"
    return "met", None


def goal_applies(metric: str, task: str | None) -> bool:
    """Whether a goal's metric can exist for a task: the NIH pneumonia contrast needs a pneumonia class (an
    unknown task counts as applicable)."""
    if metric != "nih_pneumonia_vs_normal_auc" or not task or task not in config.TASKS:
        return True
    return "pneumonia" in config.task_classes(task)


def check_goals(entries: Sequence[dict], goals: Sequence[Goal] = GOALS) -> list[dict]:
    """Each goal that applies to the configuration's task, per (run_id, variant): value, interval, target,
    ``status`` (:func:`goal_status`; ``undetermined`` with the entry's note as ``reason`` when the value could
    not be computed) and ``met`` (status == "met")."""
    out = []
    keys = list(dict.fromkeys((e.get("run_id"), e.get("variant")) for e in entries))
    for run_id, variant in keys:
        mine = {e["metric"]: e for e in entries if (e.get("run_id"), e.get("variant")) == (run_id, variant)}
        task = next((e.get("task") for e in mine.values() if e.get("task")), None)
        for goal in goals:
            if not goal_applies(goal.metric, task):
                continue
            e = mine.get(goal.metric, {})
            target = goal.target
            if goal.relative_to is not None:
                base = e.get("chance") if goal.relative_to == CHANCE else mine.get(goal.relative_to, {}).get("value")
                target = None if base is None else base + goal.margin
            value = e.get("value")
            status, reason = (
                goal_status(e, goal.op, target) if value is not None else ("undetermined", e.get("note") or "not computed")
            )
            row = {"status": status, "met": None if status is None else status == "met"}
            if reason:
                row["reason"] = reason
            out.append(
                {
                    "goal": goal.goal,
                    "run_id": run_id,
                    "config_id": e.get("config_id", run_id),
                    "variant": variant,
                    "metric": goal.metric,
                    "op": goal.op,
                    "target": target,
                    "value": value,
                    "ci_low": e.get("ci_low"),
                    "ci_high": e.get("ci_high"),
                    **row,
                }
            )
    return out


def goals_table() -> list[dict]:
    """The goal lines as plain dicts (for reports)."""
    return [asdict(g) for g in GOALS]
