"""Shared plotting helpers for the notebooks; each stage adds its functions in its own section."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# ---------------------------------------------------------------------------------------------------------
# learning curves (training runs, evaluation grid, lung stage)
# ---------------------------------------------------------------------------------------------------------


def plot_learning_curve(
    history: pd.DataFrame,
    ax: Axes | None = None,
    *,
    metric: str = "valid_accuracy",
    labels: tuple[str, str, str] = ("train loss", "valid loss", "valid accuracy"),
    ylabels: tuple[str, str] = ("loss", "accuracy"),
    best_epoch: int | None = None,
    best_label: str = "best epoch",
    stages: bool = True,
    small: bool = False,
    title: str | None = None,
) -> Axes:
    """Train and valid loss per epoch, and ``metric`` on a twin axis from 0 to 1, on ``ax``; ``best_epoch``
    marked, finetune stages (several ``stage`` values) shaded when ``stages``; ``small`` for grid panels
    (small markers, legend inside). Returns the loss Axes."""
    ax = ax if ax is not None else plt.gca()
    ms, fs = (3, 7) if small else (None, None)
    ep = history["epoch"]
    ax.plot(ep, history["train_loss"], "o-", ms=ms, label=labels[0])
    ax.plot(ep, history["valid_loss"], "s-", ms=ms, label=labels[1])
    ax.set_xlabel("epoch", fontsize=fs)
    if not small:
        ax.set_ylabel(ylabels[0])
    if best_epoch is not None:
        ax.axvline(best_epoch, color="grey", ls=":", lw=1, label=f"{best_label} {int(best_epoch)}")
    if stages and "stage" in history and history["stage"].nunique() > 1:
        for stage, grp in history.groupby("stage"):
            lo, hi = grp["epoch"].min() - 0.5, grp["epoch"].max() + 0.5
            ax.axvspan(lo, hi, alpha=0.06 * int(stage), color="C2")
    ax2 = ax.twinx()
    ax2.plot(ep, history[metric], "^--", ms=ms, color="C3", label=labels[2])
    ax2.set_ylim(0, 1.02)
    if small:
        ax.legend(fontsize=6)
    else:
        ax2.set_ylabel(ylabels[1])
        lines, lines2 = ax.get_legend_handles_labels(), ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper center",
                  bbox_to_anchor=(0.5, -0.2), ncol=4, frameon=False)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        ax.set_title(title, fontsize=fs or 9)
    return ax


# ---------------------------------------------------------------------------------------------------------
# saving, and the confusion matrix (notebooks 04, 05, make evaluate)
# ---------------------------------------------------------------------------------------------------------


def save_figure(fig: Figure, path, dpi: int = 110, close: bool = False) -> None:
    """Save a figure as PNG through a temporary file in the same folder; ``close`` frees it (loops, scripts)."""
    from cxrstudy.fileio import atomic_path

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        if close:
            plt.close(fig)


def plot_confusion(cm, classes, title: str | None = None, ax: Axes | None = None) -> Axes:
    """Confusion matrix heat map (rows true, columns predicted) with counts and row percentages."""
    import numpy as np
    import seaborn as sns

    cm = np.asarray(cm)
    rows = cm.sum(axis=1, keepdims=True)
    pct = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    annot = np.array(
        [[f"{n}\n{100 * p:.0f}%" for n, p in zip(r, q, strict=True)] for r, q in zip(cm, pct, strict=True)]
    )
    if ax is None:
        ax = plt.subplots(figsize=(1.4 + 1.1 * len(classes), 1.0 + 1.0 * len(classes)))[1]
    sns.heatmap(
        pct,
        annot=annot,
        fmt="",
        cmap="Blues",
        vmin=0,
        vmax=1,
        cbar=False,
        ax=ax,
        xticklabels=classes,
        yticklabels=classes,
    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=8)
    return ax


# ---------------------------------------------------------------------------------------------------------
# features and decomposition (notebooks 02, 03)
# ---------------------------------------------------------------------------------------------------------


def plot_embedding(coords, hue, title: str | None = None, ax=None, legend_title: str | None = None) -> Figure:
    """2-D embedding scatter, one colour per category of ``hue`` (label, source or subclass), with counts."""
    import numpy as np

    coords = np.asarray(coords)
    hue = np.asarray(hue, dtype=str)
    fig, ax = plt.subplots(figsize=(5.6, 4.4)) if ax is None else (ax.figure, ax)
    cats = sorted(set(hue))
    cmap = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")
    for i, cat in enumerate(cats):
        m = hue == cat
        ax.scatter(coords[m, 0], coords[m, 1], s=10, alpha=0.7, color=cmap(i % cmap.N), label=f"{cat} ({m.sum()})")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=1.5, title=legend_title, title_fontsize=7, loc="best")
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def plot_silhouettes(silhouettes: dict, chosen: dict | None = None, title: str | None = None) -> Figure:
    """Silhouette of k-means against k, one line per class; the k in use is circled."""
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    for i, (cls, by_k) in enumerate(silhouettes.items()):
        ks = sorted(int(k) for k in by_k)
        ax.plot(ks, [by_k[k] for k in ks], "o-", color=f"C{i}", label=cls)
        if chosen and chosen.get(cls) in by_k:
            k = chosen[cls]
            ax.plot([k], [by_k[k]], "o", ms=13, mfc="none", mec=f"C{i}")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("k (subclasses)")
    ax.set_ylabel("silhouette (training rows)")
    ax.legend(fontsize=8)
    ax.set_title(title or "k-means silhouette per class (circled: k used)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_subclass_sizes(sizes: dict, parent_of: dict, title: str | None = None) -> Figure:
    """Bar chart of training images per subclass, coloured by parent class."""
    parents = list(dict.fromkeys(parent_of[s] for s in sizes))
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(sizes), 3.2))
    colors = [f"C{parents.index(parent_of[s])}" for s in sizes]
    bars = ax.bar(list(sizes), list(sizes.values()), color=colors)
    ax.bar_label(bars, fontsize=7)
    ax.set_ylabel("training images")
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    ax.set_title(title or "subclass sizes", fontsize=9)
    fig.tight_layout()
    return fig


def plot_subclass_examples(subclass_of: pd.Series, image_root, per_subclass: int = 4, seed: int = 0) -> Figure:
    """Grid of example training images (rows: subclasses; ``subclass_of`` is indexed by image path)."""
    from pathlib import Path

    from cxrstudy.images import load_xray

    subs = list(dict.fromkeys(sorted(subclass_of.unique())))
    fig, axes = plt.subplots(len(subs), per_subclass, figsize=(1.6 * per_subclass, 1.7 * len(subs)), squeeze=False)
    for r, sub in enumerate(subs):
        members = subclass_of[subclass_of == sub]
        picks = members.sample(n=min(per_subclass, len(members)), random_state=seed).index
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c < len(picks):
                ax.imshow(load_xray(Path(image_root) / picks[c]), cmap="gray", vmin=0, vmax=255)
        axes[r][0].set_title(f"{sub} (n={len(members)})", fontsize=8, loc="left")
    fig.tight_layout()
    return fig
