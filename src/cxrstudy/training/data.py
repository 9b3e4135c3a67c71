"""Training data: the task's manifest rows, batch augmentation on tensors, in-memory batch loaders.

Training and evaluation images come from the shared uint8 tensor cache (``cxrstudy.tensorcache``): each
file decoded and resized once; ``TensorBatches`` slices, augments (``BatchAugment``, per image, whole batch
at once) and normalises batches straight into channels_last float. ``XrayDataset`` is the per-image PIL
path (kept for callers that want one image at a time)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cxrstudy import config
from cxrstudy.data.splits import HOLDOUT
from cxrstudy.images import load_xray
from cxrstudy.models import BackboneSpec, normalize_batch, resize_to_uint8
from cxrstudy.tensorcache import to_model_input

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: What ``train_augmentation`` does, as run.json records it.
AUGMENTATION_NOTE = (
    "rotate±10°, translate±4%, scale±5%, brightness/contrast±15% (per image, on whole batches), no flips"
)


@dataclass(frozen=True)
class AugmentRanges:
    """Ranges of the training augmentation: rotation (degrees, ±), shift (fraction of the side, ±), scale
    (low, high), brightness and contrast factors (1 ± value)."""

    degrees: float = 10.0
    translate: float = 0.04
    scale: tuple[float, float] = (0.95, 1.05)
    brightness: float = 0.15
    contrast: float = 0.15


class BatchAugment:
    """Random affine (rotation, scale, shift; bilinear, black fill) and brightness/contrast jitter drawn
    independently for every image of a grey batch (B,1,S,S), applied to the whole batch at once.

    The same operations and ranges as torchvision's ``RandomAffine(degrees=10, translate=(0.04, 0.04),
    scale=(0.95, 1.05))`` then ``ColorJitter(brightness=0.15, contrast=0.15)`` on each image, without a
    per-image Python loop. Output has the input's shape and dtype (uint8 is rounded back, float stays
    unrounded in 0..255). ``generator`` makes it reproducible (None: torch's global generator)."""

    def __init__(self, ranges: AugmentRanges = AugmentRanges(), generator: torch.Generator | None = None):
        self.ranges, self.generator = ranges, generator

    def _uniform(self, n: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=self.generator)

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        """Parameters of ``n`` images: angle (degrees), scale, shift (n,2) as fractions of the side,
        brightness and contrast factors."""
        r = self.ranges
        return {
            "angle": self._uniform(n, -r.degrees, r.degrees),
            "scale": self._uniform(n, *r.scale),
            "shift": self._uniform(2 * n, -r.translate, r.translate).view(n, 2),
            "brightness": self._uniform(n, 1 - r.brightness, 1 + r.brightness),
            "contrast": self._uniform(n, 1 - r.contrast, 1 + r.contrast),
        }

    @staticmethod
    def apply(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Apply sampled parameters to a batch (B,1,H,W); returns the same shape and dtype."""
        b, _, h, w = x.shape
        xf = x.float()
        a = torch.deg2rad(p["angle"].to(xf))
        cos, sin, s = torch.cos(a), torch.sin(a), p["scale"].to(xf)
        # output -> input map in normalised coordinates: D R(-a) D^-1 / s, shift taken out first
        theta = torch.zeros(b, 2, 3, dtype=xf.dtype)
        theta[:, 0, 0], theta[:, 0, 1] = cos / s, sin * h / (w * s)
        theta[:, 1, 0], theta[:, 1, 1] = -sin * w / (h * s), cos / s
        shift = 2 * p["shift"].to(xf)  # fraction of the side -> normalised units
        theta[:, :, 2] = -(theta[:, :, :2] @ shift.unsqueeze(2)).squeeze(2)
        grid = F.affine_grid(theta.to(xf.device), [b, 1, h, w], align_corners=False)
        xf = F.grid_sample(xf, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        xf = (xf * p["brightness"].to(xf).view(b, 1, 1, 1)).clamp_(0, 255)
        mean = xf.mean(dim=(1, 2, 3), keepdim=True)
        c = p["contrast"].to(xf).view(b, 1, 1, 1)
        xf = (c * xf + (1 - c) * mean).clamp_(0, 255)
        return xf.round_().to(torch.uint8) if x.dtype == torch.uint8 else xf.to(x.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Augment a batch (B,1,S,S) or one image (1,S,S)."""
        if x.dim() == 3:
            return self(x.unsqueeze(0)).squeeze(0)
        return self.apply(x, self.sample(len(x)))


def train_augmentation(generator: torch.Generator | None = None) -> BatchAugment:
    """Augmentation for frontal chest X-rays, on squish-resized grey images (B,1,S,S) or (1,S,S) before
    normalisation (uint8, or float in 0..255)."""
    # Small rotation, scale and translation, brightness/contrast jitter: the variation between films,
    # positioning and exposure. No vertical flip (films are never upside down) and no horizontal flip
    # either: the heart sits on the left, and burned-in laterality markers and text would be mirrored,
    # producing anatomy that does not occur and a cue the network could learn.
    return BatchAugment(AugmentRanges(), generator)


#: Bounds of a film's sampling weight before the weights are scaled to mean 1 (``source_balance_weights``).
BALANCE_CLIP: tuple[float, float] = (0.25, 4.0)


def source_balance_weights(
    labels: Sequence[str], sources: Sequence[str], clip: tuple[float, float] = BALANCE_CLIP
) -> tuple[np.ndarray, pd.DataFrame]:
    """Per-film weights ``P(label) / P(label | source)`` (Kamiran & Calders' reweighing), clipped to ``clip``
    and scaled to mean 1, and a table of them per (label, source) cell with its film count.

    Under these weights the label is independent of the source within every source that holds more than one
    label (up to the clip); a source with one label only keeps it, down-weighted to that label's prior."""
    frame = pd.DataFrame({"label": np.asarray(labels, dtype=object), "source": np.asarray(sources, dtype=object)})
    if frame.empty:
        raise ValueError("source_balance_weights: no training films")
    if frame.isna().any().any() or (frame == "").any().any():
        raise ValueError("source_balance_weights: every film needs a label and a source")
    n = len(frame)
    n_label = frame.groupby("label")["label"].transform("size").to_numpy(float)
    n_source = frame.groupby("source")["source"].transform("size").to_numpy(float)
    n_cell = frame.groupby(["label", "source"])["label"].transform("size").to_numpy(float)
    w = np.clip(n_label * n_source / (n * n_cell), *clip)
    w = w / w.mean()
    frame["weight"] = w
    cells = (
        frame.groupby(["label", "source"], sort=True)
        .agg(n=("weight", "size"), weight=("weight", "first"))
        .reset_index()
    )
    return w, cells


class TensorBatches:
    """Batches ``(normalised float (B,3,S,S) channels_last, targets)`` sliced from an in-memory uint8 tensor
    (N,1,S,S): shuffled (training) with its own seeded generator, augmented batch-wise, no per-image work.
    With ``weights`` (training only) each epoch draws N films with replacement in proportion to them.

    Iterable with a length, which is all fastai's Learner asks of a loader. In training the last batch is
    dropped only when it would hold a single image (batch norm needs two), as ``make_loader`` does."""

    def __init__(
        self,
        images: torch.Tensor,
        targets: np.ndarray | torch.Tensor,
        spec: BackboneSpec,
        batch_size: int,
        *,
        train: bool,
        seed: int,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        weights: np.ndarray | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"expected uint8 images (N,1,S,S), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.weights = None
        if weights is not None:
            w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
            if not train:
                raise ValueError("sampling weights are for training batches only")
            if w.shape != (len(images),) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"expected {len(images)} finite non-negative weights with a positive sum")
            self.weights = w
        self.images, self.targets = images, torch.as_tensor(targets, dtype=torch.long)
        self.spec, self.bs, self.train, self.augment = spec, batch_size, train, augment
        self.generator = torch.Generator().manual_seed(seed)
        self.drop_last = train and len(images) % batch_size == 1

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.bs if self.drop_last else -(-n // self.bs)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.images)
        if not self.train:
            order = torch.arange(n)
        elif self.weights is not None:
            order = torch.multinomial(self.weights, n, replacement=True, generator=self.generator)
        else:
            order = torch.randperm(n, generator=self.generator)
        for k in range(len(self)):
            idx = order[k * self.bs : (k + 1) * self.bs]
            x = self.images[idx].float()
            if self.augment is not None:
                x = self.augment(x)
            yield to_model_input(x, self.spec), self.targets[idx]


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
    if bad := set(rows["split"]) - {*SPLITS, HOLDOUT}:
        raise ValueError(f"manifest has unknown split value(s) {sorted(bad)}")
    for split in ("train", "val"):
        counts = rows.loc[rows["split"] == split, "label"].value_counts()
        if absent := [c for c in classes if counts.get(c, 0) == 0]:
            raise ValueError(f"task {task!r}: no {split} images of class(es) {absent}")
    return rows
