"""The four transfer scenarios (shallow, deep, finetune, scratch) with fastai, with and without decomposition.

One code path: the network always predicts *subclasses* and a fixed composition matrix sums their
probabilities into the task's classes. Decomposition off means one subclass per class (identity).
Training rows carry their subclass (from notebook 03's k-means on training features); validation
and test rows never get one: they carry subclass ``-1`` and only their class, so the loss is the
composed negative log-likelihood there and every validation number is about the real classes.

Scenarios:

* ``shallow``: backbone frozen (weights and batch-norm statistics); only the new linear head trains,
  on cached pooled features (``cxrstudy.features``), no augmentation.
* ``deep``: every layer trains from the pretrained start (one-cycle schedule).
* ``finetune``: layer groups are unfrozen in stages from the head downwards (``freeze_to``), with
  discriminative learning rates ``slice(lr / lr_mult, lr)`` and one one-cycle fit per stage; frozen
  groups keep their batch-norm statistics (``BnFreeze``).
* ``scratch``: the no-transfer control, the same architecture from random weights, all layers training.

Each run writes ``<out_root>/<run_id>/`` with ``model.pth``, ``history.csv``, ``learning_curve.png``,
``predictions.csv`` and, last, ``run.json`` (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.callback.schedule import fit_one_cycle, lr_find  # noqa: F401  (patches Learner)
from fastai.callback.tracker import EarlyStoppingCallback, SaveModelCallback
from fastai.callback.training import BnFreeze
from fastai.data.core import DataLoaders
from fastai.learner import AvgMetric, Learner
from fastai.torch_core import params
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.transforms import v2 as T

from cxrstudy import config
from cxrstudy.fileio import atomic_write_bytes, atomic_write_text, write_json
from cxrstudy.images import load_xray
from cxrstudy.models import (
    BackboneSpec,
    Classifier,
    get_spec,
    model_transform,
    normalize_batch,
    resize_to_uint8,
)
from cxrstudy.plots import plot_learning_curve, save_figure

SPLITS: tuple[str, ...] = ("train", "val", "test")
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


# --------------------------------------------------------------------------------------------- labels


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


def decomposition_labels(profile_dir: Path, classes: Sequence[str]) -> tuple[LabelSpace, pd.Series]:
    """Notebook 03's decomposition restricted to the task's classes, and the subclass of each training image."""
    from cxrstudy.decomposition import load_decomposition

    dec, subclass_of = load_decomposition(Path(profile_dir))
    subs = tuple(s for s in dec.subclasses if dec.parent_of[s] in classes)
    missing = [c for c in classes if not any(dec.parent_of[s] == c for s in subs)]
    if missing:
        raise ValueError(f"decomposition in {profile_dir} has no subclass for class(es) {missing}")
    space = LabelSpace(tuple(classes), subs, {s: dec.parent_of[s] for s in subs})
    return space, subclass_of[subclass_of.isin(subs)]


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
        sub[train] = names.map(sub_idx).to_numpy()
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
        """Mean loss over the batch; ``target`` is (B, 2) ``[subclass, parent]``."""
        sub, parent = target[:, 0], target[:, 1]
        logp_sub = F.log_softmax(logits.float(), dim=1)
        logp_cls = composed_log_probs(logits, self.log_matrix)
        nll_sub = -logp_sub.gather(1, sub.clamp(min=0).unsqueeze(1)).squeeze(1)
        nll_cls = -logp_cls.gather(1, parent.unsqueeze(1)).squeeze(1)
        return torch.where(sub >= 0, nll_sub, nll_cls).mean()

    def composed_accuracy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Share of rows whose composed argmax class is the true class."""
        return (composed_log_probs(logits, self.log_matrix).argmax(1) == target[:, 1]).float().mean()


# --------------------------------------------------------------------------------------------- data


def train_augmentation() -> Callable[[torch.Tensor], torch.Tensor]:
    """Augmentation for frontal chest X-rays, on the squish-resized uint8 image (1,S,S) before normalisation.

    Small rotation (±10°), scale (±5 %) and translation (±4 %), brightness/contrast jitter (±15 %): the
    variation between films, positioning and exposure. No vertical flip (films are never upside down)
    and no horizontal flip either: the heart sits on the left, and burned-in laterality markers and text
    would be mirrored, producing anatomy that does not occur and a cue the network could learn.
    """
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
    """Images on disk as ``(normalised tensor (3,S,S), target [subclass, parent])``.

    The same preprocessing as ``models.model_transform`` (squish-resize to uint8, then normalise), split
    in two so augmentation works on the small uint8 image; the resized images are kept in memory
    (``cache``, S*S bytes each), so only the first epoch decodes files.
    """

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


class _ImageList(Dataset):
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


# --------------------------------------------------------------------------------------------- learner


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


class _ChannelsLast(Callback):
    """Feed image batches in channels-last memory format (1.3-2x faster convolutions on CPU)."""

    order = 1

    def before_batch(self) -> None:
        if self.xb[0].dim() == 4:
            self.learn.xb = (self.xb[0].contiguous(memory_format=torch.channels_last), *self.xb[1:])


class _History(Callback):
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
    learn = Learner(
        dls,
        model,
        loss_func=loss,
        metrics=[AvgMetric(loss.composed_accuracy)],
        lr=lr,
        wd=wd,
        path=path,
        model_dir=".",
        train_bn=False,
        cbs=[_ChannelsLast(), BnFreeze()],
        **kw,
    )
    return learn


def fit_stage(
    learn: Learner,
    epochs: int,
    lr: float | slice,
    *,
    stage: int,
    history: list[dict[str, Any]],
    saver: SaveModelCallback,
    patience: int,
) -> None:
    """One one-cycle fit with best-checkpoint (kept across stages) and early stopping on the composed valid loss."""
    cbs = [_History(history, stage), saver, EarlyStoppingCallback(monitor="valid_loss", patience=patience)]
    learn.fit_one_cycle(epochs, lr, cbs=cbs)
    bad = [r["epoch"] for r in history if not math.isfinite(r["valid_loss"])]
    if bad:
        raise FloatingPointError(f"training diverged: non-finite validation loss at epoch(s) {bad}; lower lr")


# --------------------------------------------------------------------------------------------- predictions


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


def compose_predictions(sub_probs: np.ndarray, space: LabelSpace) -> np.ndarray:
    """Composed class probabilities (n, n_classes) from subclass probabilities."""
    from cxrstudy.decomposition import compose

    return np.asarray(compose(sub_probs, list(space.subclasses), list(space.classes)))


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


def load_run_model(run_dir: Path | str) -> tuple[Classifier, dict[str, Any]]:
    """The trained ``Classifier`` of a run folder (eval mode, CPU) and its ``run.json``."""
    run_dir = Path(run_dir)
    info_path = run_dir / "run.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path} is missing: {run_dir} is not a finished training run")
    info = json.loads(info_path.read_text())
    model = Classifier(
        info["backbone"],
        len(info["subclasses"]),
        pretrained=False,
        dropout=float(info["params"].get("dropout", 0.2)),
    )
    try:
        state = torch.load(run_dir / "model.pth", map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except (OSError, RuntimeError) as exc:
        raise RuntimeError(
            f"{run_dir / 'model.pth'}: cannot load into Classifier({info['backbone']!r}): {exc}"
        ) from exc
    return model.eval(), info


def predict_images(
    model: nn.Module,
    images: Sequence[Image.Image],
    run_info: dict[str, Any],
    device: str = "auto",
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Composed class probabilities (n, n_classes) and subclass probabilities (n, n_sub) of PIL ``L`` images."""
    space = LabelSpace(tuple(run_info["classes"]), tuple(run_info["subclasses"]), dict(run_info["parent_of"]))
    transform = model_transform(get_spec(run_info["backbone"]), int(run_info["image_size"]))
    loader = DataLoader(_ImageList(images, transform), batch_size=batch_size, shuffle=False)
    sub = predict_loader(model, loader, config.resolve_device(device))
    return compose_predictions(sub, space), sub


# --------------------------------------------------------------------------------------------- files


def make_run_id(task: str, backbone: str, scenario: str, decomposition: bool, seed: int) -> str:
    """``<task>__<backbone>__<scenario>__<decomp|nodecomp>__seed<seed>``."""
    return f"{task}__{backbone}__{scenario}__{'decomp' if decomposition else 'nodecomp'}__seed{seed}"


@dataclass
class RunResult:
    """A finished run: its folder, record, per-epoch history and val/test predictions."""

    run_id: str
    run_dir: Path
    info: dict[str, Any]
    history: pd.DataFrame
    predictions: pd.DataFrame


# --------------------------------------------------------------------------------------------- scenarios


def _train_shallow(
    model: Classifier,
    rows: pd.DataFrame,
    targets: np.ndarray,
    loss: ComposedLoss,
    *,
    feature_manifest: pd.DataFrame,
    image_root: Path,
    backbone: str,
    image_size: int,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: torch.device,
    num_workers: int,
    patience: int,
    wd: float | None,
    feature_cache_dir: Path | None,
    workdir: Path,
    history: list[dict[str, Any]],
) -> None:
    """Train only ``model.head`` (after its dropout) on frozen-backbone features of train and val.

    Features come from ``extract_features`` on ``feature_manifest`` (the whole manifest the run was given,
    so notebook 02's cache is reused when it saw the same rows).
    """
    from cxrstudy.features import extract_features

    kw: dict[str, Any] = {"cache_dir": feature_cache_dir} if feature_cache_dir is not None else {}
    fit_rows = rows[rows["split"].isin(["train", "val"])]
    feats = extract_features(
        feature_manifest,
        image_root,
        backbone,
        image_size,
        batch_size=batch_size,
        device=str(device),
        num_workers=num_workers,
        **kw,
    )
    missing = set(fit_rows["image"]) - set(feats.index)
    if missing:
        raise ValueError(
            f"extract_features returned no features for {len(missing)} image(s), e.g. {sorted(missing)[:3]}"
        )
    loaders = []
    for split in ("train", "val"):
        m = (rows["split"] == split).to_numpy()
        x = torch.tensor(feats.loc[rows.loc[m, "image"]].to_numpy(dtype=np.float32))
        if x.shape[1] != model.head.in_features:
            raise ValueError(f"features have {x.shape[1]} columns, the head expects {model.head.in_features}")
        ds = TensorDataset(x, torch.as_tensor(targets[m]))
        loaders.append(make_loader(ds, batch_size, train=split == "train", seed=seed))
    head = nn.Sequential(model.dropout, model.head).to(device)
    learn = make_learner(head, DataLoaders(*loaders), loss, lr=lr, path=workdir, wd=wd)
    saver = SaveModelCallback(monitor="valid_loss", fname="best", reset_on_fit=False)
    fit_stage(learn, epochs, lr, stage=1, history=history, saver=saver, patience=patience)


def _train_images(
    model: Classifier,
    rows: pd.DataFrame,
    targets: np.ndarray,
    loss: ComposedLoss,
    *,
    scenario: str,
    image_root: Path,
    image_size: int,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: torch.device,
    num_workers: int,
    patience: int,
    wd: float | None,
    use_lr_find: bool,
    finetune_stages: Sequence[int] | None,
    lr_mult: float,
    workdir: Path,
    history: list[dict[str, Any]],
) -> dict[str, Any]:
    """deep / finetune / scratch on augmented images; returns extra facts for run.json (stages, found lr)."""
    loaders = []
    for split in ("train", "val"):
        m = (rows["split"] == split).to_numpy()
        ds = XrayDataset(
            [image_root / p for p in rows.loc[m, "image"]],
            targets[m],
            model.spec,
            image_size,
            train_augmentation() if split == "train" else None,
        )
        loaders.append(
            make_loader(ds, batch_size, train=split == "train", seed=seed, num_workers=num_workers)
        )
    model.to(device).to(memory_format=torch.channels_last)
    learn = make_learner(
        model, DataLoaders(*loaders), loss, lr=lr, path=workdir, splitter=group_splitter, wd=wd
    )
    saver = SaveModelCallback(monitor="valid_loss", fname="best", reset_on_fit=False)
    extra: dict[str, Any] = {}
    if scenario in ("deep", "scratch"):
        learn.unfreeze()
        fit_stage(learn, epochs, lr, stage=1, history=history, saver=saver, patience=patience)
        return extra
    n_groups = len(model.layer_groups())
    sched = finetune_schedule(n_groups, finetune_stages)
    extra["finetune_stages"] = sched
    for stage, n_open in enumerate(sched, start=1):
        learn.freeze_to(-n_open)
        if stage == 1 and use_lr_find:
            found = float(learn.lr_find(num_it=min(100, 10 * len(loaders[0])), show_plot=False).valley)
            extra["lr_found"] = found
            lr = found
        stage_lr: float | slice = lr if n_open == 1 else slice(lr / lr_mult, lr)
        fit_stage(learn, epochs, stage_lr, stage=stage, history=history, saver=saver, patience=patience)
    return extra


def train_run(
    manifest: pd.DataFrame,
    image_root: Path | str = config.PROCESSED_DIR,
    *,
    task: str = "covid_vs_normal",
    scenario: str = "shallow",
    decomposition: bool = False,
    backbone: str = "efficientnet_lite0",
    image_size: int = 160,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    device: str = "auto",
    out_root: Path | str | None = None,
    profile_dir: Path | str | None = None,
    num_workers: int = 0,
    patience: int = 2,
    use_lr_find: bool = False,
    finetune_stages: Sequence[int] | None = None,
    lr_mult: float = 100.0,
    wd: float | None = None,
    dropout: float = 0.2,
    feature_cache_dir: Path | str | None = None,
) -> RunResult:
    """Train one scenario with decomposition on or off, save the run folder, return its record.

    ``manifest``: rows with image, label, split, source, patient_group (subsample it beforehand);
    ``profile_dir``: where notebook 03's decomposition lives (needed when ``decomposition``);
    ``out_root``: folder of run folders (default ``<profile_dir>/runs``). ``epochs`` is per stage for
    finetune. ``wd`` None = fastai's default (0.01, decoupled). ``feature_cache_dir`` (shallow) None =
    the features module's default cache.
    """
    if scenario not in config.SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {config.SCENARIOS}")
    if epochs < 1 or batch_size < 2 or lr <= 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 2 and lr > 0 (got {epochs}, {batch_size}, {lr})")
    if decomposition and profile_dir is None:
        raise ValueError("decomposition=True needs profile_dir (where notebook 03 wrote decomposition/)")
    if out_root is None:
        if profile_dir is None:
            raise ValueError("give out_root or profile_dir")
        out_root = Path(profile_dir) / "runs"
    image_root = Path(image_root)
    classes = config.task_classes(task)
    rows = task_rows(manifest, task)
    space, subclass_of = (
        decomposition_labels(Path(profile_dir), classes)
        if decomposition  # type: ignore[arg-type]
        else (identity_labels(classes), None)
    )
    targets = make_targets(rows, space, subclass_of)
    dev = config.resolve_device(device)

    run_id = make_run_id(task, backbone, scenario, decomposition, seed)
    run_dir = Path(out_root) / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").unlink(missing_ok=True)  # run.json marks a finished run: never leave a stale one

    config.seed_everything(seed)
    model = Classifier(backbone, len(space.subclasses), pretrained=scenario != "scratch", dropout=dropout)
    loss = ComposedLoss(space.matrix())
    history: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cxr-train-") as workdir:
        if scenario == "shallow":
            _train_shallow(
                model,
                rows,
                targets,
                loss,
                feature_manifest=manifest,
                image_root=image_root,
                backbone=backbone,
                image_size=image_size,
                epochs=epochs,
                lr=lr,
                batch_size=batch_size,
                seed=seed,
                device=dev,
                num_workers=num_workers,
                patience=patience,
                wd=wd,
                feature_cache_dir=Path(feature_cache_dir) if feature_cache_dir else None,
                workdir=Path(workdir),
                history=history,
            )
        else:
            extra = _train_images(
                model,
                rows,
                targets,
                loss,
                scenario=scenario,
                image_root=image_root,
                image_size=image_size,
                epochs=epochs,
                lr=lr,
                batch_size=batch_size,
                seed=seed,
                device=dev,
                num_workers=num_workers,
                patience=patience,
                wd=wd,
                use_lr_find=use_lr_find,
                finetune_stages=finetune_stages,
                lr_mult=lr_mult,
                workdir=Path(workdir),
                history=history,
            )
    train_seconds = time.perf_counter() - t0
    model = model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    hist = pd.DataFrame(history, columns=list(HISTORY_COLUMNS))

    eval_rows = rows[rows["split"].isin(["val", "test"])].reset_index(drop=True)
    eval_ds = XrayDataset(
        [image_root / p for p in eval_rows["image"]],
        np.zeros((len(eval_rows), 2)),
        model.spec,
        image_size,
        cache=False,
    )
    sub_probs = predict_loader(
        model, make_loader(eval_ds, batch_size, train=False, seed=seed, num_workers=num_workers), dev
    )
    model.to("cpu")
    preds = predictions_frame(eval_rows, sub_probs, space, with_subclasses=decomposition)

    acc = {
        s: float((preds.loc[preds["split"] == s, "pred"] == preds.loc[preds["split"] == s, "label"]).mean())
        if (preds["split"] == s).any()
        else None
        for s in ("val", "test")
    }
    n = rows["split"].value_counts()
    info: dict[str, Any] = {
        "run_id": run_id,
        "task": task,
        "backbone": backbone,
        "scenario": scenario,
        "decomposition": bool(decomposition),
        "seed": seed,
        "classes": list(space.classes),
        "subclasses": list(space.subclasses),
        "parent_of": dict(space.parent_of),
        "parent_of_subclass": dict(space.parent_of),
        "image_size": image_size,
        "epochs": epochs,
        "lr": lr,
        "pretrained": scenario != "scratch",
        "device": str(dev),
        "train_seconds": round(train_seconds, 3),
        "epochs_run": len(hist),
        "best_epoch": int(hist.loc[hist["valid_loss"].idxmin(), "epoch"]),
        "best_valid_loss": float(hist["valid_loss"].min()),
        "n_train": int(n.get("train", 0)),
        "n_val": int(n.get("val", 0)),
        "n_test": int(n.get("test", 0)),
        "val_accuracy": acc["val"],
        "test_accuracy": acc["test"],
        "params": {
            "batch_size": batch_size,
            "num_workers": num_workers,
            "patience": patience,
            "use_lr_find": use_lr_find,
            "lr_mult": lr_mult,
            "wd": wd,
            "dropout": dropout,
            "augmentation": "rotate±10°, translate±4%, scale±5%, brightness/contrast±15%, no flips"
            if scenario != "shallow"
            else "none (cached features)",
            **extra,
        },
    }

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(run_dir / "model.pth", buf.getvalue())
    atomic_write_text(run_dir / "history.csv", hist.to_csv(index=False))
    save_figure(plot_learning_curve(hist, title=run_id), run_dir / "learning_curve.png")
    atomic_write_text(run_dir / "predictions.csv", preds.to_csv(index=False))
    write_json(run_dir / "run.json", info)  # last: marks the run finished
    return RunResult(run_id, run_dir, info, hist, preds)


# --------------------------------------------------------------------------------------------- summaries


def summarize_runs(results: Sequence[RunResult]) -> pd.DataFrame:
    """One row per run: scenario, decomposition, subclasses, epochs, time and composed val/test accuracy."""
    keys = (
        "run_id",
        "scenario",
        "decomposition",
        "epochs_run",
        "best_epoch",
        "train_seconds",
        "n_train",
        "n_val",
        "n_test",
        "val_accuracy",
        "test_accuracy",
    )
    rows = [{**{k: r.info[k] for k in keys}, "n_subclasses": len(r.info["subclasses"])} for r in results]
    return pd.DataFrame(rows)


def describe_decomposition_effect(summary: pd.DataFrame) -> str:
    """Plain-language comparison of decomposition on vs off (point estimates; intervals come in notebook 05)."""
    on, off = summary[summary["decomposition"]], summary[~summary["decomposition"]]
    if on.empty or off.empty:
        return "Only one decomposition setting was run: no comparison."
    a, b = on.iloc[0], off.iloc[0]
    lines = []
    for split in ("val", "test"):
        x, y = a[f"{split}_accuracy"], b[f"{split}_accuracy"]
        if x is None or y is None or pd.isna(x) or pd.isna(y):
            continue
        lines.append(
            f"{split}: {100 * x:.1f}% with decomposition vs {100 * y:.1f}% without "
            f"({100 * (x - y):+.1f} points, n={int(a[f'n_{split}'])} images)"
        )
    return (
        f"{a['scenario']} ({int(a['n_subclasses'])} subclasses vs {int(b['n_subclasses'])} classes): "
        + "; ".join(lines)
    )


# --------------------------------------------------------------------------------------------- benchmark


class _BatchTimer(Callback):
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
    """Training images/s of one scenario through the real pipeline (first batch = warm-up, not counted).

    ``rows`` need ``image`` and ``label`` (any task class); shallow needs ``features`` (indexed by image) and
    times the head on them. Returns ``{"img_s": ..., "stages": [img/s per finetune stage]}``.
    """
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
    if scenario == "shallow":
        if features is None:
            raise ValueError("shallow times the head on cached features: pass features")
        x = torch.tensor(features.loc[rows["image"]].to_numpy(dtype=np.float32))
        ds: Dataset = TensorDataset(x, torch.as_tensor(targets))
        net: nn.Module = nn.Sequential(model.dropout, model.head)
        kw: dict[str, Any] = {}
    else:
        ds = XrayDataset(
            [Path(image_root) / p for p in rows["image"]],
            targets,
            model.spec,
            image_size,
            train_augmentation(),
        )
        net = model.to(memory_format=torch.channels_last)
        kw = {"splitter": group_splitter}
    net.to(dev)
    loader = make_loader(ds, batch_size, train=True, seed=seed)
    valid = make_loader(torch.utils.data.Subset(ds, range(2)), batch_size, train=False, seed=seed)
    rates = []
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as workdir:
        learn = make_learner(net, DataLoaders(loader, valid), loss, lr=1e-4, path=Path(workdir), **kw)
        if scenario == "finetune":
            opens = finetune_schedule(len(model.layer_groups()), finetune_stages)
        elif scenario == "shallow":
            opens = [0]
        else:
            opens = [len(model.layer_groups())]
        for n_open in opens:
            if n_open:
                learn.freeze_to(-n_open)
            timer = _BatchTimer()
            quiet = learn.no_bar() if hasattr(learn, "no_bar") else contextlib.nullcontext()
            with learn.no_logging(), quiet:
                learn.fit(1, cbs=[timer])
            rates.append(batch_size * (len(timer.times) - 1) / sum(timer.times[1:]))
    # stages run for equal epochs: the overall rate is the harmonic mean
    return {"img_s": len(rates) / sum(1 / r for r in rates), "stages": rates}
