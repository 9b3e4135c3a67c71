"""Saved runs on images the study never processed: the one path shared by ``make evaluate`` and ``cxrstudy predict``.

Images go through the study's preprocessing: the one decoder (``load_xray``), the data step's shrink to a
shorter side of 256 px, the run's input view (for a lung view, a mask from the profile's saved lung
model, then :func:`cxrstudy.lungs.render.render_one`), then the run's own ``resize_to_uint8`` and
``model_transform``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from cxrstudy import config
from cxrstudy.runspec import RunSpec

#: (image size, interpolation, input view, equalise, view margin): what a run's input depends on beyond
#: the decoded film.
InputKey = tuple[int, str, str, bool, float]


def input_key(info: dict[str, Any]) -> InputKey:
    """What a run's model expects: size, interpolation and input view (runs without a view: the full film)."""
    from cxrstudy.models import get_spec

    spec = RunSpec.from_record(info)
    if spec.image_size is None:
        raise ValueError(f"run {spec.run_id}: run.json has no image_size")
    return (spec.image_size, get_spec(spec.backbone).interpolation, *spec.view)


def needs_lungs(keys: set[InputKey]) -> bool:
    """Whether any of the runs sees the film through a lung view."""
    from cxrstudy.lungs.render import is_plain

    return any(not is_plain(k[2], k[3]) for k in keys)


def view_mask(mask: np.ndarray, view: str, margin: float) -> np.ndarray:
    """The lung mask in the coordinates of a view's image (framed like the film: :func:`lungs.views.to_view_frame`)."""
    from cxrstudy.lungs.views import to_view_frame

    m = np.asarray(mask, dtype=bool)
    return to_view_frame(m, m, view, margin)


def decode_study(path: Path | str) -> Image.Image:
    """Decode one file as the data step does (grey, shorter side 256); raises ImageDecodeError naming it."""
    from cxrstudy.data.preprocess import TARGET_SHORT_SIDE
    from cxrstudy.images import load_xray, resize_short_side

    return resize_short_side(load_xray(path), TARGET_SHORT_SIDE)


@dataclass
class Decoded:
    """Decoded files: readable indices, model-size inputs per key, unreadable (index, reason), lung masks."""

    ok: list[int]
    inputs: dict[InputKey, list[Image.Image]]
    bad: list[tuple[int, str]]
    masks: list[np.ndarray | None]


def decode_for_models(
    paths: Sequence[str | Path], keys: set[InputKey], lungs_dir: Path | None = None, device: str = "cpu"
) -> Decoded:
    """Decode each file once and build each key's model-size input; the film's lung mask comes from the
    saved lung model in ``lungs_dir`` (``reports/<profile>/lungs``) when there is one, and is required
    by a lung view. Pre-resizing with ``resize_to_uint8`` makes the model's own resize a no-op."""
    from cxrstudy.images import ImageDecodeError
    from cxrstudy.lungs.render import is_plain, render_one
    from cxrstudy.models import resize_to_uint8

    seg = _segmenter(lungs_dir, device, required=needs_lungs(keys))
    out = Decoded([], {k: [] for k in keys}, [], [])
    for i, path in enumerate(paths):
        try:
            img = decode_study(path)
        except ImageDecodeError as exc:
            out.bad.append((i, exc.reason))
            continue
        mask = seg.predict(img) if seg is not None else None
        out.ok.append(i)
        out.masks.append(mask)
        for key in keys:
            size, interp, view, equalize, margin = key
            seen = img if is_plain(view, equalize) else render_one(img, mask, view, equalize, margin)
            arr = resize_to_uint8(seen, size, interp)[0].numpy()
            out.inputs[key].append(Image.fromarray(arr, mode="L"))
    return out


def _segmenter(lungs_dir: Path | None, device: str, required: bool) -> Any:
    """The saved lung model in ``lungs_dir``; None when there is none and no run needs it (else the error)."""
    from cxrstudy.lungs import LungSegmenter

    if lungs_dir is None and not required:
        return None
    try:
        return LungSegmenter.load(Path(lungs_dir or "."), device)
    except FileNotFoundError:
        if required:
            raise
        return None


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
