"""Grad-CAM saliency (pytorch-grad-cam) on a trained ``Classifier`` and the share of it inside the lung field.

The target layer is the backbone's last convolutional stage, ``Classifier.cam_layer()`` (the spec's
``layout.cam_layer``: EfficientNet ``bn2`` after ``conv_head``; ResNet the last block of ``layer4``;
DenseNet, VGG, AlexNet ``features``). The class score explained is the class's logit, or with class
decomposition the log-sum-exp of its subclass logits (the log of the composed class probability up to
a constant shared by all classes).
The lung region of a film is its segmented lungs when masks are given (``lungs.stage.load_lung_masks``,
at the processed film's size), resized to the map's grid; otherwise, or for a film whose segmentation
failed QC, the fixed rectangle :data:`cxrstudy.lungs.region.LUNG_REGION` (``lungs.region.cam_region``). A uniform saliency map's in-lung share is the region's area fraction, recorded per image
(``uniform_share``). Maps are upsampled from ``cam_grid`` cells per side (input size / 32): at 160 px,
5x5 cells, too coarse to tell lung from its surroundings.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from cxrstudy.lungs.region import LUNG_REGION, cam_region, lung_mask
from cxrstudy.runspec import RunSpec


@torch.no_grad()
def cam_grid(model: nn.Module, image_size: int) -> int:
    """Cells per side of the target layer's map at this input size (Grad-CAM's real resolution)."""
    shapes: list[tuple[int, ...]] = []
    handle = model.cam_layer().register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    try:
        device = next(model.parameters()).device
        model.eval()(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        handle.remove()
    return int(min(shapes[-1][-2:]))


def class_output_indices(run_info: dict) -> dict[str, list[int]]:
    """Model output indices belonging to each task class (several with decomposition, else one)."""
    classes = list(run_info["classes"])
    subclasses = run_info.get("subclasses") or []
    if not run_info.get("decomposition") or not subclasses:
        return {c: [i] for i, c in enumerate(classes)}
    parent = run_info.get("parent_of_subclass") or run_info.get("parent_of")
    if parent is None:
        raise ValueError("run.json: decomposition run without parent_of_subclass")
    parents = [parent[s] for s in subclasses] if isinstance(parent, dict) else list(parent)
    if len(parents) != len(subclasses):
        raise ValueError(f"run.json: {len(subclasses)} subclasses but {len(parents)} parents")
    out = {c: [i for i, p in enumerate(parents) if p == c] for c in classes}
    empty = [c for c, idx in out.items() if not idx]
    if empty:
        raise ValueError(f"run.json: classes {empty} have no subclass")
    return out


class ClassScoreTarget:
    """Grad-CAM target: log-sum-exp of a class's output logits (its plain logit when it has one)."""

    def __init__(self, indices: Sequence[int]) -> None:
        self.indices = list(indices)

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(model_output[..., self.indices], dim=-1)


def lung_share(cam: np.ndarray, region: tuple[float, float, float, float] = LUNG_REGION) -> float:
    """Fraction of a (H, W) non-negative saliency map's mass inside the central lung region (NaN if all zero)."""
    cam = np.asarray(cam, dtype=float)
    if cam.ndim != 2:
        raise ValueError(f"expected a (H, W) saliency map, got shape {cam.shape}")
    if (cam < 0).any():
        raise ValueError("saliency map has negative values")
    total = cam.sum()
    if total <= 0:
        return float("nan")
    return float(cam[lung_mask(cam.shape[0], cam.shape[1], region)].sum() / total)


def region_share(cam: np.ndarray, region: np.ndarray) -> float:
    """Fraction of a (H, W) non-negative saliency map's mass inside a boolean region (NaN if all zero)."""
    cam = np.asarray(cam, dtype=float)
    if cam.shape != np.shape(region):
        raise ValueError(f"map {cam.shape} and region {np.shape(region)} differ in shape")
    if (cam < 0).any():
        raise ValueError("saliency map has negative values")
    total = cam.sum()
    return float(cam[np.asarray(region, bool)].sum() / total) if total > 0 else float("nan")


def gradcam_maps(
    model: nn.Module,
    images: Sequence[Image.Image],
    run_info: dict,
    target_classes: Sequence[str],
    device: str | torch.device = "cpu",
    batch_size: int = 16,
) -> np.ndarray:
    """Grad-CAM maps (N, S, S) in [0, 1] for decoded L images, each explaining its ``target_classes`` entry."""
    from pytorch_grad_cam import GradCAM

    from cxrstudy.models import model_transform

    if len(images) != len(target_classes):
        raise ValueError(f"{len(images)} images but {len(target_classes)} target classes")
    indices = class_output_indices(run_info)
    unknown = sorted(set(target_classes) - set(indices))
    if unknown:
        raise ValueError(f"target classes {unknown} are not among the run's classes {list(indices)}")
    transform = model_transform(model.spec, int(run_info["image_size"]))
    model = model.to(device)
    saved = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():  # a frozen backbone would give no gradients at the target layer
        p.requires_grad_(True)
    out: list[np.ndarray] = []
    try:
        with GradCAM(model=model, target_layers=[model.cam_layer()]) as cam:
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                x = torch.stack([transform(im) for im in chunk]).to(device)
                targets = [ClassScoreTarget(indices[c]) for c in target_classes[start : start + batch_size]]
                out.append(np.asarray(cam(input_tensor=x, targets=targets), dtype=np.float32))
    finally:
        for p, r in zip(model.parameters(), saved, strict=True):
            p.requires_grad_(r)
    return np.concatenate(out) if out else np.zeros((0, 0, 0), dtype=np.float32)


def sample_for_saliency(
    preds: pd.DataFrame, classes: Sequence[str], per_class: int, seed: int = 0
) -> pd.DataFrame:
    """Up to ``per_class`` correct and ``per_class`` wrong test images per true class (seeded sample)."""
    df = preds[preds["split"] == "test"] if "split" in preds.columns else preds
    df = df.assign(outcome=np.where(df["pred"] == df["label"], "correct", "wrong"))
    parts = []
    for cls in classes:
        for outcome in ("correct", "wrong"):
            pool = df[(df["label"] == cls) & (df["outcome"] == outcome)]
            if len(pool):
                parts.append(pool.sample(n=min(per_class, len(pool)), random_state=seed))
    if not parts:
        return df.iloc[0:0]
    return pd.concat(parts).reset_index(drop=True)


class ViewMasks:
    """Lung masks by image in the coordinates of a run's input view (``inference.view_mask``)."""

    def __init__(self, masks: dict[str, np.ndarray], view: str, margin: float) -> None:
        self.masks, self.view, self.margin = masks, view, margin

    def get(self, name: str) -> np.ndarray | None:
        """The film's mask cropped like the view's image, or None."""
        from cxrstudy.inference import view_mask

        mask = self.masks.get(name)
        return None if mask is None else view_mask(mask, self.view, self.margin)


#: Columns of a saliency table.
SALIENCY_COLUMNS = (
    "image", "source", "label", "pred", "outcome", "lung_share", "uniform_share", "region", "cam_grid", "image_size",
)


def saliency_for_run(
    model: nn.Module,
    run_info: dict,
    preds: pd.DataFrame,
    image_root: Path,
    per_class: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
    masks: dict[str, np.ndarray] | ViewMasks | None = None,
) -> tuple[pd.DataFrame, list[Image.Image], np.ndarray, list[np.ndarray]]:
    """Grad-CAM of a run's sampled test images (per true class and outcome), explaining the predicted class.

    Returns the sample table (:data:`SALIENCY_COLUMNS`: ``lung_share`` inside the film's lung region,
    ``uniform_share`` its area fraction, ``region`` segmented / rectangle), the decoded images, the maps
    and the regions on the map grid. ``masks``: segmented lungs by image (None: the rectangle).
    """
    from cxrstudy.images import load_xray

    sample = sample_for_saliency(preds, run_info["classes"], per_class, seed)
    images = [load_xray(Path(image_root) / p) for p in sample["image"]]
    cams = gradcam_maps(model, images, run_info, list(sample["pred"]), device=device)
    regions, kinds = [], []
    for name, img, cam in zip(sample["image"], images, cams, strict=True):
        region, kind = cam_region((masks or {}).get(name), img.size, cam.shape)
        regions.append(region)
        kinds.append(kind)
    sample = sample.assign(
        lung_share=[region_share(c, r) for c, r in zip(cams, regions, strict=True)],
        uniform_share=[float(r.mean()) for r in regions],
        region=kinds,
        cam_grid=cam_grid(model, int(run_info["image_size"])),
        image_size=int(run_info["image_size"]),
    )
    return sample[[c for c in SALIENCY_COLUMNS if c in sample.columns]], images, cams, regions


def saliency_for_runs(
    runs: Sequence[dict],
    image_root: Path,
    per_class: int,
    fig_dir: Path,
    seed: int = 0,
    device: str | torch.device = "cpu",
    masks: dict[str, np.ndarray] | None = None,
    manifest: pd.DataFrame | None = None,
    profile: str | None = None,
) -> pd.DataFrame:
    """Grad-CAM of every run (``reporting.results.load_runs`` items) on its films as it saw them (its input view,
    rendered from ``manifest`` and ``profile`` when it has one); saves ``saliency_<run_id>.png`` grids (lung
    region outlined) under ``fig_dir`` and returns one table (run_id and :data:`SALIENCY_COLUMNS`)."""
    from cxrstudy import plots
    from cxrstudy.evaluation import figures
    from cxrstudy.evaluation.runfeatures import run_image_root
    from cxrstudy.training import load_run_model

    parts = []
    for run in runs:
        model, info = load_run_model(run["dir"])
        spec = RunSpec.from_record(info)
        run_id = spec.run_id
        view, _, margin = spec.view
        root = run_image_root(info, manifest, profile, image_root)
        run_masks = masks if masks is None or view == "full" else ViewMasks(masks, view, margin)
        table, images, cams, regions = saliency_for_run(
            model, info, run["predictions"], root, per_class, seed, device, run_masks
        )
        if len(table) == 0:
            continue
        titles = [
            f"{r.label}→{r.pred} ({r.outcome})\nin-lung {r.lung_share:.2f} (uniform {r.uniform_share:.2f})"
            for r in table.itertuples()
        ]
        fig = figures.plot_saliency_regions(images, cams, titles, regions, ncols=4)
        fig.suptitle(spec.label("  "), fontsize=8, y=1.02)
        plots.save_figure(fig, Path(fig_dir) / f"saliency_{run_id}.png", close=True)
        parts.append(table.assign(run_id=run_id))
    return (
        pd.concat(parts, ignore_index=True)
        if parts
        else pd.DataFrame(columns=["run_id", *SALIENCY_COLUMNS])
    )
