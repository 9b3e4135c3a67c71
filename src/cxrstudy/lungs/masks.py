"""The V7 Labs lung masks shipped inside ``torchxrayvision``, paired with the manifest's ieee8023 films.

The archive ``torchxrayvision/data/semantic_masks_v7labs_lungs.zip`` is read in place through
``importlib.resources`` (no network, nothing copied into the repository). Each member is a PNG named
after an ieee8023 image file (``images/<name>`` upstream); pixel value 255 is lung, 127 marks other
annotations (text labels, electrodes, devices) and is *not* lung, 0 is background. About 80 masks are
empty (CT slices, lateral views): they are never paired.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import io
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxrstudy.lungs.region import resize_mask

#: Package and member of the mask archive.
MASK_PACKAGE = "torchxrayvision"
MASK_ARCHIVE = "data/semantic_masks_v7labs_lungs.zip"
#: Pixel values at or above this are lung (255); 127 is "other annotation".
LUNG_VALUE_MIN = 128
#: Source whose films the masks belong to.
MASK_SOURCE = "ieee8023"


@dataclass(frozen=True)
class MaskPair:
    """One manifest image with its V7 mask: names, split and patient group."""

    image: str  # path relative to data/processed/
    member: str  # member name inside the archive
    split: str
    patient_group: str


def _archive_bytes() -> bytes:
    """The mask archive's bytes, located through importlib.resources; a clear error when absent."""
    try:
        ref = importlib.resources.files(MASK_PACKAGE).joinpath(MASK_ARCHIVE)
        return ref.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise RuntimeError(
            f"the lung masks come from the PyPI package {MASK_PACKAGE!r} (file {MASK_ARCHIVE}); "
            f"install torchxrayvision==1.5.7 ({exc})"
        ) from exc


@lru_cache(maxsize=1)
def _archive() -> tuple[zipfile.ZipFile, str]:
    """Open archive (kept in memory) and its SHA-256."""
    data = _archive_bytes()
    return zipfile.ZipFile(io.BytesIO(data)), hashlib.sha256(data).hexdigest()


def archive_sha256() -> str:
    """SHA-256 of the mask archive (part of the lung cache key)."""
    return _archive()[1]


def mask_members() -> dict[str, str]:
    """File name (as the ieee8023 image is named) -> archive member, for every non-folder member."""
    zf, _ = _archive()
    out: dict[str, str] = {}
    for name in zf.namelist():
        if name.endswith("/"):
            continue
        out[name.rsplit("/", 1)[-1]] = name
    return out


def _stem(name: str) -> str:
    """Lower-case file name without its extension (``a/B.JPG`` -> ``b``)."""
    base = name.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0].lower() if "." in base else base.lower()


def read_mask(member: str) -> np.ndarray:
    """Boolean lung mask at the archive's (original) resolution."""
    zf, _ = _archive()
    with Image.open(io.BytesIO(zf.read(member))) as im:
        arr = np.asarray(im.convert("L"))
    return arr >= LUNG_VALUE_MIN


@lru_cache(maxsize=1024)
def _processed_mask(member: str, width: int, height: int) -> np.ndarray:
    """Mask resized to a processed image's size, cached (read-only) so pairing and training decode once."""
    out = resize_mask(read_mask(member), (width, height))
    out.setflags(write=False)
    return out


def processed_mask(member: str, size: tuple[int, int]) -> np.ndarray:
    """Boolean mask of an archive member resized (nearest) to PIL ``size`` = (width, height); a copy."""
    return _processed_mask(member, int(size[0]), int(size[1])).copy()


#: Seed of the lung stage's own patient-disjoint split of the mask films.
LUNG_SPLIT_SEED = 0


def lung_split(manifest: pd.DataFrame) -> pd.Series:
    """The lung stage's ``train``/``val``/``test`` of every manifest row: its own patient-disjoint split
    (``data.splits.make_splits``, seeded by :data:`LUNG_SPLIT_SEED`), since a mask is not a label and the
    classifier's cross-validation folds do not apply to it."""
    from cxrstudy.data.sources import holdout_sources
    from cxrstudy.data.splits import make_splits

    return make_splits(manifest, seed=LUNG_SPLIT_SEED, holdout_sources=holdout_sources())


def pair_masks(
    manifest: pd.DataFrame, min_area: float = 0.02, max_masks: int = 0, seed: int = 0
) -> tuple[list[MaskPair], dict]:
    """Pair ieee8023 manifest rows with masks by upstream file name.

    An exact file-name match is tried first, then a case-insensitive match without extension
    (``x.JPG`` vs ``x.jpg`` vs ``x.png``); a stem matching more than one mask is ambiguous and skipped.
    ``max_masks`` > 0 keeps that many matches (:func:`limit_pairs`) before any mask is decoded. Masks
    with under ``min_area`` of lung at the manifest's ``width`` x ``height`` are dropped (the archive
    holds empty masks for CT slices and lateral views). Returns the pairs (manifest order) and counts.
    """
    need = {"image", "source_name", "upstream_path", "patient_group", "patient_id_is_image_level", "label",
            "width", "height"}
    missing = sorted(need - set(manifest.columns))
    if missing:
        raise ValueError(f"manifest lacks column(s) {missing} needed to pair lung masks")
    members = mask_members()
    by_stem: dict[str, list[str]] = {}
    for name in members:
        by_stem.setdefault(_stem(name), []).append(name)
    rows = manifest.assign(split=lung_split(manifest))[manifest["source_name"] == MASK_SOURCE]
    counts = {
        "masks_in_archive": len(members),
        "manifest_rows_of_source": int(len(rows)),
        "matched_exact": 0,
        "matched_by_stem": 0,
        "ambiguous": 0,
        "empty_mask": 0,
    }
    matched: list[MaskPair] = []
    sizes: dict[str, tuple[int, int]] = {}
    for row in rows.itertuples(index=False):
        fname = str(row.upstream_path).rsplit("/", 1)[-1]
        if fname in members:
            member, how = members[fname], "matched_exact"
        else:
            cands = by_stem.get(_stem(fname), [])
            if len(cands) > 1:
                counts["ambiguous"] += 1
                continue
            if not cands:
                continue
            member, how = members[cands[0]], "matched_by_stem"
        counts[how] += 1
        matched.append(MaskPair(str(row.image), member, str(row.split), str(row.patient_group)))
        sizes[str(row.image)] = (int(row.width), int(row.height))
    pairs = []
    for pair in limit_pairs(matched, max_masks, seed):
        if processed_mask(pair.member, sizes[pair.image]).mean() < min_area:
            counts["empty_mask"] += 1
            continue
        pairs.append(pair)
    counts["pairs"] = len(pairs)
    counts["max_masks"] = max_masks
    counts["by_split"] = {s: sum(p.split == s for p in pairs) for s in ("train", "val", "test")}
    counts["patient_groups"] = len({p.patient_group for p in pairs})
    return pairs, counts


def limit_pairs(pairs: list[MaskPair], max_masks: int, seed: int) -> list[MaskPair]:
    """About ``max_masks`` pairs (0: all): each split keeps its share (rounded), at least 2 per split present."""
    if max_masks < 0:
        raise ValueError(f"max_masks must be >= 0, got {max_masks}")
    if max_masks == 0 or max_masks >= len(pairs):
        return list(pairs)
    rng = np.random.default_rng(seed)
    keep: set[int] = set()
    splits = sorted({p.split for p in pairs})
    for split in splits:
        idx = [i for i, p in enumerate(pairs) if p.split == split]
        n = max(2, round(max_masks * len(idx) / len(pairs)))
        keep.update(rng.permutation(idx)[:n].tolist())
    return [p for i, p in enumerate(pairs) if i in keep]


def load_pair(pair: MaskPair, image_root: Path) -> tuple[Image.Image, np.ndarray]:
    """The processed image (mode L) and its mask resized (nearest) to the image's size."""
    from cxrstudy.images import load_xray

    img = load_xray(Path(image_root) / pair.image)
    return img, processed_mask(pair.member, img.size)
