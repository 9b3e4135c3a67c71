"""``cxrstudy predict``: class probabilities and a Grad-CAM overlay for any X-ray files, from a saved run.

Same decoding and preprocessing as the study (``cxrstudy.inference``). Writes into ``--out``:
``predictions.csv`` (columns ``image, run_id, pred, prob_<class>...``), one ``<name>_gradcam.png`` per
readable image and ``unreadable.csv`` (file and reason) when some could not be read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from cxrstudy import config
from cxrstudy.fileio import atomic_write_text
from cxrstudy.inference import choose_run, decode_for_models, input_key, prediction_frame, view_mask


@dataclass
class PredictResult:
    """What a predict call wrote: the table, the overlay files, the unreadable files and the run used."""

    run_id: str
    predictions: pd.DataFrame
    overlays: list[Path]
    unreadable: pd.DataFrame


def overlay_figure(img: Image.Image, cam: np.ndarray, title: str, lungs: np.ndarray | None = None) -> Figure:
    """The image in grey with the Grad-CAM map (upsampled to the image) in a translucent colour map and,
    when given, the lung outline (a mask in the image's coordinates, any size)."""
    fig = Figure(figsize=(4, 4.4))
    ax = fig.subplots()
    ax.imshow(np.asarray(img), cmap="gray")
    cam_img = Image.fromarray((np.clip(cam, 0, 1) * 255).astype(np.uint8)).resize(img.size, Image.BILINEAR)
    ax.imshow(np.asarray(cam_img) / 255.0, cmap="jet", alpha=0.35, vmin=0, vmax=1)
    if lungs is not None and lungs.any() and not lungs.all():
        outline = Image.fromarray(lungs.astype(np.uint8) * 255).resize(img.size, Image.NEAREST)
        ax.contour(np.asarray(outline) > 127, levels=[0.5], colors="lime", linewidths=1.0)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    return fig


def _overlay_names(paths: list[Path]) -> list[str]:
    """Unique PNG names from the image file names (a counter where two images share a name)."""
    names, seen = [], {}
    for p in paths:
        stem = p.stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}_gradcam.png" if seen[stem] == 1 else f"{stem}_{seen[stem]}_gradcam.png")
    return names


def predict(
    images: list[Path | str],
    out: Path | str,
    profile: str = "default",
    run: str | None = None,
    device: str = "auto",
    cam: bool = True,
) -> PredictResult:
    """Predict every readable image with the chosen run and write the outputs into ``out``."""
    from cxrstudy.training import load_run_model

    out, paths = Path(out), [Path(p) for p in images]
    run_dir = choose_run(profile, run)
    model, info = load_run_model(run_dir)
    run_id, key = info.get("run_id") or run_dir.name, input_key(info)
    lungs_dir = run_dir.parent.parent / "lungs"
    dec = decode_for_models(paths, {key}, lungs_dir if (lungs_dir / "model.json").is_file() else None, device)
    unreadable = pd.DataFrame([{"image": str(paths[i]), "reason": r} for i, r in dec.bad], columns=["image", "reason"])
    if len(unreadable):
        atomic_write_text(out / "unreadable.csv", unreadable.to_csv(index=False))
    if not dec.ok:
        return PredictResult(run_id, pd.DataFrame(), [], unreadable)
    meta = pd.DataFrame({"image": [str(paths[i]) for i in dec.ok], "run_id": run_id})
    preds = prediction_frame(model, dec.inputs[key], info, meta, device=device)
    table = preds[["image", "run_id", "pred", *(f"prob_{c}" for c in info["classes"])]]
    atomic_write_text(out / "predictions.csv", table.to_csv(index=False))
    overlays = _overlays(model, info, dec, key, table, [paths[i] for i in dec.ok], out, device) if cam else []
    return PredictResult(run_id, table, overlays, unreadable)


def _overlays(model, info: dict, dec, key, table: pd.DataFrame, paths: list[Path], out: Path, device: str) -> list[Path]:
    """One Grad-CAM overlay PNG per predicted image, with the lung outline when masks exist."""
    from cxrstudy import plots
    from cxrstudy.evaluation.saliency import gradcam_maps

    inputs = dec.inputs[key]
    maps = gradcam_maps(model, inputs, info, list(table["pred"]), device=config.resolve_device(device))
    written = []
    for name, img, m, mask, row in zip(_overlay_names(paths), inputs, maps, dec.masks, table.itertuples(), strict=True):
        probs = ", ".join(f"{c} {getattr(row, f'prob_{c}'):.2f}" for c in info["classes"])
        lungs = view_mask(mask, key[2], key[4]) if mask is not None else None
        fig = overlay_figure(img, m, f"{Path(row.image).name}: {row.pred}\n{probs}", lungs)
        plots.save_figure(fig, out / name, close=True)
        written.append(out / name)
    return written
