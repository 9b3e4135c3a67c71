"""Patient-disjoint, stratified train/val/test split; leave-one-source-out folds; smoke-profile subsample.

``make_splits`` never puts one ``patient_group`` in two splits. Whole groups are assigned greedily
(:func:`assign_groups`: largest group first, ties in a ``seed``-ed random order, each to the split
whose target share of the group's strata is least met) with strata ``label`` x ``source_name``, so
every split has about the same label mix and the same sources per label. (scikit-learn's
``StratifiedGroupKFold`` does the same with equal folds only, and takes seconds for 20 folds.) The
result depends only on the groups, labels and sources, never on row order.

CXNet files without a metadata row carry an image-level stand-in patient ID
(``patient_id_is_image_level``): serial films of one person may hide behind different IDs, so with
``image_level_to_train=True`` (default) every group holding such a row goes to training and the
fractions apply to the remaining rows.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Rows of held-out sources (``make_splits(holdout_sources=...)``): never trained or validated on.
HOLDOUT = "holdout"


def _require(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: input lacks columns {missing}")


def assign_groups(counts: np.ndarray, fractions: Sequence[float], seed: int = 0) -> np.ndarray:
    """Greedy stratified assignment of groups to bins: ``counts`` is groups x strata (rows per stratum in
    each group), ``fractions`` the bins' target shares. Groups are visited largest first (ties in a
    seeded random order) and each goes to the bin with the largest relative unmet need for its strata."""
    fractions = np.asarray(fractions, dtype=float)
    counts = np.asarray(counts, dtype=float)
    target = fractions[:, None] * counts.sum(axis=0)[None, :]
    have = np.zeros_like(target)
    order = np.random.default_rng(seed).permutation(len(counts))
    order = order[np.argsort(-counts.sum(axis=1)[order], kind="stable")]
    out = np.zeros(len(counts), dtype=int)
    for g in order:
        need = np.where(target > 0, (target - have) / np.maximum(target, 1e-12), -1.0)  # bins x strata
        score = need @ counts[g] / counts[g].sum()
        best = int(np.argmax(score))  # ties: the earlier bin
        out[g] = best
        have[best] += counts[g]
    return out


def make_splits(
    df: pd.DataFrame,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    *,
    image_level_to_train: bool = True,
    stratify: Sequence[str] = ("label", "source_name"),
    holdout_sources: Sequence[str] = (),
) -> pd.Series:
    """``train``/``val``/``test`` per row (index-aligned), disjoint by ``patient_group``, stratified by
    ``stratify`` columns, seeded and independent of row order (module docstring). Rows of
    ``holdout_sources``, and every row sharing a patient group with them, get ``holdout``."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"make_splits: need 0 <= val_fraction, test_fraction and their sum < 1 "
            f"(got {val_fraction}, {test_fraction})"
        )
    needed = ["patient_group", *stratify] + (["patient_id_is_image_level"] if image_level_to_train else [])
    _require(df, needed, "make_splits")
    if df["patient_group"].isna().any():
        raise ValueError("make_splits: empty patient_group in some rows")
    split = np.full(len(df), "train", dtype=object)
    groups = df["patient_group"].astype(str).to_numpy()
    held = np.zeros(len(df), dtype=bool)
    if holdout_sources:
        _require(df, ["source_name"], "make_splits(holdout_sources)")
        held = np.isin(groups, groups[df["source_name"].isin(list(holdout_sources)).to_numpy()])
        split[held] = HOLDOUT
    free = ~held
    if image_level_to_train:
        image_level = df["patient_id_is_image_level"].astype(bool).to_numpy()
        free &= ~np.isin(groups, groups[image_level])
    if free.any():
        strata = df.loc[free, list(stratify)].astype(str).agg("|".join, axis=1).to_numpy()
        table = pd.crosstab(groups[free], strata)  # groups (sorted by name) x strata (sorted)
        fractions = (1 - val_fraction - test_fraction, val_fraction, test_fraction)
        bins = assign_groups(table.to_numpy(), fractions, seed)
        split_of = dict(zip(table.index, np.array(SPLITS, dtype=object)[bins], strict=True))
        split[free] = [split_of[g] for g in groups[free]]
    return pd.Series(split, index=df.index, name="split")


def linked_rows(df: pd.DataFrame, mask: pd.Series) -> pd.Series:
    """Rows outside ``mask`` whose ``patient_group`` also has rows inside it (keep them out of training)."""
    _require(df, ["patient_group"], "linked_rows")
    inside = set(df.loc[mask.to_numpy(dtype=bool), "patient_group"])
    return ~mask.astype(bool) & df["patient_group"].isin(inside)


def loso_folds(df: pd.DataFrame) -> list[tuple[str, pd.Series]]:
    """Leave-one-source-out folds ``(source_name, rows held out)``, sources in alphabetical order; only
    sources whose hold-out leaves every class of ``df`` in training (without rows linked to it by
    ``patient_group``, when that column is present)."""
    _require(df, ["source_name", "label"], "loso_folds")
    classes = set(df["label"])
    folds = []
    for source in sorted(df["source_name"].unique()):
        mask = pd.Series(df["source_name"].to_numpy() == source, index=df.index, name=source)
        train = ~mask
        if "patient_group" in df.columns:
            train &= ~linked_rows(df, mask)
        if set(df.loc[train, "label"]) >= classes:
            folds.append((str(source), mask))
    return folds


def _order_key(df: pd.DataFrame) -> list[str]:
    for cols in (["image"], ["source_name", "upstream_path"]):
        if all(c in df.columns for c in cols) and not df.duplicated(cols).any():
            return cols
    raise ValueError("subsample: need a unique 'image' or ('source_name', 'upstream_path') column")


def subsample(manifest: pd.DataFrame, max_per_class: int, seed: int) -> pd.DataFrame:
    """Up to ``max_per_class`` rows per (split, label), drawn with ``seed`` independently of row order;
    ``0`` keeps everything. Rows come back in the manifest's order."""
    if max_per_class < 0:
        raise ValueError(f"subsample: max_per_class must be >= 0 (got {max_per_class})")
    if max_per_class == 0:
        return manifest.copy()
    _require(manifest, ["split", "label"], "subsample")
    m = manifest.reset_index(drop=True)
    ordered = m.sort_values(_order_key(m), kind="stable")
    shuffled = ordered.iloc[np.random.default_rng(seed).permutation(len(ordered))]
    keep = shuffled.groupby(["split", "label"], sort=False).cumcount() < max_per_class
    chosen = np.sort(shuffled.index[keep.to_numpy()].to_numpy())
    return manifest.iloc[chosen].copy()


#: The manifest's ``split`` of a film that cross-validation scores (every film outside the held-out sources).
CV = "cv"
#: Share of the training folds' patient groups that form a fold's inner validation part.
INNER_VAL_FRACTION = 0.15
#: ``fold`` of a held-out film: predicted by every fold's model, trained or validated on by none.
HOLDOUT_FOLD = -1


def assign_folds(
    df: pd.DataFrame,
    folds: int,
    seed: int = 0,
    *,
    stratify: Sequence[str] = ("label", "source_name"),
    holdout_sources: Sequence[str] = (),
) -> pd.Series:
    """Fold (0 .. ``folds`` - 1) of every row by scikit-learn's ``StratifiedGroupKFold`` (shuffled with ``seed``):
    patient groups never span two folds, strata ``stratify`` are spread evenly. Rows of ``holdout_sources`` and
    every row sharing a patient group with them get :data:`HOLDOUT_FOLD`. Independent of row order."""
    from sklearn.model_selection import StratifiedGroupKFold

    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"assign_folds: folds must be an integer >= 2 (got {folds!r})")
    _require(df, ["patient_group", "source_name", *stratify], "assign_folds")
    if df["patient_group"].isna().any():
        raise ValueError("assign_folds: empty patient_group in some rows")
    groups = df["patient_group"].astype(str).to_numpy()
    held = np.isin(groups, groups[df["source_name"].isin(list(holdout_sources)).to_numpy()])
    out = np.full(len(df), HOLDOUT_FOLD, dtype=int)
    free = np.flatnonzero(~held)
    if len(free):
        order = free[np.lexsort((df["image"].astype(str).to_numpy()[free] if "image" in df.columns
                                 else np.arange(len(free)), groups[free]))]
        strata = df.iloc[order][list(stratify)].astype(str).agg("|".join, axis=1).to_numpy()
        n_groups = len(set(groups[order]))
        if n_groups < folds:
            raise ValueError(f"assign_folds: {n_groups} patient group(s) cannot fill {folds} folds")
        cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        with warnings.catch_warnings():  # a stratum smaller than the folds (figure1 pneumonia: 2 films) is expected
            warnings.filterwarnings("ignore", "The least populated class", UserWarning)
            for i, (_, test) in enumerate(cv.split(np.zeros(len(order)), strata, groups[order])):
                out[order[test]] = i
    return pd.Series(out, index=df.index, name="fold")


def fold_split(
    df: pd.DataFrame, fold: int, folds: pd.Series, val_fraction: float = 0.15, seed: int = 0
) -> pd.Series:
    """One fold's roles: ``test`` (the fold), ``holdout`` (:data:`HOLDOUT_FOLD`), and the other folds split
    patient-disjointly into ``train`` and an inner ``val`` (:func:`make_splits`, stratified the same way)."""
    folds = pd.Series(folds, index=df.index)
    if fold not in set(folds):
        raise ValueError(f"fold_split: fold {fold} is not among the folds {sorted(set(folds))}")
    role = pd.Series("test", index=df.index, name="split", dtype=object)
    role[folds == HOLDOUT_FOLD] = HOLDOUT
    rest = (folds != fold) & (folds != HOLDOUT_FOLD)
    inner = make_splits(df[rest], seed=seed + fold, val_fraction=val_fraction, test_fraction=0.0,
                        image_level_to_train="patient_id_is_image_level" in df.columns)
    role[rest] = inner
    return role


def cv_roles(
    manifest: pd.DataFrame, folds: int, fold: int, seed: int = 0, val_fraction: float = INNER_VAL_FRACTION
) -> pd.DataFrame:
    """The manifest as one cross-validation fold sees it: ``fold`` from :func:`assign_folds` (``folds`` folds seeded
    by ``seed``, the held-out sources out of every fold) and ``split`` the row's role (:func:`fold_split`)."""
    from cxrstudy.data.sources import holdout_sources

    assigned = assign_folds(manifest, folds, seed, holdout_sources=holdout_sources())
    return manifest.assign(fold=assigned, split=fold_split(manifest, fold, assigned, val_fraction, seed))
