"""Deep feature reweighting (DFR; Kirichenko, Izmailov & Wilson, ICLR 2023): a trained fold run's last layer
retrained on a group-balanced sample of the fold's inner-validation films (variant ``dfr`` from the baseline,
``<variant>_dfr`` from another, ``RunSpec.dfr``).

The rule: the base run's penultimate (pooled backbone) features of its fold's inner-validation films, which it
never trained on (they only chose its checkpoint) and which are outside its held-out fold; groups label x source
x view of those films only (label x source, then label, when some class has no label x source x view group of
:data:`MIN_GROUP` films: ``choose_grouping``, recorded in run.json). Groups of fewer than :data:`MIN_GROUP` films are left out of the balanced samples
(one film would cut every group to one) and named in run.json. A balanced sample draws as many films from each
remaining group as its smallest holds (without replacement, seeded). An L1-penalised logistic regression
(scikit-learn: ``liblinear`` for two classes, multinomial ``saga`` for three) on standardised features; C from
:data:`C_GRID` by patient-grouped cross-validation over the inner-validation films (each split's balanced
sample of its training part, scored by the mean per-group accuracy on its held part, ties to the smaller C);
the final head averages :data:`N_DRAWS` balanced draws' weights (as the paper does). The new head replaces the
network's linear layer; the run predicts its fold's test films and the held-out hospital with it; its
validation rows are the cross-fitted predictions at the chosen C (each film predicted by a head that did not fit
it), so that the variant selection reads no in-sample figure.
"""

from __future__ import annotations

import io
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cxrstudy import config
from cxrstudy.fileio import atomic_write_bytes, atomic_write_text, write_json
from cxrstudy.runspec import RunSpec

#: Inverse L1 strengths tried (the paper's grid).
C_GRID: tuple[float, ...] = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)
#: Balanced draws averaged into the final head.
N_DRAWS = 10
#: Patient-grouped splits of the inner-validation films that choose C (fewer when there are fewer groups).
N_SPLITS = 5
#: Smallest group (films) a balanced sample draws from; smaller groups are left out and named.
MIN_GROUP = 2
#: run.json's statement of the rule.
RULE = (
    "last layer retrained (Kirichenko et al. 2023) on the base run's penultimate features of its fold's "
    f"inner-validation films: L1 logistic regression on group-balanced samples (label x source x view, coarser "
    f"when a class has no such group of {MIN_GROUP} films; groups under {MIN_GROUP} films left out), C by patient-grouped CV (mean per-group accuracy), {N_DRAWS} draws averaged"
)
#: The group columns (label x source x view).
GROUP_COLUMNS: tuple[str, ...] = ("label", "source_name", "view")


def dfr_groups(rows: pd.DataFrame, columns: tuple[str, ...] = GROUP_COLUMNS) -> pd.Series:
    """``label|source|view`` (or the given ``columns``) of each row (``unknown`` where the manifest has none)."""
    frame = rows.reindex(columns=list(columns)).fillna("unknown").astype(str).replace("", "unknown")
    return frame.agg("|".join, axis=1).reset_index(drop=True)


def choose_grouping(
    rows: pd.DataFrame, labels: set[str] | None = None
) -> tuple[tuple[str, ...], pd.Series]:
    """The finest of label x source x view, label x source, label under which every label (of ``rows``, or
    ``labels``) has a group of at least :data:`MIN_GROUP` films (so a balanced sample holds every class), and its
    groups; ValueError if none."""
    labels = set(rows["label"].astype(str)) if labels is None else labels
    for columns in (GROUP_COLUMNS, GROUP_COLUMNS[:2], GROUP_COLUMNS[:1]):
        groups = dfr_groups(rows, columns)
        sizes = groups.value_counts()
        kept = {g.split("|", 1)[0] for g in sizes[sizes >= MIN_GROUP].index}
        if kept >= labels:
            return columns, groups
    raise ValueError(f"DFR: some class has fewer than {MIN_GROUP} inner-validation films")


def balanced_sample(groups: pd.Series, rng: np.random.Generator) -> np.ndarray:
    """Positions of a group-balanced sample: from every group of at least :data:`MIN_GROUP` films as many films as
    the smallest such group holds, drawn without replacement."""
    sizes = groups.value_counts()
    kept = sizes[sizes >= MIN_GROUP]
    if kept.empty:
        raise ValueError(f"DFR: no group of at least {MIN_GROUP} films among {len(groups)} inner-validation films")
    n = int(kept.min())
    codes = groups.to_numpy()
    picks = [rng.choice(np.flatnonzero(codes == g), n, replace=False) for g in sorted(kept.index)]
    return np.sort(np.concatenate(picks))


def _fit_head(x: np.ndarray, y: np.ndarray, n_classes: int, c: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(weight (n_classes, F), bias (n_classes,)) of an L1 logistic regression on standardised ``x``, folded back
    into the raw features and written as softmax logits (two classes: class 0's row zero)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    mu, sd = x.mean(0), x.std(0) + 1e-6
    solver = "liblinear" if n_classes == 2 else "saga"
    # L1; tol 1e-3: saga at scikit-learn's 1e-4 runs thousands of epochs on 1280 features (3 s a fit on 60 films)
    clf = LogisticRegression(C=c, l1_ratio=1.0, solver=solver, max_iter=1000, tol=1e-3, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit((x - mu) / sd, y)
    w_std = np.zeros((n_classes, x.shape[1]))
    b = np.zeros(n_classes)
    present = clf.classes_.astype(int)
    if n_classes == 2 and len(present) == 2:
        w_std[1], b[1] = clf.coef_[0], clf.intercept_[0]
    elif len(present) == n_classes:
        w_std, b = clf.coef_.copy(), clf.intercept_.copy()
    else:
        raise ValueError(f"DFR: the balanced sample holds classes {present.tolist()} of {n_classes}")
    w = w_std / sd
    return w, b - w @ mu


def _averaged_head(
    x: np.ndarray, y: np.ndarray, groups: pd.Series, n_classes: int, c: float, seed: int, draws: int
) -> tuple[np.ndarray, np.ndarray]:
    """The mean weights of ``draws`` heads, each on its own balanced sample (seeds ``seed``, ``seed + 1``, ...)."""
    heads = []
    for d in range(draws):
        pick = balanced_sample(groups, np.random.default_rng(seed + d))
        heads.append(_fit_head(x[pick], y[pick], n_classes, c, seed + d))
    return np.mean([h[0] for h in heads], 0), np.mean([h[1] for h in heads], 0)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _group_balanced_accuracy(y: np.ndarray, pred: np.ndarray, groups: np.ndarray) -> float:
    """Mean over groups of the accuracy within each group."""
    return float(np.mean([np.mean(pred[groups == g] == y[groups == g]) for g in np.unique(groups)]))


def choose_c(
    x: np.ndarray, y: np.ndarray, rows: pd.DataFrame, n_classes: int, seed: int
) -> tuple[float, list[dict[str, Any]], np.ndarray | None]:
    """C from :data:`C_GRID` by patient-grouped CV (``GroupKFold`` over ``rows``' ``patient_group``): per C the
    mean per-group accuracy on the held parts, each split's head fitted on a balanced sample of its training part
    (grouped by :func:`choose_grouping` there; a split whose training part cannot hold every class is skipped).
    Returns the C, the table of scores and the chosen C's cross-fitted probabilities; with no usable split, the
    grid's first (weakest) C and None."""
    from sklearn.model_selection import GroupKFold

    rows = rows.reset_index(drop=True)
    patients = rows["patient_group"].astype(str).to_numpy()
    held_groups = dfr_groups(rows).to_numpy()
    k = min(N_SPLITS, len(np.unique(patients)))
    splits = list(GroupKFold(n_splits=k).split(x, y, patients)) if k >= 2 else []
    fits = []
    for tr, te in splits:
        try:
            fits.append((tr, te, choose_grouping(rows.iloc[tr], set(rows["label"].astype(str)))[1]))
        except ValueError:  # this split's training part lacks a class: it says nothing
            continue
    table, probs = [], {}
    for c in C_GRID:
        p = np.full((len(y), n_classes), 1.0 / n_classes)
        scores = []
        for i, (tr, te, groups) in enumerate(fits):
            w, b = _averaged_head(x[tr], y[tr], groups, n_classes, c, seed + 100 * i, 1)
            p[te] = _softmax(x[te] @ w.T + b)
            scores.append(_group_balanced_accuracy(y[te], p[te].argmax(1), held_groups[te]))
        table.append({"C": c, "score": float(np.mean(scores)) if scores else None, "splits": len(scores)})
        probs[c] = p
    if not fits:
        return C_GRID[0], table, None
    covered = np.zeros(len(y), dtype=bool)
    for _, te, _ in fits:
        covered[te] = True
    best = max(table, key=lambda t: (t["score"], -t["C"]))["C"]
    return best, table, probs[best] if covered.all() else None


@torch.inference_mode()
def penultimate_features(model: torch.nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> np.ndarray:
    """The backbone's pooled features (n, F) of uint8 images (N,1,S,S), no augmentation, eval mode."""
    from cxrstudy.training.data import TensorBatches

    model.eval().to(device)
    loader = TensorBatches(images, np.zeros(len(images)), model.spec, batch_size, train=False, seed=0)
    out = [model.backbone(x.to(device).contiguous(memory_format=torch.channels_last)).float().cpu().numpy()
           for x, _ in loader]
    model.to("cpu")
    return np.concatenate(out) if out else np.zeros((0, model.head.in_features), dtype=np.float32)


def train_dfr(
    base_dir: Path | str,
    manifest: pd.DataFrame,
    image_root: Path | str,
    *,
    out_root: Path | str | None = None,
    tensor_dir: Path | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Write the DFR run of the finished run in ``base_dir`` (``RunSpec.dfr``'s folder beside it, or under
    ``out_root``) from the same ``manifest`` and ``image_root`` the base trained on; returns its run.json.
    ValueError for a decomposition-on base."""
    from cxrstudy.data.splits import cv_roles
    from cxrstudy.tensorcache import load_uint8_batch
    from cxrstudy.training.data import task_rows
    from cxrstudy.training.labels import identity_labels
    from cxrstudy.training.learner import predictions_frame
    from cxrstudy.training.runs import load_run_model

    t0 = time.perf_counter()
    base_dir = Path(base_dir)
    model, info = load_run_model(base_dir)
    spec = RunSpec.from_record(info).dfr  # raises for a decomposition-on base
    seed, fold = int(info["train_seed"]), int(info["fold"])
    rows = task_rows(cv_roles(manifest, int(info["folds"]), fold, int(info["seed"]), float(info["inner_val"])),
                     info["task"])
    rows = rows[rows["split"].isin(["val", "test", "holdout"])].reset_index(drop=True)
    images = load_uint8_batch(rows, Path(image_root), int(info["image_size"]), model.spec.interpolation,
                              cache_dir=tensor_dir)
    dev = config.resolve_device(device)
    feats = penultimate_features(model, images, int(info["params"]["batch_size"]), dev)
    classes = list(info["classes"])
    val = (rows["split"] == "val").to_numpy()
    y = rows.loc[val, "label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    grouping, groups = choose_grouping(rows[val])
    c, table, val_probs = choose_c(feats[val], y, rows[val], len(classes), seed)
    w, b = _averaged_head(feats[val], y, groups, len(classes), c, seed, N_DRAWS)
    with torch.no_grad():
        model.head.weight.copy_(torch.as_tensor(w, dtype=model.head.weight.dtype))
        model.head.bias.copy_(torch.as_tensor(b, dtype=model.head.bias.dtype))
    probs = _softmax(feats @ w.T + b)
    if val_probs is not None:
        probs[val] = val_probs
    preds = predictions_frame(rows, probs, identity_labels(tuple(classes)), with_subclasses=False)
    out_dir = Path(out_root or base_dir.parent) / spec.run_id
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "run.json").unlink(missing_ok=True)
    record = {
        **info,
        "run_id": spec.run_id,
        "config_id": spec.config_id,
        "variant": spec.variant,
        "base_run_id": info["run_id"],
        "train_seconds": round(float(info.get("train_seconds") or 0) + time.perf_counter() - t0, 3),  # base + DFR
        "val_accuracy": float((preds.loc[val, "pred"] == preds.loc[val, "label"]).mean()),
        "test_accuracy": _accuracy(preds, "test"),
        "dfr": _facts(c, table, grouping, groups, int(val.sum()), w, val_probs is not None, time.perf_counter() - t0),
    }
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(out_dir / "model.pth", buf.getvalue())
    for name in ("history.csv", "learning_curve.png"):  # the base's (the backbone's) training
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, out_dir / name)
    atomic_write_text(out_dir / "predictions.csv", preds.to_csv(index=False))
    write_json(out_dir / "run.json", json.loads(json.dumps(record, default=str)))  # last: marks the run finished
    return record


def _facts(
    c: float, table: list[dict], grouping: tuple[str, ...], groups: pd.Series, n_val: int, w: np.ndarray,
    cross_fitted: bool, seconds: float,
) -> dict[str, Any]:
    """run.json's ``dfr`` block: the rule, the chosen C and its grid, the groups and their sizes, the head's sparsity."""
    sizes = groups.value_counts()
    return {
        "rule": RULE,
        "seconds": round(seconds, 3),
        "c": c,
        "c_grid": table,
        "n_draws": N_DRAWS,
        "grouping": list(grouping),
        "per_group": int(sizes[sizes >= MIN_GROUP].min()),
        "groups": [{"group": g, "n": int(n), "in_sample": bool(n >= MIN_GROUP)} for g, n in sizes.sort_index().items()],
        "left_out_groups": sorted(sizes[sizes < MIN_GROUP].index),
        "n_val_films": n_val,
        "nonzero_weights": int((np.abs(w) > 0).any(0).sum()),
        "c_rule": "patient-grouped CV, mean per-group accuracy" if any(t["splits"] for t in table)
        else "fixed at the grid's first: no split's training part held every class",
        "val_predictions": "cross-fitted at the chosen C (patient-grouped splits)" if cross_fitted
        else "in-sample: too few inner-validation films to cross-fit every one (optimistic)",
    }


def _accuracy(preds: pd.DataFrame, split: str) -> float | None:
    rows = preds[preds["split"] == split]
    return float((rows["pred"] == rows["label"]).mean()) if len(rows) else None
