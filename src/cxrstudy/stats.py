"""General statistics: group bootstrap, percentile and stratified intervals, spread over seeds, Holm's
adjustment, and the linear probe with patient-grouped cross-validation.

A leaf module: it imports nothing of ``cxrstudy`` (numpy, pandas, scikit-learn with its joblib and
threadpoolctl only), so every stage (evaluation, the lung stage) can use it. The group bootstrap resamples whole groups with replacement (as
many groups as there are); an item enters a replicate as often as its group was drawn, implemented with
per-item integer weights (exactly equivalent to replicating the rows). Intervals are percentile intervals.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

#: Replicates are processed in chunks of this many to bound memory (chunk x items weights).
_CHUNK = 250


# --------------------------------------------------------------------------- group bootstrap


def bootstrap_weights(
    groups: np.ndarray, n_bootstrap: int, seed: int, strata: np.ndarray | None = None
) -> Iterator[np.ndarray]:
    """Yield (chunk, n) weight matrices: multinomial draws of whole groups, mapped to their images. With
    ``strata`` (one per image; a group takes its first image's), each stratum's groups are drawn as many times as
    it has groups, so every replicate holds every stratum (a class-stratified bootstrap)."""
    _, first, codes = np.unique(groups, return_index=True, return_inverse=True)
    n_groups = codes.max() + 1
    of_group = np.zeros(n_groups, dtype=int) if strata is None else np.unique(np.asarray(strata)[first], return_inverse=True)[1]
    members = [np.flatnonzero(of_group == s) for s in range(of_group.max() + 1)]
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_bootstrap:
        b = min(_CHUNK, n_bootstrap - done)
        counts = np.zeros((b, n_groups), dtype=np.int64)
        for m in members:
            counts[:, m] = rng.multinomial(len(m), np.full(len(m), 1.0 / len(m)), size=b)
        yield counts[:, codes].astype(float)
        done += b


#: Fewest patients a class needs for an interval: below it a metric is reported as not estimable.
MIN_PATIENTS_PER_CLASS = 10


def patients_per_class(labels: Sequence, groups: Sequence) -> dict[str, int]:
    """Distinct patient groups per label."""
    df = pd.DataFrame({"label": np.asarray(labels).astype(str), "group": np.asarray(groups).astype(str)})
    return {str(k): int(v) for k, v in df.groupby("label")["group"].nunique().items()}


def not_estimable(labels: Sequence, groups: Sequence, minimum: int = MIN_PATIENTS_PER_CLASS) -> str | None:
    """Why an interval over these films is not estimable (a class with fewer than ``minimum`` patients), or None."""
    thin = {k: v for k, v in patients_per_class(labels, groups).items() if v < minimum}
    if not thin:
        return None
    listed = ", ".join(f"{k}: {v}" for k, v in sorted(thin.items()))
    return f"not estimable: fewer than {minimum} patients in a class ({listed})"


def group_array(groups: Sequence | None, n: int) -> np.ndarray:
    """Patient groups as an array; ``None`` means every image is its own group (image bootstrap)."""
    if groups is None:
        return np.arange(n)
    g = np.asarray(groups)
    if len(g) != n:
        raise ValueError(f"groups has {len(g)} entries for {n} images")
    if pd.isna(pd.Series(g)).any():
        raise ValueError("groups contains missing values: every image needs a patient group")
    return g.astype(str)


def percentile_interval(point: float, reps: np.ndarray, level: float) -> dict:
    """{'value', 'ci_low', 'ci_high', 'n_boot'} from a point estimate and replicate values (NaN skipped)."""
    used = reps[~np.isnan(reps)]
    alpha = (1.0 - level) / 2.0
    value = None if np.isnan(point) else float(point)
    if len(used) == 0:
        return {"value": value, "ci_low": None, "ci_high": None, "n_boot": 0}
    lo, hi = np.percentile(used, [100 * alpha, 100 * (1 - alpha)])
    return {"value": value, "ci_low": float(lo), "ci_high": float(hi), "n_boot": int(len(used))}


def group_bootstrap_means(
    values: Sequence[np.ndarray], groups: np.ndarray, n_bootstrap: int, seed: int, level: float = 0.95
) -> list[dict]:
    """Mean of each per-image array, with percentile intervals from one shared bootstrap over ``groups``."""
    reps: list[list[np.ndarray]] = [[] for _ in values]
    for W in bootstrap_weights(groups, n_bootstrap, seed):
        for i, v in enumerate(values):
            reps[i].append(W @ v / W.sum(axis=1))
    return [
        percentile_interval(float(v.mean()), np.concatenate(r) if r else np.array([]), level)
        for v, r in zip(values, reps, strict=True)
    ]


def stratified_mean_ci(
    values: Sequence[np.ndarray], strata: np.ndarray, n_bootstrap: int = 1000, seed: int = 0
) -> list[dict]:
    """Mean of each per-image array with a 95% percentile interval from one bootstrap over images,
    resampled within each stratum (as the sample was drawn)."""
    strata = np.asarray(strata)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    reps = np.empty((n_bootstrap, len(values)))
    arrays = [np.asarray(v, dtype=float) for v in values]
    for b in range(n_bootstrap):
        idx = np.concatenate([rng.choice(m, size=len(m), replace=True) for m in members])
        reps[b] = [a[idx].mean() for a in arrays]
    out = []
    for j, a in enumerate(arrays):
        lo, hi = np.percentile(reps[:, j], [2.5, 97.5]) if n_bootstrap and len(a) else (np.nan, np.nan)
        value = float(a.mean()) if len(a) else None
        out.append(
            {
                "value": value,
                "ci_low": None if np.isnan(lo) else float(lo),
                "ci_high": None if np.isnan(hi) else float(hi),
                "n": int(len(a)),
            }
        )
    return out


# --------------------------------------------------------------------------- seeds and multiplicity


def seed_spread(values: Sequence[float]) -> dict:
    """Spread of one metric over seeds: n, mean, standard deviation (ddof=1), min, max."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if len(v) == 0:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None}
    return {
        "n": int(len(v)),
        "mean": float(v.mean()),
        "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
    }


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (family-wise error) in input order; None stays None."""
    idx = [i for i, p in enumerate(p_values) if p is not None]
    order = sorted(idx, key=lambda i: p_values[i])
    m = len(order)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p_values[i])))
        out[i] = running
    return out


# --------------------------------------------------------------------------- linear probe


def linear_probe(seed: int = 0) -> Pipeline:
    """The linear head used by every probe: standardised features, balanced logistic regression."""
    return make_pipeline(
        StandardScaler(),
        LogisticRegression(C=0.1, max_iter=3000, class_weight="balanced", random_state=seed),
    )


def one_blas_thread() -> threadpool_limits:
    """Context that runs BLAS on one thread: the probes' lbfgs fits on a few hundred films are about 4x faster
    on one thread than on two (measured on the 2-core reference kind of machine)."""
    return threadpool_limits(limits=1, user_api="blas")


def grouped_splits(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) positions of StratifiedGroupKFold on patient ``groups``, stratified by ``y``, seeded."""
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(cv.split(np.zeros(len(y)), y, groups))


def grouped_cv_predict(
    X: np.ndarray, y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int,
    splits: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[np.ndarray, list]:
    """Out-of-fold probabilities of the linear probe, folds by StratifiedGroupKFold on patient groups
    (:func:`grouped_splits`), or the given ``splits``."""
    labels = sorted(set(y))
    probs = np.zeros((len(y), len(labels)))
    with one_blas_thread():
        for tr, te in splits if splits is not None else grouped_splits(y, groups, n_splits, seed):
            model = linear_probe(seed).fit(X[tr], y[tr])
            p = model.predict_proba(X[te])
            for j, c in enumerate(model.classes_):
                probs[te, labels.index(c)] = p[:, j]
    return probs, labels


def balanced_accuracy_of(y: np.ndarray, probs: np.ndarray, labels: Sequence) -> float:
    """Mean recall over the labels present in ``y`` of the arg-max of ``probs`` (columns ``labels``)."""
    pred = np.asarray(labels)[probs.argmax(axis=1)]
    return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))


def _null_value(X: np.ndarray, y: np.ndarray, splits: Sequence[tuple[np.ndarray, np.ndarray]], seed: int) -> float:
    return balanced_accuracy_of(y, *grouped_cv_predict(X, y, np.zeros(len(y)), 0, seed, splits))


def cv_null(
    X: np.ndarray, labelings: Sequence[np.ndarray], splits: Sequence[tuple[np.ndarray, np.ndarray]], seed: int,
    n_jobs: int | None = None,
) -> list[float]:
    """Balanced accuracy of the linear probe refitted on the same ``splits`` (the observed labels' grouped folds)
    under each of ``labelings``, in input order, on ``n_jobs`` worker processes (default: one per CPU core, at most
    one per labeling)."""
    if not len(labelings):
        return []
    jobs = n_jobs or min(len(labelings), os.cpu_count() or 1)
    if jobs == 1:
        return [_null_value(X, y, splits, seed) for y in labelings]
    return list(Parallel(n_jobs=jobs)(delayed(_null_value)(X, y, splits, seed) for y in labelings))
