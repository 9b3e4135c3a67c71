"""Training data: the task's manifest rows, image datasets, augmentation and seeded loaders."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from cxrstudy import config
from cxrstudy.images import load_xray
from cxrstudy.models import BackboneSpec, normalize_batch, resize_to_uint8

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: What ``train_augmentation`` does, as run.json records it.
AUGMENTATION_NOTE = "rotate±10°, translate±4%, scale±5%, brightness/contrast±15%, no flips"


def train_augmentation() -> Callable[[torch.Tensor], torch.Tensor]:
    """Augmentation for frontal chest X-rays, on the squish-resized uint8 image (1,S,S) before normalisation."""
    # Small rotation, scale and translation, brightness/contrast jitter: the variation between films,
    # positioning and exposure. No vertical flip (films are never upside down) and no horizontal flip
    # either: the heart sits on the left, and burned-in laterality markers and text would be mirrored,
    # producing anatomy that does not occur and a cue the network could learn.
    return T.Compose(
        [
            T.RandomAffine(
                degrees=10,
                translate=(0.04, 0.04),
                scale=(0.95, 1.05),
                interpolation=T.InterpolationMode.BILINEAR,
            ),
            T.ColorJitter(brightness=0.15, contrast=0.15),
        ]
    )


class XrayDataset(Dataset):
    """Images on disk as ``(normalised tensor (3,S,S), target [subclass, parent])``, ``models.model_transform``'s
    preprocessing split in two so augmentation works on the small uint8 image, which ``cache`` keeps in memory."""

    def __init__(
        self,
        paths: Sequence[Path],
        targets: np.ndarray,
        spec: BackboneSpec,
        image_size: int,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cache: bool = True,
    ) -> None:
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        self.paths, self.targets = [Path(p) for p in paths], torch.as_tensor(targets, dtype=torch.long)
        self.spec, self.image_size, self.augment = spec, image_size, augment
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._cache.get(i) if self._cache is not None else None
        if x is None:
            x = resize_to_uint8(load_xray(self.paths[i]), self.image_size, self.spec.interpolation)
            if self._cache is not None:
                self._cache[i] = x
        if self.augment is not None:
            x = self.augment(x)
        return normalize_batch(x, self.spec), self.targets[i]


class ImageList(Dataset):
    """In-memory PIL images through the model transform (for ``predict_images``)."""

    def __init__(
        self, images: Sequence[Image.Image], transform: Callable[[Image.Image], torch.Tensor]
    ) -> None:
        self.images, self.transform = list(images), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.images[i])


def make_loader(ds: Dataset, batch_size: int, *, train: bool, seed: int, num_workers: int = 0) -> DataLoader:
    """Seeded DataLoader; in training, shuffled and without a last batch of one (batch norm needs two)."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=train,
        generator=gen,
        num_workers=num_workers,
        drop_last=train and len(ds) % batch_size == 1,
        persistent_workers=num_workers > 0,
    )


def task_rows(manifest: pd.DataFrame, task: str) -> pd.DataFrame:
    """Manifest rows of the task's classes (others dropped), checked for the columns training needs."""
    need = {"image", "label", "split", "source", "patient_group"}
    if missing := need - set(manifest.columns):
        raise ValueError(f"manifest lacks column(s) {sorted(missing)}")
    classes = config.task_classes(task)
    rows = manifest[manifest["label"].isin(classes)].reset_index(drop=True)
    if bad := set(rows["split"]) - set(SPLITS):
        raise ValueError(f"manifest has unknown split value(s) {sorted(bad)}")
    for split in ("train", "val"):
        counts = rows.loc[rows["split"] == split, "label"].value_counts()
        if absent := [c for c in classes if counts.get(c, 0) == 0]:
            raise ValueError(f"task {task!r}: no {split} images of class(es) {absent}")
    return rows
