"""The fits of each scenario: shallow (head on cached features) and deep / finetune / scratch (images)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cxrstudy.models import Classifier
from cxrstudy.training.data import XrayDataset, make_loader, train_augmentation
from cxrstudy.training.labels import ComposedLoss
from cxrstudy.training.learner import finetune_schedule, fit_stage, group_splitter, make_learner, make_saver
from cxrstudy.training.trainconfig import TrainConfig


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
        loaders.append(make_loader(ds, cfg.batch_size, train=split == "train", seed=cfg.seed))
    return loaders


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
) -> None:
    """Train only ``model.head`` (after its dropout) on frozen-backbone features of train and val; features of the
    whole ``feature_manifest`` the run was given, so notebook 02's cache is reused when it saw the same rows."""
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
    fit_stage(learn, cfg.epochs, cfg.lr, stage=1, history=history, saver=make_saver(), patience=cfg.patience)


def _image_loaders(
    model: Classifier, rows: pd.DataFrame, targets: np.ndarray, cfg: TrainConfig, image_root: Path
) -> list[DataLoader]:
    """Train (augmented, shuffled) and val loaders of the images on disk."""
    loaders = []
    for split in ("train", "val"):
        m = (rows["split"] == split).to_numpy()
        ds = XrayDataset(
            [image_root / p for p in rows.loc[m, "image"]],
            targets[m],
            model.spec,
            cfg.image_size,
            train_augmentation() if split == "train" else None,
        )
        loaders.append(
            make_loader(
                ds, cfg.batch_size, train=split == "train", seed=cfg.seed, num_workers=cfg.num_workers
            )
        )
    return loaders


def _fit_finetune(
    learn: Learner, n_groups: int, n_train_batches: int, cfg: TrainConfig, history: list[dict[str, Any]]
) -> dict[str, Any]:
    """Unfreeze layer groups stage by stage (discriminative lrs once the backbone opens); facts for run.json."""
    saver = make_saver()
    sched = finetune_schedule(n_groups, cfg.finetune_stages)
    extra: dict[str, Any] = {"finetune_stages": sched}
    lr = cfg.lr
    for stage, n_open in enumerate(sched, start=1):
        learn.freeze_to(-n_open)
        if stage == 1 and cfg.use_lr_find:
            found = float(learn.lr_find(num_it=min(100, 10 * n_train_batches), show_plot=False).valley)
            extra["lr_found"] = found
            lr = found
        stage_lr: float | slice = lr if n_open == 1 else slice(lr / cfg.lr_mult, lr)
        fit_stage(
            learn, cfg.epochs, stage_lr, stage=stage, history=history, saver=saver, patience=cfg.patience
        )
    return extra


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
) -> dict[str, Any]:
    """deep / finetune / scratch on augmented images; returns extra facts for run.json (stages, found lr)."""
    loaders = _image_loaders(model, rows, targets, cfg, image_root)
    model.to(device).to(memory_format=torch.channels_last)
    learn = make_learner(
        model, DataLoaders(*loaders), loss, lr=cfg.lr, path=workdir, splitter=group_splitter, wd=cfg.wd
    )
    if cfg.scenario == "finetune":
        return _fit_finetune(learn, len(model.layer_groups()), len(loaders[0]), cfg, history)
    learn.unfreeze()
    fit_stage(learn, cfg.epochs, cfg.lr, stage=1, history=history, saver=make_saver(), patience=cfg.patience)
    return {}
