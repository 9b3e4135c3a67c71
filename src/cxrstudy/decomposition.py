"""DeTraC class decomposition (k-means per class on training features) and composition back to classes.

Only training rows are ever clustered: ``fit_decomposition`` refuses any row whose split is not
``train``. Subclasses are named ``<class>_<j>`` (j = 1..k, largest cluster first); with k = 1 the
subclass is the class itself, so "no decomposition" runs the same code path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import silhouette_score
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from cxrstudy import config
from cxrstudy.fileio import atomic_write_text, write_json

SUBDIR = "decomposition"
SUBCLASSES_CSV = "subclasses.csv"
DECOMPOSITION_JSON = "decomposition.json"


@dataclass
class Decomposition:
    """Result of a decomposition: k per class, subclass names (grouped by class), parents, silhouettes."""

    k: dict[str, int]
    subclasses: list[str]
    parent_of: dict[str, str]
    silhouettes: dict[str, dict[int, float]]
    sizes: dict[str, int] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)


def subclass_name(cls: str, j: int, k: int) -> str:
    """Name of the j-th (1-based) of k subclasses of ``cls``: the class itself when k == 1."""
    return cls if k == 1 else f"{cls}_{j}"


def parent_class(subclass: str, classes: Sequence[str]) -> str:
    """Parent class of a subclass name (``covid_2`` -> ``covid``, ``covid`` -> ``covid``)."""
    if subclass in classes:
        return subclass
    m = re.fullmatch(r"(.+)_(\d+)", subclass)
    if m and m.group(1) in classes:
        return m.group(1)
    raise ValueError(f"subclass {subclass!r} has no parent among classes {list(classes)}")


def _as_series(values: Any, index: pd.Index, what: str) -> pd.Series:
    """Align labels/splits with the feature rows: by index when it names the same rows, else by position."""
    if isinstance(values, pd.Series):
        if len(values) != len(index):
            raise ValueError(f"{what} has {len(values)} rows but features have {len(index)}")
        if values.index.is_unique and set(values.index) == set(index):
            return values.reindex(index).astype(str)
        return pd.Series(values.to_numpy(), index=index).astype(str)
    arr = np.asarray(values)
    if arr.shape != (len(index),):
        raise ValueError(f"{what} has shape {arr.shape} but features have {len(index)} rows")
    return pd.Series(arr, index=index).astype(str)


def _embed(x: np.ndarray, standardize: bool, pca_components: int, seed: int) -> np.ndarray:
    """Standardise and PCA-reduce one class's training features (fitted on those rows only)."""
    if standardize:
        x = StandardScaler().fit_transform(x)
    n_comp = min(pca_components, x.shape[0] - 1, x.shape[1]) if pca_components else 0
    if n_comp >= 2:
        x = PCA(n_components=n_comp, random_state=seed).fit_transform(x)
    return x


def _kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Cluster ids 0..k-1 renumbered by size (largest first, ties by first row)."""
    if k == 1:
        return np.zeros(len(x), dtype=int)
    raw = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    order = sorted(range(k), key=lambda c: (-(raw == c).sum(), int(np.argmax(raw == c))))
    remap = np.empty(k, dtype=int)
    remap[order] = np.arange(k)
    return remap[raw]


def _silhouettes(x: np.ndarray, k_range: tuple[int, int], seed: int) -> dict[int, float]:
    """Silhouette of k-means for each k in the inclusive range that the row count allows."""
    out: dict[int, float] = {}
    for k in range(k_range[0], k_range[1] + 1):
        if 2 <= k < len(x):
            labels = _kmeans(x, k, seed)
            out[k] = float(silhouette_score(x, labels)) if len(set(labels)) > 1 else float("nan")
    return out


def fit_decomposition(
    features: pd.DataFrame | np.ndarray,
    labels: Any,
    splits: Any,
    k: int | str | dict[str, int | str] = 2,
    k_range: tuple[int, int] = (2, 5),
    standardize: bool = True,
    pca_components: int = 50,
    seed: int = 0,
    classes: Sequence[str] | None = None,
) -> tuple[Decomposition, pd.Series]:
    """k-means per class on TRAINING rows only; returns the decomposition and a subclass per row.

    ``k``: an int (1 = no decomposition), ``"auto"`` (best silhouette in ``k_range``), or a dict per
    class. Any row whose split is not ``train`` raises ValueError naming it: filter first.
    """
    index = features.index if isinstance(features, pd.DataFrame) else pd.RangeIndex(len(features))
    x_all = np.asarray(features, dtype=np.float64)
    if x_all.ndim != 2:
        raise ValueError(f"features must be 2-D, got shape {x_all.shape}")
    if not np.isfinite(x_all).all():
        raise ValueError("features contain NaN or infinite values")
    splits_s = _as_series(splits, index, "splits")
    bad = splits_s[splits_s != "train"]
    if len(bad):
        named = ", ".join(f"{i!r} ({s})" for i, s in bad.head(5).items())
        raise ValueError(
            f"decomposition is fitted on training rows only; {len(bad)} non-train row(s) passed, e.g. {named}"
        )
    labels_s = _as_series(labels, index, "labels")
    present = set(labels_s)
    unknown = sorted(present - set(classes if classes is not None else config.CLASSES))
    if unknown:
        raise ValueError(f"unknown label(s) {unknown}; expected {list(classes or config.CLASSES)}")
    order = [c for c in (classes or config.CLASSES) if c in present]
    if k_range[0] < 2 or k_range[1] < k_range[0]:
        raise ValueError(f"bad k_range {k_range}: need 2 <= k_min <= k_max")

    k_of: dict[str, int] = {}
    sil: dict[str, dict[int, float]] = {}
    sub = pd.Series(index=index, dtype=object, name="subclass")
    # One BLAS/OpenMP thread: these problems are small, on a shared CPU spinning OpenMP threads made
    # k-means ~8x slower, and results then do not depend on the core count.
    with threadpool_limits(limits=1):
        for cls in order:
            mask = (labels_s == cls).to_numpy()
            x = _embed(x_all[mask], standardize, pca_components, seed)
            sil[cls] = _silhouettes(x, k_range, seed)
            want = k.get(cls, 1) if isinstance(k, dict) else k
            if want == "auto":
                scored = {kk: s for kk, s in sil[cls].items() if np.isfinite(s)}
                kc = max(scored, key=lambda kk: (scored[kk], -kk)) if scored else 1
            elif isinstance(want, (int, np.integer)) and not isinstance(want, bool) and want >= 1:
                kc = int(want)
            else:
                raise ValueError(f"k for class {cls!r} must be a positive int or 'auto', got {want!r}")
            if kc > mask.sum():
                raise ValueError(f"class {cls!r} has {mask.sum()} training rows, fewer than k={kc}")
            ids = _kmeans(x, kc, seed)
            k_of[cls] = kc
            sub[mask] = [subclass_name(cls, j + 1, kc) for j in ids]

    subclasses = [subclass_name(c, j, k_of[c]) for c in order for j in range(1, k_of[c] + 1)]
    counts = sub.value_counts()
    decomp = Decomposition(
        k=k_of,
        subclasses=subclasses,
        parent_of={s: parent_class(s, order) for s in subclasses},
        silhouettes=sil,
        sizes={s: int(counts.get(s, 0)) for s in subclasses},
        classes=order,
        params={
            "k": k if isinstance(k, (str, dict)) else int(k),
            "k_range": list(k_range),
            "standardize": standardize,
            "pca_components": pca_components,
            "seed": seed,
        },
    )
    return decomp, sub.astype(str)


def composition_matrix(subclasses: list[str], classes: Sequence[str]) -> np.ndarray:
    """(n_sub, n_classes) 0/1 matrix: row i has a single 1 at the parent class of subclass i."""
    m = np.zeros((len(subclasses), len(classes)), dtype=np.float64)
    for i, s in enumerate(subclasses):
        m[i, list(classes).index(parent_class(s, classes))] = 1.0
    return m


def _check_probs(sub_probs: np.ndarray, subclasses: list[str]) -> np.ndarray:
    """Validate (N, n_sub) probability rows (non-negative, summing to one)."""
    p = np.asarray(sub_probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(subclasses):
        raise ValueError(f"sub_probs must have shape (N, {len(subclasses)}), got {p.shape}")
    if (p < -1e-6).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("sub_probs rows must be probabilities summing to 1 (apply softmax to logits first)")
    return p


def compose(sub_probs: np.ndarray, subclasses: list[str], classes: Sequence[str]) -> np.ndarray:
    """Class probabilities = sum of the subclass probabilities of each class (rows sum to 1)."""
    p = _check_probs(sub_probs, subclasses)
    return p @ composition_matrix(subclasses, classes)


def compose_hard(sub_probs: np.ndarray, subclasses: list[str], classes: Sequence[str]) -> np.ndarray:
    """DeTraC's rule: index into ``classes`` of the parent of the most probable subclass."""
    p = _check_probs(sub_probs, subclasses)
    return composition_matrix(subclasses, classes).argmax(axis=1)[p.argmax(axis=1)]


def part_name(seed: int, fold: int) -> str:
    """Folder of one cross-validation fold's decomposition under ``decomposition/``."""
    return f"seed{seed}_fold{fold}"


def save_decomposition(
    profile_dir: Path, decomposition: Decomposition, subclass_of: pd.Series, part: str = ""
) -> Path:
    """Write ``decomposition/[<part>/]subclasses.csv`` (image, label, subclass) and ``decomposition.json``."""
    out = Path(profile_dir) / SUBDIR / part
    unknown = sorted(set(subclass_of) - set(decomposition.subclasses))
    if unknown:
        raise ValueError(f"subclass labels {unknown} are not in the decomposition")
    table = pd.DataFrame(
        {
            "image": subclass_of.index.astype(str),
            "label": [decomposition.parent_of[s] for s in subclass_of],
            "subclass": subclass_of.to_numpy(),
        }
    )
    atomic_write_text(out / SUBCLASSES_CSV, table.to_csv(index=False))
    record = asdict(decomposition)
    record["silhouettes"] = {
        c: {str(k): (v if np.isfinite(v) else None) for k, v in d.items()}
        for c, d in decomposition.silhouettes.items()
    }
    write_json(out / DECOMPOSITION_JSON, record)
    return out


def load_decomposition(profile_dir: Path, part: str = "") -> tuple[Decomposition, pd.Series]:
    """Read what ``save_decomposition`` wrote: the decomposition and the subclass per training image."""
    out = Path(profile_dir) / SUBDIR / part
    jpath, cpath = out / DECOMPOSITION_JSON, out / SUBCLASSES_CSV
    for p in (jpath, cpath):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: run notebook 03_decomposition for this profile first")
    record = json.loads(jpath.read_text())
    record["silhouettes"] = {
        c: {int(k): (float("nan") if v is None else v) for k, v in d.items()}
        for c, d in record["silhouettes"].items()
    }
    decomp = Decomposition(**record)
    table = pd.read_csv(cpath, dtype=str, keep_default_na=False)
    if list(table.columns) != ["image", "label", "subclass"]:
        raise ValueError(f"{cpath}: expected columns image,label,subclass, got {list(table.columns)}")
    bad = table[~table["subclass"].isin(decomp.subclasses)]
    if len(bad):
        raise ValueError(f"{cpath}: subclass(es) {sorted(set(bad['subclass']))} not in {jpath.name}")
    wrong = table[
        [decomp.parent_of[s] != lab for s, lab in zip(table["subclass"], table["label"], strict=True)]
    ]
    if len(wrong):
        raise ValueError(
            f"{cpath}: label disagrees with the subclass's parent for {wrong['image'].head(3).tolist()}"
        )
    return decomp, pd.Series(
        table["subclass"].to_numpy(), index=pd.Index(table["image"], name="image"), name="subclass"
    )
