"""Cross-validation: a configuration's fold runs pooled into one out-of-fold whole.

Every film outside the held-out hospital sits in exactly one fold, and the fold's run predicts it once without
having trained or validated on it; :func:`oof_runs` stacks those predictions into one table per configuration
(the run ids without their fold, ``RunSpec.config_id``), beside every fold's inner-validation rows (for choices)
and the held-out hospital's rows as the fold models' ensemble (mean class probability). The result has the shape
of a loaded run (``reporting.results.load_runs``), so every metric reads it as it would read one run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from cxrstudy.runspec import RunSpec

HOLDOUT = "holdout"


def group_folds(runs: Sequence[dict]) -> dict[str, list[dict]]:
    """Fold runs by configuration id (first appearance order), each list in fold order; a configuration with a
    fold twice raises ValueError naming it."""
    out: dict[str, list[dict]] = {}
    for run in runs:
        spec = RunSpec.from_record(run["info"])
        out.setdefault(spec.config_id, []).append(run)
    for cid, members in out.items():
        folds = [RunSpec.from_record(r["info"]).fold for r in members]
        if None in folds or len(set(folds)) != len(folds):
            raise ValueError(f"configuration {cid}: folds {folds} are not distinct fold runs")
        members.sort(key=lambda r: RunSpec.from_record(r["info"]).fold)
    return out


def _prob_columns(preds: pd.DataFrame) -> list[str]:
    return [c for c in preds.columns if c.startswith("prob_") and not c.startswith("prob_sub_")]


def ensemble_rows(frames: Sequence[pd.DataFrame], classes: Sequence[str]) -> pd.DataFrame:
    """One row per film of the fold models' rows of the same films: mean class probability, ``pred`` its arg-max,
    ``pred_hard`` (when present) the folds' most frequent hard-rule class, ties to ``pred``; ``n_models`` counts
    the models averaged."""
    both = pd.concat(frames, ignore_index=True)
    probs = [f"prob_{c}" for c in classes]
    skip = {*probs, "image", "pred", "pred_hard"}
    ids = [c for c in both.columns if c not in skip and not c.startswith("prob_sub_")]
    g = both.groupby("image", sort=False)
    out = g[ids].first().reset_index()
    mean = g[probs].mean().to_numpy()
    out[probs] = mean
    out["pred"] = np.asarray(classes, dtype=object)[mean.argmax(1)]
    if "pred_hard" in both.columns:
        modes = g["pred_hard"].agg(lambda s: s.value_counts().index.tolist())
        counts = g["pred_hard"].agg(lambda s: s.value_counts().tolist())
        out["pred_hard"] = [
            p if len(c) > 1 and c[0] == c[1] else m[0]
            for m, c, p in zip(modes, counts, out["pred"], strict=True)
        ]
    out["n_models"] = g.size().to_numpy()
    return out


def oof_run(members: Sequence[dict]) -> dict[str, Any]:
    """The out-of-fold whole of one configuration's fold runs: predictions (``test``: every fold's own films;
    ``holdout``: the ensemble; ``val``: every fold's inner-validation rows), ``info`` (the first fold's record with
    ``fold`` None, ``run_id`` the configuration id, the folds' run ids and summed training time), ``fold_dirs``."""
    first = members[0]
    info = first["info"]
    classes = list(info["classes"])
    parts, holdout = [], []
    for run in members:
        fold = int(run["info"]["fold"])
        p = run["predictions"].drop(columns=[c for c in run["predictions"].columns if c.startswith("prob_sub_")])
        p = p.assign(fold=np.where(p["split"] == HOLDOUT, -1, fold))
        parts.append(p[p["split"] != HOLDOUT])
        holdout.append(p[p["split"] == HOLDOUT])
    preds = pd.concat(parts, ignore_index=True)
    test = preds[preds["split"] == "test"]
    if dup := sorted(test.loc[test["image"].duplicated(), "image"])[:3]:
        raise ValueError(f"configuration {RunSpec.from_record(info).config_id}: film(s) in two folds' test rows: {dup}")
    if any(len(h) for h in holdout):
        ens = ensemble_rows([h for h in holdout if len(h)], classes).assign(fold=-1)
        preds = pd.concat([preds, ens[[c for c in ens.columns if c != "n_models"]]], ignore_index=True)
    spec = RunSpec.from_record({**info, "fold": None})
    n = preds["split"].value_counts()
    merged = {
        **info,
        "run_id": spec.run_id,
        "config_id": spec.config_id,
        "fold": None,
        "fold_run_ids": [r["info"]["run_id"] for r in members],
        "n_folds": len(members),
        "train_seconds": round(sum(float(r["info"].get("train_seconds") or 0) for r in members), 3),
        "epochs_run": max((r["info"].get("epochs_run") or 0) for r in members),
        "epochs_run_by_fold": [r["info"].get("epochs_run") for r in members],
        "best_epoch_by_fold": [r["info"].get("best_epoch") for r in members],
        "n_test": int(n.get("test", 0)),
        "n_val": int(n.get("val", 0)),
        "subclasses": classes,
    }
    return {
        "dir": first["dir"],
        "info": merged,
        "predictions": preds,
        "fold_dirs": {int(r["info"]["fold"]): r["dir"] for r in members},
        "fold_runs": list(members),
    }


def oof_runs(runs: Sequence[dict]) -> list[dict]:
    """:func:`oof_run` of every configuration among ``runs`` (loaded fold runs), in first appearance order."""
    return [oof_run(m) for m in group_folds(runs).values()]


def film_folds(run: dict, manifest: pd.DataFrame) -> pd.Series:
    """Fold of every manifest film (index image) in an out-of-fold whole's cross-validation (its folds and seed,
    ``data.splits.assign_folds``; held-out films -1); a disagreement with the folds its runs predicted raises
    ValueError (the manifest or subsample differs from training's)."""
    from cxrstudy.data.sources import holdout_sources
    from cxrstudy.data.splits import assign_folds

    info = run["info"]
    folds = assign_folds(manifest, int(info["folds"]), int(info["seed"]), holdout_sources=holdout_sources())
    by_image = pd.Series(folds.to_numpy(), index=manifest["image"].astype(str).to_numpy())
    by_image = by_image[~by_image.index.duplicated()]
    test = run["predictions"][run["predictions"]["split"] == "test"]
    if (bad := test[test["fold"].to_numpy() != test["image"].map(by_image).to_numpy()]).size:
        raise ValueError(
            f"configuration {info['run_id']}: the manifest's folds disagree with the runs' for "
            f"{len(bad)} film(s), e.g. {bad['image'].head(3).tolist()} (same manifest and max_per_class?)"
        )
    return by_image


def per_fold_values(run: dict, metric) -> list[float | None]:
    """``metric(predictions)`` of each fold run of an out-of-fold whole (fold order)."""
    return [metric(r["predictions"]) for r in run["fold_runs"]]
