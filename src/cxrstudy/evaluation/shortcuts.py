"""Shortcut and confounding checks on frozen features (the shallow, linear-on-features level).

* **Source identification**: a linear classifier on frozen features predicts the source repository
  (patient-group cross-validation); the higher above the majority baseline, the easier the shortcut.
* **Masking** (after Maguolo & Nanni 2021): features of images with the central lung field blacked
  out (:func:`mask_lungs`) or with only that field kept (:func:`keep_lungs_only`); a linear head
  trained on the train split and tested on the test split of each. A high score with the lungs
  blacked out means the score is not about the lungs.
* **Leave-one-source-out**: a linear head trained without a whole source, tested on that source.
* **Same hospital**: Actualmed is the only source with COVID-19 and normal films from one site.

Lung region. When the profile has a lung stage output (``reports/<profile>/lungs/summary.json``, notebook
01_lungs), each film's segmented lungs (:func:`load_lung_masks`, a boolean mask at the processed image's
size) are hidden or kept; a film whose segmentation failed QC (its mask is the whole image) falls back to
the rectangle. Otherwise every film uses :data:`LUNG_REGION`, a fixed central rectangle, x and y from 15%
to 85% of the image (49% of its area), which covers both lung fields and the mediastinum of a frontal
film squish-resized to a square. :func:`lung_region_info` says which was used (results.json
``lung_region``: ``segmented`` or ``fixed rectangle``). Masked films are rendered once under
``data/cache/lung_views/`` and go through the ordinary feature cache.
Everything here uses linear heads on cached features, so it is cheap on 2 CPU cores.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.pipeline import Pipeline

from cxrstudy import config
from cxrstudy.data.sources import same_hospital_source
from cxrstudy.evaluation.metrics import compute_metrics
from cxrstudy.stats import grouped_cv_predict, linear_probe

#: Central lung field as fractions of width / height: (x0, y0, x1, y1).
LUNG_REGION: tuple[float, float, float, float] = (0.15, 0.15, 0.85, 0.85)


# --------------------------------------------------------------------------- lung region and masks


def lung_mask(height: int, width: int, region: tuple[float, float, float, float] = LUNG_REGION) -> np.ndarray:
    """Boolean (height, width) mask, True inside the central lung region (pixel centres inside it)."""
    x0, y0, x1, y1 = region
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError(f"bad region {region}: need 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    ys = (np.arange(height) + 0.5) / height
    xs = (np.arange(width) + 0.5) / width
    return ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]


def _apply_mask(img: Image.Image, keep_inside: bool) -> Image.Image:
    """Black out the lung region (``keep_inside=False``) or everything else (``True``) of an L image."""
    if not isinstance(img, Image.Image) or img.mode != "L":
        raise ValueError("masking expects a decoded 8-bit grayscale PIL image (mode 'L'); use load_xray")
    arr = np.asarray(img).copy()
    inside = lung_mask(arr.shape[0], arr.shape[1])
    arr[inside if not keep_inside else ~inside] = 0
    return Image.fromarray(arr, mode="L")


def mask_lungs(img: Image.Image) -> Image.Image:
    """The image with the central lung field (:data:`LUNG_REGION`) blacked out."""
    return _apply_mask(img, keep_inside=False)


def keep_lungs_only(img: Image.Image) -> Image.Image:
    """The image with everything outside the central lung field blacked out."""
    return _apply_mask(img, keep_inside=True)


#: Feature variants of the masking experiment: name -> (PIL transform, extract_features cache_tag).
MASK_VARIANTS = {"masked_lungs": (mask_lungs, "mask_lungs"), "lungs_only": (keep_lungs_only, "lungs_only")}
#: Where films with segmented lungs hidden / kept alone are rendered (one folder per masks and root).
LUNG_VIEWS_DIR = config.CACHE_DIR / "lung_views"
#: Bump when the rendered views change meaning.
LUNG_VIEWS_VERSION = 1


# --------------------------------------------------------------------------- segmented lungs


def load_lung_masks(
    manifest: pd.DataFrame, profile: str, image_root: Path = config.PROCESSED_DIR, device: str = "cpu"
) -> tuple[dict[str, np.ndarray] | None, str]:
    """The profile's segmented lung mask per manifest image and the lung stage's cache key, or
    (None, "") when the profile has no lung stage output (``reports/<profile>/lungs/summary.json``)."""
    summary = config.profile_dir(profile) / "lungs" / "summary.json"
    if not summary.is_file():
        return None, ""
    from cxrstudy.lungs import masks_for

    masks = masks_for(manifest, profile, missing="predict", device=device, image_root=image_root)
    return masks, str(json.loads(summary.read_text()).get("cache_key", ""))


def film_mask(mask: np.ndarray | None, height: int, width: int) -> tuple[np.ndarray, str]:
    """The lung mask used for one film and its kind: the segmented mask (``segmented``), or the
    rectangle (``rectangle``) when there is none, its shape differs or it is the QC fallback (all True)."""
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape == (height, width) and m.any() and not m.all():
            return m, "segmented"
    return lung_mask(height, width), "rectangle"


def rectangle_region() -> dict:
    """The fixed central rectangle (:data:`LUNG_REGION`): x, y (fractions) and its area share."""
    x0, y0, x1, y1 = LUNG_REGION
    return {"x": [x0, x1], "y": [y0, y1], "area_share": (x1 - x0) * (y1 - y0)}


def lung_region_info(masks: dict[str, np.ndarray] | None, images: Sequence[str] | None = None) -> dict:
    """results.json ``lung_region_detail``: ``kind`` (``segmented`` / ``fixed rectangle``), the rectangle,
    and with masks the films segmented, those on the rectangle (QC fallback) and the mean lung area."""
    out: dict = {"rectangle": rectangle_region()}
    if not masks:
        return {"kind": "fixed rectangle", **out}
    names = list(images) if images is not None else list(masks)
    usable = [np.asarray(masks[n], bool) for n in names if n in masks]
    seg = [m for m in usable if m.any() and not m.all()]
    return {
        "kind": "segmented",
        **out,
        "n_images": len(names),
        "n_segmented": len(seg),
        "n_rectangle_fallback": len(names) - len(seg),
        "mean_area_share": float(np.mean([m.mean() for m in seg])) if seg else None,
        "source": "lung stage (notebook 01_lungs), QC fallback films use the rectangle",
    }


def _views_folder(lung_key: str, image_root: Path) -> Path:
    """Folder of the rendered masked views for these masks and this image root."""
    payload = json.dumps(
        {"v": LUNG_VIEWS_VERSION, "lungs": lung_key, "root": str(Path(image_root).resolve()), "rect": LUNG_REGION}
    )
    return LUNG_VIEWS_DIR / hashlib.sha256(payload.encode()).hexdigest()[:16]


def render_masked_views(
    manifest: pd.DataFrame,
    masks: dict[str, np.ndarray],
    image_root: Path,
    lung_key: str,
    views_dir: Path | None = None,
) -> dict[str, Path]:
    """Write each film with its lungs hidden and with only its lungs kept (PNG, same size and path as
    the film) under ``<views folder>/<variant>/``; existing files are kept. Returns variant -> root."""
    from cxrstudy.fileio import atomic_path
    from cxrstudy.images import load_xray

    folder = Path(views_dir) if views_dir is not None else _views_folder(lung_key, image_root)
    roots = {name: folder / name for name in MASK_VARIANTS}
    for image in manifest["image"].astype(str):
        targets = {name: root / image for name, root in roots.items()}
        if all(t.is_file() for t in targets.values()):
            continue
        arr = np.asarray(load_xray(Path(image_root) / image))
        inside, _ = film_mask(masks.get(image), *arr.shape)
        for name, target in targets.items():
            out = np.where(inside if name == "masked_lungs" else ~inside, 0, arr).astype(np.uint8)
            with atomic_path(target) as tmp:
                Image.fromarray(out, mode="L").save(tmp, format="PNG")
    return roots


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
) -> dict:
    """Linear head trained on train and tested on test for each feature variant (unmasked, masked_lungs, …)."""
    rows = _task_rows(manifest, classes)
    train, test = rows[rows["split"] == "train"], rows[rows["split"] == "test"]
    out = {}
    for name, feats in features_by_variant.items():
        res, _ = train_test_probe(feats, train, test, classes, seed, n_bootstrap)
        out[name] = {
            "n_train": int(len(train)),
            "n_test": int(len(test)),
            **{k: res[k] for k in ("accuracy", "balanced_accuracy", "roc_auc")},
        }
    return out


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
    """One source (default: the registry's same-hospital source, Actualmed): each run's test predictions on
    it, and a within-source linear probe.

    The probe uses every image of the source and task with patient-grouped cross-validation (folds =
    fewest patient groups of a class, at most 5); its metrics come from the out-of-fold predictions.
    """
    source_name = source_name or same_hospital_source()
    rows = _task_rows(manifest[manifest["source_name"] == source_name], classes)
    out: dict = {"source": source_name, "n": int(len(rows)), "counts": rows["label"].value_counts().to_dict()}
    per_run = {}
    for run_id, preds in run_predictions.items():
        sub = preds[(preds["split"] == "test") & preds["image"].isin(rows["image"])]
        sub = sub[sub["label"].isin(list(classes))]
        entry: dict = {"n": int(len(sub))}
        if len(sub):
            correct = (sub["pred"] == sub["label"]).to_numpy()
            entry["accuracy"] = float(correct.mean())
            entry["labels"] = sub["label"].value_counts().to_dict()
        per_run[run_id] = entry
    out["runs_test"] = per_run
    min_groups = rows.groupby("label")["patient_group"].nunique().reindex(list(classes)).fillna(0).min()
    n_splits = int(min(5, min_groups))
    if n_splits < 2:
        out["probe"] = {"note": f"fewer than 2 patient groups in some class of {source_name}: no probe"}
        return out
    X = _features_for(features, rows, "same hospital")
    y = rows["label"].to_numpy()
    probs_cv, labels = grouped_cv_predict(X, y, rows["patient_group"].astype(str).to_numpy(), n_splits, seed)
    probs = np.zeros((len(y), len(classes)))
    for j, c in enumerate(labels):
        probs[:, list(classes).index(c)] = probs_cv[:, j]
    res = compute_metrics(y, probs, classes, rows["patient_group"], n_bootstrap, seed)
    out["probe"] = {"n_splits": n_splits, **{k: res[k] for k in ("accuracy", "balanced_accuracy", "roc_auc")}}
    return out


# --------------------------------------------------------------------------- all checks for notebook 05


def folds_from_masks(
    rows: pd.DataFrame, folds: Sequence[tuple[str, pd.Series]]
) -> list[tuple[str, pd.DataFrame, pd.DataFrame]]:
    """(source, held-out mask) folds to (source, train rows, held-out rows); training drops every patient
    group that also appears in the held-out rows (cross-source duplicates and follow-ups)."""
    out = []
    for source, mask in folds:
        held = np.asarray(mask, dtype=bool)
        if len(held) != len(rows):
            raise ValueError(f"fold {source!r}: mask has {len(held)} entries for {len(rows)} rows")
        test = rows[held]
        train = rows[~held & ~rows["patient_group"].isin(set(test["patient_group"])).to_numpy()]
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
) -> dict:
    """Every feature-level check: source identification (across and within labels), masking,
    leave-one-source-out, same hospital, and the lung region used (``lung_region``).

    Features come from ``cxrstudy.features.extract_features`` (cached). ``view_root``: the films through the
    checks' input view (``lungs.render.view_root``; None: ``image_root``) for source identification,
    leave-one-source-out and same hospital; the masking experiment always reads the plain films under
    ``image_root`` (the lung masks are at their size). ``lung_masks`` (image -> boolean mask at the film's
    size, e.g. :func:`load_lung_masks`; ``lung_key`` names them) switches the masking from the rectangle to
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
        "source_identification": source_identification(unmasked, manifest, seed),
        "source_id_within_label": source_id_within_label(unmasked, manifest, seed=seed, n_bootstrap=n_bootstrap),
        "masking": masking_experiment(variants, manifest, classes, seed, n_bootstrap),
        "leave_one_source_out": leave_one_source_out(unmasked, rows, folds, classes, seed, n_bootstrap),
        "same_hospital": same_hospital(
            unmasked, manifest, run_predictions, classes, seed=seed, n_bootstrap=n_bootstrap
        ),
    }
