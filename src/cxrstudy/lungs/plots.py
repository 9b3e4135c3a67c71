"""Figures of the lung stage: training curve and mask-outline overlays per source."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from cxrstudy.plots import plot_learning_curve


def plot_training_curve(history: pd.DataFrame, best_epoch: int | None = None, ax: Axes | None = None) -> Axes:
    """Train / validation loss (BCE + (1 - Dice)) and validation Dice per epoch, the selected epoch marked."""
    if ax is None:
        ax = plt.subplots(figsize=(6.4, 3.6))[1]
    plot_learning_curve(
        history, ax, metric="valid_dice", labels=("train", "validation", "validation Dice (training size)"),
        ylabels=("BCE + (1 - Dice)", "Dice"), best_epoch=best_epoch or None, best_label="selected epoch",
    )  # fmt: skip
    ax.figure.tight_layout()
    return ax


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
