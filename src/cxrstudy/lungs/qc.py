"""Post-processing of predicted lung masks and the quality check (QC) with its fallback.

Post-processing: threshold the probability map, drop components under ``min_component`` of the
image area, keep the two largest (8-connected) components, fill holes in each.

QC thresholds (:data:`QC_THRESHOLDS`; a film fails when any rule fails, each failure is a flag):

* ``blank_image``: the film's grey-level standard deviation is under 8 (nothing to segment);
* ``not_a_film``: neighbouring pixels correlate under 0.5 (noise; every radiograph, even a noisy
  scan, is far smoother);
* ``no_lungs``: nothing left after post-processing;
* ``area_low`` / ``area_high``: lung area outside 8-70% of the image (the 303 V7 masks span 9-62%);
* ``lr_imbalance``: the smaller lung under 35% of the larger one's area (a missed lung). Left and
  right are the two components (by centroid) or, with one component, the mask's area left and right
  of the image's middle column;
* ``box_narrow`` / ``box_short``: the mask's bounding box under 45% of the width or 25% of the height
  (both lungs of a frontal film span well over 45% of its width: a narrower box is one lung, even when
  that lung straddles the middle column and so looks balanced);
* ``not_side_by_side``: two components whose vertical extents overlap by under 30% of the shorter;
* ``uncertain``: under 70% of the probability map's pixels inside the bounding box are confident
  (p < 0.1 or p > 0.9): the network does not recognise a chest film (photographs, noise);
* ``implausible_shape``: the mask, scaled to its bounding box, has a soft Dice under 0.65 with the
  mean training mask scaled the same way (the model's ``shape_prior``); reference masks score 0.77
  or more, masks found in photographs 0.4-0.6.

A film that fails gets the fallback: the whole image as lung (mask of ones, box = the image) and the
flag ``fallback``; downstream input views then see the full image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

#: The QC rules' thresholds (documented above).
QC_THRESHOLDS: dict[str, float] = {
    "min_image_std": 8.0,
    "min_neighbour_corr": 0.5,
    "min_area": 0.08,
    "max_area": 0.70,
    "min_lr_balance": 0.35,
    "min_box_width": 0.45,
    "min_box_height": 0.25,
    "min_vertical_overlap": 0.30,
    "min_confident": 0.70,
    "min_shape_score": 0.65,
}
#: Side of the bounding-box-normalised masks compared with the shape prior.
SHAPE_SIZE = 32
#: Probability threshold and smallest component kept (fraction of the image area).
THRESHOLD = 0.5
MIN_COMPONENT = 0.005
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass
class LungQC:
    """QC of one film's mask: box (x1/y1 exclusive, processed-image pixels), measures, pass flag, flags."""

    x0: int
    y0: int
    x1: int
    y1: int
    area_fraction: float
    n_components: int
    lr_balance: float
    confident_fraction: float
    shape_score: float
    qc_pass: bool
    qc_flags: list[str] = field(default_factory=list)

    def row(self) -> dict:
        """A flat dict for ``lungs.csv`` (flags ``;``-joined)."""
        d = asdict(self)
        d["qc_flags"] = ";".join(self.qc_flags)
        return d


def clean_mask(
    binary: np.ndarray, min_component: float = MIN_COMPONENT, keep: int = 2
) -> tuple[np.ndarray, int]:
    """Keep the ``keep`` largest 8-connected components of at least ``min_component`` of the area, holes filled.

    Returns the cleaned boolean mask and how many components it has.
    """
    binary = np.asarray(binary, dtype=bool)
    if binary.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {binary.shape}")
    labels, n = ndi.label(binary, structure=_EIGHT)
    if n == 0:
        return np.zeros_like(binary), 0
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(-sizes, kind="stable")
    kept = [int(i) + 1 for i in order[:keep] if sizes[i] >= min_component * binary.size]
    out = np.zeros_like(binary)
    for lab in kept:
        out |= ndi.binary_fill_holes(labels == lab)
    return out, len(kept)


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the True pixels, x1/y1 exclusive; None for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _balance_and_overlap(mask: np.ndarray) -> tuple[float, float]:
    """Left/right balance (smaller / larger area) and vertical overlap of two components (1.0 for one)."""
    labels, n = ndi.label(mask, structure=_EIGHT)
    if n >= 2:
        sizes = np.bincount(labels.ravel())[1:]
        a, b = (np.argsort(-sizes)[:2] + 1).tolist()
        ra = np.flatnonzero((labels == a).any(axis=1))
        rb = np.flatnonzero((labels == b).any(axis=1))
        overlap = max(0, min(ra[-1], rb[-1]) - max(ra[0], rb[0]) + 1) / min(len(ra), len(rb))
        sa, sb = float(sizes[a - 1]), float(sizes[b - 1])
        return min(sa, sb) / max(sa, sb), float(overlap)
    mid = mask.shape[1] // 2
    left, right = float(mask[:, :mid].sum()), float(mask[:, mid:].sum())
    big = max(left, right)
    return (min(left, right) / big if big else 0.0), 1.0


def normalised_shape(mask: np.ndarray, size: int = SHAPE_SIZE) -> np.ndarray:
    """The mask's bounding-box crop area-resized to size x size (float in [0, 1]); zeros for an empty mask."""
    box = bounding_box(np.asarray(mask, dtype=bool))
    if box is None:
        return np.zeros((size, size), dtype=np.float32)
    x0, y0, x1, y1 = box
    crop = Image.fromarray(np.asarray(mask[y0:y1, x0:x1], dtype=np.uint8) * 255)
    return np.asarray(crop.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


def shape_prior(masks: list[np.ndarray], size: int = SHAPE_SIZE) -> np.ndarray:
    """Mean of the bounding-box-normalised masks (the training masks' average lung-pair shape)."""
    if not masks:
        raise ValueError("no masks to build a shape prior from")
    return np.mean([normalised_shape(m, size) for m in masks], axis=0).astype(np.float32)


def shape_score(mask: np.ndarray, prior: np.ndarray) -> float:
    """Soft Dice between the mask's normalised shape and the prior (0 for an empty mask)."""
    prior = np.asarray(prior, dtype=np.float32)
    a = normalised_shape(mask, prior.shape[0])
    den = float(a.sum() + prior.sum())
    return float(2.0 * (a * prior).sum() / den) if den > 0 else 0.0


def neighbour_correlation(image: np.ndarray) -> float:
    """Correlation of horizontally adjacent pixels (1 for smooth images, ~0 for noise, 0 for constant)."""
    a = np.asarray(image, dtype=np.float32)
    if a.ndim != 2 or a.shape[1] < 2:
        return 0.0
    x, y = a[:, :-1].ravel(), a[:, 1:].ravel()
    x, y = x - x.mean(), y - y.mean()
    den = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else 0.0


def image_flags(image: np.ndarray) -> list[str]:
    """The QC rules that need only the grey image: ``blank_image`` (std under 8), else ``not_a_film``
    (neighbouring pixels correlate under 0.5)."""
    t = QC_THRESHOLDS
    if float(np.asarray(image, dtype=np.float32).std()) < t["min_image_std"]:
        return ["blank_image"]
    if neighbour_correlation(image) < t["min_neighbour_corr"]:
        return ["not_a_film"]
    return []


def assess(
    mask: np.ndarray,
    prob: np.ndarray | None = None,
    image: np.ndarray | None = None,
    prior: np.ndarray | None = None,
) -> LungQC:
    """QC of a cleaned mask (plus, when given, its probability map, the grey image and the shape prior;
    a rule whose input is missing, or an all-zero prior, is skipped)."""
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    t = QC_THRESHOLDS
    flags: list[str] = image_flags(image) if image is not None else []
    box = bounding_box(mask)
    _, n_comp = ndi.label(mask, structure=_EIGHT)
    area = float(mask.mean())
    if box is None:
        flags.append("no_lungs")
        balance, overlap, confident, shape = 0.0, 0.0, 0.0, 0.0
        box = (0, 0, w, h)
    else:
        balance, overlap = _balance_and_overlap(mask)
        x0, y0, x1, y1 = box
        if prob is not None:
            p = np.asarray(prob, dtype=np.float32)[y0:y1, x0:x1]
            confident = float(((p < 0.1) | (p > 0.9)).mean())
        else:
            confident = 1.0
        if area < t["min_area"]:
            flags.append("area_low")
        if area > t["max_area"]:
            flags.append("area_high")
        if balance < t["min_lr_balance"]:
            flags.append("lr_imbalance")
        if (x1 - x0) < t["min_box_width"] * w:
            flags.append("box_narrow")
        if (y1 - y0) < t["min_box_height"] * h:
            flags.append("box_short")
        if overlap < t["min_vertical_overlap"]:
            flags.append("not_side_by_side")
        if confident < t["min_confident"]:
            flags.append("uncertain")
        use_prior = prior is not None and float(np.asarray(prior).sum()) > 0
        shape = shape_score(mask, prior) if use_prior else 1.0
        if shape < t["min_shape_score"]:
            flags.append("implausible_shape")
    ok = not flags
    if not ok:
        flags.append("fallback")
        box = (0, 0, w, h)
    return LungQC(*box, area, int(n_comp), float(balance), float(confident), float(shape), ok, flags)


def postprocess(
    prob: np.ndarray,
    image: np.ndarray | None = None,
    threshold: float = THRESHOLD,
    prior: np.ndarray | None = None,
) -> tuple[np.ndarray, LungQC]:
    """Probability map (H,W) -> (final mask, QC). A failed film's final mask is all ones (the fallback)."""
    prob = np.asarray(prob, dtype=np.float32)
    if prob.ndim != 2:
        raise ValueError(f"expected a 2-D probability map, got shape {prob.shape}")
    mask, _ = clean_mask(prob > threshold)
    qc = assess(mask, prob, image, prior)
    if not qc.qc_pass:
        mask = np.ones_like(mask)
    return mask, qc


def fallback_mask(height: int, width: int) -> np.ndarray:
    """The fallback: the whole image is the lung field."""
    return np.ones((height, width), dtype=bool)
