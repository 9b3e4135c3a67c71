"""Near-duplicate detection across and within sources, label conflicts and patient groups.

Two tests find copies; both work on the processed 8-bit grayscale PNGs (shorter side 256).

1. **Thumbnail correlation** (the reference test, docs/DATA.md): 32x32 bilinear thumbnail, z-normalised, Pearson r
   for every pair. ``r >= 0.975``: the same image. ``0.96 <= r < 0.975``: probably the same patient
   (a follow-up film), except for pairs involving NIH or Actualmed, whose unrelated films reach
   0.95-0.96. On the mirror this alone reproduces the expected table of docs/DATA.md exactly.
2. **Local features with a geometric check**, for re-cropped, re-scaled, re-windowed copies that the
   thumbnail test misses. Images outside NIH get 500 ORB keypoints (FAST threshold 5).
   *Shortlist*: each image's 100 strongest ORB descriptors are cut into 16-bit words; images become
   TF-IDF vectors of words and each image's ``shortlist_k`` (5) most cosine-similar images are
   candidates (about 6,300 pairs instead of a million). *Verification*: Hamming matching with Lowe's
   ratio test (0.8) and a RANSAC similarity transform (``cv2.estimateAffinePartial2D``, 5 px),
   rejected when implausible (scale beyond 3x, rotation beyond 30 degrees, inliers covering < 2% of
   an image); a quick pass on the 150 strongest keypoints (< 6 inliers: stop) saves two thirds of the
   time. The first image is then warped onto the second: the Pearson r of the overlap is the
   *aligned correlation*.

   **Criterion: >= 80 inliers and aligned r >= 0.95: the same image; otherwise >= 25 inliers: the
   same patient** (a follow-up film of one person matches anatomy, devices and markers, but rarely
   pixel for pixel). On the whole mirror the copies found have 127-484 inliers; the only pair of
   distinct films with aligned r >= 0.95, ieee8023's Singapore ``fig4a``/``fig4b`` (one patient, one
   paper figure, new ECG leads in 4b), has 41. Calibrated on the mirror, each of the 138 CXNet files
   below against all 194 MHH films:

   - positives: of the 138 CXNet files numbered 510-673 and 686-706 (every one a copy of a Hannover
     film), 130 match an MHH film as the same image (135-484 inliers, aligned r
     0.958-1.000; for 96 of them the thumbnail r is below 0.975, down to -0.22). 6 match only other
     films of one MHH patient (27-222 inliers, aligned r 0.81-0.935: their originals are absent from
     the mirror), so they are linked as the same patient; 2 match nothing.
   - the other 26,600 pairs of that grid: 24 reach 25 inliers, all with aligned r <= 0.935, and every
     one whose patient is known is a film of the copy's own MHH patient; all others have <= 20.
   - negatives: 3,000 random MHH-NIH pairs (max 0 inliers) and 3,000 random NIH-NIH pairs (max 20).
     Among the NIH-NIH *shortlist* (k=10), 38 pairs of different patients reach 25-46 inliers on
     shared markers and positioning, aligned r <= 0.92 (never the same image), while follow-up films
     of one NIH patient align at up to r 0.97. Hence NIH is left out of this test (nothing in the
     study copies NIH once DarkCovidNet's Covid-19 folder is skipped; the thumbnail test still finds
     NIH's own exact duplicates; ``Source.local_feature_test``) and, as for the thumbnail test, NIH
     and Actualmed (one hospital each) get no same-patient link from image similarity
     (``Source.image_patient_link``).

Rules. Same-image pairs (either test) with different labels: both rows dropped ("label conflict").
Otherwise one copy is kept by source priority (``Source.priority``): MHH > ieee8023 > Figure1 > Actualmed
> CXNet > NIH (ties by upstream path): rows are visited in that order and a row with a same-image link to
an already visited row is dropped as a duplicate of that row's kept copy. Verified local-feature copies
are dropped like thumbnail copies. On the mirror (2,321 candidate images) the thumbnail test alone
drops 227 copies and the 2 rows of the one label conflict (the table in docs/DATA.md, which counts the
conflict's CXNet row among its 228: equal cell by cell); with local features the data build drops 385
copies and the 2 conflict rows, i.e. 158 more (docs/DATA.md: about 160), nearly all CXNet plus 2
ieee8023 and 1 Figure1 copies of ieee8023 films. CXNet falls from 565 / 418 to 410 / 265 (images /
patient groups; docs/DATA.md: about 405 / 259), its image-level-ID files from 189 to 47 (about 40).
Patient groups are the connected components (over all input rows, dropped ones included, so a dropped
copy still links its neighbours) of: equal ``patient_id``, equal non-empty ``case_url``, every
same-image pair and every same-patient pair. A group is named ``pg_`` + the first 10 hex digits of
the SHA-1 of its smallest ``patient_id``: stable across runs and row orders.

Caching (``cache_dir``): per-image features under ``features-<version>/`` keyed by the SHA-256 of the
processed PNG; verification results in ``verified-<version>.csv`` keyed by the two SHA-256; the image
pairs of an exact (rows, images, settings) set in ``pairs-<fingerprint>.json``. On 2 shared CPU
cores: about 15-35 s cold, under 1 s warm.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import scipy.sparse as sp
from PIL import Image
from scipy.sparse.csgraph import connected_components
from sklearn.feature_extraction.text import TfidfTransformer

from cxrstudy.data.sources import no_image_patient_link, no_local_feature_test, priority_order
from cxrstudy.fileio import atomic_writer, sha256_file, write_json

log = logging.getLogger(__name__)


REQUIRED_COLUMNS: tuple[str, ...] = (
    "source",
    "source_name",
    "upstream_path",
    "label",
    "patient_id",
    "patient_id_is_image_level",
    "case_url",
    "image",
)
PAIR_COLUMNS: tuple[str, ...] = ("a", "b", "kind", "method", "score")
DROPPED_COLUMNS: tuple[str, ...] = ("source", "upstream_path", "reason")


@dataclass(frozen=True)
class DedupParams:
    """Thresholds and feature settings; the defaults are the calibrated criterion (module docstring)."""

    thumb_size: int = 32
    same_image_r: float = 0.975
    same_patient_r: float = 0.96
    orb_features: int = 500
    orb_fast_threshold: int = 5
    shortlist_descriptors: int = 100
    shortlist_k: int = 5
    prefilter_descriptors: int = 150
    prefilter_min_inliers: int = 6
    ratio: float = 0.8
    ransac_px: float = 5.0
    max_scale: float = 3.0
    max_rotation_deg: float = 30.0
    min_spread: float = 0.02
    min_inliers: int = 25
    same_image_min_inliers: int = 80
    aligned_same_image_r: float = 0.95
    min_overlap_px: int = 2000

    def classify(self, inliers: int, aligned_r: float) -> str | None:
        """Verdict of a verified pair: ``same_image``, ``same_patient`` or ``None`` (module docstring)."""
        if inliers < self.min_inliers:
            return None
        if inliers >= self.same_image_min_inliers and aligned_r >= self.aligned_same_image_r:
            return "same_image"
        return "same_patient"

    def feature_version(self) -> str:
        """Cache tag of the per-image features (changes when a feature setting changes)."""
        keys = ("thumb_size", "orb_features", "orb_fast_threshold")
        return _short_hash("feat1:" + ",".join(f"{k}={getattr(self, k)}" for k in keys))

    def verify_version(self) -> str:
        """Cache tag of pair verification results."""
        keys = (
            "prefilter_descriptors",
            "prefilter_min_inliers",
            "ratio",
            "ransac_px",
            "max_scale",
            "max_rotation_deg",
            "min_spread",
            "min_overlap_px",
        )
        return _short_hash(
            f"ver1:{self.feature_version()}:" + ",".join(f"{k}={getattr(self, k)}" for k in keys)
        )


@dataclass
class DedupResult:
    """Rows kept (input order, plus ``patient_group``), rows dropped with a reason, and every link found.

    ``pairs``: ``a`` is the row of higher priority; ``score`` is the thumbnail r (``thumbnail``), the
    RANSAC inlier count (``orb``) or 1 (``patient_id``, ``case_url``: each row linked to the first row
    sharing its value). ``info``: counts and seconds.
    """

    kept: pd.DataFrame
    dropped: pd.DataFrame
    pairs: pd.DataFrame
    info: dict = field(default_factory=dict)


@dataclass
class ImageFeatures:
    """What the tests need of one image: thumbnail, ORB keypoints/descriptors (strongest first), a half-size copy."""

    thumb: np.ndarray  # (thumb_size**2,) float32, z-normalised
    points: np.ndarray  # (n, 2) float32, pixel coordinates in the processed image
    descriptors: np.ndarray  # (n, 32) uint8
    small: np.ndarray  # uint8 image at half the processed size
    has_orb: bool = True  # False: ORB was not computed (points/descriptors empty)

    def save(self, path: Path) -> None:
        """Write atomically as an uncompressed ``.npz``."""
        with atomic_writer(path) as f:
            np.savez(f, **asdict(self))

    @classmethod
    def load(cls, path: Path) -> ImageFeatures:
        """Read a file written by :meth:`save`."""
        with np.load(path) as z:
            arrays = {k: z[k] for k in ("thumb", "points", "descriptors", "small")}
            return cls(**arrays, has_orb=bool(z["has_orb"]))


# --------------------------------------------------------------------------------------- small helpers


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def row_keys(df: pd.DataFrame) -> pd.Series:
    """Row keys ``<source_name>:<upstream_path>`` used in the pairs table."""
    return df["source_name"].astype(str) + ":" + df["upstream_path"].astype(str)


def read_gray(path: Path) -> np.ndarray:
    """A processed image as a 2-D uint8 array; a clear error naming the file when it cannot be read."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read processed image ({exc})") from exc
    if arr.ndim != 2 or min(arr.shape) < 16:
        raise ValueError(f"{path}: processed image is too small or not 2-D (shape {arr.shape})")
    return arr


def thumbnail(img: np.ndarray, size: int = 32) -> np.ndarray:
    """``size`` x ``size`` bilinear thumbnail, z-normalised, flattened (all zeros for a flat image)."""
    t = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR), dtype=np.float32).ravel()
    t = t - t.mean()
    sd = t.std()
    return t / sd if sd > 0 else t


def image_features(img: np.ndarray, params: DedupParams = DedupParams(), orb: bool = True) -> ImageFeatures:
    """Thumbnail, ORB keypoints (strongest first; skipped when ``orb`` is false) and a half-size copy."""
    kps, desc = [], None
    if orb:
        detector = cv2.ORB_create(nfeatures=params.orb_features, fastThreshold=params.orb_fast_threshold)
        kps, desc = detector.detectAndCompute(img, None)
    if desc is None or not kps:
        points, desc = np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8)
    else:
        order = np.argsort([-k.response for k in kps], kind="stable")
        points = np.array([kps[i].pt for i in order], np.float32).reshape(-1, 2)
        desc = desc[order]
    small = cv2.resize(img, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    return ImageFeatures(thumbnail(img, params.thumb_size), points, desc, small, has_orb=orb)


# --------------------------------------------------------------------------------------- feature cache


def load_features(
    paths: Sequence[Path],
    shas: Sequence[str],
    params: DedupParams = DedupParams(),
    cache_dir: Path | None = None,
    workers: int = 2,
    orb: Sequence[bool] | None = None,
) -> list[ImageFeatures]:
    """Features of every image (ORB only where ``orb`` says so; default all), read from ``cache_dir``
    when present (keyed by SHA-256), else computed and cached."""
    folder = Path(cache_dir) / f"features-{params.feature_version()}" if cache_dir is not None else None
    need_orb = [True] * len(paths) if orb is None else list(orb)

    def one(job: tuple[Path, str, bool]) -> ImageFeatures:
        path, sha, with_orb = job
        cached = folder / sha[:2] / f"{sha}.npz" if folder is not None else None
        if cached is not None and cached.is_file():
            try:
                feats = ImageFeatures.load(cached)
                if feats.has_orb or not with_orb:
                    return feats
            except (OSError, ValueError, KeyError) as exc:  # a damaged cache entry is recomputed
                log.warning("recomputing damaged cache entry %s (%s)", cached, exc)
        feats = image_features(read_gray(path), params, orb=with_orb)
        if cached is not None:
            feats.save(cached)
        return feats

    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        return list(ex.map(one, zip(paths, shas, need_orb, strict=True)))


# --------------------------------------------------------------------------------------- thumbnail test


def thumbnail_correlations(thumbs: np.ndarray) -> np.ndarray:
    """Pearson r of every pair of z-normalised thumbnails (rows of ``thumbs``)."""
    return (thumbs @ thumbs.T) / thumbs.shape[1]


# --------------------------------------------------------------------------------------- local features


def shortlist_pairs(
    descriptors: Sequence[np.ndarray], k: int = 5, n_descriptors: int = 100
) -> list[tuple[int, int]]:
    """Candidate pairs ``(i, j)``, ``i < j``: each image's ``k`` nearest images in a TF-IDF space of
    16-bit words of its ``n_descriptors`` strongest ORB descriptors (robust to cropping and scaling)."""
    n = len(descriptors)
    if n < 2 or k < 1:
        return []
    rows, cols = [], []
    for i, d in enumerate(descriptors):
        d = d[:n_descriptors]
        if len(d) == 0:
            continue
        words = np.unpackbits(d, axis=1).reshape(len(d), 16, 16) @ (1 << np.arange(15, -1, -1))
        cols.append((np.arange(16) * 65536 + words).ravel())
        rows.append(np.full(cols[-1].size, i))
    if not rows:
        return []
    r, c = np.concatenate(rows), np.concatenate(cols)
    x = sp.csr_matrix((np.ones(r.size, np.float32), (r, c)), shape=(n, 16 * 65536))
    x = TfidfTransformer(sublinear_tf=True).fit_transform(x)
    sim = (x @ x.T).toarray()
    np.fill_diagonal(sim, -1.0)
    kk = min(k, n - 1)
    # stable ordering: ties broken by index, so the shortlist is deterministic
    top = np.argsort(-sim, axis=1, kind="stable")[:, :kk]
    pairs = {
        (min(i, int(j)), max(i, int(j)))
        for i in range(n)
        for j in top[i]
        if sim[i, j] > 0 and len(descriptors[i])
    }
    return sorted(pairs)


def match_transform(
    a_points: np.ndarray,
    a_desc: np.ndarray,
    b_points: np.ndarray,
    b_desc: np.ndarray,
    areas: tuple[float, float],
    params: DedupParams = DedupParams(),
) -> tuple[int, np.ndarray | None]:
    """RANSAC inliers and similarity transform (``a`` -> ``b``) of ratio-test ORB matches; ``(0, None)``
    when there is no transform or it is implausible for a copy or a follow-up film (scale beyond
    ``max_scale``, rotation beyond ``max_rotation_deg``, inliers' convex hull < ``min_spread`` of either
    image's ``areas``)."""
    if len(a_desc) < 4 or len(b_desc) < 4:
        return 0, None
    knn = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(a_desc, b_desc, k=2)
    good = [m[0] for m in knn if len(m) == 2 and m[0].distance < params.ratio * m[1].distance]
    if len(good) < 4:
        return 0, None
    src = a_points[[m.queryIdx for m in good]]
    dst = b_points[[m.trainIdx for m in good]]
    transform, inl = cv2.estimateAffinePartial2D(
        src, dst, method=cv2.RANSAC, ransacReprojThreshold=params.ransac_px
    )
    if transform is None or inl is None or inl.sum() < 3:
        return 0, None
    scale = float(np.hypot(transform[0, 0], transform[1, 0]))
    angle = float(np.degrees(np.arctan2(transform[1, 0], transform[0, 0])))
    if not (1 / params.max_scale <= scale <= params.max_scale) or abs(angle) > params.max_rotation_deg:
        return 0, None
    keep = inl.ravel().astype(bool)
    spread = min(
        cv2.contourArea(cv2.convexHull(pts[keep])) / area for pts, area in ((src, areas[0]), (dst, areas[1]))
    )
    if spread < params.min_spread:
        return 0, None
    return int(keep.sum()), transform


def aligned_correlation(
    a: ImageFeatures, b: ImageFeatures, transform: np.ndarray, min_overlap_px: int
) -> float:
    """Pearson r of ``b`` and ``a`` warped onto it (half-size copies) over their overlap; NaN if too small."""
    half = transform.astype(np.float32).copy()
    half[:, 2] *= 0.5  # both small copies are half size
    h, w = b.small.shape
    warped = cv2.warpAffine(a.small.astype(np.float32), half, (w, h), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(np.ones(a.small.shape, np.uint8), half, (w, h), flags=cv2.INTER_NEAREST) > 0
    if mask.sum() < min_overlap_px / 4:  # overlap counted at full size
        return float("nan")
    x, y = warped[mask], b.small[mask].astype(np.float32)
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def verify_pair(a: ImageFeatures, b: ImageFeatures, params: DedupParams = DedupParams()) -> tuple[int, float]:
    """``(inliers, aligned_r)`` of a candidate pair (NaN r when there is no transform). A quick pass on the
    ``prefilter_descriptors`` strongest keypoints rejects pairs below ``prefilter_min_inliers`` first."""
    if not (a.has_orb and b.has_orb):
        raise ValueError("verify_pair: both images need ORB features")
    n = params.prefilter_descriptors
    areas = (4.0 * a.small.size, 4.0 * b.small.size)  # full-size areas
    if n and (len(a.descriptors) > n or len(b.descriptors) > n):
        quick, _ = match_transform(
            a.points[:n], a.descriptors[:n], b.points[:n], b.descriptors[:n], areas, params
        )
        if quick < params.prefilter_min_inliers:
            return 0, float("nan")
    inliers, transform = match_transform(a.points, a.descriptors, b.points, b.descriptors, areas, params)
    if transform is None:
        return 0, float("nan")
    return inliers, aligned_correlation(a, b, transform, params.min_overlap_px)


def _verify_cached(
    pairs: Sequence[tuple[int, int]],
    feats: Sequence[ImageFeatures],
    shas: Sequence[str],
    params: DedupParams,
    cache_dir: Path | None,
    workers: int,
) -> list[tuple[int, float]]:
    """Verification results of ``pairs`` (indices), from and into the cache keyed by SHA-256 pairs."""
    path = Path(cache_dir) / f"verified-{params.verify_version()}.csv" if cache_dir is not None else None
    known: dict[tuple[str, str], tuple[int, float]] = {}
    if path is not None and path.is_file():
        try:
            c = pd.read_csv(path, dtype={"sha_a": str, "sha_b": str})
            known = {
                (a, b): (int(n), float(r))
                for a, b, n, r in zip(c["sha_a"], c["sha_b"], c["inliers"], c["aligned_r"], strict=True)
            }
        except (OSError, ValueError, KeyError, pd.errors.ParserError) as exc:
            log.warning("ignoring damaged verification cache %s (%s)", path, exc)
    # orient each pair by SHA so the result does not depend on row order
    oriented = [(i, j) if shas[i] <= shas[j] else (j, i) for i, j in pairs]
    todo = sorted({(i, j) for i, j in oriented if (shas[i], shas[j]) not in known})
    if todo:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
            results = list(ex.map(lambda ij: verify_pair(feats[ij[0]], feats[ij[1]], params), todo))
        for (i, j), res in zip(todo, results, strict=True):
            known[(shas[i], shas[j])] = res
        if path is not None:
            out = pd.DataFrame(
                [(a, b, n, r) for (a, b), (n, r) in sorted(known.items())],
                columns=["sha_a", "sha_b", "inliers", "aligned_r"],
            )
            with atomic_writer(path, "w") as f:
                out.to_csv(f, index=False)
    return [known[(shas[i], shas[j])] for i, j in oriented]


def find_image_pairs(
    sources: Sequence[str],
    paths: Sequence[Path],
    shas: Sequence[str],
    params: DedupParams = DedupParams(),
    cache_dir: Path | None = None,
    workers: int = 2,
    local_features: bool = True,
) -> tuple[list[tuple[int, int, str, str, float]], int]:
    """Image-similarity links ``(i, j, kind, method, score)`` (positions, ``i < j``) by both tests, and
    the number of shortlisted pairs verified with local features."""
    n = len(paths)
    skip_orb, unlinked = no_local_feature_test(), no_image_patient_link()
    use_orb = [local_features and s not in skip_orb for s in sources]
    feats = load_features(paths, shas, params, cache_dir, workers, orb=use_orb)
    pair_rows: list[tuple[int, int, str, str, float]] = []
    if n:
        corr = thumbnail_correlations(np.stack([f.thumb for f in feats]))
        ii, jj = np.nonzero(np.triu(corr >= params.same_patient_r, k=1))
        for i, j in zip(ii.tolist(), jj.tolist(), strict=True):
            r = float(corr[i, j])
            if r >= params.same_image_r:
                pair_rows.append((i, j, "same_image", "thumbnail", r))
            elif sources[i] not in unlinked and sources[j] not in unlinked:
                pair_rows.append((i, j, "same_patient", "thumbnail", r))
    thumb_same = {(i, j) for i, j, kind, _, _ in pair_rows if kind == "same_image"}
    idx = [i for i in range(n) if use_orb[i]]
    cand = shortlist_pairs(
        [feats[i].descriptors for i in idx], params.shortlist_k, params.shortlist_descriptors
    )
    cand = [(idx[a], idx[b]) for a, b in cand if (idx[a], idx[b]) not in thumb_same]
    for (i, j), (inl, r) in zip(
        cand, _verify_cached(cand, feats, shas, params, cache_dir, workers), strict=True
    ):
        kind = params.classify(inl, r)
        if kind == "same_image" or (
            kind == "same_patient" and sources[i] not in unlinked and sources[j] not in unlinked
        ):
            pair_rows.append((i, j, kind, "orb", float(inl)))
    return pair_rows, len(cand)


def _image_pairs_cached(
    keys: Sequence[str],
    sources: Sequence[str],
    paths: Sequence[Path],
    shas: Sequence[str],
    params: DedupParams,
    cache_dir: Path | None,
    workers: int,
    local_features: bool,
) -> tuple[list[tuple[int, int, str, str, float]], int]:
    """:func:`find_image_pairs`, memoised in ``cache_dir`` for exactly this set of (row, image) and settings."""
    if cache_dir is None:
        return find_image_pairs(sources, paths, shas, params, None, workers, local_features)
    fingerprint = _short_hash(
        f"{params}|{local_features}|" + "|".join(sorted(f"{k}={s}" for k, s in zip(keys, shas, strict=True)))
    )
    path = Path(cache_dir) / f"pairs-{fingerprint}.json"
    pos = {k: i for i, k in enumerate(keys)}
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            rows = [(pos[a], pos[b], kind, m, float(sc)) for a, b, kind, m, sc in cached["pairs"]]
            return rows, int(cached["n_candidates"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring damaged pair cache %s (%s)", path, exc)
    rows, n_cand = find_image_pairs(sources, paths, shas, params, cache_dir, workers, local_features)
    payload = {"n_candidates": n_cand, "pairs": [[keys[i], keys[j], k, m, sc] for i, j, k, m, sc in rows]}
    write_json(path, payload, indent=None)
    return rows, n_cand


# --------------------------------------------------------------------------------------- the whole step


def _check_input(df: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"deduplicate: input lacks columns {missing}")
    known = priority_order()
    unknown = sorted(set(df["source_name"]) - set(known))
    if unknown:
        raise ValueError(f"deduplicate: unknown source_name {unknown}; expected one of {known}")
    if not df.index.is_unique:
        raise ValueError("deduplicate: the input's index has repeated labels")
    keys = row_keys(df)
    if keys.duplicated().any():
        raise ValueError(f"deduplicate: row {keys[keys.duplicated()].iloc[0]!r} appears twice")
    for col in ("patient_id", "label", "image"):
        bad = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if bad.any():
            raise ValueError(f"deduplicate: empty {col} in row {keys[bad].iloc[0]!r}")


def _group_names(df: pd.DataFrame, links: Iterable[tuple[int, int]]) -> np.ndarray:
    """Connected components of the links (positional indices) named after their smallest patient_id."""
    n = len(df)
    ij = np.array(list(links), dtype=np.int64).reshape(-1, 2)
    graph = sp.coo_matrix((np.ones(len(ij)), (ij[:, 0], ij[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    pids = df["patient_id"].astype(str).to_numpy()
    smallest = pd.Series(pids).groupby(comp).min()
    names = {c: "pg_" + hashlib.sha1(p.encode()).hexdigest()[:10] for c, p in smallest.items()}
    return np.array([names[c] for c in comp], dtype=object)


def _star_links(values: pd.Series) -> list[tuple[int, int]]:
    """Links joining every row to the first row (in the frame's order) with the same non-empty value."""
    pos = pd.Series(np.arange(len(values)), index=values.index)
    v = values.fillna("").astype(str).str.strip()
    first = pos.groupby(v.to_numpy()).transform("min").to_numpy()
    return [(int(f), int(i)) for i, f, s in zip(range(len(v)), first, v, strict=True) if s and f != i]


def _priority_order(df: pd.DataFrame) -> pd.DataFrame:
    """The rows (plus ``_prio``) in source priority order, then by source name and upstream path."""
    prio = {s: i for i, s in enumerate(priority_order())}
    return df.assign(_prio=df["source_name"].map(prio)).sort_values(["_prio", "source_name", "upstream_path"])


def _processed_paths(work: pd.DataFrame, image_root: Path) -> list[Path]:
    """Each row's processed image under ``image_root``; FileNotFoundError naming the first one missing."""
    paths = [image_root / p for p in work["image"].astype(str)]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"deduplicate: processed image {p} does not exist")
    return paths


def _drop_reasons(work: pd.DataFrame, same_image: Sequence[tuple[int, int]]) -> dict[int, str]:
    """Why rows (positions in ``work``, which is in priority order) are dropped: label conflicts first,
    then every copy but the one of highest priority in each same-image cluster."""
    n = len(work)
    labels = work["label"].astype(str).to_numpy()
    reason: dict[int, str] = {}
    for i, j in same_image:
        if labels[i] != labels[j]:
            for x, y in ((i, j), (j, i)):
                reason.setdefault(
                    x, f"label conflict with {work['source'].iat[y]}:{work['upstream_path'].iat[y]}"
                )
    neighbours: dict[int, list[int]] = {}
    for i, j in same_image:
        if i in reason or j in reason:
            continue
        neighbours.setdefault(max(i, j), []).append(min(i, j))  # work is in priority order
    kept_copy = np.arange(n)
    for i in range(n):
        earlier = sorted(neighbours.get(i, []))
        if earlier:
            kept_copy[i] = kept_copy[earlier[0]]
            k = kept_copy[i]
            reason[i] = f"duplicate of {work['source'].iat[k]}:{work['upstream_path'].iat[k]}"
    return reason


def _patient_links(
    work: pd.DataFrame, pair_rows: Sequence[tuple[int, int, str, str, float]]
) -> tuple[list[tuple[int, int]], list[tuple[int, int, str, str, float]]]:
    """Links for the patient groups (every image pair, then equal ``patient_id``, then equal ``case_url``)
    and the pair rows of the ``patient_id`` / ``case_url`` links."""
    links = [(i, j) for i, j, *_ in pair_rows]
    id_rows: list[tuple[int, int, str, str, float]] = []
    for col, method in (("patient_id", "patient_id"), ("case_url", "case_url")):
        star = _star_links(work[col])
        links += star
        id_rows += [(i, j, "same_patient", method, 1.0) for i, j in star]
    return links, id_rows


def _dropped_table(work: pd.DataFrame, reason: dict[int, str], is_dropped: np.ndarray) -> pd.DataFrame:
    """The dropped rows (``source``, ``upstream_path``, ``reason``) in ``work``'s order."""
    return pd.DataFrame(
        {
            "source": work["source"].to_numpy()[is_dropped],
            "upstream_path": work["upstream_path"].to_numpy()[is_dropped],
            "reason": [reason[i] for i in range(len(work)) if is_dropped[i]],
        },
        columns=list(DROPPED_COLUMNS),
    )


def _pairs_table(keys: np.ndarray, pair_rows: Sequence[tuple[int, int, str, str, float]]) -> pd.DataFrame:
    """The pairs table (``a`` the row of higher priority), sorted by ``a``, ``b``, ``kind``, ``method``."""
    pairs = pd.DataFrame(
        [(keys[min(i, j)], keys[max(i, j)], kind, m, s) for i, j, kind, m, s in pair_rows],
        columns=list(PAIR_COLUMNS),
    )
    return pairs.sort_values(["a", "b", "kind", "method"]).reset_index(drop=True)


def deduplicate(
    df: pd.DataFrame,
    image_root: Path,
    cache_dir: Path | None = None,
    *,
    params: DedupParams = DedupParams(),
    local_features: bool = True,
    workers: int | None = None,
) -> DedupResult:
    """Find copies (thumbnail correlation, then ORB + RANSAC on a shortlist), drop label conflicts and
    all but one copy by source priority, and link patients into ``patient_group`` (module docstring)."""
    _check_input(df)
    t0 = time.perf_counter()
    workers = workers or min(2, os.cpu_count() or 1)
    # Work in priority order (then path) so every result is independent of the input's row order.
    work = _priority_order(df)
    n = len(work)
    keys = row_keys(work).to_numpy()
    sources = work["source_name"].to_numpy()
    paths = _processed_paths(work, Path(image_root))
    shas = [sha256_file(p) for p in paths]
    pair_rows, n_candidates = _image_pairs_cached(
        keys, sources, paths, shas, params, cache_dir, workers, local_features
    )
    t_pairs = time.perf_counter()

    # label conflicts first, then one copy per same-image cluster by priority
    reason = _drop_reasons(work, [(i, j) for i, j, kind, _, _ in pair_rows if kind == "same_image"])
    # patient groups
    links, id_rows = _patient_links(work, pair_rows)
    pair_rows = pair_rows + id_rows
    groups = _group_names(work, links)

    is_dropped = np.array([i in reason for i in range(n)], dtype=bool)
    group_of = pd.Series(groups, index=work.index)
    kept = df.loc[~df.index.isin(work.index[is_dropped])].assign(patient_group=group_of)
    dropped = _dropped_table(work, reason, is_dropped)
    pairs = _pairs_table(keys, pair_rows)
    info = {
        "n_input": n,
        "n_kept": int(len(kept)),
        "n_candidates_verified": n_candidates,
        "pairs": pairs.groupby(["kind", "method"]).size().to_dict() if len(pairs) else {},
        "seconds": {"pairs": round(t_pairs - t0, 2), "total": round(time.perf_counter() - t0, 2)},
    }
    log.info("deduplicate: %s", info)
    return DedupResult(kept=kept, dropped=dropped, pairs=pairs, info=info)
