"""Shared plotting helpers for the notebooks; each stage adds its functions in its own section."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# ---------------------------------------------------------------------------------------------------------
# training (notebook 04)
# ---------------------------------------------------------------------------------------------------------


def plot_learning_curve(history: pd.DataFrame, title: str | None = None) -> Figure:
    """Train/valid loss and valid accuracy per epoch; finetune stages shaded, best epoch marked.

    Built without pyplot, so a notebook shows it only where it is displayed (``display(fig)``).
    """
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.subplots()
    ep = history["epoch"]
    ax.plot(ep, history["train_loss"], "o-", label="train loss")
    ax.plot(ep, history["valid_loss"], "s-", label="valid loss (composed)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if len(history):
        best = history.loc[history["valid_loss"].idxmin()]
        ax.axvline(best["epoch"], color="grey", ls=":", lw=1, label=f"best epoch {int(best['epoch'])}")
    if history["stage"].nunique() > 1:
        for stage, grp in history.groupby("stage"):
            lo, hi = grp["epoch"].min() - 0.5, grp["epoch"].max() + 0.5
            ax.axvspan(lo, hi, alpha=0.06 * int(stage), color="C2")
    ax2 = ax.twinx()
    ax2.plot(ep, history["valid_accuracy"], "^--", color="C3", label="valid accuracy")
    ax2.set_ylabel("accuracy")
    ax2.set_ylim(0, 1.02)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper center",
              bbox_to_anchor=(0.5, -0.2), ncol=4, frameon=False)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------
# evaluation (notebook 05, make evaluate)
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


def plot_confusion(cm, classes, title: str | None = None, ax=None) -> Figure:
    """Confusion matrix heat map (rows true, columns predicted) with counts and row percentages."""
    import numpy as np
    import seaborn as sns

    cm = np.asarray(cm)
    rows = cm.sum(axis=1, keepdims=True)
    pct = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    annot = np.array(
        [[f"{n}\n{100 * p:.0f}%" for n, p in zip(r, q, strict=True)] for r, q in zip(cm, pct, strict=True)]
    )
    fig, ax = (
        plt.subplots(figsize=(1.4 + 1.1 * len(classes), 1.0 + 1.0 * len(classes)))
        if ax is None
        else (ax.figure, ax)
    )
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
    return fig


def plot_roc_pr(y_true, probs, classes, title: str | None = None) -> Figure:
    """One-vs-rest ROC and precision-recall curves per class (scikit-learn curves)."""
    import numpy as np
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    y = np.asarray(y_true)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8.4, 3.6))
    for j, c in enumerate(classes):
        pos = y == c
        if pos.all() or not pos.any():
            continue
        fpr, tpr, _ = roc_curve(pos, probs[:, j])
        a1.plot(fpr, tpr, label=f"{c} (AUC {auc(fpr, tpr):.3f})")
        prec, rec, _ = precision_recall_curve(pos, probs[:, j])
        a2.step(rec, prec, where="post", label=f"{c} (prevalence {pos.mean():.2f})")
    a1.plot([0, 1], [0, 1], ":", color="grey")
    a1.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (one-vs-rest)")
    a2.set(xlabel="recall", ylabel="precision", title="precision-recall", ylim=(0, 1.02))
    for a in (a1, a2):
        a.legend(fontsize=7, loc="lower right" if a is a1 else "lower left")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


def plot_reliability(
    curve: pd.DataFrame, ece: float | None = None, title: str | None = None, ax=None
) -> Figure:
    """Reliability diagram from ``metrics.reliability_curve``: accuracy vs confidence per bin, counts as bars."""
    fig, ax = plt.subplots(figsize=(3.8, 3.6)) if ax is None else (ax.figure, ax)
    used = curve[curve["count"] > 0]
    width = float((curve["bin_upper"] - curve["bin_lower"]).iloc[0])
    ax.bar(
        used["bin_lower"],
        used["accuracy"],
        width=width,
        align="edge",
        edgecolor="k",
        alpha=0.7,
        label="accuracy in bin",
    )
    ax.plot(used["confidence"], used["accuracy"], "o", color="C3", ms=4, label="mean confidence")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="confidence (top class)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02))
    ttl = (title or "") + (f"\nECE {ece:.3f}" if ece is not None else "")
    ax.set_title(ttl.strip(), fontsize=8)
    ax.legend(fontsize=7, loc="upper left")
    return fig


def plot_per_source_heatmap(table: pd.DataFrame, title: str | None = None) -> Figure:
    """Heat map of accuracy, rows = runs, columns = source/label; ``table`` is already pivoted (NaN = none)."""
    import seaborn as sns

    longest = max((len(str(i)) for i in table.index), default=10)
    fig, ax = plt.subplots(figsize=(2.5 + 0.07 * longest + 1.0 * table.shape[1], 2.0 + 0.45 * table.shape[0]))
    sns.heatmap(
        table, annot=True, fmt=".2f", cmap="RdYlGn", vmin=0, vmax=1, ax=ax, cbar_kws={"label": "accuracy"}
    )
    ax.tick_params(axis="x", labelrotation=30)
    ax.set_xlabel("source / label")
    ax.set_ylabel("")
    ax.tick_params(labelsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def _image_grid(n: int, ncols: int) -> tuple[Figure, object]:
    """A figure of ``n`` image panels, ``ncols`` wide at most, axes switched off."""
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.4 * ncols, 2.6 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes


def plot_saliency_grid(images, cams, titles, ncols: int = 4, region=None) -> Figure:
    """Images with their Grad-CAM overlaid (jet, 45%); the lung region drawn as a dashed rectangle."""
    import numpy as np
    from matplotlib.patches import Rectangle

    fig, axes = _image_grid(len(images), ncols)
    for ax, img, cam, t in zip(axes.flat, images, cams, titles, strict=False):
        s = cam.shape[0]
        ax.imshow(np.asarray(img.resize((cam.shape[1], s))), cmap="gray")
        ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        if region is not None:
            x0, y0, x1, y1 = region
            ax.add_patch(
                Rectangle(
                    (x0 * cam.shape[1], y0 * s),
                    (x1 - x0) * cam.shape[1],
                    (y1 - y0) * s,
                    fill=False,
                    ls="--",
                    lw=0.8,
                    color="white",
                )
            )
        ax.set_title(t, fontsize=7)
    fig.tight_layout()
    return fig




# ---------------------------------------------------------------------------------------------------------
# data (notebook 00)
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# figures on the profile's index.html (notebook 05)
# ---------------------------------------------------------------------------------------------------------


def plot_intervals(
    panels: dict[str, pd.DataFrame],
    reference: dict[str, float] | None = None,
    xlabel: str = "accuracy (95% CI, patient bootstrap)",
    title: str | None = None,
) -> Figure:
    """Points with horizontal 95% error bars (tables of label, value, ci_low, ci_high; fractions), one panel
    per table, reference values as vertical lines; the x axis spans intervals and references within [0, 1]."""
    import numpy as np

    panels = {k: t for k, t in panels.items() if len(t)}
    rows = [len(t) for t in panels.values()] or [1]
    fig, axes = plt.subplots(
        len(rows), 1, figsize=(6.8, 0.9 + 0.3 * sum(rows) + 0.5 * len(rows)), sharex=True, squeeze=False,
        gridspec_kw={"height_ratios": rows},
    )
    lows = [float(np.nanmin(t[["value", "ci_low"]].to_numpy(dtype=float))) for t in panels.values()]
    lows += list((reference or {}).values())
    lo = max(0.0, min(lows, default=0.0) - 0.05)
    for ax, (name, t) in zip(axes[:, 0], panels.items(), strict=False):
        y = np.arange(len(t))
        v = t["value"].to_numpy(dtype=float)
        err = np.vstack([v - t["ci_low"].to_numpy(dtype=float), t["ci_high"].to_numpy(dtype=float) - v])
        ax.errorbar(v, y, xerr=np.nan_to_num(err), fmt="o", color="C0", ms=4, capsize=3, lw=1.2)
        ax.set_yticks(y, t["label"], fontsize=7)
        ax.set_ylim(len(t) - 0.5, -0.5)
        ax.grid(axis="x", color="0.9")
        if name:
            ax.set_title(name, fontsize=8, loc="left")
        for i, (ref, val) in enumerate((reference or {}).items()):
            ax.axvline(val, color=f"C{i + 1}", ls="-" if i == 0 else "--", lw=1.2, label=f"{ref} {100 * val:.2f}%")
    axes[-1, 0].set_xlim(lo, 1.0)
    axes[-1, 0].set_xlabel(xlabel, fontsize=8)
    if reference:
        axes[0, 0].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------
# evaluation: lung regions and the scorecard (notebook 05)
# ---------------------------------------------------------------------------------------------------------


def plot_saliency_regions(images, cams, titles, regions, ncols: int = 4) -> Figure:
    """Images with their Grad-CAM overlaid (jet, 45%) and each film's lung region (boolean, map grid) outlined."""
    import numpy as np

    fig, axes = _image_grid(len(images), ncols)
    for ax, img, cam, t, region in zip(axes.flat, images, cams, titles, regions, strict=False):
        ax.imshow(np.asarray(img.resize((cam.shape[1], cam.shape[0]))), cmap="gray")
        ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        if region is not None and np.asarray(region).any() and not np.asarray(region).all():
            ax.contour(np.asarray(region, dtype=float), levels=[0.5], colors="white", linewidths=0.8, linestyles="--")
        ax.set_title(t, fontsize=7)
    fig.tight_layout()
    return fig


def plot_scorecard(panels: dict[str, pd.DataFrame], xlabel: str = "value (95% CI)", title: str | None = None) -> Figure:
    """One panel per metric: rows (label, value, ci_low, ci_high, target, op) as points with horizontal
    intervals; the goal as a vertical line when all rows share it, else a marker per row; missing values
    are listed as "n/a"."""
    import numpy as np

    panels = {k: t for k, t in panels.items() if len(t)}
    rows = [len(t) for t in panels.values()] or [1]
    fig, axes = plt.subplots(
        len(rows), 1, figsize=(7.2, 1.0 + 0.32 * sum(rows) + 0.55 * len(rows)), sharex=True, squeeze=False,
        gridspec_kw={"height_ratios": rows},
    )
    for ax, (name, t) in zip(axes[:, 0], panels.items(), strict=False):
        y = np.arange(len(t))
        v = t["value"].to_numpy(dtype=float)
        lo, hi = t["ci_low"].to_numpy(dtype=float), t["ci_high"].to_numpy(dtype=float)
        err = np.nan_to_num(np.vstack([v - lo, hi - v]))
        ok = np.isfinite(v)
        ax.errorbar(v[ok], y[ok], xerr=err[:, ok], fmt="o", color="C0", ms=4, capsize=3, lw=1.2)
        for yi in y[~ok]:
            ax.text(0.01, yi, "n/a", fontsize=7, va="center", color="0.4")
        targets = t["target"].to_numpy(dtype=float)
        known = targets[np.isfinite(targets)]
        if len(known) and np.allclose(known, known[0]):
            ax.axvline(known[0], color="C3", ls="--", lw=1.2)  # the goal itself is in the panel title
        elif len(known):
            ax.plot(targets, y, "|", color="C3", ms=12, mew=2)  # a goal per row (S3: each run's majority + 5)
        ax.set_yticks(y, t["label"], fontsize=7)
        ax.set_ylim(len(t) - 0.5, -0.5)
        ax.grid(axis="x", color="0.9")
        ax.set_title(name, fontsize=8, loc="left")
    axes[-1, 0].set_xlim(0.0, 1.0)
    axes[-1, 0].set_xlabel(xlabel, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.985) if title else None)
    return fig
