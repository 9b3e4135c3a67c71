"""One uint8 tensor cache of decoded, squish-resized images, shared by feature extraction and training.

``load_uint8_batch(rows, image_root, size, interpolation)`` returns the manifest rows' images as one uint8
tensor ``(N,1,S,S)``: each file decoded once by the project's one decoder (:func:`cxrstudy.images.load_xray`)
and resized once by :func:`cxrstudy.models.resize_to_uint8`, so the pixels are exactly those of the PIL path
(``models.model_transform``). Later calls read the result back from ``data/cache/tensors/``.

Keys. An *entry group* is (resolved image root folder, size, interpolation, tag of an extra PIL transform);
inside a group each image is identified by its manifest path, the manifest's ``sha256`` (when the column
exists) and the file's size and modification time, so two folders holding different renderings of the same
file names (the lung-cropped views) never share pixels, and a file rewritten in place is decoded again.
Any entry of the group that holds every requested image serves the request (feature extraction on the whole
manifest, then training on the task's rows, decode each file once); otherwise the missing images are
decoded and a new entry is written.

Files. ``<group>_<digest>.npy`` (the array) then ``<group>_<digest>.json`` (the image identities, written
last: it marks the entry complete), each written atomically through :mod:`cxrstudy.fileio`. An entry whose
JSON is missing or whose array does not match it is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from cxrstudy import config
from cxrstudy.fileio import atomic_writer, write_json
from cxrstudy.images import load_xray
from cxrstudy.models import resize_to_uint8

#: Bump when what an entry holds changes (decoder, resize): older entries are then ignored.
CACHE_VERSION = 1

#: Where entries go unless a ``cache_dir`` is given (read at call time, so tests can point it elsewhere).
DEFAULT_CACHE_DIR: Path = config.CACHE_DIR / "tensors"

#: Open entries of this process: path -> (identities, read-only memory map).
_OPEN: dict[Path, tuple[list[str], np.ndarray]] = {}


def image_identities(rows: pd.DataFrame, image_root: Path | str) -> list[str]:
    """Identity of each row's file: manifest path, manifest sha256 (when present), file size and mtime.

    A FileNotFoundError lists the files that are missing under ``image_root``."""
    root = Path(image_root)
    images = rows["image"].astype(str).tolist()
    shas = rows["sha256"].astype(str).tolist() if "sha256" in rows.columns else [""] * len(images)
    out, missing = [], []
    for image, sha in zip(images, shas, strict=True):
        try:
            st = (root / image).stat()
        except OSError:
            missing.append(str(root / image))
            continue
        out.append(f"{image}\t{sha}\t{st.st_size}\t{st.st_mtime_ns}")
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} manifest image(s) not found under {root}, e.g. {missing[:3]}"
        )
    return out


def group_key(image_root: Path | str, size: int, interpolation: str, tag: str = "") -> str:
    """Hex key of an entry group: the resolved root folder, size, interpolation and transform tag."""
    payload = {
        "version": CACHE_VERSION,
        "root": str(Path(image_root).resolve()),
        "size": int(size),
        "interpolation": interpolation,
        "tag": tag,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def decode_one(
    path: Path, size: int, interpolation: str, transform: Callable[[Image.Image], Image.Image] | None = None
) -> torch.Tensor:
    """One file -> uint8 (1,S,S): ``load_xray``, the optional PIL transform, ``resize_to_uint8``."""
    img = load_xray(path)  # ImageDecodeError names the file
    if transform is not None:
        img = transform(img)
        if not isinstance(img, Image.Image) or img.mode != "L":
            raise ValueError(f"{path}: the extra transform must return a PIL image of mode 'L'")
    return resize_to_uint8(img, size, interpolation)


def decode_images(
    paths: Sequence[Path],
    size: int,
    interpolation: str,
    transform: Callable[[Image.Image], Image.Image] | None = None,
    workers: int = 0,
) -> np.ndarray:
    """Decode and resize files into a new uint8 array (N,1,S,S), in order; threads (PIL releases the GIL)."""
    out = np.empty((len(paths), 1, size, size), dtype=np.uint8)
    n_workers = workers or min(8, os.cpu_count() or 1)

    def fill(i: int) -> None:
        out[i] = decode_one(paths[i], size, interpolation, transform).numpy()

    if n_workers <= 1 or len(paths) < 2:
        for i in range(len(paths)):
            fill(i)
    else:
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            list(pool.map(fill, range(len(paths))))  # list(): re-raises the first error
    return out


def _open_entry(npy: Path, size: int) -> tuple[list[str], np.ndarray] | None:
    """(identities, memory map) of a complete, consistent entry; None for anything else."""
    if npy in _OPEN:
        return _OPEN[npy]
    meta = npy.with_suffix(".json")
    try:
        info = json.loads(meta.read_text())
        ids = list(info["identities"])
        arr = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if (
        info.get("version") != CACHE_VERSION
        or arr.dtype != np.uint8
        or arr.shape != (len(ids), 1, size, size)
    ):
        return None
    _OPEN[npy] = (ids, arr)
    return ids, arr


def _best_entry(folder: Path, group: str, wanted: list[str], size: int) -> tuple[dict[str, int], np.ndarray]:
    """The group's entry holding most of ``wanted`` (all of them stops the search): identity -> row, array."""
    best: tuple[dict[str, int], np.ndarray] = ({}, np.empty((0, 1, size, size), np.uint8))
    best_hits = 0
    want = set(wanted)
    for npy in sorted(folder.glob(f"{group}_*.npy")):
        entry = _open_entry(npy, size)
        if entry is None:
            continue
        index = {k: i for i, k in enumerate(entry[0])}
        hits = len(want.intersection(index))
        if hits > best_hits:
            best, best_hits = (index, entry[1]), hits
            if hits == len(want):
                break
    return best


def _write_entry(folder: Path, group: str, ids: list[str], arr: np.ndarray, about: dict[str, Any]) -> Path:
    """Write the array, then its identities (the completion mark), each atomically."""
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:20]
    npy = folder / f"{group}_{digest}.npy"
    with atomic_writer(npy) as fh:
        np.save(fh, arr, allow_pickle=False)
    record = {"version": CACHE_VERSION, **about, "identities": ids}
    write_json(npy.with_suffix(".json"), record, indent=None)
    _OPEN.pop(npy, None)
    return npy


def load_uint8_batch(
    manifest_rows: pd.DataFrame,
    image_root: Path | str,
    size: int,
    interpolation: str = "bicubic",
    *,
    transform: Callable[[Image.Image], Image.Image] | None = None,
    tag: str = "",
    cache_dir: Path | str | None = None,
    persist: bool = True,
    workers: int = 0,
) -> torch.Tensor:
    """The rows' images as a uint8 tensor (N,1,S,S) in row order, decoded at most once per file and size.

    ``transform`` is an optional PIL->PIL op applied after decoding (it needs a ``tag`` naming it, part of the
    key); ``persist=False`` decodes without reading or writing the cache; ``workers`` decode threads (0: one
    per core, at most 8). Missing files raise FileNotFoundError, undecodable ones ``ImageDecodeError``
    naming the file."""
    if transform is not None and not tag:
        raise ValueError("an extra transform changes the pixels: give it a tag naming it")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    root = Path(image_root)
    ids = image_identities(manifest_rows, root)
    paths = [root / p for p in manifest_rows["image"].astype(str)]
    if not persist:
        return torch.from_numpy(decode_images(paths, size, interpolation, transform, workers))
    folder = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    group = group_key(root, size, interpolation, tag)
    index, arr = _best_entry(folder, group, ids, size)
    todo = [i for i, k in enumerate(ids) if k not in index]
    if not todo:
        return torch.from_numpy(np.ascontiguousarray(arr[[index[k] for k in ids]]))
    out = np.empty((len(ids), 1, size, size), dtype=np.uint8)
    done = [i for i, k in enumerate(ids) if k in index]
    if done:
        out[done] = arr[[index[ids[i]] for i in done]]
    out[todo] = decode_images([paths[i] for i in todo], size, interpolation, transform, workers)
    unique = dict.fromkeys(ids)  # an entry lists each identity once
    if len(unique) == len(ids):
        about = {"root": str(root.resolve()), "size": size, "interpolation": interpolation, "tag": tag}
        _write_entry(folder, group, ids, out, about)
    return torch.from_numpy(out)


def clear_open_entries() -> None:
    """Forget this process's open memory maps (tests; after deleting cache files)."""
    _OPEN.clear()


def to_model_input(x: torch.Tensor, spec) -> torch.Tensor:
    """uint8 or float (0..255) grey batch (B,1,S,S) -> normalised float (B,3,S,S) in channels_last layout.

    The same arithmetic as :func:`cxrstudy.models.normalize_batch` (bit for bit), written straight into a
    channels_last buffer instead of normalising and then copying."""
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"expected a grey batch (B,1,S,S), got shape {tuple(x.shape)}")
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(spec.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1) * 255.0
    b, _, h, w = x.shape
    out = torch.empty((b, 3, h, w), dtype=torch.float32, device=x.device, memory_format=torch.channels_last)
    torch.sub(x.float().expand(b, 3, h, w), mean, out=out)
    return out.div_(std)
