"""fastai learner: layer groups, callbacks, one-cycle fit stages, and prediction tables."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from fastai.callback.core import Callback
from fastai.callback.schedule import fit_one_cycle, lr_find, valley  # noqa: F401  (patches Learner)
from fastai.callback.tracker import EarlyStoppingCallback, SaveModelCallback
from fastai.callback.training import BnFreeze
from fastai.data.core import DataLoaders
from fastai.learner import AvgMetric, Learner
from fastai.torch_core import params
from torch import nn
from torch.utils.data import DataLoader

from cxrstudy.models import Classifier
from cxrstudy.training.labels import ComposedLoss, LabelSpace, compose_predictions
from cxrstudy.training.trainconfig import TrainConfig

#: Columns every predictions.csv starts with (then prob_<class>…, pred, [prob_sub_<subclass>…, pred_hard]).
PREDICTION_ID_COLUMNS: tuple[str, ...] = ("image", "split", "label", "source", "patient_group")
HISTORY_COLUMNS: tuple[str, ...] = (
    "epoch",
    "stage",
    "train_loss",
    "valid_loss",
    "valid_accuracy",
    "lr",
    "seconds",
    "trainable_params",
)


def count_trainable(model: nn.Module) -> int:
    """Number of parameters that currently require gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def group_splitter(model: Classifier) -> list[list[nn.Parameter]]:
    """fastai splitter from ``Classifier.layer_groups()``; checks the groups cover every parameter once."""
    groups = [list(params(g)) for g in model.layer_groups()]
    ids = [id(p) for g in groups for p in g]
    if len(ids) != len(set(ids)) or set(ids) != {id(p) for p in model.parameters()}:
        raise ValueError("Classifier.layer_groups() must cover every parameter exactly once")
    return groups


def finetune_schedule(n_groups: int, stages: Sequence[int] | None = None) -> list[int]:
    """Trailing groups unfrozen per stage: default head only, then + last backbone group, then all."""
    sched = list(stages) if stages is not None else sorted({1, min(2, n_groups), n_groups})
    if not sched or sched != sorted(set(sched)) or sched[0] < 1 or sched[-1] > n_groups:
        raise ValueError(f"finetune stages must increase strictly within 1..{n_groups}, got {sched}")
    return sched


class ChannelsLast(Callback):
    """Feed image batches in channels-last memory format (1.3-2x faster convolutions on CPU)."""

    order = 1

    def before_batch(self) -> None:
        if self.xb[0].dim() == 4:
            self.learn.xb = (self.xb[0].contiguous(memory_format=torch.channels_last), *self.xb[1:])


class StepCounter(Callback):
    """Counts optimizer steps of the fits it joins (fastai's ``after_step`` fires once per training batch's
    step; lr_find's steps are not counted: it runs without this callback and restores the weights)."""

    order = 60

    def __init__(self) -> None:
        self.steps = 0

    def after_step(self) -> None:
        self.steps += 1


class History(Callback):
    """Collects one history row per epoch (runs after Recorder, before the trackers may stop the fit)."""

    order = 55

    def __init__(self, rows: list[dict[str, Any]], stage: int) -> None:
        self.rows, self.stage = rows, stage

    def before_fit(self) -> None:
        self.trainable = count_trainable(self.learn.model)

    def before_epoch(self) -> None:
        self.t0, self.n_lr = time.perf_counter(), len(self.recorder.lrs)

    def after_epoch(self) -> None:
        train_loss, valid_loss, acc = (float(v) for v in self.learn.final_record[:3])
        lrs = self.recorder.lrs[self.n_lr :]
        self.rows.append(
            {
                "epoch": len(self.rows) + 1,
                "stage": self.stage,
                "train_loss": train_loss,
                "valid_loss": valid_loss,
                "valid_accuracy": acc,
                "lr": float(np.mean(lrs)) if lrs else float("nan"),
                "seconds": time.perf_counter() - self.t0,
                "trainable_params": self.trainable,
            }
        )


def make_learner(
    model: nn.Module,
    dls: DataLoaders,
    loss: ComposedLoss,
    *,
    lr: float,
    path: Path,
    splitter: Callable | None = None,
    wd: float | None = None,
) -> Learner:
    """fastai Learner with the composed loss and accuracy; frozen batch-norm layers stay frozen."""
    kw: dict[str, Any] = {"splitter": splitter} if splitter is not None else {}
    return Learner(
        dls,
        model,
        loss_func=loss,
        metrics=[AvgMetric(loss.composed_accuracy)],
        lr=lr,
        wd=wd,
        path=path,
        model_dir=".",
        train_bn=False,
        cbs=[ChannelsLast(), BnFreeze()],
        **kw,
    )


def make_saver() -> SaveModelCallback:
    """Best-checkpoint callback on the composed valid loss, kept across fit stages."""
    return SaveModelCallback(monitor="valid_loss", fname="best", reset_on_fit=False)


def fit_stage(
    learn: Learner,
    epochs: int,
    lr: float | slice,
    *,
    stage: int,
    history: list[dict[str, Any]],
    saver: SaveModelCallback,
    patience: int,
    counter: StepCounter | None = None,
) -> None:
    """One one-cycle fit with best-checkpoint (kept across stages) and early stopping on the composed valid loss;
    ``counter`` counts its optimizer steps."""
    cbs = [History(history, stage), saver, EarlyStoppingCallback(monitor="valid_loss", patience=patience)]
    learn.fit_one_cycle(epochs, lr, cbs=[*cbs, counter] if counter is not None else cbs)
    bad = [r["epoch"] for r in history if not math.isfinite(r["valid_loss"])]
    if bad:
        raise FloatingPointError(f"training diverged: non-finite validation loss at epoch(s) {bad}; lower lr")


def choose_lr(learn: Learner, cfg: TrainConfig) -> dict[str, Any]:
    """The peak learning rate by the one rule of every scenario (``TrainConfig``): with ``use_lr_find``,
    fastai's ``lr_find`` (``suggest_funcs=valley``, ``cfg.lr_find_iters`` steps) on the training data in the
    learner's first-stage state, clamped to ``cfg.lr_range``; otherwise ``cfg.lr``. Facts for run.json."""
    if not cfg.use_lr_find:
        return {"lr": cfg.lr, "lr_rule": "fixed: TrainConfig.lr"}
    lo, hi = cfg.lr_range
    found = float(learn.lr_find(num_it=cfg.lr_find_iters, show_plot=False, suggest_funcs=(valley,)).valley)
    lr = min(max(found, lo), hi) if math.isfinite(found) else cfg.lr
    rule = (
        f"lr_find valley over {cfg.lr_find_iters} steps on the training data, clamped to [{lo:g}, {hi:g}]"
        + ("" if math.isfinite(found) else "; no finite suggestion, TrainConfig.lr used")
    )
    return {"lr": lr, "lr_found": found if math.isfinite(found) else None, "lr_rule": rule}


@torch.inference_mode()
def predict_loader(model: nn.Module, loader: DataLoader, device: torch.device) -> np.ndarray:
    """Softmax subclass probabilities (n, n_subclasses) of the model in eval mode."""
    model.eval().to(device)
    out = []
    for batch in loader:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        out.append(torch.softmax(model(x).float(), dim=1).cpu().numpy())
    n_out = model.head.out_features if hasattr(model, "head") else 0
    return np.concatenate(out) if out else np.zeros((0, n_out), dtype=np.float32)


def predictions_frame(
    rows: pd.DataFrame, sub_probs: np.ndarray, space: LabelSpace, with_subclasses: bool
) -> pd.DataFrame:
    """The contract's predictions table for ``rows``; subclass columns and ``pred_hard`` when decomposition is on."""
    from cxrstudy.decomposition import compose_hard

    probs = compose_predictions(sub_probs, space)
    out = rows.loc[:, list(PREDICTION_ID_COLUMNS)].reset_index(drop=True)
    for j, c in enumerate(space.classes):
        out[f"prob_{c}"] = probs[:, j]
    out["pred"] = [space.classes[j] for j in probs.argmax(1)]
    if with_subclasses:
        for j, s in enumerate(space.subclasses):
            out[f"prob_sub_{s}"] = sub_probs[:, j]
        hard = np.asarray(compose_hard(sub_probs, list(space.subclasses), list(space.classes)))
        out["pred_hard"] = [space.classes[j] for j in hard]
    return out
