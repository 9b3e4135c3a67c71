"""Every manifest film seen through an input view, rendered once into a cached folder of PNGs.

Later steps read images from an *image root* (``data/processed`` for the plain films). For another view
(``lung_crop``, ``lung_mask``, or equalised) :func:`view_root` renders each film through
:func:`cxrstudy.lungs.views.apply_view` with the profile's lung masks into
``data/cache/views/<view>_<key>/`` under the same relative names, and returns that folder: features,
decomposition, training and evaluation then work unchanged on it. The key covers the lung stage's
cache entry, the view, the equalisation, the margin and the manifest's content; a folder is used only
when complete (a marker written last).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxrstudy import config
from cxrstudy.fileio import atomic_path, write_json

#: Bump when rendering changes meaning without its inputs changing.
RENDER_VERSION = 1
VIEWS_CACHE = config.CACHE_DIR / "views"
COMPLETE = ".complete.json"


def check_view(view: str, equalize: bool = False) -> None:
    """ValueError naming the problem for an unknown view or a bad equalise flag."""
    from cxrstudy.lungs.views import VIEWS

    known = sorted(VIEWS)
    if view not in known:
        raise ValueError(f"input_view must be one of {known}, got {view!r}")
    if not isinstance(equalize, bool):
        raise ValueError(f"equalize must be true or false, got {equalize!r}")


def is_plain(view: str, equalize: bool) -> bool:
    """Whether the view is the processed film itself (no lung stage needed)."""
    return view == "full" and not equalize


def view_tag(view: str, equalize: bool) -> str:
    """Short name of a view for cache names and run ids (``full``, ``lung_mask_eq``...)."""
    return f"{view}_eq" if equalize else view


def render_one(img: Image.Image, mask: np.ndarray, view: str, equalize: bool, margin: float) -> Image.Image:
    """One film through an input view (the shortcut checks' lungs-hidden / lungs-only films are rendered by
    ``evaluation.shortcuts.render_masked_views``, which falls back to the central rectangle for QC failures)."""
    from cxrstudy.lungs.views import apply_view

    return apply_view(img, mask, view, equalize=equalize, margin=margin)


def view_cache_tag(image_root: Path) -> str:
    """Feature-cache tag of an image root: empty for the processed films, else the rendered folder's name."""
    root = Path(image_root).resolve()
    return "" if root == Path(config.PROCESSED_DIR).resolve() else root.name


def _lung_entry(profile: str) -> str:
    """Name of the lung stage's cache entry the profile used (part of the render key)."""
    path = config.profile_dir(profile) / "lungs" / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"input views other than 'full' need the lung stage: no {path}; run notebook 01_lungs for "
            f"profile {profile!r} first (make reproduce PROFILE={profile})"
        )
    return Path(json.loads(path.read_text())["cache_dir"]).name


def render_key(manifest: pd.DataFrame, profile: str, view: str, equalize: bool, margin: float) -> str:
    """Key of a rendered folder: lung entry, view, equalisation, margin, manifest content, version."""
    from cxrstudy.features import manifest_key

    payload = json.dumps(
        [RENDER_VERSION, _lung_entry(profile), view, equalize, round(margin, 4), manifest_key(manifest)]
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def view_root(
    manifest: pd.DataFrame,
    profile: str,
    view: str = "full",
    equalize: bool = False,
    margin: float = 0.05,
    image_root: Path = config.PROCESSED_DIR,
    cache_dir: Path = VIEWS_CACHE,
) -> Path:
    """The folder holding every manifest film through ``view`` (``image_root`` itself for the plain view)."""
    check_view(view, equalize)
    if is_plain(view, equalize):
        return Path(image_root)
    root = (
        Path(cache_dir)
        / f"{view_tag(view, equalize)}_{render_key(manifest, profile, view, equalize, margin)}"
    )
    if (root / COMPLETE).is_file():
        return root
    from cxrstudy.images import load_xray
    from cxrstudy.lungs.stage import masks_for

    masks = masks_for(manifest, profile, missing="predict", image_root=Path(image_root))
    for name in manifest["image"].astype(str):
        out = render_one(load_xray(Path(image_root) / name), masks[name], view, equalize, margin)
        with atomic_path(root / name) as tmp:
            out.save(tmp, format="PNG", compress_level=1)
    write_json(
        root / COMPLETE, {"view": view, "equalize": equalize, "margin": margin, "images": len(manifest)}
    )
    return root
