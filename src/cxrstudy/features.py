"""Pooled penultimate features for every image of a manifest, with an on-disk cache, and 2-D embeddings.

The data pipeline is built for throughput: workers decode and squish-resize to uint8 (1,S,S) tensors
(4x less memory traffic than float), normalisation and the grey->3-channel copy happen on the device,
the model runs in channels_last under ``torch.inference_mode``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cxrstudy import config
from cxrstudy.fileio import atomic_write_bytes
from cxrstudy.images import load_xray
from cxrstudy.models import create_backbone, get_spec, normalize_batch, resize_to_uint8

#: Bump when the extraction code changes what it computes: old cache files are then ignored.
CACHE_VERSION = 1

#: Manifest columns that identify an image's content for the cache key (``width``/``height`` when present).
_KEY_COLUMNS = ("image", "sha256")
_OPTIONAL_KEY_COLUMNS = ("width", "height")


class _ImageDataset(Dataset):
    """Decoded, squish-resized uint8 (1,S,S) tensors of the manifest's images, in manifest order."""

    def __init__(
        self,
        paths: list[Path],
        image_size: int,
        interpolation: str,
        transform: Callable[[Image.Image], Image.Image] | None = None,
    ) -> None:
        self.paths = paths
        self.image_size = image_size
        self.interpolation = interpolation
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = load_xray(self.paths[i])
        if self.transform is not None:
            img = self.transform(img)
            if not isinstance(img, Image.Image) or img.mode != "L":
                raise ValueError(f"{self.paths[i]}: the extra transform must return a PIL image of mode 'L'")
        return resize_to_uint8(img, self.image_size, self.interpolation)


def manifest_key(manifest: pd.DataFrame) -> str:
    """SHA-256 of the rows' identifying columns (image, sha256, and width/height when present)."""
    missing = [c for c in _KEY_COLUMNS if c not in manifest.columns]
    if missing:
        raise ValueError(f"manifest lacks column(s) {missing} needed to key the feature cache")
    cols = [*_KEY_COLUMNS, *(c for c in _OPTIONAL_KEY_COLUMNS if c in manifest.columns)]
    payload = manifest[cols].astype(str).to_csv(index=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def cache_path(
    manifest: pd.DataFrame, backbone: str, image_size: int, cache_dir: Path, cache_tag: str = ""
) -> Path:
    """Cache file for (backbone spec, image size, manifest content, tag)."""
    spec = get_spec(backbone)
    key = json.dumps(
        {
            "version": CACHE_VERSION,
            "spec": dataclasses.asdict(spec),
            "image_size": image_size,
            "manifest": manifest_key(manifest),
            "tag": cache_tag,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    safe = backbone.replace(":", "-").replace("/", "-")
    tag = f"_{cache_tag}" if cache_tag else ""
    return Path(cache_dir) / f"{safe}_{image_size}px{tag}_{digest}.npz"


def prepare_model(backbone: str, device: str | torch.device = "auto") -> tuple[torch.nn.Module, torch.device]:
    """The feature backbone in eval mode, channels_last, on the resolved device."""
    dev = device if isinstance(device, torch.device) else config.resolve_device(device)
    model = create_backbone(backbone).eval().to(dev, memory_format=torch.channels_last)
    return model, dev


def _forward(model: torch.nn.Module, x_uint8: torch.Tensor, spec, dev: torch.device) -> torch.Tensor:
    """uint8 (B,1,S,S) batch -> pooled float32 features on the CPU (normalisation on the device)."""
    x = x_uint8.to(dev, non_blocking=True)
    x = normalize_batch(x, spec).contiguous(memory_format=torch.channels_last)
    return model(x).float().cpu()


def _write_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write an .npz atomically (temporary file in the same folder, then rename)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _read_cache(path: Path, images: list[str]) -> np.ndarray | None:
    """Cached features if the file exists and lists exactly these images, else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if data["images"].tolist() != images:
                return None
            return data["features"]
    except (OSError, KeyError, ValueError):  # unreadable or foreign file: recompute and overwrite
        return None


def extract_features(
    manifest: pd.DataFrame,
    image_root: Path,
    backbone: str,
    image_size: int,
    batch_size: int = 32,
    device: str = "auto",
    num_workers: int = 0,
    cache_dir: Path = config.CACHE_DIR / "features",
    transform: Callable[[Image.Image], Image.Image] | None = None,
    cache_tag: str = "",
) -> pd.DataFrame:
    """Pooled features (float32 columns f0..f{F-1}) indexed by ``manifest["image"]``; cached on disk.

    ``transform`` is an optional PIL->PIL op (e.g. lung masking) applied after decoding; it must come
    with a ``cache_tag`` naming it. ``result.attrs`` holds ``cache_hit``, ``seconds``, ``images_per_s``
    and ``cache_file``.
    """
    if transform is not None and not cache_tag:
        raise ValueError("an extra transform changes the features: give it a cache_tag naming it")
    if len(manifest) == 0:
        raise ValueError("manifest has no rows: nothing to extract")
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"bad batch_size={batch_size} or num_workers={num_workers}")
    images = manifest["image"].astype(str).tolist()
    dup = manifest["image"][manifest["image"].duplicated()].unique().tolist()
    if dup:
        raise ValueError(f"manifest lists image(s) more than once: {dup[:5]}")
    spec = get_spec(backbone)
    path = cache_path(manifest, backbone, image_size, Path(cache_dir), cache_tag)
    columns = [f"f{i}" for i in range(spec.num_features)]
    index = pd.Index(images, name="image")

    cached = _read_cache(path, images)
    if cached is not None:
        out = pd.DataFrame(cached, index=index, columns=columns)
        out.attrs.update(cache_hit=True, seconds=0.0, images_per_s=float("nan"), cache_file=str(path))
        return out

    root = Path(image_root)
    paths = [root / p for p in images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} manifest image(s) not found under {root}, e.g. {missing[:3]}"
        )

    model, dev = prepare_model(backbone, device)
    loader = DataLoader(
        _ImageDataset(paths, image_size, spec.interpolation, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=dev.type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
    )
    feats = np.empty((len(paths), spec.num_features), dtype=np.float32)
    start = time.perf_counter()
    pos = 0
    with torch.inference_mode(), tqdm(total=len(paths), unit="img", desc=f"features {backbone}") as bar:
        for xb in loader:
            fb = _forward(model, xb, spec, dev).numpy()
            feats[pos : pos + len(fb)] = fb
            pos += len(fb)
            bar.update(len(fb))
    seconds = time.perf_counter() - start
    if not np.isfinite(feats).all():
        raise RuntimeError(f"non-finite features from {backbone} at {image_size}px; not caching them")
    _write_npz_atomic(path, features=feats, images=np.array(images, dtype=str))
    out = pd.DataFrame(feats, index=index, columns=columns)
    out.attrs.update(
        cache_hit=False, seconds=seconds, images_per_s=len(paths) / seconds, cache_file=str(path)
    )
    return out


def forward_throughput(
    backbone: str, image_size: int, batch_size: int = 32, device: str = "auto", n_batches: int = 5
) -> float:
    """Images/s of the bare feature forward pass on an in-memory uint8 batch (same model setup as extraction)."""
    spec = get_spec(backbone)
    model, dev = prepare_model(backbone, device)
    gen = torch.Generator().manual_seed(0)
    xb = torch.randint(0, 256, (batch_size, 1, image_size, image_size), dtype=torch.uint8, generator=gen)
    with torch.inference_mode():
        _forward(model, xb, spec, dev)  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        for _ in range(n_batches):
            _forward(model, xb, spec, dev)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    return batch_size * n_batches / (time.perf_counter() - start)


def embed_2d(features: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(N,F) features -> (N,2) embedding after standardisation: ``pca``, ``tsne`` or ``umap``."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 3:
        raise ValueError(f"need a 2-D array of at least 3 rows, got shape {x.shape}")
    x = StandardScaler().fit_transform(x)
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        n_pre = min(50, x.shape[0] - 1, x.shape[1])
        x = PCA(n_components=n_pre, random_state=seed).fit_transform(x)
        perplexity = float(min(30.0, (x.shape[0] - 1) / 3.0))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    if method == "umap":
        try:
            import umap  # type: ignore[import-not-found]
        except ImportError as exc:
            raise ImportError("embedding 'umap' needs the umap-learn package; use 'pca' or 'tsne'") from exc
        return umap.UMAP(n_components=2, random_state=seed).fit_transform(x)
    raise ValueError(f"unknown embedding method {method!r}; use 'pca', 'tsne' or 'umap'")


def extraction_summary(features: pd.DataFrame, backbone: str, image_size: int, device: str = "auto") -> dict:
    """JSON-ready facts about one ``extract_features`` result (n images, seconds, cache hit, images/s)."""

    def num(key: str, digits: int) -> float | None:
        v = float(features.attrs.get(key, float("nan")))
        return round(v, digits) if np.isfinite(v) else None

    return {
        "backbone": backbone,
        "weights": get_spec(backbone).weights,
        "image_size": image_size,
        "device": str(config.resolve_device(device)),
        "n_images": len(features),
        "n_features": features.shape[1],
        "cache_hit": bool(features.attrs.get("cache_hit", False)),
        "seconds": num("seconds", 3),
        "images_per_s": num("images_per_s", 1),
        "cache_file": Path(features.attrs.get("cache_file", "")).name,
    }
