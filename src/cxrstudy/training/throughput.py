"""Training throughput (images/s) of each scenario through the real pipeline, for ``make bench``."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from torch import nn
from torch.utils.data import TensorDataset

from cxrstudy import config
from cxrstudy.models import Classifier
from cxrstudy.tensorcache import load_uint8_batch
from cxrstudy.training.data import TensorBatches, make_loader, train_augmentation
from cxrstudy.training.labels import ComposedLoss, identity_labels, make_targets
from cxrstudy.training.learner import finetune_schedule, group_splitter, make_learner


class BatchTimer(Callback):
    """Wall time of each training batch, data loading included (time between consecutive batch ends).

    ``between`` (optional) runs after each timed batch, outside the timing: ``make bench`` times a bare step
    there, so pipeline and bare alternate batch by batch and load from other processes hits both alike."""

    order = 99

    def __init__(self, between: Callable[[], None] | None = None) -> None:
        self.times: list[float] = []
        self.between = between

    def before_train(self) -> None:
        self.t = time.perf_counter()

    def after_batch(self) -> None:
        if self.training:
            self.times.append(time.perf_counter() - self.t)
            if self.between is not None:
                self.between()
            self.t = time.perf_counter()


def _timed_net(
    model: Classifier,
    rows: pd.DataFrame,
    targets: np.ndarray,
    scenario: str,
    image_root: Path | str,
    image_size: int,
    features: pd.DataFrame | None,
    batch_size: int,
    seed: int,
) -> tuple[Any, nn.Module, dict[str, Any]]:
    """The training batches, the network that trains and the learner's extra arguments of one scenario: the
    real pipeline (shared uint8 tensor cache, batch augmentation, channels_last)."""
    if scenario == "shallow":
        if features is None:
            raise ValueError("shallow times the head on cached features: pass features")
        x = torch.tensor(features.loc[rows["image"]].to_numpy(dtype=np.float32))
        loader = make_loader(TensorDataset(x, torch.as_tensor(targets)), batch_size, train=True, seed=seed)
        return loader, nn.Sequential(model.dropout, model.head), {}
    images = load_uint8_batch(rows, image_root, image_size, model.spec.interpolation)
    aug = train_augmentation(torch.Generator().manual_seed(seed + 1))
    loader = TensorBatches(images, targets, model.spec, batch_size, train=True, seed=seed, augment=aug)
    return loader, model.to(memory_format=torch.channels_last), {"splitter": group_splitter}


def _stage_rates(
    learn: Learner, opens: Sequence[int], batch_size: int, between: Callable[[], None] | None
) -> tuple[list[float], list[float]]:
    """Images/s of one epoch per stage (``n_open`` trailing groups unfrozen; 0 = leave as is), first batch untimed,
    and the batch times (s) after the first of every stage."""
    rates, times = [], []
    for n_open in opens:
        if n_open:
            learn.freeze_to(-n_open)
        timer = BatchTimer(between)
        quiet = learn.no_bar() if hasattr(learn, "no_bar") else contextlib.nullcontext()
        with learn.no_logging(), quiet:
            learn.fit(1, cbs=[timer])
        rates.append(batch_size * (len(timer.times) - 1) / sum(timer.times[1:]))
        times += timer.times[1:]
    return rates, times


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
    between: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Training images/s of one scenario, first batch a warm-up: ``{"img_s": ..., "stages": [per finetune stage],
    "batch_s": [timed batch times]}``. ``rows`` need ``image`` and ``label``; shallow times the head on
    ``features`` (indexed by image); ``between`` runs untimed after every batch (see ``BatchTimer``)."""
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
    loader, net, kw = _timed_net(
        model, rows, targets, scenario, image_root, image_size, features, batch_size, seed
    )
    net.to(dev)
    xb, yb = next(iter(loader))
    valid = [(xb[:2], yb[:2])]  # the learner wants a validation set: two images, not timed
    if scenario == "finetune":
        opens = finetune_schedule(len(model.layer_groups()), finetune_stages)
    else:
        opens = [0] if scenario == "shallow" else [len(model.layer_groups())]
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as workdir:
        learn = make_learner(net, DataLoaders(loader, valid), loss, lr=1e-4, path=Path(workdir), **kw)
        rates, times = _stage_rates(learn, opens, batch_size, between)
    # stages run for equal epochs: the overall rate is the harmonic mean
    return {"img_s": len(rates) / sum(1 / r for r in rates), "stages": rates, "batch_s": times}


class BareStep:
    """A bare forward + backward + AdamW step of the classifier on in-memory tensors (normalised, channels_last,
    the study's loss), cycling over the batches; ``times`` holds each step's wall time (s)."""

    def __init__(self, backbone: str, device: str, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
        self.dev = config.resolve_device(device)
        self.model = Classifier(backbone, 2).to(self.dev, memory_format=torch.channels_last).train()
        self.loss = ComposedLoss(np.eye(2, dtype=np.float32)).to(self.dev)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.batches = [
            (xb.to(self.dev), yb.to(self.dev)) for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True)
        ]
        self.times: list[float] = []
        self.step()  # warm-up, untimed
        self.times.clear()

    def step(self) -> None:
        """One timed step."""
        xb, yb = self.batches[len(self.times) % len(self.batches)]
        start = time.perf_counter()
        loss = self.loss(self.model(xb), yb)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        self.times.append(time.perf_counter() - start)


def bare_train_rate(
    backbone: str, image_size: int, batch_size: int, device: str = "auto", seconds: float = 15.0, seed: int = 0
) -> dict[str, Any]:
    """Images/s of :class:`BareStep` (``make bench``'s bare training figure) on random normalised batches, stepped
    for about ``seconds`` after a warm-up; the rate is the median step's."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * batch_size, 3, image_size, image_size, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (2 * batch_size,), generator=gen)
    bare = BareStep(backbone, device, x, torch.stack([y, y], 1), batch_size)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(bare.times) < 3:
        bare.step()
    rate = batch_size / float(np.median(bare.times))
    return {"img_s": round(rate, 2), "steps": len(bare.times), "backbone": backbone, "image_size": image_size,
            "batch_size": batch_size, "device": str(bare.dev)}
