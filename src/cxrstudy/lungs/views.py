"""Input views built from a film and its lung mask: the full film, the lung box, the lungs alone.

``apply_view(img, mask, view, equalize=False, margin=0.05)`` is the one function later steps call
(features, training, evaluation): they pass the PIL film (mode ``L``) and the mask from
:func:`cxrstudy.lungs.masks_for` or :meth:`cxrstudy.lungs.LungSegmenter.predict`. An empty mask is
treated as the QC fallback (the whole image), so a crop is never empty.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

#: The views and what they are.
VIEWS: dict[str, str] = {
    "full": "the whole film",
    "lung_crop": "the mask's bounding box plus a margin, centred on a black square canvas",
    "lung_mask": "outside the mask black, then cropped to the lung box plus margin on a black square canvas",
}
#: Views that crop the film to the lung box.
CROP_VIEWS: frozenset[str] = frozenset({"lung_crop", "lung_mask"})


def check_mask(img: Image.Image, mask: np.ndarray) -> np.ndarray:
    """The mask as a boolean (H,W) array matching the image; ValueError naming the problem otherwise."""
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(img).__name__}")
    if img.mode != "L":
        raise ValueError(f"expected an 8-bit grayscale image (mode 'L'), got mode {img.mode!r}")
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"mask must be 2-D (H,W), got shape {arr.shape}")
    if arr.shape != (img.height, img.width):
        raise ValueError(
            f"mask shape {arr.shape} does not match the image ({img.height}, {img.width}) (height, width)"
        )
    if arr.dtype != bool:
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"mask must be boolean or numeric, got dtype {arr.dtype}")
        arr = arr > (127 if arr.max(initial=0) > 1 else 0)
    return arr


def lung_box(mask: np.ndarray, margin: float = 0.05) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the mask plus ``margin`` x the image's width/height each side, clipped; the
    whole image for an empty mask. x1/y1 exclusive; never empty."""
    if not 0 <= margin <= 1:
        raise ValueError(f"margin must be a fraction in [0, 1], got {margin}")
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return 0, 0, w, h
    mx, my = round(margin * w), round(margin * h)
    x0, x1 = max(0, int(cols[0]) - mx), min(w, int(cols[-1]) + 1 + mx)
    y0, y1 = max(0, int(rows[0]) - my), min(h, int(rows[-1]) + 1 + my)
    return x0, y0, x1, y1


def to_view_frame(arr: np.ndarray, mask: np.ndarray, view: str, margin: float = 0.05) -> np.ndarray:
    """``arr`` (H,W: the film or its mask) in a view's frame: for the crop views, the lung box of ``mask``
    (the whole image when it is empty) centred on a square canvas of zeros, so the models' square resize keeps
    the lungs' aspect ratio and the box's shape is not stretched into the picture; unchanged for ``full``."""
    if view not in CROP_VIEWS:
        return arr
    m = np.asarray(mask, dtype=bool)
    x0, y0, x1, y1 = lung_box(m if m.any() else np.ones_like(m), margin)
    crop = arr[y0:y1, x0:x1]
    h, w = crop.shape
    side = max(h, w)
    out = np.zeros((side, side), dtype=crop.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = crop
    return out


def equalize_in_mask(arr: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Histogram equalisation whose grey-level mapping is computed on the mask's pixels only, applied
    to the whole array (uint8 in, uint8 out)."""
    arr = np.asarray(arr, dtype=np.uint8)
    values = arr[mask]
    if values.size == 0:
        values = arr.ravel()
    hist = np.bincount(values, minlength=256).astype(np.float64)
    cdf = np.cumsum(hist)
    lo = cdf[np.flatnonzero(hist)[0]]
    if cdf[-1] <= lo:  # one grey level: nothing to stretch
        return arr.copy()
    lut = np.clip(np.rint((cdf - lo) / (cdf[-1] - lo) * 255.0), 0, 255).astype(np.uint8)
    return lut[arr]


def apply_view(
    img: Image.Image, mask: np.ndarray, view: str, equalize: bool = False, margin: float = 0.05
) -> Image.Image:
    """The film seen through ``view`` (``full``, ``lung_crop``, ``lung_mask``), optionally equalised
    inside the mask; returns a new mode ``L`` image, never empty."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; expected one of {sorted(VIEWS)}")
    m = check_mask(img, mask)
    if not m.any():  # no lungs: the QC fallback, the whole image
        m = np.ones_like(m)
    arr = np.asarray(img, dtype=np.uint8)
    if equalize:
        arr = equalize_in_mask(arr, m)
    if view == "full":
        return Image.fromarray(np.ascontiguousarray(arr))
    if view == "lung_mask":
        arr = np.where(m, arr, 0).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(to_view_frame(arr, m, view, margin)))
