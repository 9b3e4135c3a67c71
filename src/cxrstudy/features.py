"""Pooled penultimate features for every image of a manifest, with an on-disk cache, and 2-D embeddings.

Built for throughput: the manifest's images come from the shared uint8 tensor cache
(:func:`cxrstudy.tensorcache.load_uint8_batch`: each file decoded and squish-resized once, 4x less memory
traffic than float), batches are sliced from that in-memory tensor, normalised and copied to 3 channels in
channels_last layout, and the model runs under ``torch.inference_mode``: no per-image PIL work in the loop.

Precision. Where the hardware computes bf16 natively (AVX-512-BF16 or AMX on the CPU, or a bf16-capable
GPU), the forward pass runs under bf16 autocast (1.6-1.9x on such CPUs) *only if* its features agree with
fp32: :func:`bf16_agreement` checks a sample once per (backbone, image size) and machine (per-image cosine
similarity >= 0.999 and a linear probe on bf16 features within 0.5 accuracy points of the same probe on fp32
features); the decision and the measured agreement are recorded beside the cache (``precision/``), in the
cached file's metadata and in :func:`extraction_summary`. Otherwise fp32.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from cxrstudy import config
from cxrstudy.data.manifest import manifest_key
from cxrstudy.fileio import atomic_write_bytes, write_json
from cxrstudy.models import create_backbone, get_spec
from cxrstudy.tensorcache import load_uint8_batch, to_model_input

#: Bump when the extraction code changes what it computes: old cache files are then ignored.
CACHE_VERSION = 1

#: Manifest columns that identify an image's content for the cache key (``width``/``height`` when present).

#: Precisions ``extract_features`` accepts: ``auto`` uses bf16 where supported and checked, else fp32.
PRECISIONS = ("auto", "fp32", "bf16")
#: The bf16 check: sample size, the least per-image cosine similarity, the largest probe accuracy gap (points).
BF16_SAMPLE = 512
BF16_MIN_COSINE = 0.999
BF16_MAX_PROBE_GAP = 0.5


def cache_path(
    manifest: pd.DataFrame,
    backbone: str,
    image_size: int,
    cache_dir: Path,
    cache_tag: str = "",
    precision: str = "fp32",
) -> Path:
    """Cache file for (backbone spec, image size, manifest content, tag, precision); an fp32 key carries no
    precision field."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    spec = get_spec(backbone)
    fields: dict[str, Any] = {
        "version": CACHE_VERSION,
        "spec": spec.cache_key(),
        "image_size": image_size,
        "manifest": manifest_key(manifest),
        "tag": cache_tag,
    }
    if precision == "bf16":
        fields["precision"] = "bf16"
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]
    safe = backbone.replace(":", "-").replace("/", "-")
    tag = f"_{cache_tag}" if cache_tag else ""
    prec = "_bf16" if precision == "bf16" else ""
    return Path(cache_dir) / f"{safe}_{image_size}px{tag}{prec}_{digest}.npz"


def prepare_model(backbone: str, device: str | torch.device = "auto") -> tuple[torch.nn.Module, torch.device]:
    """The feature backbone in eval mode, channels_last, on the resolved device."""
    dev = device if isinstance(device, torch.device) else config.resolve_device(device)
    model = create_backbone(backbone).eval().to(dev, memory_format=torch.channels_last)
    return model, dev


def bf16_supported(device: str | torch.device = "cpu") -> bool:
    """Whether the device computes bf16 natively: AVX-512-BF16 or AMX-BF16 on the CPU, bf16 on a GPU."""
    dev = torch.device(device) if isinstance(device, str) else device
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        flags = next(
            (ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), ""
        )
    except OSError:  # not Linux: no way to tell here, stay in fp32
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def _autocast(dev: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on the device, or nothing."""
    return torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _forward(
    model: torch.nn.Module, x_uint8: torch.Tensor, spec, dev: torch.device, bf16: bool = False
) -> torch.Tensor:
    """uint8 (B,1,S,S) batch -> pooled float32 features on the CPU (normalisation on the device)."""
    x = to_model_input(x_uint8.to(dev, non_blocking=True), spec)
    with _autocast(dev, bf16):
        out = model(x)
    return out.float().cpu()


def batch_features(
    model: torch.nn.Module, x_uint8: torch.Tensor, spec, dev: torch.device, batch_size: int, bf16: bool
) -> np.ndarray:
    """Features (N, F) float32 of an in-memory uint8 tensor (N,1,S,S), batch by batch."""
    feats = np.empty((len(x_uint8), spec.num_features), dtype=np.float32)
    with torch.inference_mode():
        for i in range(0, len(x_uint8), batch_size):
            feats[i : i + batch_size] = _forward(model, x_uint8[i : i + batch_size], spec, dev, bf16).numpy()
    return feats


def _probe_gap(f32: np.ndarray, f16: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, Any] | None:
    """Test accuracy of one linear probe trained on fp32 and of one trained on bf16 features (same split)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    values, counts = np.unique(labels, return_counts=True)
    keep = np.isin(labels, values[counts >= 2])
    if len(values[counts >= 2]) < 2:
        return None
    idx = np.flatnonzero(keep)
    tr, te = train_test_split(idx, test_size=0.5, stratify=labels[idx], random_state=seed)
    acc = {}
    for name, f in (("fp32", f32), ("bf16", f16)):
        probe = make_pipeline(
            StandardScaler(), LogisticRegression(C=0.1, max_iter=3000, class_weight="balanced")
        )
        probe.fit(f[tr], labels[tr])
        acc[name] = float((probe.predict(f[te]) == labels[te]).mean())
    return {
        "probe_accuracy_fp32": acc["fp32"],
        "probe_accuracy_bf16": acc["bf16"],
        "probe_gap_points": round(100 * abs(acc["bf16"] - acc["fp32"]), 3),
        "n_probe_train": len(tr),
        "n_probe_test": len(te),
    }


def bf16_agreement(
    model: torch.nn.Module,
    x_uint8: torch.Tensor,
    labels: np.ndarray | None,
    spec,
    dev: torch.device,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Do bf16-autocast features agree with fp32 on these images? Per-image cosine similarity (all >= 0.999)
    and a linear probe (stratified half/half split of ``labels``; test accuracies within 0.5 points).
    Returns the measured numbers and ``use_bf16``; no labels for a probe means no bf16."""
    start = time.perf_counter()
    f32 = batch_features(model, x_uint8, spec, dev, batch_size, bf16=False)
    f16 = batch_features(model, x_uint8, spec, dev, batch_size, bf16=True)
    norms = np.linalg.norm(f32, axis=1) * np.linalg.norm(f16, axis=1)
    cos = (f32 * f16).sum(1) / np.maximum(norms, 1e-12)
    probe = _probe_gap(f32, f16, np.asarray(labels), seed) if labels is not None else None
    cos_ok = bool(cos.min() >= BF16_MIN_COSINE)
    probe_ok = probe is not None and probe["probe_gap_points"] <= BF16_MAX_PROBE_GAP
    if not cos_ok:
        reason = "cosine similarity below the threshold"
    elif probe is None:
        reason = "no labelled sample for the probe"
    else:
        reason = "agrees" if probe_ok else "probe accuracy gap too large"
    return {
        "use_bf16": cos_ok and probe_ok,
        "reason": reason,
        "n_images": len(x_uint8),
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        **(probe or {}),
        "thresholds": {"cosine_min": BF16_MIN_COSINE, "probe_gap_points": BF16_MAX_PROBE_GAP},
        "seconds": round(time.perf_counter() - start, 3),
    }


def _machine() -> dict[str, str]:
    """What a precision decision holds for: CPU model (or GPU name), torch version."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return {"cpu": cpu, "gpu": gpu, "torch": torch.__version__}


def precision_record_path(cache_dir: Path, backbone: str, image_size: int, dev: torch.device) -> Path:
    """Where the bf16 decision of (backbone, image size, device type) is recorded."""
    safe = backbone.replace(":", "-").replace("/", "-")
    return Path(cache_dir) / "precision" / f"{safe}_{image_size}px_{dev.type}.json"


def _recorded(cache_dir: Path, backbone: str, image_size: int, dev: torch.device) -> dict[str, Any] | None:
    """The recorded decision when it was taken on this machine and torch version, else None."""
    path = precision_record_path(cache_dir, backbone, image_size, dev)
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = (
        isinstance(rec, dict)
        and rec.get("machine") == _machine()
        and rec.get("precision") in ("fp32", "bf16")
    )
    return rec if ok else None


def _resolve_precision(
    precision: str, backbone: str, image_size: int, dev: torch.device, cache_dir: Path
) -> tuple[str | None, dict[str, Any] | None]:
    """(precision, check) when known without running anything; (None, None) when the check must run."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return "fp32", None
    if not bf16_supported(dev):
        if precision == "bf16":
            raise ValueError(f"precision='bf16' was asked for but {dev} has no native bf16 support")
        return "fp32", {"use_bf16": False, "reason": f"no native bf16 on this {dev.type}"}
    if precision == "bf16":
        return "bf16", None
    rec = _recorded(cache_dir, backbone, image_size, dev)
    return (rec["precision"], rec.get("check")) if rec else (None, None)


def _decide_precision(
    model: torch.nn.Module,
    x_uint8: torch.Tensor,
    manifest: pd.DataFrame,
    spec,
    dev: torch.device,
    batch_size: int,
    record: Path,
) -> tuple[str, dict[str, Any]]:
    """Run :func:`bf16_agreement` on a seeded sample of the manifest; record a conclusive decision."""
    idx = np.sort(np.random.default_rng(0).permutation(len(x_uint8))[:BF16_SAMPLE])
    labels = manifest["label"].astype(str).to_numpy()[idx] if "label" in manifest.columns else None
    check = bf16_agreement(model, x_uint8[torch.from_numpy(idx)], labels, spec, dev, batch_size)
    prec = "bf16" if check["use_bf16"] else "fp32"
    if "probe_gap_points" in check or check["cosine_min"] < BF16_MIN_COSINE:  # conclusive either way
        write_json(record, {"precision": prec, "check": check, "machine": _machine()})
    return prec, check


def _write_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write an .npz atomically (temporary file in the same folder, then rename)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _read_cache(path: Path, images: list[str]) -> tuple[np.ndarray, dict[str, Any]] | None:
    """Cached features and their metadata if the file exists and lists exactly these images, else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if data["images"].tolist() != images:
                return None
            meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
            return data["features"], meta
    except (OSError, KeyError, ValueError):  # unreadable or foreign file: recompute and overwrite
        return None


def _frame(feats: np.ndarray, images: list[str], spec, **attrs: Any) -> pd.DataFrame:
    """The features table (columns f0..f{F-1}, index ``image``) with its attrs."""
    columns = [f"f{i}" for i in range(spec.num_features)]
    out = pd.DataFrame(feats, index=pd.Index(images, name="image"), columns=columns)
    out.attrs.update(attrs)
    return out


def _cached_frame(
    manifest: pd.DataFrame,
    images: list[str],
    backbone: str,
    image_size: int,
    cache_dir: Path,
    tag: str,
    precision: str | None,
) -> pd.DataFrame | None:
    """The cached result of this request (either precision when the decision is not known yet), or None."""
    for prec in [precision] if precision else ["bf16", "fp32"]:
        path = cache_path(manifest, backbone, image_size, cache_dir, tag, prec)
        hit = _read_cache(path, images)
        if hit is not None:
            feats, meta = hit
            return _frame(
                feats,
                images,
                get_spec(backbone),
                cache_hit=True,
                seconds=0.0,
                images_per_s=float("nan"),
                cache_file=str(path),
                precision=meta.get("precision", prec),
                bf16_check=meta.get("bf16_check"),
            )
    return None


def _check_request(
    manifest: pd.DataFrame, transform: object, cache_tag: str, batch_size: int, num_workers: int
) -> list[str]:
    """The manifest's image names, after the argument checks every request needs."""
    if transform is not None and not cache_tag:
        raise ValueError("an extra transform changes the features: give it a cache_tag naming it")
    if len(manifest) == 0:
        raise ValueError("manifest has no rows: nothing to extract")
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"bad batch_size={batch_size} or num_workers={num_workers}")
    dup = manifest["image"][manifest["image"].duplicated()].unique().tolist()
    if dup:
        raise ValueError(f"manifest lists image(s) more than once: {dup[:5]}")
    return manifest["image"].astype(str).tolist()


def root_tag(image_root: Path | str) -> str:
    """Cache-tag part naming an image folder other than the processed films (lung views live elsewhere)."""
    root = Path(image_root).resolve()
    if root == Path(config.PROCESSED_DIR).resolve():
        return ""
    return f"root{hashlib.sha256(str(root).encode()).hexdigest()[:8]}"


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
    precision: str = "auto",
    tensor_cache_dir: Path | None = None,
) -> pd.DataFrame:
    """Pooled features (float32 columns f0..f{F-1}) indexed by ``manifest["image"]``; cached on disk.

    Images come from the shared uint8 tensor cache (``tensor_cache_dir``, default: ``tensors/`` beside
    ``cache_dir``, i.e. data/cache/tensors/;
    ``num_workers`` decode threads the first time, 0 = one per core). ``transform`` is an optional PIL->PIL
    op (e.g. lung masking) applied after decoding; it must come with a ``cache_tag`` naming it.
    ``precision``: ``auto`` (bf16 autocast where supported and checked, see the module docstring), ``fp32``
    or ``bf16``. ``result.attrs`` holds ``cache_hit``, ``seconds`` (tensor loading + forward),
    ``images_per_s``, ``decode_seconds``, ``forward_seconds``, ``cache_file``, ``precision``, ``bf16_check``.
    """
    images = _check_request(manifest, transform, cache_tag, batch_size, num_workers)
    cache_tag = "_".join(t for t in (cache_tag, root_tag(image_root)) if t)
    spec, cache_dir = get_spec(backbone), Path(cache_dir)
    dev = config.resolve_device(device)
    prec, check = _resolve_precision(precision, backbone, image_size, dev, cache_dir)
    hit = _cached_frame(manifest, images, backbone, image_size, cache_dir, cache_tag, prec)
    if hit is not None:
        return hit
    t0 = time.perf_counter()
    x = load_uint8_batch(
        manifest,
        image_root,
        image_size,
        spec.interpolation,
        transform=transform,
        tag=cache_tag,
        cache_dir=tensor_cache_dir if tensor_cache_dir is not None else cache_dir.parent / "tensors",
        workers=num_workers,
    )
    decode_s = time.perf_counter() - t0
    model, dev = prepare_model(backbone, dev)
    if prec is None:
        record = precision_record_path(cache_dir, backbone, image_size, dev)
        prec, check = _decide_precision(model, x, manifest, spec, dev, batch_size, record)
    t1 = time.perf_counter()
    feats = batch_features(model, x, spec, dev, batch_size, bf16=prec == "bf16")
    forward_s = time.perf_counter() - t1
    if not np.isfinite(feats).all():
        raise RuntimeError(f"non-finite features from {backbone} at {image_size}px; not caching them")
    path = cache_path(manifest, backbone, image_size, cache_dir, cache_tag, prec)
    meta = {"precision": prec, "bf16_check": check, "decode_seconds": decode_s, "forward_seconds": forward_s}
    _write_npz_atomic(
        path, features=feats, images=np.array(images, dtype=str), meta=np.array(json.dumps(meta))
    )
    seconds = decode_s + forward_s
    return _frame(
        feats,
        images,
        spec,
        cache_hit=False,
        seconds=seconds,
        images_per_s=len(images) / seconds,
        cache_file=str(path),
        precision=prec,
        bf16_check=check,
        decode_seconds=decode_s,
        forward_seconds=forward_s,
    )


def profile_features(
    manifest: pd.DataFrame,
    profile: str,
    backbone: str,
    image_size: int,
    input_view: str = "full",
    equalize: bool = False,
    batch_size: int = 32,
    device: str = "auto",
    num_workers: int = 0,
    image_root: Path = config.PROCESSED_DIR,
    cache_dir: Path = config.CACHE_DIR / "features",
) -> tuple[pd.DataFrame, Path]:
    """Features of every manifest film through the profile's input view (notebooks 02 and 03 share them), with the
    folder the view's films are read from (``image_root`` itself for the plain view)."""
    from cxrstudy.lungs.render import view_cache_tag, view_root

    root = view_root(manifest, profile, input_view, equalize, image_root=image_root)
    feats = extract_features(manifest, root, backbone, image_size, batch_size=batch_size, device=device,
                             num_workers=num_workers, cache_dir=cache_dir, cache_tag=view_cache_tag(root))
    return feats, root


def forward_throughput(
    backbone: str,
    image_size: int,
    batch_size: int = 32,
    device: str = "auto",
    n_batches: int = 5,
    bf16: bool = False,
) -> float:
    """Images/s of the bare feature forward pass on an in-memory uint8 batch (same model setup as extraction)."""
    spec = get_spec(backbone)
    model, dev = prepare_model(backbone, device)
    gen = torch.Generator().manual_seed(0)
    xb = torch.randint(0, 256, (batch_size, 1, image_size, image_size), dtype=torch.uint8, generator=gen)
    with torch.inference_mode():
        _forward(model, xb, spec, dev, bf16)  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        for _ in range(n_batches):
            _forward(model, xb, spec, dev, bf16)
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
    """JSON-ready facts about one ``extract_features`` result (n images, seconds, cache hit, images/s, the
    precision used and the bf16 agreement measured when it was decided)."""

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
        "decode_seconds": num("decode_seconds", 3),
        "forward_seconds": num("forward_seconds", 3),
        "cache_file": Path(features.attrs.get("cache_file", "")).name,
        "precision": features.attrs.get("precision", "fp32"),
        "bf16_check": features.attrs.get("bf16_check"),
    }
