"""The lung region of a film: its segmented lungs, else a fixed central rectangle.

When the profile has a lung stage output (``reports/<profile>/lungs/summary.json``, notebook 01_lungs),
each film's segmented lungs (:func:`cxrstudy.lungs.stage.load_lung_masks`, a boolean mask at the processed image's size) are
its region; a film whose segmentation failed QC (its mask is the whole image), or without a mask, falls
back to :data:`LUNG_REGION`, a fixed central rectangle, x and y from 15% to 85% of the image (49% of its
area), which covers both lung fields and the mediastinum of a frontal film squish-resized to a square.
:func:`lung_region_info` says which was used (results.json ``lung_region``: ``segmented`` or
``fixed rectangle``). The shortcut checks hide or keep the region (:data:`MASK_VARIANTS`), Grad-CAM
measures saliency inside it (:func:`cam_region`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

#: Central lung field as fractions of width / height: (x0, y0, x1, y1).
LUNG_REGION: tuple[float, float, float, float] = (0.15, 0.15, 0.85, 0.85)


def lung_mask(height: int, width: int, region: tuple[float, float, float, float] = LUNG_REGION) -> np.ndarray:
    """Boolean (height, width) mask, True inside the central lung region (pixel centres inside it)."""
    x0, y0, x1, y1 = region
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError(f"bad region {region}: need 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    ys = (np.arange(height) + 0.5) / height
    xs = (np.arange(width) + 0.5) / width
    return ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]


#: Resampling of :func:`resize_mask`: nearest neighbour, or the area average.
RESAMPLE = {"nearest": Image.Resampling.NEAREST, "area": Image.Resampling.BOX}


def resize_mask(mask: np.ndarray, size: tuple[int, int], resample: str = "nearest") -> np.ndarray:
    """Boolean mask resized to PIL ``size`` = (width, height): ``nearest`` neighbour, or ``area``
    (a pixel is in the mask when at least half of what it covers is)."""
    im = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255, mode="L")
    if im.size != tuple(size):
        im = im.resize(tuple(size), RESAMPLE[resample])
    return np.asarray(im) >= 128


def film_mask(mask: np.ndarray | None, height: int, width: int) -> tuple[np.ndarray, str]:
    """The lung mask used for one film and its kind: the segmented mask (``segmented``), or the
    rectangle (``rectangle``) when there is none, its shape differs or it is the QC fallback (all True)."""
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape == (height, width) and m.any() and not m.all():
            return m, "segmented"
    return lung_mask(height, width), "rectangle"


def cam_region(mask: np.ndarray | None, film_size: tuple[int, int], cam_shape: tuple[int, int]) -> tuple[np.ndarray, str]:
    """The lung region on a saliency map's grid and its kind: the film's segmented mask area-resized
    (``segmented``), or the rectangle (``rectangle``: no mask, a mask of another size, the QC fallback,
    or nothing left)."""
    width, height = film_size
    m, kind = film_mask(mask, height, width)
    if kind == "segmented":
        region = resize_mask(m, (cam_shape[1], cam_shape[0]), "area")
        if region.any():
            return region, kind
    return lung_mask(*cam_shape), "rectangle"


def hide(arr: np.ndarray, region: np.ndarray, keep: bool) -> np.ndarray:
    """uint8 copy of an image array with the region (``keep=False``) or everything else (``keep=True``) black."""
    return np.where(~region if keep else region, 0, arr).astype(np.uint8)


def _rectangle_view(img: Image.Image, keep: bool) -> Image.Image:
    """An L image with the central rectangle (``keep=False``) or everything else (``True``) black."""
    if not isinstance(img, Image.Image) or img.mode != "L":
        raise ValueError("masking expects a decoded 8-bit grayscale PIL image (mode 'L'); use load_xray")
    arr = np.asarray(img)
    return Image.fromarray(hide(arr, lung_mask(arr.shape[0], arr.shape[1]), keep), mode="L")


def mask_lungs(img: Image.Image) -> Image.Image:
    """The image with the central lung field (:data:`LUNG_REGION`) blacked out."""
    return _rectangle_view(img, keep=False)


def keep_lungs_only(img: Image.Image) -> Image.Image:
    """The image with everything outside the central lung field blacked out."""
    return _rectangle_view(img, keep=True)


#: The masked views: name -> (rectangle transform of a film, its feature-cache tag); with segmented
#: lungs the same names are folders of rendered films (``lungs.render.render_masked_views``).
MASK_VARIANTS = {"masked_lungs": (mask_lungs, "mask_lungs"), "lungs_only": (keep_lungs_only, "lungs_only")}


def rectangle_region() -> dict:
    """The fixed central rectangle (:data:`LUNG_REGION`): x, y (fractions) and its area share."""
    x0, y0, x1, y1 = LUNG_REGION
    return {"x": [x0, x1], "y": [y0, y1], "area_share": (x1 - x0) * (y1 - y0)}


def lung_region_info(masks: dict[str, np.ndarray] | None, images: Sequence[str] | None = None) -> dict:
    """results.json ``lung_region_detail``: ``kind`` (``segmented`` / ``fixed rectangle``), the rectangle,
    and with masks the films segmented, those on the rectangle (QC fallback) and the mean lung area."""
    out: dict = {"rectangle": rectangle_region()}
    if not masks:
        return {"kind": "fixed rectangle", **out}
    names = list(images) if images is not None else list(masks)
    usable = [np.asarray(masks[n], bool) for n in names if n in masks]
    seg = [m for m in usable if m.any() and not m.all()]
    return {
        "kind": "segmented",
        **out,
        "n_images": len(names),
        "n_segmented": len(seg),
        "n_rectangle_fallback": len(names) - len(seg),
        "mean_area_share": float(np.mean([m.mean() for m in seg])) if seg else None,
        "source": "lung stage (notebook 01_lungs), QC fallback films use the rectangle",
    }
