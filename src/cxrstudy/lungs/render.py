"""Every manifest film seen through a view of its lungs, rendered once into a cached folder of PNGs.

Later steps read images from an *image root* (``data/processed`` for the plain films). For another input
view (``lung_crop``, ``lung_mask``, or equalised) :func:`view_root` renders each film through
:func:`cxrstudy.lungs.views.apply_view` with the profile's lung masks into
``data/cache/views/<view>_<key>/`` under the same relative names, and returns that folder: features,
decomposition, training and evaluation then work unchanged on it. The key covers the lung stage's
cache entry, the view, the equalisation, the margin and the manifest's content; a folder is used only
when complete (a marker written last).

The shortcut checks' masked views (:func:`render_masked_views`: lungs hidden, lungs alone, with the
rectangle for QC failures) go to ``data/cache/lung_views/<key>/<variant>/``, keyed by the masks, the
image root and the rectangle. Both caches are written by :func:`render_films`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxrstudy import config
from cxrstudy.fileio import atomic_path, write_json

#: Bump when rendering changes meaning without its inputs changing.
RENDER_VERSION = 2
VIEWS_CACHE = config.CACHE_DIR / "views"
COMPLETE = ".complete.json"
#: Where films with segmented lungs hidden / kept alone are rendered (one folder per masks and root).
LUNG_VIEWS_DIR = config.CACHE_DIR / "lung_views"
#: Bump when the rendered masked views change meaning.
LUNG_VIEWS_VERSION = 1


def render_films(
    images: Iterable[str],
    image_root: Path,
    roots: dict[str, Path],
    render: Callable[[str, Image.Image], dict[str, Image.Image]],
    compress_level: int = -1,
) -> None:
    """Write ``render(name, film)[key]`` as ``roots[key]/<name>`` (PNG, atomically) for every film under
    ``image_root``; a film whose files all exist is not decoded again."""
    from cxrstudy.images import load_xray

    for name in images:
        targets = {key: Path(root) / name for key, root in roots.items()}
        if all(t.is_file() for t in targets.values()):
            continue
        out = render(name, load_xray(Path(image_root) / name))
        for key, target in targets.items():
            with atomic_path(target) as tmp:
                out[key].save(tmp, format="PNG", compress_level=compress_level)


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
    """One film through an input view."""
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
    from cxrstudy.data.manifest import manifest_key

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
    from cxrstudy.lungs.stage import masks_for

    masks = masks_for(manifest, profile, missing="predict", image_root=Path(image_root))
    render_films(
        manifest["image"].astype(str),
        image_root,
        {view: root},
        lambda name, img: {view: render_one(img, masks[name], view, equalize, margin)},
        compress_level=1,
    )
    write_json(
        root / COMPLETE, {"view": view, "equalize": equalize, "margin": margin, "images": len(manifest)}
    )
    return root


def masked_views_folder(lung_key: str, image_root: Path) -> Path:
    """Folder of the rendered masked views for these masks and this image root."""
    from cxrstudy.lungs.region import LUNG_REGION

    payload = json.dumps(
        {"v": LUNG_VIEWS_VERSION, "lungs": lung_key, "root": str(Path(image_root).resolve()), "rect": LUNG_REGION}
    )
    return LUNG_VIEWS_DIR / hashlib.sha256(payload.encode()).hexdigest()[:16]


def render_masked_views(
    manifest: pd.DataFrame,
    masks: dict[str, np.ndarray],
    image_root: Path,
    lung_key: str,
    views_dir: Path | None = None,
) -> dict[str, Path]:
    """Write each film with its lungs hidden and with only its lungs kept (PNG, same size and path as
    the film) under ``<views folder>/<variant>/``; existing files are kept. Returns variant -> root."""
    from cxrstudy.lungs.region import MASK_VARIANTS, film_mask, hide

    folder = Path(views_dir) if views_dir is not None else masked_views_folder(lung_key, image_root)
    roots = {name: folder / name for name in MASK_VARIANTS}

    def render(image: str, img: Image.Image) -> dict[str, Image.Image]:
        arr = np.asarray(img)
        inside, _ = film_mask(masks.get(image), *arr.shape)
        return {name: Image.fromarray(hide(arr, inside, name == "lungs_only"), mode="L") for name in roots}

    render_films(manifest["image"].astype(str), image_root, roots, render)
    return roots
