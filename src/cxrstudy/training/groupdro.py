"""Online group DRO (Sagawa, Koh, Hashimoto & Liang, ICLR 2020, Algorithm 1; variant ``group_dro``).

Groups are label x source (``source_name``) cells of the run's *training* rows only (:class:`GroupCodes`;
validation, test and held-out rows get code -1 and never enter the objective). Per training batch, each group's
mean loss ``l_g`` (0 for a group absent from the batch); the group weights ``q <- q * exp(eta * l_g)``,
normalised; the batch loss is ``sum_g q_g l_g`` (:func:`dro_step`). Validation, early stopping and the kept
checkpoint read the plain (ERM) composed loss, as every other run.

Targets: like the source adversary's, the run's ``[subclass, parent]`` targets get a third column, the row's
group code (``with_group_column``); ``ComposedLoss`` reads only columns 0 and 1, so loaders and loss stay as they
are and the callback reads the groups from ``yb[0][:, 2]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from fastai.callback.core import Callback
from fastai.callback.schedule import LRFinder

from cxrstudy.training.labels import ComposedLoss

#: Column of the targets that holds the group code (after ``[subclass, parent]``).
GROUP_COLUMN = 2
#: groups.csv's columns: one row per (epoch, group).
GROUP_LOG_COLUMNS: tuple[str, ...] = ("epoch", "group", "label", "source", "n_train", "train_loss", "items", "q")


@dataclass(frozen=True)
class GroupCodes:
    """The label x source groups of the training rows, sorted; ``counts`` their training films."""

    labels: tuple[str, ...]
    sources: tuple[str, ...]
    counts: tuple[int, ...]
    column: str = "source_name"

    @classmethod
    def from_rows(cls, rows: pd.DataFrame, column: str = "source_name") -> GroupCodes:
        """Groups from the rows with ``split == "train"`` only (no other row is read)."""
        if missing := {"label", "split", column} - set(rows.columns):
            raise ValueError(f"group DRO: rows lack column(s) {sorted(missing)}")
        train = rows.loc[rows["split"] == "train", ["label", column]].astype(str)
        counts = train.groupby(["label", column]).size().sort_index()
        if counts.empty:
            raise ValueError("group DRO: no training rows to form groups from")
        labels, sources = zip(*counts.index, strict=True)
        return cls(tuple(labels), tuple(sources), tuple(int(n) for n in counts), column)

    @property
    def names(self) -> list[str]:
        """``label|source`` of each group."""
        return [f"{lab}|{src}" for lab, src in zip(self.labels, self.sources, strict=True)]

    def encode(self, rows: pd.DataFrame) -> np.ndarray:
        """int64 group code of each training row; -1 for every other row."""
        lookup = {k: j for j, k in enumerate(zip(self.labels, self.sources, strict=True))}
        out = np.full(len(rows), -1, dtype=np.int64)
        train = (rows["split"] == "train").to_numpy()
        keys = zip(rows["label"].astype(str), rows[self.column].astype(str), strict=True)
        for i, key in enumerate(keys):
            if train[i]:
                out[i] = lookup[key]
        return out

    def table(self) -> list[dict[str, Any]]:
        """run.json's ``dro_groups``: label, source and training films of each group."""
        return [
            {"group": g, "label": lab, "source": src, "n_train": n}
            for g, lab, src, n in zip(self.names, self.labels, self.sources, self.counts, strict=True)
        ]


def with_group_column(targets: np.ndarray, rows: pd.DataFrame, codes: GroupCodes) -> np.ndarray:
    """``(n, 3)`` targets ``[subclass, parent, group]`` from ``make_targets``' ``(n, 2)`` and the rows."""
    targets = np.asarray(targets)
    if targets.ndim != 2 or targets.shape[1] != 2 or len(targets) != len(rows):
        raise ValueError(f"group DRO: expected (n, 2) targets for {len(rows)} rows, got {targets.shape}")
    return np.column_stack([targets.astype(np.int64), codes.encode(rows)])


def group_losses(losses: torch.Tensor, groups: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's mean of the per-item ``losses`` (0 where the group has no item) and its item count."""
    onehot = (groups.unsqueeze(0) == torch.arange(n_groups, device=groups.device).unsqueeze(1)).float()
    counts = onehot.sum(1)
    return onehot @ losses.float() / counts.clamp(min=1), counts


def dro_step(q: torch.Tensor, per_group: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of Algorithm 1: ``q <- q * exp(eta * l_g)`` normalised (the losses detached), and the robust loss
    ``sum_g q_g l_g`` (differentiable in the losses). Returns (new q, loss)."""
    q = q * torch.exp(eta * per_group.detach())
    q = q / q.sum()
    return q, (q * per_group).sum()


class GroupDROCallback(Callback):
    """Replaces the training batch's loss by the group DRO loss (``after_loss``); lr_find fits keep the plain loss
    and leave ``q`` alone; validation batches are untouched (early stopping on the plain composed loss).
    Logs per epoch each group's item-weighted training loss, its items and the weights ``q`` at the epoch's end."""

    order = 40  # after ChannelsLast (1), before Recorder (50)

    def __init__(self, codes: GroupCodes, loss: ComposedLoss, eta: float) -> None:
        self.codes, self.loss_fn, self.eta = codes, loss, float(eta)
        self.q = torch.full((len(codes.counts),), 1.0 / len(codes.counts))
        self.n_epochs = 0
        self.log_rows: list[dict[str, Any]] = []
        self._sums = torch.zeros(len(codes.counts))
        self._items = torch.zeros(len(codes.counts))
        self._active = False

    def before_fit(self) -> None:
        """Active unless this fit is lr_find's."""
        self._active = not any(isinstance(cb, LRFinder) for cb in self.learn.cbs)

    def before_train(self) -> None:
        """Reset the epoch's sums."""
        self._sums.zero_()
        self._items.zero_()

    def after_loss(self) -> None:
        """Robust loss of a training batch from its per-item losses and group codes."""
        if not (self._active and self.learn.training):
            return
        y = self.learn.yb[0]
        if y.dim() != 2 or y.shape[1] <= GROUP_COLUMN:
            raise ValueError("group DRO: targets need a group column (build them with with_group_column)")
        groups = y[:, GROUP_COLUMN]
        if bool((groups < 0).any()):
            raise ValueError("group DRO: a training item has no group code")
        per_item = self.loss_fn.per_item(self.learn.pred, y)
        per_group, counts = group_losses(per_item, groups, len(self.q))
        q, loss = dro_step(self.q.to(per_group.device), per_group, self.eta)
        self.q = q.detach().cpu()
        self.learn.loss_grad = loss
        self.learn.loss = loss.detach()
        self._sums += (per_group.detach() * counts).cpu()
        self._items += counts.cpu()

    def after_train(self) -> None:
        """One log row per group for the epoch."""
        if not self._active:
            return
        self.n_epochs += 1
        for j, (name, lab, src, n) in enumerate(
            zip(self.codes.names, self.codes.labels, self.codes.sources, self.codes.counts, strict=True)
        ):
            items = int(self._items[j])
            self.log_rows.append({
                "epoch": self.n_epochs, "group": name, "label": lab, "source": src, "n_train": n,
                "train_loss": float(self._sums[j] / items) if items else float("nan"),
                "items": items, "q": float(self.q[j]),
            })

    def log_frame(self) -> pd.DataFrame:
        """groups.csv: one row per (epoch, group)."""
        return pd.DataFrame(self.log_rows, columns=list(GROUP_LOG_COLUMNS))

    def facts(self) -> dict[str, Any]:
        """run.json facts: the rule, the groups with their sizes, the final q and the last epoch's group losses."""
        log = self.log_frame()
        last = log[log["epoch"] == log["epoch"].max()] if len(log) else log
        return {
            "dro_rule": "online group DRO (Sagawa et al. 2020, Algorithm 1) over label x source groups of the "
            f"training rows, eta {self.eta:g}; early stopping and the kept checkpoint on the plain validation loss",
            "dro_groups": self.codes.table(),
            "dro_final_q": {g: round(float(v), 6) for g, v in zip(self.codes.names, self.q, strict=True)},
            "dro_last_epoch_loss": {r.group: _num(r.train_loss) for r in last.itertuples()},
        }


def _num(x: float) -> float | None:
    """A JSON-ready float (None for NaN)."""
    return None if not np.isfinite(x) else round(float(x), 6)
