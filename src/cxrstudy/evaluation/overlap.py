"""Are "external" images really new to the study? Exact and near copies of the study's images.

* **Exact**: the SHA-256 of the external file equals the ``sha256`` of a manifest row (the hash of the
  upstream file), or that of a dropped copy of a study image (``excluded.csv`` rows ``duplicate of …``
  and ``hannover copy: …``), whose hash is read from ``raw_dir/lock.json`` or, failing that, from the
  raw file ``raw_dir/<owner>/<repo>/<commit>/<upstream_path>``.
* **Near**: the file is decoded with :func:`cxrstudy.images.load_xray` and shrunk exactly as the data
  step does (:func:`cxrstudy.images.resize_short_side` to 256), then put through the data step's two
  same-image tests of :mod:`cxrstudy.data.dedup`, reusing its functions and calibrated thresholds:
  thumbnail correlation ``r >= 0.975`` against every manifest image, then, if that fails, ORB + RANSAC
  verification (>= 80 inliers and aligned r >= 0.95) against the shortlist of its 5 most similar
  manifest images (NIH images are left out of this test, as in the data step). ``score`` is the
  thumbnail r or the aligned r; ``method`` and (ORB) ``inliers`` say which test matched.
* **Same patient** (reported apart, in ``same_patient``, and still counted as ``new``): the data step's
  weaker links, thumbnail ``0.96 <= r < 0.975`` or ORB >= 25 inliers short of the same-image bar, never
  to an NIH or Actualmed film (their unrelated films look alike). A hint of a follow-up film or a
  copy too altered for the same-image criterion (e.g. a heavily re-compressed crop).

Manifest features come from the data step's cache (``data/cache/dedup``); missing entries are computed
in memory, not written (dedup's loader rewrites only a damaged entry or one lacking ORB that needs it).
Pass ``bank=`` to reuse them across calls. Unreadable files are listed with the decoder's reason.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrstudy.data.dedup import (
    DedupParams,
    ImageFeatures,
    image_features,
    load_features,
    shortlist_pairs,
    verify_pair,
)
from cxrstudy.data.preprocess import TARGET_SHORT_SIDE
from cxrstudy.data.sources import SOURCES, no_image_patient_link, no_local_feature_test
from cxrstudy.fileio import sha256_file
from cxrstudy.images import ImageDecodeError, load_xray, resize_short_side

log = logging.getLogger(__name__)

#: ``excluded.csv`` reasons of dropped files whose image is still in the study (as another copy).
COPY_REASONS: tuple[str, ...] = ("duplicate of ", "hannover copy")
#: The data step's calibrated criterion.
DEFAULT_PARAMS = DedupParams()


@dataclass
class Bank:
    """Features of the manifest images: keys ``<source_name>:<upstream_path>``, features, thumbnails."""

    keys: list[str]
    feats: list[ImageFeatures]
    thumbs: np.ndarray
    orb_index: list[int]


def _key(source_name: object, upstream_path: object) -> str:
    """Row key ``<source_name>:<upstream_path>``, as in duplicates.csv."""
    return f"{source_name}:{upstream_path}"


def _raw_shas(raw_dir: Path) -> dict[str, str]:
    """``<owner>/<repo>/<commit>/<path>`` -> SHA-256 from the download lock file (empty if none)."""
    lock = raw_dir / "lock.json"
    try:
        files = json.loads(lock.read_text(encoding="utf-8")).get("files", {})
        return {k: v["sha256"] for k, v in files.items() if isinstance(v, dict) and "sha256" in v}
    except (OSError, ValueError, AttributeError) as exc:
        log.info("no usable lock file at %s (%s)", lock, exc)
        return {}


def exact_index(
    manifest: pd.DataFrame, raw_dir: Path | None = None, excluded: pd.DataFrame | None = None
) -> dict[str, dict]:
    """SHA-256 -> {'match', 'copy_of'?} for manifest rows and for dropped copies of study images."""
    index = {
        str(s): {"match": _key(n, p)}
        for s, n, p in zip(
            manifest["sha256"], manifest["source_name"], manifest["upstream_path"], strict=True
        )
        if isinstance(s, str) and s
    }
    if raw_dir is None or excluded is None or not len(excluded):
        return index
    copies = excluded[excluded["reason"].astype(str).str.startswith(COPY_REASONS)]
    locked = _raw_shas(Path(raw_dir))
    for _, row in copies.iterrows():
        src = SOURCES.get(str(row["source_name"]))
        if src is None:
            continue
        rel = f"{src.repo}/{src.commit}/{row['upstream_path']}"
        sha = locked.get(rel)
        if sha is None and (Path(raw_dir) / rel).is_file():
            sha = sha256_file(Path(raw_dir) / rel)
        if sha and sha not in index:
            index[sha] = {
                "match": _key(row["source_name"], row["upstream_path"]),
                "copy_of": str(row["reason"]),
            }
    return index


def manifest_bank(
    manifest: pd.DataFrame,
    processed_dir: Path,
    cache_dir: Path | None = None,
    params: DedupParams = DEFAULT_PARAMS,
) -> Bank:
    """Dedup features of every manifest image: read from ``cache_dir`` where cached, else computed in memory."""
    paths = [Path(processed_dir) / p for p in manifest["image"].astype(str)]
    shas = [sha256_file(p) for p in paths]
    skip_orb = no_local_feature_test()
    orb = [s not in skip_orb for s in manifest["source_name"]]
    folder = Path(cache_dir) / f"features-{params.feature_version()}" if cache_dir is not None else None
    hit = [folder is not None and (folder / s[:2] / f"{s}.npz").is_file() for s in shas]
    feats: list[ImageFeatures | None] = [None] * len(paths)
    for cached in (True, False):
        idx = [i for i, h in enumerate(hit) if h == cached]
        if idx:
            got = load_features(
                [paths[i] for i in idx],
                [shas[i] for i in idx],
                params,
                cache_dir if cached else None,
                orb=[orb[i] for i in idx],
            )
            for i, f in zip(idx, got, strict=True):
                feats[i] = f
    keys = [_key(n, p) for n, p in zip(manifest["source_name"], manifest["upstream_path"], strict=True)]
    done = [f for f in feats if f is not None]  # load_features raises rather than skip
    thumbs = np.stack([f.thumb for f in done]) if done else np.zeros((0, params.thumb_size**2), np.float32)
    return Bank(keys, done, thumbs, [i for i, f in enumerate(done) if orb[i] and f.has_orb])


def external_features(path: Path, params: DedupParams = DEFAULT_PARAMS) -> ImageFeatures:
    """Decode and shrink a file like the data step, then its dedup features; raises ImageDecodeError."""
    img = np.asarray(resize_short_side(load_xray(path), TARGET_SHORT_SIDE))
    if min(img.shape) < 16:
        raise ImageDecodeError(path, f"image too small ({img.shape[1]}x{img.shape[0]})")
    return image_features(img, params, orb=True)


def near_match(ext: ImageFeatures, bank: Bank, params: DedupParams = DEFAULT_PARAMS) -> dict | None:
    """The data step's verdict of one image against the bank: ``kind`` ``near`` (same image, thumbnail
    first, else ORB) or ``same_patient`` (its weaker link, never from NIH / Actualmed films); or None."""
    unlinked = no_image_patient_link()
    linkable = [k.split(":", 1)[0] not in unlinked for k in bank.keys]
    r = bank.thumbs @ ext.thumb / ext.thumb.size if len(bank.keys) else np.zeros(0)
    best = int(np.argmax(r)) if len(r) else -1
    if best >= 0 and r[best] >= params.same_image_r:
        return {"kind": "near", "match": bank.keys[best], "score": float(r[best]), "method": "thumbnail"}
    found = None
    if len(ext.descriptors) and bank.orb_index:
        descs = [ext.descriptors] + [bank.feats[i].descriptors for i in bank.orb_index]
        pairs = shortlist_pairs(descs, params.shortlist_k, params.shortlist_descriptors)
        for j in [bank.orb_index[b - 1] for a, b in pairs if a == 0]:
            inliers, aligned_r = verify_pair(ext, bank.feats[j], params)
            kind = {"same_image": "near", "same_patient": "same_patient"}.get(
                params.classify(inliers, aligned_r)
            )
            if kind is None or (kind == "same_patient" and not linkable[j]):
                continue
            rank = (kind == "near", inliers)
            if found is None or rank > (found["kind"] == "near", found["inliers"]):
                found = {
                    "kind": kind,
                    "match": bank.keys[j],
                    "score": _num(aligned_r),
                    "method": "orb",
                    "inliers": int(inliers),
                }
    if found is None and len(r):
        ok = np.where(np.asarray(linkable) & (r >= params.same_patient_r), r, -np.inf)
        j = int(np.argmax(ok))
        if np.isfinite(ok[j]):
            found = {
                "kind": "same_patient",
                "match": bank.keys[j],
                "score": float(r[j]),
                "method": "thumbnail",
            }
    return found


def _num(x: float) -> float | None:
    """A JSON-ready float (None for NaN)."""
    return float(x) if np.isfinite(x) else None


def find_overlaps(
    paths: list[Path],
    manifest: pd.DataFrame,
    processed_dir: Path,
    raw_dir: Path | None = None,
    excluded: pd.DataFrame | None = None,
    cache_dir: Path | None = None,
    bank: Bank | None = None,
) -> dict:
    """Exact and near copies of study images among ``paths`` (module docstring); unreadable files listed.
    None means the data layout: ``../raw``, ``excluded.csv``, ``../cache/dedup`` beside ``processed_dir``."""
    t0 = time.perf_counter()
    processed_dir = Path(processed_dir)
    raw_dir = Path(raw_dir) if raw_dir is not None else processed_dir.parent / "raw"
    if excluded is None and (processed_dir / "excluded.csv").is_file():
        excluded = pd.read_csv(processed_dir / "excluded.csv", dtype=str, keep_default_na=False)
    cache_dir = Path(cache_dir) if cache_dir is not None else processed_dir.parent / "cache" / "dedup"
    index = exact_index(manifest, raw_dir if raw_dir.is_dir() else None, excluded)
    images: list[dict] = []
    related: list[dict] = []
    unreadable: list[dict] = []
    for path in map(Path, paths):
        try:
            sha = sha256_file(path)
        except OSError as exc:
            unreadable.append({"path": str(path), "reason": f"cannot read file ({exc.strerror or exc})"})
            continue
        if sha in index:
            images.append(
                {"path": str(path), "kind": "exact", **index[sha], "score": 1.0, "method": "sha256"}
            )
            continue
        try:
            ext = external_features(path)
        except ImageDecodeError as exc:
            unreadable.append({"path": str(path), "reason": exc.reason})
            continue
        if bank is None:
            bank = manifest_bank(manifest, processed_dir, cache_dir if cache_dir.is_dir() else None)
        hit = near_match(ext, bank)
        if hit is not None:
            (images if hit["kind"] == "near" else related).append({"path": str(path), **hit})
    return {
        "n_checked": len(paths),
        "exact": sum(i["kind"] == "exact" for i in images),
        "near": sum(i["kind"] == "near" for i in images),
        "new": len(paths) - len(images) - len(unreadable),
        "images": images,
        "same_patient": related,
        "unreadable": unreadable,
        "seconds": round(time.perf_counter() - t0, 2),
    }
