"""Class-conditional source adversary (variant ``lung_adversary``): gradient reversal (Ganin & Lempitsky 2015)
against the source hospital *within each class*, so training removes what tells hospitals apart, not diseases.

Pieces: ``grad_reverse`` (identity forward, gradient times ``-lambd`` backward); ``SourceCodes`` (per-class
source tables built from training rows only); ``SourceAdversary`` (one small MLP per class over the backbone's
pooled features); ``adversary_weight`` (Ganin's ramp); ``SourceAdversaryCallback`` (fastai; adds the term to
the training loss, logs the adversary per epoch).

Targets: the run's ``[subclass, parent]`` targets get a third column, the training row's per-class source code
(``with_source_column``; -1 for validation/test rows and wherever no code applies). ``ComposedLoss`` and its
accuracy read only columns 0 and 1, and ``TensorBatches`` / ``TensorDataset`` carry any width, so the loaders
and the loss stay as they are and the callback reads the batch's sources from ``yb[0][:, 2]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.callback.schedule import LRFinder
from torch import nn

#: Column of the targets that holds the per-class source code (after ``[subclass, parent]``).
SOURCE_COLUMN = 2
ADVERSARY_LOG_COLUMNS: tuple[str, ...] = (
    "epoch",
    "adv_loss",
    "adv_accuracy",
    "majority_accuracy",
    "weight",
    "items",
    "batches",
)


# ------------------------------------------------------------------------------------ gradient reversal


class GradReverse(torch.autograd.Function):
    """Identity in the forward pass; the backward pass multiplies the incoming gradient by ``-lambd``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lambd: float) -> torch.Tensor:  # noqa: D102
        ctx.lambd = float(lambd)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        return -ctx.lambd * grad, None


def grad_reverse(x: torch.Tensor, lambd: float = 1.0) -> torch.Tensor:
    """``x`` unchanged forward; gradient ``-lambd * g`` backward."""
    return GradReverse.apply(x, lambd)


def adversary_weight(step: int, total_steps: int, max_weight: float, schedule: str = "ganin") -> float:
    """Weight at ``step``: "ganin" ramps ``max_weight * (2 / (1 + exp(-10 p)) - 1)``, p = step / total_steps
    clamped to [0, 1] (0 at start, ~max_weight at the end); "constant" is ``max_weight`` throughout."""
    if schedule == "constant":
        return float(max_weight)
    if schedule != "ganin":
        raise ValueError(f"unknown adversary schedule {schedule!r}; expected 'ganin' or 'constant'")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    p = min(max(step / total_steps, 0.0), 1.0)
    return float(max_weight) * (2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0)


# ------------------------------------------------------------------------------------ source codes


@dataclass(frozen=True)
class SourceCodes:
    """Per class (in ``classes`` order) the sources of its *training* rows, sorted; a row's code is its source's
    index within its class. ``counts`` are the training images per (class, source) in the same order."""

    classes: tuple[str, ...]
    sources: tuple[tuple[str, ...], ...]
    counts: tuple[tuple[int, ...], ...]
    column: str = "source_name"

    @classmethod
    def from_rows(
        cls, rows: pd.DataFrame, classes: Sequence[str], column: str = "source_name"
    ) -> SourceCodes:
        """Code tables from the rows with ``split == "train"`` only (validation/test rows are never read)."""
        if missing := {"label", "split", column} - set(rows.columns):
            raise ValueError(f"rows lack column(s) {sorted(missing)}")
        train = rows.loc[rows["split"] == "train", ["label", column]]
        tables = [train.loc[train["label"] == c, column].astype(str).value_counts() for c in classes]
        srcs = tuple(tuple(sorted(t.index)) for t in tables)
        counts = tuple(tuple(int(t[s]) for s in ss) for t, ss in zip(tables, srcs, strict=True))
        return cls(tuple(classes), srcs, counts, column)

    @property
    def n_sources(self) -> tuple[int, ...]:
        """Number of training sources of each class."""
        return tuple(len(s) for s in self.sources)

    @property
    def majority(self) -> tuple[int, ...]:
        """Code of each class's most common training source (-1 for a class without training rows)."""
        return tuple(int(np.argmax(c)) if c else -1 for c in self.counts)

    def encode(self, rows: pd.DataFrame) -> np.ndarray:
        """int64 code of each row: its source's index within its class for training rows of a class with two or
        more training sources; -1 for validation/test rows, single-source classes and unknown sources."""
        out = np.full(len(rows), -1, dtype=np.int64)
        lookup = {
            (c, s): j
            for c, ss in zip(self.classes, self.sources, strict=True)
            if len(ss) > 1
            for j, s in enumerate(ss)
        }
        train = (rows["split"] == "train").to_numpy()
        keys = zip(rows["label"].astype(str), rows[self.column].astype(str), strict=True)
        for i, key in enumerate(keys):
            if train[i]:
                out[i] = lookup.get(key, -1)
        return out


def with_source_column(targets: np.ndarray, rows: pd.DataFrame, codes: SourceCodes) -> np.ndarray:
    """``(n, 3)`` targets ``[subclass, parent, source_code]`` from ``make_targets``' ``(n, 2)`` and the rows."""
    targets = np.asarray(targets)
    if targets.ndim != 2 or targets.shape[1] != 2 or len(targets) != len(rows):
        raise ValueError(f"expected (n, 2) targets for {len(rows)} rows, got {targets.shape}")
    parent = rows["label"].map({c: i for i, c in enumerate(codes.classes)}).to_numpy()
    if not np.array_equal(parent, targets[:, 1]):
        raise ValueError(
            "targets' parent column does not match the rows' labels in SourceCodes.classes order"
        )
    return np.column_stack([targets.astype(np.int64), codes.encode(rows)])


# ------------------------------------------------------------------------------------ the adversary


class AdversaryResult(NamedTuple):
    """Mean cross-entropy over the items used, how many items were used, how many the adversary got right."""

    loss: torch.Tensor
    items: int
    correct: int


class SourceAdversary(nn.Module):
    """One MLP head per class with two or more training sources, predicting the source within that class.

    Per-class heads rather than one head over [features, one-hot class]: each head's softmax covers only the
    sources that class has, so the adversary can only use (and the reversed gradient can only remove) what
    separates hospitals *within* a class; a joint head would also learn class-dependent source priors, and
    its reversed gradient could erode class information. Single-source classes get no head and no loss."""

    def __init__(
        self, in_features: int, n_sources: Sequence[int], hidden: int = 256, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.n_sources = tuple(int(k) for k in n_sources)
        self.heads = nn.ModuleDict(
            {
                str(c): nn.Sequential(
                    nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, k)
                )
                for c, k in enumerate(self.n_sources)
                if k > 1
            }
        )

    def forward(self, feats: torch.Tensor, cls: torch.Tensor, src: torch.Tensor) -> AdversaryResult:
        """Loss on ``feats`` (B, F) of the items whose class has a head and whose source code is known (>= 0)."""
        total = feats[:0].float().sum()  # 0, on the graph even when no item is used
        items, correct = 0, 0
        for key, head in self.heads.items():
            m = (cls == int(key)) & (src >= 0)
            n = int(m.sum())
            if n == 0:
                continue
            logits = head(feats[m]).float()
            total = total + F.cross_entropy(logits, src[m], reduction="sum")
            items += n
            correct += int((logits.argmax(1) == src[m]).sum())
        return AdversaryResult(total / max(items, 1), items, correct)


# ------------------------------------------------------------------------------------ fastai callback


class SourceAdversaryCallback(Callback):
    """Adds the source adversary to training batches only: a forward hook on ``learn.model.backbone`` keeps
    the pooled features, ``after_loss`` adds the adversary on ``grad_reverse(feats, w)`` (w ramped by
    ``adversary_weight``) to the backward loss, and the recorded ``learn.loss`` grows by ``w * adv_loss``.

    The adversary's parameters are *not* in the learner's optimizer: the callback owns an AdamW of its own,
    stepped in ``after_backward`` at a constant ``lr`` (untouched by one-cycle, freezing, lr_find and the
    checkpoints, and never saved in model.pth). The adversary head trains at full strength; the backbone
    gets its gradient times ``-w``. Targets must be ``[subclass, parent, source_code]`` (``with_source_column``).
    The weight ramps over ``total_steps`` training batches counted across fits (None: the first fit's).
    lr_find fits are skipped; validation never calls the adversary."""

    order = 40  # after ChannelsLast (1), before Recorder (50) and the History/trackers

    def __init__(
        self,
        adversary: SourceAdversary,
        codes: SourceCodes,
        max_weight: float,
        *,
        total_steps: int | None = None,
        schedule: str = "ganin",
        lr: float = 1e-3,
        wd: float = 0.0,
    ) -> None:
        if len(adversary.n_sources) != len(codes.classes) or adversary.n_sources != codes.n_sources:
            raise ValueError(
                f"adversary heads {adversary.n_sources} do not match the codes {codes.n_sources}"
            )
        adversary_weight(0, 1, max_weight, schedule)  # checks the schedule name
        self.adversary, self.codes, self.max_weight = adversary, codes, float(max_weight)
        self.total_steps, self.schedule, self.adv_lr, self.adv_wd = total_steps, schedule, lr, wd
        self.majority = torch.tensor(codes.majority, dtype=torch.long)
        self.adv_opt: torch.optim.Optimizer | None = None
        self.n_steps, self.n_epochs = 0, 0
        self.log_rows: list[dict[str, Any]] = []
        self.batch_log: list[dict[str, Any]] = []
        self._handle: Any = None
        self._feats: torch.Tensor | None = None
        self._active = self._armed = False

    # -- fit lifecycle --------------------------------------------------------------------------------
    def before_fit(self) -> None:
        """Hook the backbone (not during lr_find), move the adversary beside the model, size the ramp."""
        self._remove_hook()
        self._active = not any(isinstance(cb, LRFinder) for cb in self.learn.cbs)
        if not self._active:
            return
        if hasattr(self.learn, "mixed_precision"):
            raise NotImplementedError("SourceAdversaryCallback does not support fastai's MixedPrecision")
        backbone = getattr(self.learn.model, "backbone", None)
        if not isinstance(backbone, nn.Module):
            raise TypeError(
                "SourceAdversaryCallback needs a model with a .backbone (cxrstudy.models.Classifier)"
            )
        self.adversary.to(next(self.learn.model.parameters()).device).train()
        if self.adv_opt is None:
            self.adv_opt = torch.optim.AdamW(
                self.adversary.parameters(), lr=self.adv_lr, weight_decay=self.adv_wd
            )
        if self.total_steps is None:
            self.total_steps = max(1, self.learn.n_epoch * len(self.learn.dls.train))
        self._handle = backbone.register_forward_hook(self._keep)

    def after_fit(self) -> None:
        """Remove the hook."""
        self._remove_hook()

    def after_cancel_fit(self) -> None:
        """Remove the hook when the fit is cancelled (early stopping)."""
        self._remove_hook()

    def _remove_hook(self) -> None:
        """Drop the backbone hook and any kept features."""
        if self._handle is not None:
            self._handle.remove()
        self._handle, self._feats, self._armed = None, None, False

    def _keep(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        """Forward hook: keep the backbone's pooled features of an armed training batch."""
        if self._armed and torch.is_grad_enabled():
            self._feats = output

    # -- batches --------------------------------------------------------------------------------------
    def before_batch(self) -> None:
        """Arm the hook for training batches only."""
        self._armed = self._active and self.learn.training
        self._feats = None

    def after_loss(self) -> None:
        """Add the adversary term to the training batch's loss."""
        if not (self._armed and self.learn.training):
            return
        if self._feats is None:
            raise RuntimeError("the backbone's forward hook caught no features in this training batch")
        y = self.learn.yb[0]
        if y.dim() != 2 or y.shape[1] <= SOURCE_COLUMN:
            raise ValueError("targets need a source column: build them with adversary.with_source_column")
        w = adversary_weight(self.n_steps, self.total_steps or 1, self.max_weight, self.schedule)
        cls, src = y[:, 1], y[:, SOURCE_COLUMN]
        res = self.adversary(grad_reverse(self._feats, w), cls, src)
        self.learn.loss_grad = self.learn.loss_grad + res.loss
        self.learn.loss = self.learn.loss + w * res.loss.detach()
        used = (src >= 0) & (torch.as_tensor(self.codes.n_sources, device=y.device)[cls] > 1)
        majority = int((src[used] == self.majority.to(y.device)[cls[used]]).sum())
        self.batch_log.append(
            {
                "epoch": self.n_epochs + 1,
                "step": self.n_steps,
                "weight": w,
                "adv_loss": float(res.loss.detach()),
                "items": res.items,
                "correct": res.correct,
                "majority": majority,
            }
        )
        self._feats, self._armed = None, False
        self.n_steps += 1

    def after_backward(self) -> None:
        """Step the adversary's own optimizer and clear its gradients."""
        if self.adv_opt is not None and self._active and self.learn.training:
            self.adv_opt.step()
            self.adv_opt.zero_grad(set_to_none=True)

    def after_train(self) -> None:
        """Close the epoch's training phase: one log row."""
        if not self._active:
            return
        self.n_epochs += 1
        rows = [b for b in self.batch_log if b["epoch"] == self.n_epochs]
        self.log_rows.append(summarize_batches(rows, self.n_epochs))

    def log_frame(self) -> pd.DataFrame:
        """Per-epoch log: item-weighted adversary loss and accuracy on training batches, the accuracy of always
        guessing each class's majority source, the mean weight, items and batches."""
        return pd.DataFrame(self.log_rows, columns=list(ADVERSARY_LOG_COLUMNS))


def summarize_batches(batches: list[dict[str, Any]], epoch: int) -> dict[str, Any]:
    """One epoch's log row from the callback's per-batch records."""
    items = sum(b["items"] for b in batches)
    nan = float("nan")
    return {
        "epoch": epoch,
        "adv_loss": sum(b["adv_loss"] * b["items"] for b in batches) / items if items else nan,
        "adv_accuracy": sum(b["correct"] for b in batches) / items if items else nan,
        "majority_accuracy": sum(b["majority"] for b in batches) / items if items else nan,
        "weight": float(np.mean([b["weight"] for b in batches])) if batches else nan,
        "items": items,
        "batches": len(batches),
    }


def make_source_adversary(
    model: nn.Module, codes: SourceCodes, hidden: int = 256, dropout: float = 0.0
) -> SourceAdversary:
    """A ``SourceAdversary`` sized for a ``Classifier``'s pooled features and the code tables."""
    in_features = model.head.in_features if hasattr(model, "head") else model.spec.num_features
    return SourceAdversary(int(in_features), codes.n_sources, hidden=hidden, dropout=dropout)
