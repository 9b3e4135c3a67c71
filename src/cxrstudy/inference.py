"""Saved runs on images the study never processed: the one path shared by ``make evaluate`` and ``cxrstudy predict``.

Images go through the study's preprocessing: the one decoder (``load_xray``), the data step's shrink to a
shorter side of 256 px, then the run's own ``resize_to_uint8`` and ``model_transform``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from cxrstudy import config

#: (image size, interpolation): what a run's input depends on beyond the decoded image.
InputKey = tuple[int, str]


def input_key(info: dict[str, Any]) -> InputKey:
    """The (image size, interpolation) a run's model expects."""
    from cxrstudy.models import get_spec

    return int(info["image_size"]), get_spec(info["backbone"]).interpolation


def decode_study(path: Path | str) -> Image.Image:
    """Decode one file as the data step does (grey, shorter side 256); raises ImageDecodeError naming it."""
    from cxrstudy.data.preprocess import TARGET_SHORT_SIDE
    from cxrstudy.images import load_xray, resize_short_side

    return resize_short_side(load_xray(path), TARGET_SHORT_SIDE)


def decode_for_models(
    paths: Sequence[str | Path], keys: set[InputKey]
) -> tuple[list[int], dict[InputKey, list[Image.Image]], list[tuple[int, str]], list[Image.Image]]:
    """Decode each file once; returns (readable indices, model-size images per key, (index, reason) of
    unreadable files, the decoded study-size images). Pre-resizing with ``resize_to_uint8`` makes the
    model's own resize a no-op, so the input equals resizing inside ``model_transform``."""
    from cxrstudy.images import ImageDecodeError
    from cxrstudy.models import resize_to_uint8

    ok: list[int] = []
    bad: list[tuple[int, str]] = []
    decoded: list[Image.Image] = []
    resized: dict[InputKey, list[Image.Image]] = {k: [] for k in keys}
    for i, path in enumerate(paths):
        try:
            img = decode_study(path)
        except ImageDecodeError as exc:
            bad.append((i, exc.reason))
            continue
        ok.append(i)
        decoded.append(img)
        for size, interp in keys:
            arr = resize_to_uint8(img, size, interp)[0].numpy()
            resized[(size, interp)].append(Image.fromarray(arr, mode="L"))
    return ok, resized, bad, decoded


def prediction_frame(
    model: Any,
    images: Sequence[Image.Image],
    info: dict[str, Any],
    meta: pd.DataFrame,
    device: str = "auto",
    batch_size: int = 32,
) -> pd.DataFrame:
    """``meta`` plus ``prob_<class>``, ``pred`` and, with decomposition, ``prob_sub_*`` and ``pred_hard``."""
    from cxrstudy.training import predict_images

    classes = list(info["classes"])
    probs, sub = predict_images(model, list(images), info, device=device, batch_size=batch_size)
    preds = meta.reset_index(drop=True).copy()
    for j, c in enumerate(classes):
        preds[f"prob_{c}"] = probs[:, j]
    preds["pred"] = [classes[j] for j in probs.argmax(axis=1)]
    subclasses = list(info.get("subclasses") or classes)
    if info.get("decomposition") and subclasses != classes:
        from cxrstudy.decomposition import compose_hard

        for j, s in enumerate(subclasses):
            preds[f"prob_sub_{s}"] = sub[:, j]
        preds["pred_hard"] = [classes[j] for j in compose_hard(sub, subclasses, classes)]
    return preds


def known_profiles() -> list[str]:
    """Profiles that have a reports folder with saved runs."""
    return sorted(p.parent.name for p in config.REPORTS_DIR.glob("*/runs") if p.is_dir())


def run_dirs(profile_dir: Path) -> dict[str, Path]:
    """Finished runs of a profile (those with run.json and model.pth), by run id."""
    found = {}
    for d in sorted((profile_dir / "runs").glob("*/")):
        if (d / "run.json").is_file() and (d / "model.pth").is_file():
            found[d.name] = d
    return found


def headline_run(profile_dir: Path) -> str | None:
    """The run the evaluation chose on validation (``results.json`` headline), if the profile has one."""
    path = profile_dir / "results.json"
    if not path.is_file():
        return None
    return (json.loads(path.read_text()).get("headline") or {}).get("run_id")


def choose_run(profile: str, run: str | None = None, reports_dir: Path | None = None) -> Path:
    """The folder of ``run`` (default: the profile's headline run); errors name what exists instead."""
    pdir = (reports_dir or config.REPORTS_DIR) / profile
    runs = run_dirs(pdir)
    if not runs:
        known = ", ".join(known_profiles()) or "none yet"
        raise FileNotFoundError(
            f"profile {profile!r} has no saved runs under {pdir / 'runs'} (profiles with runs: {known}); "
            f"run `make reproduce PROFILE={profile}` first"
        )
    wanted = run or headline_run(pdir)
    if wanted is None:
        raise FileNotFoundError(
            f"profile {profile!r} has no results.json naming a headline run; pick one with --run: {', '.join(runs)}"
        )
    if wanted not in runs:
        raise FileNotFoundError(f"profile {profile!r} has no run {wanted!r}; its runs: {', '.join(runs)}")
    return runs[wanted]
