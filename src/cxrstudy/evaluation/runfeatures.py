"""Pooled penultimate features of a run's own trained network, for the scorecard; cached per run.

:func:`run_features` passes the manifest rows' films through the run's ``Classifier.backbone`` (weights from
``runs/<run_id>/model.pth``; preprocessing ``models.model_transform`` at the run's image size, in its two
steps: each film decoded and resized to uint8 once for all runs of a request, then ``normalize_batch``;
inference mode, channels_last, batches of 32) and caches the result in ``data/cache/run_features/<backbone>_<key>.npz``
(outside the run folder, which the evaluation step reads: a cache there would change its own input). Each
cached row is keyed by the manifest row (image, sha256, width, height) and the file under the image root (size,
mtime); the file as a whole by the SHA-256 of the run's backbone weights (:func:`backbone_digest`: runs with the
same backbone, e.g. the frozen ImageNet backbone of every shallow run, share one file), the resolved image root,
backbone and image size. A request reuses every cached row it can and computes only the rest, so re-running
notebook 05 computes nothing.

:func:`scorecard_rows` are the films whose features the scorecard reads for one run, and only films the run
never trained or validated on: a film is *seen* by a run when its manifest split is ``train`` or ``val`` AND
its label is one of the run's classes (run.json ``classes``); everything else is unseen (test, holdout, and
films of labels outside the task, e.g. pneumonia films for a binary covid_vs_normal run). They are the
unseen COVID-19 films (source identification within COVID-19) and, where a ranking metric falls back to
the probe, the unseen ieee8023 covid + pneumonia or NIH normal + pneumonia films
(:func:`cxrstudy.evaluation.scorecard.feature_rows`). :func:`scorecard_entries` runs
:func:`cxrstudy.evaluation.scorecard.scorecard_for_run` for every run, runs sharing (input view, task)
one after the other, so :func:`decoded_films` decodes each group's films once.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxrstudy import config
from cxrstudy.fileio import atomic_write_bytes
from cxrstudy.runspec import RunSpec

#: Folder of the runs' cached features (the key covers the run's weights, so a retrained run misses).
CACHE_DIR = config.CACHE_DIR / "run_features"
#: Bump when what is cached changes meaning.
CACHE_VERSION = 2
def scorecard_rows(manifest: pd.DataFrame, run_info: dict, predictions: pd.DataFrame | None = None) -> pd.DataFrame:
    """Manifest rows whose films the scorecard reads features of for one run: only films it never trained
    or validated on (``scorecard.feature_rows``; every probe fallback's films when ``predictions`` is None)."""
    from cxrstudy.evaluation.scorecard import feature_rows

    return feature_rows(run_info, predictions, manifest)


def row_identities(rows: pd.DataFrame, image_root: Path) -> list[str]:
    """Cache key of each row: manifest image, sha256, width, height, and the file's size and mtime."""
    cols = [c for c in ("sha256", "width", "height") if c in rows.columns]
    out = []
    for rec in rows[["image", *cols]].astype(str).itertuples(index=False):
        path = Path(image_root) / rec[0]
        try:
            st = path.stat()
        except OSError as exc:
            raise FileNotFoundError(f"{path}: film not found under the image root") from exc
        out.append("\t".join([*rec, str(st.st_size), str(st.st_mtime_ns)]))
    return out


def backbone_digest(run_dir: Path) -> str:
    """SHA-256 of the run's backbone weights (``backbone.*`` tensors of model.pth: names, dtypes, shapes, bytes)."""
    state = torch.load(Path(run_dir) / "model.pth", map_location="cpu", weights_only=True)
    digest = hashlib.sha256()
    for name in sorted(k for k in state if k.startswith("backbone.")):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}\t{t.dtype}\t{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_key(run_dir: Path, info: dict, image_root: Path) -> str:
    """Key of a run's feature file: backbone weights, backbone, image size, resolved image root, version."""
    payload = {
        "version": CACHE_VERSION,
        "backbone_weights": backbone_digest(run_dir),
        "backbone": info["backbone"],
        "image_size": int(info["image_size"]),
        "root": str(Path(image_root).resolve()),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _read_cache(path: Path, key: str) -> dict[str, np.ndarray]:
    """Cached rows (identity -> feature vector) of ``path`` when written under ``key``; else empty."""
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            if json.loads(str(data["meta"])).get("key") != key:
                return {}
            return dict(zip(data["ids"].tolist(), data["features"], strict=True))
    except (OSError, KeyError, ValueError):  # unreadable or foreign: recompute and overwrite
        return {}


def _write_cache(path: Path, key: str, rows: dict[str, np.ndarray]) -> None:
    """Write every cached row under ``key`` (atomically)."""
    buf = io.BytesIO()
    ids = list(rows)
    feats = np.stack([rows[i] for i in ids]).astype(np.float32)
    np.savez(buf, ids=np.array(ids, dtype=str), features=feats, meta=np.array(json.dumps({"key": key})))
    atomic_write_bytes(path, buf.getvalue())


@functools.lru_cache(maxsize=1)
def decoded_films(paths: tuple[Path, ...], ids: tuple[str, ...], image_size: int, interpolation: str) -> torch.Tensor:
    """Films decoded and squish-resized to uint8 (N,1,S,S) (the first half of ``models.model_transform``),
    in threads; the last request is kept, so the runs of one notebook decode their films once."""
    from cxrstudy.images import load_xray
    from cxrstudy.models import resize_to_uint8

    def one(path: Path) -> torch.Tensor:
        """One film as uint8 (1,S,S)."""
        return resize_to_uint8(load_xray(path), image_size, interpolation)

    if len(paths) != len(ids):
        raise ValueError(f"{len(paths)} paths for {len(ids)} identities")
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        films = list(pool.map(one, paths))
    return torch.stack(films) if films else torch.zeros((0, 1, image_size, image_size), dtype=torch.uint8)


def extract_backbone_features(
    backbone: torch.nn.Module,
    spec,
    films: torch.Tensor,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
) -> np.ndarray:
    """Pooled features (N, F) float32 of uint8 films (N,1,S,S) through ``backbone``: normalised as
    ``models.model_transform`` (``normalize_batch``), inference mode, channels_last, ``batch_size`` at a time."""
    from cxrstudy.models import normalize_batch

    dev = torch.device(device) if isinstance(device, str) else device
    backbone = backbone.eval().to(dev, memory_format=torch.channels_last)
    out = np.empty((len(films), spec.num_features), dtype=np.float32)
    with torch.inference_mode():
        for i in range(0, len(films), batch_size):
            x = normalize_batch(films[i : i + batch_size].to(dev), spec).contiguous(memory_format=torch.channels_last)
            out[i : i + len(x)] = backbone(x).float().cpu().numpy()
    return out


def run_features(
    run_dir: Path | str,
    rows: pd.DataFrame,
    image_root: Path | str = config.PROCESSED_DIR,
    device: str = "auto",
    batch_size: int = 32,
    cache: bool = True,
) -> pd.DataFrame:
    """Penultimate features of the run's network for ``rows``' films (columns f0..; index image), read
    from and added to its cache file under :data:`CACHE_DIR`; ``attrs['computed']`` counts films computed now."""
    from cxrstudy.models import get_spec
    from cxrstudy.training import load_run_model

    run_dir, image_root = Path(run_dir), Path(image_root)
    info = json.loads((run_dir / "run.json").read_text())
    rows = rows.drop_duplicates("image").reset_index(drop=True)
    ids = row_identities(rows, image_root)
    key = model_key(run_dir, info, image_root)
    path = CACHE_DIR / f"{info['backbone']}_{key[:24]}.npz"
    cached = _read_cache(path, key) if cache else {}
    todo = [i for i, k in enumerate(ids) if k not in cached]
    if todo:
        model, info = load_run_model(run_dir)
        spec = get_spec(info["backbone"])
        paths = tuple(image_root / rows["image"].iloc[i] for i in todo)
        films = decoded_films(paths, tuple(ids[i] for i in todo), int(info["image_size"]), spec.interpolation)
        dev = config.resolve_device(device)
        feats = extract_backbone_features(model.backbone, spec, films, dev, batch_size)
        if not np.isfinite(feats).all():
            raise RuntimeError(f"{run_dir}: non-finite features; not caching them")
        cached.update({ids[i]: f for i, f in zip(todo, feats, strict=True)})
        if cache:
            _write_cache(path, key, cached)
    X = np.stack([cached[k] for k in ids]) if ids else np.zeros((0, 0), dtype=np.float32)
    out = pd.DataFrame(X, index=pd.Index(rows["image"].astype(str), name="image"))
    out.columns = [f"f{j}" for j in range(out.shape[1])]
    out.attrs.update(computed=len(todo), cache_file=str(path))
    return out


def run_image_root(
    info: dict, manifest: pd.DataFrame, profile: str | None, image_root: Path | str = config.PROCESSED_DIR
) -> Path:
    """Folder of the films as the run saw them: ``image_root`` for the full film, else the profile's
    rendered view (``lungs.render.view_root``; a ValueError when the run has a view and no profile is given)."""
    from cxrstudy.lungs.render import is_plain, view_root

    spec = RunSpec.from_record(info)
    view, equalize, margin = spec.view
    if is_plain(view, equalize):
        return Path(image_root)
    if profile is None:
        raise ValueError(f"run {spec.run_id!r} sees the {view!r} view: pass the profile to render it")
    return view_root(manifest, profile, view, equalize, margin, Path(image_root))


def scorecard_order(runs: Sequence[dict]) -> list[int]:
    """Indices of ``runs`` with runs sharing (input view, task) next to each other (first appearance order)."""
    specs = [RunSpec.from_record(r["info"]) for r in runs]
    keys = [(s.view, s.task) for s in specs]
    first = {k: i for i, k in reversed(list(enumerate(keys)))}
    return sorted(range(len(runs)), key=lambda i: (first[keys[i]], i))


def oof_features(
    run: dict, rows: pd.DataFrame, manifest: pd.DataFrame, image_root: Path, device: str, batch_size: int
) -> pd.DataFrame:
    """Out-of-fold penultimate features of ``rows``' films for an out-of-fold whole (``evaluation.cv.oof_run``):
    each film through the model of its own fold (``evaluation.cv.film_folds``), held-out films through the
    first fold's model; a plain run's own features otherwise."""
    from cxrstudy.evaluation.cv import film_folds

    if "fold_dirs" not in run:
        return run_features(run["dir"], rows, image_root, device, batch_size)
    fold_of = rows["image"].map(film_folds(run, manifest)).fillna(-1).astype(int)
    first = min(run["fold_dirs"])
    parts = [
        run_features(run["fold_dirs"][fold if fold in run["fold_dirs"] else first], part, image_root, device, batch_size)
        for fold, part in rows.groupby(fold_of.to_numpy(), sort=True)
    ]
    out = pd.concat(parts)
    return out.loc[rows["image"].drop_duplicates().astype(str)]


def scorecard_entries(
    runs: Sequence[dict],
    manifest: pd.DataFrame,
    image_root: Path | str = config.PROCESSED_DIR,
    device: str = "auto",
    batch_size: int = 32,
    n_bootstrap: int = 1000,
    seed: int = 0,
    profile: str | None = None,
    n_permutations: int | None = None,
) -> list[dict]:
    """Scorecard entries of every configuration (``evaluation.cv.oof_runs`` items, entries in their order) on its
    out-of-fold features of films its models never trained or validated on (:func:`scorecard_rows`), each
    configuration's films through its input view (:func:`run_image_root`; ``image_root`` holds the plain films)."""
    from cxrstudy.evaluation.scorecard import N_PERMUTATIONS, scorecard_for_run

    done: dict[int, list[dict]] = {}
    memo: dict = {}  # probes on identical features (a DFR run's and its base's) run once
    for i in scorecard_order(runs):
        run = runs[i]
        info = run["info"]
        rows = scorecard_rows(manifest, info, run["predictions"])
        root = run_image_root(info, manifest, profile, image_root)
        feats = oof_features(run, rows, manifest, root, device, batch_size) if len(rows) else None
        done[i] = scorecard_for_run(
            info, run["predictions"], manifest, feats, RunSpec.from_record(info).variant, n_bootstrap, seed,
            N_PERMUTATIONS if n_permutations is None else n_permutations,
            [r["predictions"] for r in run.get("fold_runs", ())],
            memo,
        )
    return [e for i in range(len(runs)) for e in done[i]]
