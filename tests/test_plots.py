"""The one learning-curve plotter: what each caller's figure shows (lines, marks, stage shading)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from cxrstudy.plots import plot_confusion, plot_learning_curve

HISTORY = pd.DataFrame({
    "epoch": [1, 2, 3, 4], "stage": [1, 1, 2, 2], "train_loss": [1.0, 0.8, 0.6, 0.5],
    "valid_loss": [0.9, 0.7, 0.75, 0.72], "valid_accuracy": [0.5, 0.6, 0.7, 0.8],
})  # fmt: skip


def _lines(ax: Axes) -> dict[str, np.ndarray]:
    twin = [a for a in ax.figure.axes if a is not ax]
    return {ln.get_label(): np.asarray(ln.get_ydata(), float) for a in [ax, *twin] for ln in a.get_lines()}


def test_learning_curve_draws_losses_metric_best_epoch_and_stages_on_the_given_axes():
    fig = Figure()
    ax = fig.subplots()
    out = plot_learning_curve(HISTORY, ax, best_epoch=2, title="run")
    assert out is ax and ax.get_title() == "run"
    lines = _lines(ax)
    np.testing.assert_array_equal(lines["train loss"], HISTORY["train_loss"])
    np.testing.assert_array_equal(lines["valid loss"], HISTORY["valid_loss"])
    np.testing.assert_array_equal(lines["valid accuracy"], HISTORY["valid_accuracy"])
    assert "best epoch 2" in lines
    assert len(ax.patches) == 2  # one shaded span per finetune stage
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["train loss", "valid loss", "best epoch 2", "valid accuracy"]


def test_small_panels_without_stages_or_best_epoch():
    ax = Figure().subplots()
    plot_learning_curve(HISTORY, ax, stages=False, small=True)
    assert not ax.patches and "best epoch" not in " ".join(_lines(ax))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train loss", "valid loss"]


def test_the_lung_stage_uses_the_same_plotter_for_dice():
    from cxrstudy.lungs.plots import plot_training_curve

    hist = HISTORY.drop(columns=["stage", "valid_accuracy"]).assign(valid_dice=[0.7, 0.8, 0.85, 0.9])
    ax = plot_training_curve(hist, best_epoch=3)
    lines = _lines(ax)
    np.testing.assert_array_equal(lines["validation Dice (training size)"], hist["valid_dice"])
    assert {"train", "validation", "selected epoch 3"} <= set(lines)
    assert ax.get_ylabel() == "BCE + (1 - Dice)"
    plt.close(ax.figure)


def test_confusion_returns_its_axes():
    ax = Figure().subplots()
    assert plot_confusion([[3, 1], [0, 4]], ["covid", "normal"], "t", ax=ax) is ax
    assert ax.get_xlabel() == "predicted" and ax.get_title() == "t"
