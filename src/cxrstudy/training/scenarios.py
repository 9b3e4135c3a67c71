"""The fits of each scenario: shallow (head on cached features) and deep / finetune / scratch (images).

Every scenario takes its peak learning rate from one rule (``learner.choose_lr``) and reports its budget:
the planned optimizer steps (``epochs`` x batches per epoch, finetune's epochs split over its stages) and
the steps counted by a fastai callback (``learner.StepCounter``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cxrstudy.models import Classifier
from cxrstudy.training.data import (
    BALANCE_CLIP,
    TensorBatches,
    make_loader,
    source_balance_weights,
    train_augmentation,
)
from cxrstudy.training.labels import ComposedLoss
from cxrstudy.training.learner import (
    StepCounter,
    choose_lr,
    finetune_schedule,
    fit_stage,
    group_splitter,
    make_learner,
    make_saver,
)
from cxrstudy.training.trainconfig import BUDGET_RULE, TrainConfig


def _feature_loaders(
    feats: pd.DataFrame, rows: pd.DataFrame, targets: np.ndarray, head: nn.Linear, cfg: TrainConfig
) -> list[DataLoader]:
    """Train and val loaders of cached features (no workers: the tensors are in memory)."""
    missing = set(rows.loc[rows["split"].isin(["train", "val"]), "image"]) - set(feats.index)
    if missing:
        raise ValueError(
            f"extract_features returned no features for {len(missing)} image(s), e.g. {sorted(missing)[:3]}"
        )
    loaders = []
    for split in ("train", "val"):
        m = (rows["split"] == split).to_numpy()
        x = torch.tensor(feats.loc[rows.loc[m, "image"]].to_numpy(dtype=np.float32))
        if x.shape[1] != head.in_features:
            raise ValueError(f"features have {x.shape[1]} columns, the head expects {head.in_features}")
        ds = TensorDataset(x, torch.as_tensor(targets[m]))
        loaders.append(make_loader(ds, cfg.batch_size, train=split == "train", seed=cfg.train_seed))
    return loaders


def _budget(
    cfg: TrainConfig, steps_per_epoch: int, epochs: list[int], counter: StepCounter
) -> dict[str, Any]:
    """The run's budget facts for run.json: planned and counted optimizer steps."""
    return {
        "budget_rule": BUDGET_RULE,
        "stage_epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "budget_steps": steps_per_epoch * sum(epochs),
        "optimizer_steps": counter.steps,
    }


def _fit_once(
    learn: Learner,
    cfg: TrainConfig,
    lr: float,
    history: list[dict[str, Any]],
    counter: StepCounter | None = None,
) -> StepCounter:
    """One fit stage of ``cfg.epochs`` at peak ``lr`` (shallow, deep, scratch); returns its step counter."""
    counter = counter if counter is not None else StepCounter()
    fit_stage(
        learn,
        cfg.epochs,
        lr,
        stage=1,
        history=history,
        saver=make_saver(),
        patience=cfg.patience,
        counter=counter,
    )
    return counter


def train_shallow(
    model: Classifier,
    rows: pd.DataFrame,
    targets: np.ndarray,
    loss: ComposedLoss,
    cfg: TrainConfig,
    *,
    feature_manifest: pd.DataFrame,
    image_root: Path,
    device: torch.device,
    feature_cache_dir: Path | None,
    workdir: Path,
    history: list[dict[str, Any]],
) -> dict[str, Any]:
    """Train only ``model.head`` (after its dropout) on frozen-backbone features of train and val; features of the
    whole ``feature_manifest`` the run was given, so notebook 02's cache is reused when it saw the same rows.
    Returns facts for run.json (learning rate, budget, feature precision)."""
    from cxrstudy.features import extract_features

    kw: dict[str, Any] = {"cache_dir": feature_cache_dir} if feature_cache_dir is not None else {}
    feats = extract_features(
        feature_manifest,
        image_root,
        cfg.backbone,
        cfg.image_size,
        batch_size=cfg.batch_size,
        device=str(device),
        num_workers=cfg.num_workers,
        **kw,
    )
    loaders = _feature_loaders(feats, rows, targets, model.head, cfg)
    head = nn.Sequential(model.dropout, model.head).to(device)
    learn = make_learner(head, DataLoaders(*loaders), loss, lr=cfg.lr, path=workdir, wd=cfg.wd)
    facts = choose_lr(learn, cfg)
    counter = _fit_once(learn, cfg, facts["lr"], history)
    facts["feature_precision"] = feats.attrs.get("precision", "fp32")
    return {**facts, **_budget(cfg, len(loaders[0]), [cfg.epochs], counter)}


def image_loaders(
    model: Classifier, rows: pd.DataFrame, targets: np.ndarray, cfg: TrainConfig, images: torch.Tensor
) -> list[TensorBatches]:
    """Train (shuffled or, with ``cfg.sampling == "source_balanced"``, drawn by source-balance weights;
    augmented batch-wise) and val batches from the rows' uint8 images (N,1,S,S)."""
    loaders = []
    for split in ("train", "val"):
        m = (rows["split"] == split).to_numpy()
        train = split == "train"
        aug = train_augmentation(torch.Generator().manual_seed(cfg.train_seed + 1)) if train else None
        weights = None
        if train and cfg.sampling == "source_balanced":
            weights, _ = source_balance_weights(rows.loc[m, "label"], rows.loc[m, "source_name"])
        loaders.append(
            TensorBatches(
                images[torch.tensor(m)],
                targets[m],
                model.spec,
                cfg.batch_size,
                train=train,
                seed=cfg.train_seed,
                augment=aug,
                weights=weights,
            )
        )
    return loaders


def sampling_facts(rows: pd.DataFrame, cfg: TrainConfig) -> dict[str, Any]:
    """run.json facts of the training sampling: its rule and, when source-balanced, the weight and film
    count of every (label, source) cell of the training split."""
    if cfg.sampling == "uniform":
        return {}
    train = rows[rows["split"] == "train"]
    _, cells = source_balance_weights(train["label"], train["source_name"])
    return {
        "sampling_rule": "weights P(label)/P(label|source) on the training split (Kamiran & Calders 2012), "
        f"clipped to {list(BALANCE_CLIP)}, mean 1; N films drawn with replacement per epoch",
        "sampling_weights": [
            {"label": r.label, "source": r.source, "n": int(r.n), "weight": round(float(r.weight), 4)}
            for r in cells.itertuples()
        ],
    }


def _fit_finetune(
    learn: Learner, n_groups: int, cfg: TrainConfig, history: list[dict[str, Any]], counter: StepCounter
) -> dict[str, Any]:
    """Unfreeze layer groups stage by stage (discriminative lrs once the backbone opens), ``cfg.epochs`` split
    over the stages; facts for run.json."""
    saver = make_saver()
    sched = finetune_schedule(n_groups, cfg.finetune_stages)
    epochs = cfg.stage_epochs()
    if len(epochs) != len(sched):
        raise ValueError(f"finetune schedule {sched} has {len(sched)} stages, the budget {len(epochs)}")
    facts: dict[str, Any] = {"finetune_stages": sched}
    for stage, (n_open, n_epochs) in enumerate(zip(sched, epochs, strict=True), start=1):
        learn.freeze_to(-n_open)
        if stage == 1:
            facts.update(choose_lr(learn, cfg))
        lr = facts["lr"]
        stage_lr: float | slice = lr if n_open == 1 else slice(lr / cfg.lr_mult, lr)
        fit_stage(
            learn,
            n_epochs,
            stage_lr,
            stage=stage,
            history=history,
            saver=saver,
            patience=cfg.patience,
            counter=counter,
        )
    return facts


def train_images(
    model: Classifier,
    rows: pd.DataFrame,
    targets: np.ndarray,
    loss: ComposedLoss,
    cfg: TrainConfig,
    *,
    image_root: Path,
    device: torch.device,
    workdir: Path,
    history: list[dict[str, Any]],
    images: torch.Tensor | None = None,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """deep / finetune / scratch on augmented images; returns extra facts for run.json (lr, budget, stages).
    ``images``: the rows' uint8 tensor (N,1,S,S); None reads it from the shared tensor cache. ``callbacks``
    join the learner for every fit (the source adversary's ramp spans the whole budget, all stages)."""
    if images is None:
        from cxrstudy.tensorcache import load_uint8_batch

        images = load_uint8_batch(rows, image_root, cfg.image_size, model.spec.interpolation)
    loaders = image_loaders(model, rows, targets, cfg, images)
    model.to(device).to(memory_format=torch.channels_last)
    learn = make_learner(
        model, DataLoaders(*loaders), loss, lr=cfg.lr, path=workdir, splitter=group_splitter, wd=cfg.wd
    )
    budget = len(loaders[0]) * sum(cfg.stage_epochs())
    for cb in callbacks:
        if getattr(cb, "total_steps", "absent") is None:
            cb.total_steps = budget
        learn.add_cb(cb)
    counter = StepCounter()
    if cfg.scenario == "finetune":
        facts = _fit_finetune(learn, len(model.layer_groups()), cfg, history, counter)
    else:
        learn.unfreeze()
        facts = choose_lr(learn, cfg)
        _fit_once(learn, cfg, facts["lr"], history, counter)
    return {**facts, **_budget(cfg, len(loaders[0]), cfg.stage_epochs(), counter), **sampling_facts(rows, cfg)}
