"""Label spaces: the task's classes, the subclasses the network predicts, targets and the composed loss."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LabelSpace:
    """Task classes, the subclasses the network predicts, and each subclass's parent class."""

    classes: tuple[str, ...]
    subclasses: tuple[str, ...]
    parent_of: dict[str, str]

    def matrix(self) -> np.ndarray:
        """0/1 composition matrix (n_subclasses, n_classes)."""
        from cxrstudy.decomposition import composition_matrix

        return np.asarray(composition_matrix(list(self.subclasses), list(self.classes)), dtype=np.float32)


def identity_labels(classes: Sequence[str]) -> LabelSpace:
    """Decomposition off: each class is its own single subclass."""
    return LabelSpace(tuple(classes), tuple(classes), {c: c for c in classes})


def decomposition_labels(
    profile_dir: Path, classes: Sequence[str], part: str = ""
) -> tuple[LabelSpace, pd.Series]:
    """Notebook 03's decomposition (of one fold: ``part``) restricted to the task's classes, and the subclass of
    each training image."""
    from cxrstudy.decomposition import load_decomposition

    dec, subclass_of = load_decomposition(Path(profile_dir), part)
    subs = tuple(s for s in dec.subclasses if dec.parent_of[s] in classes)
    missing = [c for c in classes if not any(dec.parent_of[s] == c for s in subs)]
    if missing:
        raise ValueError(f"decomposition in {profile_dir} has no subclass for class(es) {missing}")
    space = LabelSpace(tuple(classes), subs, {s: dec.parent_of[s] for s in subs})
    return space, subclass_of[subclass_of.isin(subs)]


def _training_subclasses(
    rows: pd.DataFrame, train: np.ndarray, space: LabelSpace, subclass_of: pd.Series
) -> np.ndarray:
    """Subclass index of each training row, checked against the decomposition (present, same parent)."""
    sub_idx = {s: i for i, s in enumerate(space.subclasses)}
    names = rows.loc[train, "image"].map(subclass_of)
    if names.isna().any():
        lost = rows.loc[train, "image"][names.isna()].tolist()
        raise ValueError(
            f"{len(lost)} training image(s) have no subclass in the decomposition (was notebook 03 run on the "
            f"same manifest, max_per_class and seed?), e.g. {lost[:3]}"
        )
    wrong = [
        im
        for im, s, lab in zip(rows.loc[train, "image"], names, rows.loc[train, "label"], strict=True)
        if space.parent_of[s] != lab
    ]
    if wrong:
        raise ValueError(
            f"decomposition gives subclasses of another class for {len(wrong)} image(s), e.g. {wrong[:3]}"
        )
    return names.map(sub_idx).to_numpy()


def make_targets(rows: pd.DataFrame, space: LabelSpace, subclass_of: pd.Series | None) -> np.ndarray:
    """``(n, 2)`` int64 targets ``[subclass, parent]``; subclass only for training rows, -1 elsewhere."""
    parent = rows["label"].map({c: i for i, c in enumerate(space.classes)})
    if parent.isna().any():
        raise ValueError(f"labels outside {space.classes}: {sorted(set(rows.loc[parent.isna(), 'label']))}")
    sub = np.full(len(rows), -1, dtype=np.int64)
    train = (rows["split"] == "train").to_numpy()
    if subclass_of is None:
        sub[train] = parent.to_numpy()[train]
    else:
        sub[train] = _training_subclasses(rows, train, space, subclass_of)
    return np.stack([sub, parent.to_numpy(dtype=np.int64)], axis=1)


def composed_log_probs(logits: torch.Tensor, log_matrix: torch.Tensor) -> torch.Tensor:
    """Log of composed class probabilities: ``log sum_{s in class} softmax(logits)_s``, shape (B, n_classes)."""
    logp_sub = F.log_softmax(logits.float(), dim=1)
    return torch.logsumexp(logp_sub.unsqueeze(2) + log_matrix.to(logits.device).unsqueeze(0), dim=1)


class ComposedLoss(nn.Module):
    """Cross-entropy on the subclass where known (subclass >= 0), composed NLL of the parent class otherwise."""

    def __init__(self, matrix: np.ndarray) -> None:
        super().__init__()
        with np.errstate(divide="ignore"):
            self.register_buffer("log_matrix", torch.from_numpy(np.log(np.asarray(matrix, dtype=np.float32))))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss over the batch; ``target`` is (B, 2) ``[subclass, parent]`` (further columns ignored)."""
        return self.per_item(logits, target).mean()

    def per_item(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of each item (B,): subclass cross-entropy where known, composed NLL of the parent otherwise."""
        sub, parent = target[:, 0], target[:, 1]
        logp_sub = F.log_softmax(logits.float(), dim=1)
        logp_cls = composed_log_probs(logits, self.log_matrix)
        nll_sub = -logp_sub.gather(1, sub.clamp(min=0).unsqueeze(1)).squeeze(1)
        nll_cls = -logp_cls.gather(1, parent.unsqueeze(1)).squeeze(1)
        return torch.where(sub >= 0, nll_sub, nll_cls)

    def composed_accuracy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Share of rows whose composed argmax class is the true class."""
        return (composed_log_probs(logits, self.log_matrix).argmax(1) == target[:, 1]).float().mean()


def compose_predictions(sub_probs: np.ndarray, space: LabelSpace) -> np.ndarray:
    """Composed class probabilities (n, n_classes) from subclass probabilities."""
    from cxrstudy.decomposition import compose

    return np.asarray(compose(sub_probs, list(space.subclasses), list(space.classes)))
