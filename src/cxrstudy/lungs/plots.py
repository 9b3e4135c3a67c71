"""Figures of the lung stage: training curve and mask-outline overlays per source."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle


def plot_training_curve(history: pd.DataFrame, best_epoch: int | None = None) -> Figure:
    """Train / validation loss and validation Dice per epoch."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot(history["epoch"], history["train_loss"], label="train")
    ax1.plot(history["epoch"], history["valid_loss"], label="validation")
    ax1.set(xlabel="epoch", ylabel="BCE + (1 - Dice)", title="loss")
    ax1.legend()
    ax2.plot(history["epoch"], history["valid_dice"], color="C2")
    if best_epoch:
        ax2.axvline(best_epoch, ls="--", color="grey", label=f"selected epoch {best_epoch}")
        ax2.legend(loc="lower right")
    ax2.set(xlabel="epoch", ylabel="Dice", title="validation Dice (training size)")
    fig.tight_layout()
    return fig


def pick_examples(
    table: pd.DataFrame, manifest: pd.DataFrame, per_source: int, seed: int = 0
) -> pd.DataFrame:
    """Up to ``per_source`` rows of ``table`` per source (random, seeded), sources in alphabetical order."""
    src = manifest.set_index("image")["source_name"]
    t = table.assign(source_name=table["image"].map(src))
    parts = []
    for i, (_, g) in enumerate(sorted(t.groupby("source_name"), key=lambda kv: kv[0])):
        parts.append(g.sample(min(per_source, len(g)), random_state=seed + i))
    return pd.concat(parts) if parts else t.iloc[:0]


def plot_overlays(
    rows: pd.DataFrame,
    masks: dict[str, np.ndarray],
    image_root: Path,
    ncols: int = 6,
    truth: dict[str, np.ndarray] | None = None,
    title_col: str = "source_name",
) -> Figure:
    """Films with the mask outline (red), the lung box (yellow; dashed when QC failed) and, when given,
    the reference mask's outline (cyan). ``rows`` needs ``image``, the box columns and ``qc_pass``."""
    from cxrstudy.images import load_xray

    n = len(rows)
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.1 * ncols, 2.3 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, row in zip(axes.ravel(), rows.itertuples(index=False), strict=False):
        img = np.asarray(load_xray(Path(image_root) / row.image))
        ax.imshow(img, cmap="gray", vmin=0, vmax=255)
        ok = str(row.qc_pass).lower() in ("true", "1")
        if truth is not None and row.image in truth:
            ax.contour(truth[row.image].astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
        if ok:
            ax.contour(masks[row.image].astype(float), levels=[0.5], colors="red", linewidths=0.8)
        ax.add_patch(
            Rectangle(
                (row.x0 - 0.5, row.y0 - 0.5),
                row.x1 - row.x0,
                row.y1 - row.y0,
                fill=False,
                ec="yellow",
                lw=0.8,
                ls="-" if ok else "--",
            )
        )
        label = str(getattr(row, title_col, ""))
        ax.set_title(label if ok else f"{label}: QC fail", fontsize=7, color="black" if ok else "red")
    fig.tight_layout()
    return fig
