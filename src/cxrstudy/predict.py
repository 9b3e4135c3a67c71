"""``cxrstudy predict``: class probabilities, a lung QC and a Grad-CAM overlay for any X-ray files, from saved runs.

Same decoding and preprocessing as the study (``cxrstudy.inference``). By default a configuration's fold models
predict as one ensemble (mean class probability); ``run`` names a configuration or one run. Writes into ``--out``:
``predictions.csv`` (columns ``image, run_id, n_models, pred, prob_<class>..., qc``; ``run_id`` is the
configuration id for an ensemble, ``qc`` is empty for a film that passes the lung QC, else its flags, and says
``unchecked: no lung model`` when the profile has none), one ``<name>_gradcam.png`` per readable image (the mean
of the models' Grad-CAM maps for the ensemble's class) and ``unreadable.csv`` (file and reason) when some could
not be read.
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
from cxrstudy.inference import (
    Models,
    choose_models,
    decode_for_models,
    ensemble_frame,
    qc_problems,
    view_mask,
)


@dataclass
class PredictResult:
    """What a predict call wrote: the table, the overlay files, the unreadable files, the models used and whether
    a lung model checked the films."""

    models: Models
    predictions: pd.DataFrame
    overlays: list[Path]
    unreadable: pd.DataFrame
    lungs_checked: bool = False

    @property
    def run_id(self) -> str:
        """The configuration id of the ensemble (or the one run's id)."""
        return self.models.id

    @property
    def flagged(self) -> pd.DataFrame:
        """The predicted films that failed the lung QC (``image``, ``qc``): not films the models can judge."""
        if self.predictions.empty:
            return pd.DataFrame(columns=["image", "qc"])
        bad = self.predictions["qc"].map(lambda q: bool(qc_problems(q)))
        return self.predictions.loc[bad, ["image", "qc"]]


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
    """Predict every readable image with the chosen models (:func:`inference.choose_models`: by default the
    headline configuration's fold models as one ensemble) and write the outputs into ``out``."""
    out, paths = Path(out), [Path(p) for p in images]
    chosen = choose_models(profile, run)
    models, key = chosen.load(), chosen.key
    lungs_dir = chosen.dirs[0].parent.parent / "lungs"
    dec = decode_for_models(paths, {key}, lungs_dir if (lungs_dir / "model.json").is_file() else None, device)
    unreadable = pd.DataFrame([{"image": str(paths[i]), "reason": r} for i, r in dec.bad], columns=["image", "reason"])
    if len(unreadable):
        atomic_write_text(out / "unreadable.csv", unreadable.to_csv(index=False))
    if not dec.ok:
        return PredictResult(chosen, pd.DataFrame(), [], unreadable, dec.lungs_checked)
    meta = pd.DataFrame({"image": [str(paths[i]) for i in dec.ok], "run_id": chosen.id})
    preds = ensemble_frame(models, chosen.infos, dec.inputs[key], meta, device=device).assign(qc=dec.qc)
    classes = chosen.infos[0]["classes"]
    table = preds[["image", "run_id", "n_models", "pred", *(f"prob_{c}" for c in classes), "qc"]]
    atomic_write_text(out / "predictions.csv", table.to_csv(index=False))
    ok_paths = [paths[i] for i in dec.ok]
    overlays = _overlays(models, chosen.infos, dec, key, table, ok_paths, out, device) if cam else []
    return PredictResult(chosen, table, overlays, unreadable, dec.lungs_checked)


def _overlays(
    models: list, infos: list[dict], dec, key, table: pd.DataFrame, paths: list[Path], out: Path, device: str
) -> list[Path]:
    """One Grad-CAM overlay PNG per predicted image: the mean of the models' maps for the predicted class, with
    the lung outline when masks exist."""
    from cxrstudy import plots
    from cxrstudy.evaluation.saliency import gradcam_maps

    inputs, targets, dev = dec.inputs[key], list(table["pred"]), config.resolve_device(device)
    maps = np.mean([gradcam_maps(m, inputs, info, targets, device=dev) for m, info in zip(models, infos, strict=True)], 0)
    source = "Grad-CAM" if len(models) == 1 else f"Grad-CAM: mean of {len(models)} fold models"
    written = []
    for name, img, m, mask, row in zip(_overlay_names(paths), inputs, maps, dec.masks, table.itertuples(), strict=True):
        probs = ", ".join(f"{c} {getattr(row, f'prob_{c}'):.2f}" for c in infos[0]["classes"])
        lungs = view_mask(mask, key[2], key[4]) if mask is not None else None
        title = f"{Path(row.image).name}: {row.pred}\n{probs}\n{source}"
        if qc_problems(row.qc):
            title += f"\nQC failed: {row.qc}"
        fig = overlay_figure(img, m, title, lungs)
        plots.save_figure(fig, out / name, close=True)
        written.append(out / name)
    return written
