"""Worst-group accuracy: the accuracy of the label x source group a configuration does worst on, out of fold.

The films are a configuration's out-of-fold rows (``split == "test"``: every film outside the held-out hospital,
predicted by the fold model that never trained or validated on it); a group is a (label, source) cell. Only groups
of at least :data:`MIN_FILMS` films compete for the worst (a group of two films would decide the figure by chance);
every group is listed with its n and accuracy. The interval is the 2.5-97.5 percentiles of the worst competing
group's accuracy (the minimum, recomputed per replicate) over a patient-group bootstrap stratified by class, as
the other metrics' (``stats.bootstrap_weights``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from cxrstudy.stats import bootstrap_weights, percentile_interval

#: Smallest group (films) that competes for the worst group.
MIN_FILMS = 10
#: The split read: the out-of-fold films.
SPLIT = "test"


def worst_group_accuracy(
    predictions: pd.DataFrame,
    manifest: pd.DataFrame | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    min_films: int = MIN_FILMS,
) -> dict:
    """results.json ``worst_group_accuracy`` of one configuration's out-of-fold predictions: ``group``
    (``label|source``), ``label``, ``source``, ``n``, ``value``, ``ci_low``, ``ci_high``, ``min_films`` and
    ``groups`` (every label x source cell's n and accuracy, ``competes`` when it has ``min_films`` films)."""
    from cxrstudy.evaluation.scorecard import with_source_names

    rows = with_source_names(predictions[predictions["split"] == SPLIT], manifest)
    if rows.empty:
        return {"value": None, "note": "no out-of-fold films", "groups": [], "min_films": min_films}
    key = rows["label"].astype(str) + "|" + rows["source_name"].astype(str)
    correct = (rows["pred"] == rows["label"]).to_numpy(dtype=float)
    table = (
        pd.DataFrame({"group": key, "correct": correct}).groupby("group")["correct"].agg(["size", "mean"])
    )
    groups = [
        {"group": g, "n": int(r["size"]), "accuracy": float(r["mean"]), "competes": bool(r["size"] >= min_films)}
        for g, r in table.iterrows()
    ]
    competing = [g for g in groups if g["competes"]]
    out: dict = {"min_films": min_films, "groups": groups}
    if not competing:
        return {**out, "value": None, "note": f"no label x source group has {min_films} or more films"}
    worst = min(competing, key=lambda g: (g["accuracy"], g["group"]))
    names = [g["group"] for g in competing]
    member = np.stack([(key == g).to_numpy(dtype=float) for g in names])  # (groups, films)
    reps = []
    if n_bootstrap:
        patients = rows["patient_group"].astype(str).to_numpy()
        for w in bootstrap_weights(patients, n_bootstrap, seed, strata=rows["label"].astype(str).to_numpy()):
            hits, sizes = (w * correct) @ member.T, w @ member.T  # (chunk, groups)
            with np.errstate(invalid="ignore", divide="ignore"):
                reps.append(np.nanmin(np.where(sizes > 0, hits / sizes, np.nan), axis=1))
    interval = percentile_interval(worst["accuracy"], np.concatenate(reps) if reps else np.array([]), 0.95)
    label, source = worst["group"].split("|", 1)
    return {**out, "group": worst["group"], "label": label, "source": source, "n": worst["n"], **interval}


def with_worst_group(
    entries: Sequence[dict], runs: Sequence[dict], manifest: pd.DataFrame | None, n_bootstrap: int, seed: int
) -> list[dict]:
    """``entries`` (results.json ``configurations``, one per out-of-fold whole in ``runs``' order), each with its
    ``worst_group_accuracy``."""
    if len(entries) != len(runs):
        raise ValueError(f"worst-group accuracy: {len(entries)} entries for {len(runs)} configurations")
    return [
        {**e, "worst_group_accuracy": worst_group_accuracy(r["predictions"], manifest, n_bootstrap, seed)}
        for e, r in zip(entries, runs, strict=True)
    ]
