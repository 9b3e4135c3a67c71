"""Shortcut and confounding checks on frozen features (the shallow, linear-on-features level).

* **Source identification**: a linear classifier on frozen features predicts the source repository
  (patient-group cross-validation); the higher above the majority baseline, the easier the shortcut.
* **Masking** (after Maguolo & Nanni 2021): features of images with the central lung field blacked
  out (``lungs.region.mask_lungs``) or with only that field kept (``keep_lungs_only``); a linear head
  scored out of fold by patient-grouped cross-validation on each. A high score with the lungs blacked out
  means the score is not about the lungs.
* **Leave-one-source-out**: a linear head trained without a whole source, tested on that source.
* **Same hospital**: Actualmed is the only source with COVID-19 and normal films from one site; a head trained
  on every other film is tested on it.

No probe trains on a film of the held-out hospital (``split`` holdout).

The lung region (segmented lungs, else the central rectangle) is :mod:`cxrstudy.lungs.region`'s; films
with segmented lungs hidden or kept are rendered once by :func:`cxrstudy.lungs.render.render_masked_views`
and go through the ordinary feature cache.
Everything here uses linear heads on cached features, so it is cheap on 2 CPU cores.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.pipeline import Pipeline

from cxrstudy.data.sources import same_hospital_source
from cxrstudy.evaluation.metrics import compute_metrics
from cxrstudy.lungs.region import MASK_VARIANTS, lung_region_info
from cxrstudy.lungs.render import render_masked_views
from cxrstudy.stats import grouped_cv_predict, linear_probe, one_blas_thread

# --------------------------------------------------------------------------- linear probes


def _features_for(features: pd.DataFrame, rows: pd.DataFrame, what: str) -> np.ndarray:
    """Feature rows for the manifest rows' images; a clear error when some are missing."""
    missing = rows.loc[~rows["image"].isin(features.index), "image"]
    if len(missing):
        raise ValueError(f"{what}: {len(missing)} image(s) have no features, e.g. {missing.iloc[0]!r}")
    return features.loc[rows["image"]].to_numpy(dtype=np.float64)


def _task_rows(manifest: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Manifest rows whose label belongs to the task."""
    return manifest[manifest["label"].isin(list(classes))].reset_index(drop=True)


def _probe_probs(model: Pipeline, X: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Probabilities in ``classes`` order (zero for a class the probe never saw)."""
    probs = np.zeros((len(X), len(classes)))
    p = model.predict_proba(X)
    for j, c in enumerate(model.classes_):
        probs[:, list(classes).index(c)] = p[:, j]
    return probs


def train_test_probe(
    features: pd.DataFrame,
    train: pd.DataFrame,
    test: pd.DataFrame,
    classes: Sequence[str],
    seed: int = 0,
    n_bootstrap: int = 1000,
) -> tuple[dict, np.ndarray]:
    """Fit the linear probe on ``train`` rows, evaluate on ``test`` rows (patient-bootstrap metrics)."""
    if train["label"].nunique() < 2:
        raise ValueError(
            f"training rows hold only {train['label'].unique().tolist()}: a probe needs two classes"
        )
    with one_blas_thread():
        model = linear_probe(seed).fit(_features_for(features, train, "train"), train["label"].to_numpy())
    probs = _probe_probs(model, _features_for(features, test, "test"), classes)
    res = compute_metrics(test["label"], probs, classes, test["patient_group"], n_bootstrap, seed)
    return res, probs


def _eligible(df: pd.DataFrame, column: str, min_groups: int) -> tuple[pd.DataFrame, list[str]]:
    """Rows whose ``column`` value has at least ``min_groups`` patient groups; and the values dropped."""
    counts = df.groupby(column)["patient_group"].nunique()
    keep = counts[counts >= min_groups].index
    return df[df[column].isin(keep)], sorted(set(counts.index) - set(keep))


def _cv_summary(
    df: pd.DataFrame, features: pd.DataFrame, column: str, n_splits: int, seed: int, what: str
) -> dict:
    """Grouped-CV linear prediction of ``column``: accuracy, balanced accuracy, majority baseline, n."""
    df, dropped = _eligible(df, column, n_splits)
    if df[column].nunique() < 2:
        return {
            "n": int(len(df)),
            "note": f"fewer than two {column} values with >= {n_splits} patient groups",
        }
    X = _features_for(features, df, what)
    y = df[column].astype(str).to_numpy()
    probs, labels = grouped_cv_predict(X, y, df["patient_group"].astype(str).to_numpy(), n_splits, seed)
    pred = np.asarray(labels)[probs.argmax(axis=1)]
    recall = {c: float((pred[y == c] == c).mean()) for c in labels}
    shares = pd.Series(y).value_counts(normalize=True)
    return {
        "n": int(len(df)),
        "classes": labels,
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(np.mean(list(recall.values()))),
        "majority_baseline": float(shares.max()),
        "chance_balanced": 1.0 / len(labels),
        "recall": recall,
        "dropped_too_few_groups": dropped,
        "n_splits": n_splits,
    }


def label_only_baseline(manifest: pd.DataFrame) -> float | None:
    """Accuracy of naming the source from the label alone (each label's largest source): what the
    across-label source probe reaches without seeing any image."""
    if len(manifest) == 0:
        return None
    return float(manifest.groupby("label")["source_name"].agg(lambda s: s.value_counts().iloc[0]).sum() / len(manifest))


def source_identification(
    features: pd.DataFrame, manifest: pd.DataFrame, seed: int = 0, n_splits: int = 5
) -> dict:
    """How well frozen features predict the source (all images; patient-group CV), overall and within label.

    Sources with fewer than ``n_splits`` patient groups (in the subset) are left out and listed;
    ``label_only_baseline`` is what knowing only the label gives (:func:`label_only_baseline`).
    """
    out = _cv_summary(manifest, features, "source_name", n_splits, seed, "source identification")
    out["label_only_baseline"] = label_only_baseline(_eligible(manifest, "source_name", n_splits)[0])
    within = {}
    for label, rows in manifest.groupby("label"):
        within[str(label)] = _cv_summary(
            rows, features, "source_name", n_splits, seed, f"source within {label}"
        )
    out["within_label"] = within
    return out


def masking_experiment(
    features_by_variant: dict[str, pd.DataFrame],
    manifest: pd.DataFrame,
    classes: Sequence[str],
    seed: int = 0,
    n_bootstrap: int = 1000,
    n_splits: int = 5,
) -> dict:
    """Out-of-fold metrics of the linear head (patient-grouped CV, films outside the held-out hospital) for each
    feature variant (unmasked, masked_lungs, …)."""
    rows = _task_rows(outside_holdout(manifest), classes)
    groups = rows["patient_group"].astype(str).to_numpy()
    y = rows["label"].to_numpy()
    out = {}
    for name, feats in features_by_variant.items():
        probs_cv, labels = grouped_cv_predict(_features_for(feats, rows, f"masking {name}"), y, groups, n_splits, seed)
        probs = np.zeros((len(y), len(classes)))
        for j, c in enumerate(labels):
            probs[:, list(classes).index(c)] = probs_cv[:, j]
        res = compute_metrics(y, probs, classes, groups, n_bootstrap, seed)
        out[name] = {
            "n": int(len(rows)),
            "n_patients": res["n_patients"],
            "n_splits": n_splits,
            **{k: res[k] for k in ("accuracy", "balanced_accuracy", "roc_auc")},
        }
    return out


def outside_holdout(manifest: pd.DataFrame) -> pd.DataFrame:
    """Rows a probe may train on: every split but ``holdout``."""
    return manifest[manifest["split"].astype(str) != "holdout"]


def leave_one_source_out(
    features: pd.DataFrame,
    manifest: pd.DataFrame,
    folds: Sequence[tuple[str, pd.DataFrame, pd.DataFrame]],
    classes: Sequence[str],
    seed: int = 0,
    n_bootstrap: int = 1000,
) -> list[dict]:
    """Per held-out source: linear head trained on the fold's train rows, tested on the held-out rows.

    ``folds`` holds (held_out_source, train_rows, test_rows); only task classes are used. A fold is
    skipped (with a reason) when its training rows lack a task class or the held-out source has
    no images of the task. Sensitivity is reported for every class present in the held-out source,
    with the training composition (``train_counts`` per class, ``train_sources`` per class and source).
    """
    out = []
    for source, train, test in folds:
        train, test = _task_rows(train, classes), _task_rows(test, classes)
        entry: dict = {
            "held_out": str(source),
            "n": int(len(test)),
            "labels": sorted(test["label"].unique().tolist()),
            "counts": {str(k): int(v) for k, v in test["label"].value_counts().sort_index().items()},
        }
        missing = sorted(set(classes) - set(train["label"]))
        if len(test) == 0 or missing:
            entry["skipped"] = (
                "no task images in this source" if len(test) == 0 else f"training lacks {missing}"
            )
            out.append(entry)
            continue
        res, _ = train_test_probe(features, train, test, classes, seed, n_bootstrap)
        entry["n_train"] = int(len(train))
        entry["train_counts"] = {c: int((train["label"] == c).sum()) for c in classes}
        if "source_name" in train.columns:
            entry["train_sources"] = {
                c: train.loc[train["label"] == c, "source_name"].value_counts().to_dict() for c in classes
            }
        entry["accuracy"] = res["accuracy"]
        entry["sensitivity"] = {c: res["per_class"][c]["sensitivity"] for c in entry["labels"]}
        if len(entry["labels"]) > 1:
            entry["balanced_accuracy"] = res["balanced_accuracy"]
        out.append(entry)
    return out


def same_hospital(
    features: pd.DataFrame,
    manifest: pd.DataFrame,
    run_predictions: dict[str, pd.DataFrame],
    classes: Sequence[str] = ("covid", "normal"),
    source_name: str | None = None,
    seed: int = 0,
    n_bootstrap: int = 1000,
) -> dict:
    """One source (default: the registry's same-hospital source, Actualmed): each run's predictions on its
    films the run never trained or validated on (``runs_test``: the held-out hospital's ``holdout`` split, or
    ``test``), and a linear probe trained on every task film outside the held-out hospital, tested on it.
    """
    source_name = source_name or same_hospital_source()
    rows = _task_rows(manifest[manifest["source_name"] == source_name], classes)
    out: dict = {"source": source_name, "n": int(len(rows)), "counts": rows["label"].value_counts().to_dict()}
    per_run = {}
    for run_id, preds in run_predictions.items():
        sub = preds[~preds["split"].isin(["train", "val"]) & preds["image"].isin(rows["image"])]
        sub = sub[sub["label"].isin(list(classes))]
        entry: dict = {"n": int(len(sub))}
        if len(sub):
            correct = (sub["pred"] == sub["label"]).to_numpy()
            entry["accuracy"] = float(correct.mean())
            entry["labels"] = sub["label"].value_counts().to_dict()
        per_run[run_id] = entry
    out["runs_test"] = per_run
    if rows["label"].nunique() < 2:
        out["probe"] = {"note": f"{source_name} holds only {sorted(rows['label'].unique())}: no probe"}
        return out
    train = _task_rows(outside_holdout(manifest[manifest["source_name"] != source_name]), classes)
    res, _ = train_test_probe(features, train, rows, classes, seed, n_bootstrap)
    out["probe"] = {
        "trained_on": "every task film outside the held-out hospital",
        "n_train": int(len(train)),
        **{k: res[k] for k in ("accuracy", "balanced_accuracy", "roc_auc")},
    }
    return out


# --------------------------------------------------------------------------- all checks for notebook 05


def folds_from_masks(
    rows: pd.DataFrame, folds: Sequence[tuple[str, pd.Series]]
) -> list[tuple[str, pd.DataFrame, pd.DataFrame]]:
    """(source, held-out mask) folds to (source, train rows, held-out rows); training drops every patient
    group that also appears in the held-out rows (cross-source duplicates and follow-ups) and the held-out
    hospital's films."""
    out = []
    for source, mask in folds:
        held = np.asarray(mask, dtype=bool)
        if len(held) != len(rows):
            raise ValueError(f"fold {source!r}: mask has {len(held)} entries for {len(rows)} rows")
        test = rows[held]
        train = rows[~held & ~rows["patient_group"].isin(set(test["patient_group"])).to_numpy()]
        train = outside_holdout(train) if "split" in train.columns else train
        out.append((source, train, test))
    return out


def masking_features(
    manifest: pd.DataFrame,
    feats,
    image_root: Path,
    lung_masks: dict[str, np.ndarray] | None,
    lung_key: str = "",
) -> dict[str, pd.DataFrame]:
    """Features of the masking variants: segmented lungs rendered as films when ``lung_masks`` is given,
    else the rectangle transforms. ``feats(root, transform, tag)`` extracts (cached) features."""
    if not lung_masks:
        return {name: feats(image_root, fn, tag) for name, (fn, tag) in MASK_VARIANTS.items()}
    roots = render_masked_views(manifest, lung_masks, image_root, lung_key)
    tag = roots["masked_lungs"].parent.name  # the views folder's key: masks, root, rectangle
    return {name: feats(root, None, f"seg_{name}_{tag}") for name, root in roots.items()}


def run_shortcut_checks(
    manifest: pd.DataFrame,
    run_predictions: dict[str, pd.DataFrame],
    image_root,
    backbone: str,
    image_size: int,
    classes: Sequence[str] = ("covid", "normal"),
    batch_size: int = 32,
    device: str = "auto",
    seed: int = 0,
    n_bootstrap: int = 1000,
    lung_masks: dict[str, np.ndarray] | None = None,
    lung_key: str = "",
    view_root: Path | None = None,
    n_permutations: int = 19,
) -> dict:
    """Every feature-level check: source identification (across and within labels), masking,
    leave-one-source-out, same hospital, and the lung region used (``lung_region``).

    Features come from ``cxrstudy.features.extract_features`` (cached). ``view_root``: the films through the
    checks' input view (``lungs.render.view_root``; None: ``image_root``) for source identification,
    leave-one-source-out and same hospital; the masking experiment always reads the plain films under
    ``image_root`` (the lung masks are at their size). ``lung_masks`` (image -> boolean mask at the film's
    size, e.g. ``lungs.stage.load_lung_masks``; ``lung_key`` names them) switches the masking from the rectangle to
    the segmented lungs. ``run_predictions`` maps run_id to predictions (same hospital).
    """
    from cxrstudy.data.splits import loso_folds
    from cxrstudy.evaluation.scorecard import source_id_within_label
    from cxrstudy.features import extract_features

    def feats(root, transform=None, tag: str = "") -> pd.DataFrame:
        """Cached frozen features of the manifest's films under ``root``."""
        return extract_features(
            manifest, root, backbone, image_size, batch_size=batch_size, device=device,
            transform=transform, cache_tag=tag,
        )

    variants = {"unmasked": feats(image_root)}
    variants.update(masking_features(manifest, feats, image_root, lung_masks, lung_key))
    rows = _task_rows(manifest, classes)
    folds = folds_from_masks(rows, loso_folds(rows))
    plain = view_root is None or Path(view_root).resolve() == Path(image_root).resolve()
    unmasked = variants["unmasked"] if plain else feats(view_root)
    return {
        "lung_region": lung_region_info(lung_masks, manifest["image"].astype(str).tolist()),
        "source_identification": source_identification(unmasked, outside_holdout(manifest), seed),
        "source_id_within_label": source_id_within_label(unmasked, manifest, seed=seed, n_bootstrap=n_bootstrap,
                                                      n_permutations=n_permutations),
        "masking": masking_experiment(variants, manifest, classes, seed, n_bootstrap),
        "leave_one_source_out": leave_one_source_out(unmasked, rows, folds, classes, seed, n_bootstrap),
        "same_hospital": same_hospital(
            unmasked, manifest, run_predictions, classes, seed=seed, n_bootstrap=n_bootstrap
        ),
    }
