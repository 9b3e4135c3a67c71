"""Training throughput (images/s) of each scenario through the real pipeline, for ``make bench``."""

from __future__ import annotations

import contextlib
import tempfile
import time
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
from torch.utils.data import Dataset, TensorDataset

from cxrstudy import config
from cxrstudy.models import Classifier
from cxrstudy.training.data import XrayDataset, make_loader, train_augmentation
from cxrstudy.training.labels import ComposedLoss, identity_labels, make_targets
from cxrstudy.training.learner import finetune_schedule, group_splitter, make_learner


class BatchTimer(Callback):
    """Wall time of each training batch, data loading included (time between consecutive batch ends)."""

    order = 99

    def __init__(self) -> None:
        self.times: list[float] = []

    def before_train(self) -> None:
        self.t = time.perf_counter()

    def after_batch(self) -> None:
        if self.training:
            now = time.perf_counter()
            self.times.append(now - self.t)
            self.t = now


def _timed_net(
    model: Classifier,
    rows: pd.DataFrame,
    targets: np.ndarray,
    scenario: str,
    image_root: Path | str,
    image_size: int,
    features: pd.DataFrame | None,
) -> tuple[Dataset, nn.Module, dict[str, Any]]:
    """The dataset, the network that trains and the learner's extra arguments of one scenario."""
    if scenario == "shallow":
        if features is None:
            raise ValueError("shallow times the head on cached features: pass features")
        x = torch.tensor(features.loc[rows["image"]].to_numpy(dtype=np.float32))
        return TensorDataset(x, torch.as_tensor(targets)), nn.Sequential(model.dropout, model.head), {}
    ds = XrayDataset(
        [Path(image_root) / p for p in rows["image"]],
        targets,
        model.spec,
        image_size,
        train_augmentation(),
    )
    return ds, model.to(memory_format=torch.channels_last), {"splitter": group_splitter}


def _stage_rates(learn: Learner, opens: Sequence[int], batch_size: int) -> list[float]:
    """Images/s of one epoch per stage (``n_open`` trailing groups unfrozen; 0 = leave as is), first batch untimed."""
    rates = []
    for n_open in opens:
        if n_open:
            learn.freeze_to(-n_open)
        timer = BatchTimer()
        quiet = learn.no_bar() if hasattr(learn, "no_bar") else contextlib.nullcontext()
        with learn.no_logging(), quiet:
            learn.fit(1, cbs=[timer])
        rates.append(batch_size * (len(timer.times) - 1) / sum(timer.times[1:]))
    return rates


def training_throughput(
    rows: pd.DataFrame,
    image_root: Path | str,
    scenario: str,
    *,
    backbone: str = "efficientnet_lite0",
    image_size: int = 160,
    batch_size: int = 32,
    n_batches: int = 4,
    device: str = "auto",
    features: pd.DataFrame | None = None,
    finetune_stages: Sequence[int] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Training images/s of one scenario, first batch a warm-up: ``{"img_s": ..., "stages": [per finetune stage]}``.
    ``rows`` need ``image`` and ``label``; shallow times the head on ``features`` (indexed by image)."""
    if scenario not in config.SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {config.SCENARIOS}")
    n = batch_size * (n_batches + 1)
    if len(rows) < n:
        raise ValueError(f"need {n} rows for {n_batches}+1 batches of {batch_size}, got {len(rows)}")
    rows = rows.iloc[:n].assign(split="train")
    classes = tuple(c for c in config.CLASSES if c in set(rows["label"]))
    space = identity_labels(classes)
    targets = make_targets(rows, space, None)
    dev = config.resolve_device(device)
    config.seed_everything(seed)
    model = Classifier(backbone, len(classes), pretrained=scenario != "scratch")
    loss = ComposedLoss(space.matrix())
    ds, net, kw = _timed_net(model, rows, targets, scenario, image_root, image_size, features)
    net.to(dev)
    loader = make_loader(ds, batch_size, train=True, seed=seed)
    valid = make_loader(torch.utils.data.Subset(ds, range(2)), batch_size, train=False, seed=seed)
    if scenario == "finetune":
        opens = finetune_schedule(len(model.layer_groups()), finetune_stages)
    else:
        opens = [0] if scenario == "shallow" else [len(model.layer_groups())]
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as workdir:
        learn = make_learner(net, DataLoaders(loader, valid), loss, lr=1e-4, path=Path(workdir), **kw)
        rates = _stage_rates(learn, opens, batch_size)
    # stages run for equal epochs: the overall rate is the harmonic mean
    return {"img_s": len(rates) / sum(1 / r for r in rates), "stages": rates}
