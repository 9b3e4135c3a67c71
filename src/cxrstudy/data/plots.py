"""Figures of the data step (notebook 00): counts per source, sample films, near-duplicate pairs."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure


def plot_counts_by_source(manifest: pd.DataFrame, title: str | None = None) -> Figure:
    """Stacked bars of images per source, coloured by label, one panel per split."""
    from cxrstudy.config import CLASSES

    splits = [s for s in ("train", "val", "test") if s in set(manifest["split"])] or ["all"]
    fig, axes = plt.subplots(1, len(splits), figsize=(3.6 * len(splits), 3.4), sharey=True, squeeze=False)
    sources = list(dict.fromkeys(manifest["source_name"]))
    for ax, split in zip(axes[0], splits, strict=True):
        part = manifest if split == "all" else manifest[manifest["split"] == split]
        table = pd.crosstab(part["source_name"], part["label"]).reindex(index=sources, columns=list(CLASSES), fill_value=0)
        table.plot(kind="bar", stacked=True, ax=ax, legend=ax is axes[0][-1], width=0.8)
        ax.set_title(f"{split} ({len(part)} images)", fontsize=9)
        ax.set_xlabel("")
        ax.set_ylabel("images")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_sample_grid(manifest: pd.DataFrame, image_root, per_cell: int = 4, seed: int = 0) -> Figure:
    """A few random processed images for every (label, source) pair present: one row per pair."""
    from pathlib import Path

    from PIL import Image

    root = Path(image_root)
    groups = list(manifest.groupby(["label", "source_name"], sort=True))
    fig, axes = plt.subplots(len(groups), per_cell, figsize=(1.6 * per_cell, 1.7 * len(groups)), squeeze=False)
    for row, ((label, source), g) in enumerate(groups):
        pick = g.sample(n=min(per_cell, len(g)), random_state=seed)
        for col in range(per_cell):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col < len(pick):
                with Image.open(root / pick["image"].iloc[col]) as im:
                    ax.imshow(im.convert("L"), cmap="gray", vmin=0, vmax=255)
            else:
                ax.axis("off")
            if col == 0:
                ax.set_ylabel(f"{label}\n{source} ({len(g)})", fontsize=8)
    fig.tight_layout()
    return fig


def plot_image_pairs(pairs: list[tuple[object, object, str]], ncols: int = 2) -> Figure:
    """Side-by-side pairs of images (paths) with a caption each, e.g. duplicates found across sources."""
    from PIL import Image

    nrows = max(1, -(-len(pairs) // ncols))
    fig, axes = plt.subplots(nrows, 2 * ncols, figsize=(2.4 * 2 * ncols, 2.5 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, (a, b, caption) in enumerate(pairs):
        r, c = divmod(i, ncols)
        for j, p in enumerate((a, b)):
            ax = axes[r][2 * c + j]
            with Image.open(p) as im:
                ax.imshow(im.convert("L"), cmap="gray", vmin=0, vmax=255)
            ax.set_title(caption if j == 0 else "", fontsize=7, loc="left")
    fig.tight_layout()
    return fig
