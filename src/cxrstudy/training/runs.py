"""One training run end to end (``train_run``), its folder and record, reloading, and run summaries."""

from __future__ import annotations

import io
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from cxrstudy import config
from cxrstudy.fileio import atomic_write_bytes, atomic_write_text, write_json
from cxrstudy.models import Classifier, get_spec, model_transform
from cxrstudy.plots import plot_learning_curve, save_figure
from cxrstudy.runspec import RunSpec
from cxrstudy.tensorcache import load_uint8_batch
from cxrstudy.training.adversary import (
    SourceAdversaryCallback,
    SourceCodes,
    make_source_adversary,
    with_source_column,
)
from cxrstudy.training.data import AUGMENTATION_NOTE, ImageList, TensorBatches, task_rows
from cxrstudy.training.groupdro import GroupCodes, GroupDROCallback, with_group_column
from cxrstudy.training.labels import (
    ComposedLoss,
    LabelSpace,
    compose_predictions,
    decomposition_labels,
    identity_labels,
    make_targets,
)
from cxrstudy.training.learner import HISTORY_COLUMNS, predict_loader, predictions_frame
from cxrstudy.training.scenarios import train_images, train_shallow
from cxrstudy.training.trainconfig import TrainConfig


@dataclass
class RunResult:
    """A finished run: its folder, record, per-epoch history and val/test predictions."""

    run_id: str
    run_dir: Path
    info: dict[str, Any]
    history: pd.DataFrame
    predictions: pd.DataFrame


# --------------------------------------------------------------------------------------------- train_run


def train_run(
    manifest: pd.DataFrame,
    cfg: TrainConfig,
    image_root: Path | str = config.PROCESSED_DIR,
    *,
    out_root: Path | str | None = None,
    profile_dir: Path | str | None = None,
    feature_cache_dir: Path | str | None = None,
) -> RunResult:
    """Train ``cfg``'s run on ``manifest`` (subsampled beforehand), write ``<out_root>/<run_id>/`` (default
    ``<profile_dir>/runs``; ``profile_dir`` holds notebook 03's decomposition) and return its record. Images
    under ``image_root`` are decoded once into the uint8 tensor cache (``tensors/`` beside
    ``feature_cache_dir``; data/cache/tensors/ by default), keyed by that folder and the files' content."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"train_run: cfg must be a TrainConfig, got {type(cfg).__name__}")
    if cfg.decomposition and profile_dir is None:
        raise ValueError("decomposition=True needs profile_dir (where notebook 03 wrote decomposition/)")
    if out_root is None:
        if profile_dir is None:
            raise ValueError("give out_root or profile_dir")
        out_root = Path(profile_dir) / "runs"
    image_root = Path(image_root)
    rows, space, targets = _labelled_rows(manifest, cfg, profile_dir)
    dev = config.resolve_device(cfg.device)

    run_id = cfg.run_id
    run_dir = Path(out_root) / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").unlink(missing_ok=True)  # run.json marks a finished run: never leave a stale one

    config.seed_everything(cfg.train_seed)
    model = Classifier(
        cfg.backbone, len(space.subclasses), pretrained=cfg.scenario != "scratch", dropout=cfg.dropout
    )
    loss = ComposedLoss(space.matrix())
    history: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    tensor_dir = Path(feature_cache_dir).parent / "tensors" if feature_cache_dir else None
    images = _task_images(rows, cfg, image_root, model, tensor_dir) if cfg.scenario != "shallow" else None
    extra = _fit(
        model, rows, targets, loss, cfg, manifest, image_root, dev, feature_cache_dir, history, images
    )
    train_seconds = time.perf_counter() - t0
    model = model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    hist = pd.DataFrame(history, columns=list(HISTORY_COLUMNS))
    if images is None:  # shallow: the val/test images, after the features (same tensor cache entries)
        images = _task_images(rows, cfg, image_root, model, tensor_dir)
    preds = _predict_eval(model, rows, space, cfg, images, dev)
    adversary_log = extra.pop("_adversary_log", None)
    groups_log = extra.pop("_groups_log", None)
    info = _run_info(run_id, cfg, space, rows, hist, preds, str(dev), train_seconds, extra)
    _save_run(run_dir, model, hist, preds, info, adversary_log, groups_log)
    return RunResult(run_id, run_dir, info, hist, preds)


def _labelled_rows(
    manifest: pd.DataFrame, cfg: TrainConfig, profile_dir: Path | str | None
) -> tuple[pd.DataFrame, LabelSpace, np.ndarray]:
    """The task's rows, the label space (decomposition on or off) and the ``[subclass, parent]`` targets."""
    classes = config.task_classes(cfg.task)
    rows, part = fold_rows(manifest, cfg)
    rows = task_rows(rows, cfg.task)
    space, subclass_of = (
        decomposition_labels(Path(profile_dir), classes, part)  # type: ignore[arg-type]
        if cfg.decomposition
        else (identity_labels(classes), None)
    )
    return rows, space, make_targets(rows, space, subclass_of)


def fold_rows(manifest: pd.DataFrame, cfg: TrainConfig) -> tuple[pd.DataFrame, str]:
    """The manifest as the run's fold sees it (``data.splits.cv_roles``) and the folder of that fold's
    decomposition; a manifest whose ``split`` already names roles (train, val, test, holdout) is trained as given,
    with the decomposition at the top of ``decomposition/``."""
    from cxrstudy.data.splits import HOLDOUT, SPLITS, cv_roles
    from cxrstudy.decomposition import part_name

    if "split" in manifest.columns and set(manifest["split"]) <= {*SPLITS, HOLDOUT}:
        return manifest, ""
    return cv_roles(manifest, cfg.folds, cfg.fold, cfg.seed, cfg.inner_val), part_name(cfg.seed, cfg.fold)


def _task_images(
    rows: pd.DataFrame, cfg: TrainConfig, image_root: Path, model: Classifier, tensor_dir: Path | None
) -> torch.Tensor:
    """The task rows' images at the training size from the shared uint8 tensor cache (N,1,S,S); the cache
    is ``tensors/`` beside the feature cache (data/cache/tensors/ by default), as ``extract_features`` has it."""
    return load_uint8_batch(
        rows,
        image_root,
        cfg.image_size,
        model.spec.interpolation,
        cache_dir=tensor_dir,
        workers=cfg.num_workers,
    )


def _fit(
    model: Classifier,
    rows: pd.DataFrame,
    targets: np.ndarray,
    loss: ComposedLoss,
    cfg: TrainConfig,
    manifest: pd.DataFrame,
    image_root: Path,
    device: torch.device,
    feature_cache_dir: Path | str | None,
    history: list[dict[str, Any]],
    images: torch.Tensor | None,
) -> dict[str, Any]:
    """Run the scenario's fit in a scratch folder (fastai's checkpoints); extra facts for run.json (with the
    source adversary, its per-epoch log under ``_adversary_log``)."""
    with tempfile.TemporaryDirectory(prefix="cxr-train-") as workdir:
        if cfg.scenario != "shallow":
            adv = _source_adversary(model, rows, targets, cfg) if cfg.adversary_weight > 0 else None
            dro = _group_dro(rows, targets, loss, cfg) if cfg.objective == "group_dro" else None
            extra = adv or dro
            facts = train_images(
                model,
                rows,
                extra[0] if extra else targets,
                loss,
                cfg,
                image_root=image_root,
                device=device,
                workdir=Path(workdir),
                history=history,
                images=images,
                callbacks=[extra[1]] if extra else (),
            )
            if adv:
                facts.update(_adversary_facts(adv[1], history))
            if dro:
                facts.update({**dro[1].facts(), "_groups_log": dro[1].log_frame()})
            return facts
        return train_shallow(
            model,
            rows,
            targets,
            loss,
            cfg,
            feature_manifest=manifest,
            image_root=image_root,
            device=device,
            feature_cache_dir=Path(feature_cache_dir) if feature_cache_dir else None,
            workdir=Path(workdir),
            history=history,
        )


def _source_adversary(
    model: Classifier, rows: pd.DataFrame, targets: np.ndarray, cfg: TrainConfig
) -> tuple[np.ndarray, SourceAdversaryCallback]:
    """Targets with the per-class source column (codes from *training* rows only; -1 elsewhere) and the
    adversary callback with the run's weight, schedule, learning rate and width."""
    codes = SourceCodes.from_rows(rows, config.task_classes(cfg.task))
    torch.manual_seed(cfg.train_seed + 2)  # the heads' initial weights, independently of the model's
    adversary = make_source_adversary(model, codes, hidden=cfg.adversary_hidden)
    cb = SourceAdversaryCallback(
        adversary, codes, cfg.adversary_weight, schedule=cfg.adversary_schedule, lr=cfg.adversary_lr
    )
    return with_source_column(targets, rows, codes), cb


def _group_dro(
    rows: pd.DataFrame, targets: np.ndarray, loss: ComposedLoss, cfg: TrainConfig
) -> tuple[np.ndarray, GroupDROCallback]:
    """Targets with the group column (label x source of *training* rows only; -1 elsewhere) and the group DRO
    callback with the run's step size."""
    codes = GroupCodes.from_rows(rows)
    return with_group_column(targets, rows, codes), GroupDROCallback(codes, loss, cfg.dro_eta)


def kept_epoch(history: Sequence[dict[str, Any]]) -> int | None:
    """The epoch whose weights the run keeps: the lowest validation loss (the first on ties), as the checkpoint."""
    losses = [r["valid_loss"] for r in history]
    return int(history[int(np.argmin(losses))]["epoch"]) if losses else None


def _adversary_facts(cb: SourceAdversaryCallback, history: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """run.json facts of the adversary (sources per class; accuracy vs majority at the kept epoch, and at the last
    for reference) and its log."""
    log = cb.log_frame()
    keys = ("adv_accuracy", "majority_accuracy", "weight")
    last = log.iloc[-1].to_dict() if len(log) else {}
    best = kept_epoch(history)
    kept = log[log["epoch"] == best].iloc[0].to_dict() if best is not None and (log["epoch"] == best).any() else {}
    return {
        "adversary_sources": {c: list(s) for c, s in zip(cb.codes.classes, cb.codes.sources, strict=True)},
        "adversary_kept_epoch": {"epoch": best, **{k: kept.get(k) for k in keys}},
        "adversary_last_epoch": {"epoch": last.get("epoch"), **{k: last.get(k) for k in keys}},
        "_adversary_log": log,
    }


def _predict_eval(
    model: Classifier,
    rows: pd.DataFrame,
    space: LabelSpace,
    cfg: TrainConfig,
    images: torch.Tensor,
    device: torch.device,
) -> pd.DataFrame:
    """Predictions table of the val and test rows (no augmentation) from the task rows' uint8 images
    ``images`` (row order); the model ends on CPU."""
    m = rows["split"].isin(["val", "test", "holdout"]).to_numpy()  # holdout: never trained or validated on
    eval_rows = rows[m].reset_index(drop=True)
    loader = TensorBatches(
        images[torch.tensor(m)], np.zeros(len(eval_rows)), model.spec, cfg.batch_size, train=False, seed=0
    )
    sub_probs = predict_loader(model, loader, device)
    model.to("cpu")
    return predictions_frame(eval_rows, sub_probs, space, with_subclasses=cfg.decomposition)


def _split_accuracy(preds: pd.DataFrame, split: str) -> float | None:
    """Composed accuracy of one split's predictions; None when the split has none."""
    rows = preds[preds["split"] == split]
    return float((rows["pred"] == rows["label"]).mean()) if len(rows) else None


def _run_info(
    run_id: str,
    cfg: TrainConfig,
    space: LabelSpace,
    rows: pd.DataFrame,
    hist: pd.DataFrame,
    preds: pd.DataFrame,
    device: str,
    train_seconds: float,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The run.json record (docs/ARCHITECTURE.md)."""
    n = rows["split"].value_counts()
    return {
        "run_id": run_id,
        "task": cfg.task,
        "backbone": cfg.backbone,
        "scenario": cfg.scenario,
        "decomposition": bool(cfg.decomposition),
        "seed": cfg.seed,
        "fold": cfg.fold,
        "folds": cfg.folds,
        "config_id": cfg.spec.config_id,
        "train_seed": cfg.train_seed,
        "inner_val": cfg.inner_val,
        "classes": list(space.classes),
        "subclasses": list(space.subclasses),
        "parent_of": dict(space.parent_of),
        "parent_of_subclass": dict(space.parent_of),
        "variant": cfg.variant,
        "input_view": cfg.input_view,
        "equalize": bool(cfg.equalize),
        "view_margin": float(cfg.view_margin),
        "adversary": cfg.adversary,
        "sampling": cfg.sampling,
        "objective": cfg.objective,
        "image_size": cfg.image_size,
        "epochs": cfg.epochs,
        "lr": float(extra.get("lr", cfg.lr)),
        "pretrained": cfg.scenario != "scratch",
        "device": device,
        "train_seconds": round(train_seconds, 3),
        "epochs_run": len(hist),
        "best_epoch": int(hist.loc[hist["valid_loss"].idxmin(), "epoch"]),
        "best_valid_loss": float(hist["valid_loss"].min()),
        "n_train": int(n.get("train", 0)),
        "n_val": int(n.get("val", 0)),
        "n_test": int(n.get("test", 0)),
        "val_accuracy": _split_accuracy(preds, "val"),
        "test_accuracy": _split_accuracy(preds, "test"),
        "params": {
            "batch_size": cfg.batch_size,
            "num_workers": cfg.num_workers,
            "patience": cfg.patience,
            "use_lr_find": cfg.use_lr_find,
            "lr_config": cfg.lr,
            "lr_range": list(cfg.lr_range),
            "lr_find_iters": cfg.lr_find_iters,
            "lr_mult": cfg.lr_mult,
            "wd": cfg.wd,
            "dropout": cfg.dropout,
            **({"dro_eta": cfg.dro_eta} if cfg.objective == "group_dro" else {}),
            "augmentation": AUGMENTATION_NOTE if cfg.scenario != "shallow" else "none (cached features)",
            **{k: v for k, v in extra.items() if k != "lr"},
        },
    }


def learning_curve_figure(hist: pd.DataFrame, run_id: str) -> Figure:
    """A run's learning curve (composed valid loss, best epoch by valid loss), built without pyplot."""
    fig = Figure(figsize=(6.4, 3.6))
    best = int(hist.loc[hist["valid_loss"].idxmin(), "epoch"]) if len(hist) else None
    plot_learning_curve(hist, fig.subplots(), labels=("train loss", "valid loss (composed)", "valid accuracy"),
                        best_epoch=best, title=run_id)  # fmt: skip
    fig.tight_layout()
    return fig


def _save_run(
    run_dir: Path,
    model: nn.Module,
    hist: pd.DataFrame,
    preds: pd.DataFrame,
    info: dict[str, Any],
    adversary_log: pd.DataFrame | None = None,
    groups_log: pd.DataFrame | None = None,
) -> None:
    """Write model.pth, history.csv, learning_curve.png, predictions.csv, adversary.csv (with the source
    adversary) and groups.csv (group DRO; a stale one of either is removed) and, last, run.json."""
    for name, log in (("adversary.csv", adversary_log), ("groups.csv", groups_log)):
        if log is not None:
            atomic_write_text(run_dir / name, log.to_csv(index=False))
        else:
            (run_dir / name).unlink(missing_ok=True)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(run_dir / "model.pth", buf.getvalue())
    atomic_write_text(run_dir / "history.csv", hist.to_csv(index=False))
    save_figure(learning_curve_figure(hist, info["run_id"]), run_dir / "learning_curve.png")
    atomic_write_text(run_dir / "predictions.csv", preds.to_csv(index=False))
    write_json(run_dir / "run.json", info)  # last: marks the run finished


# --------------------------------------------------------------------------------------------- reloading


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
    loader = DataLoader(ImageList(images, transform), batch_size=batch_size, shuffle=False)
    sub = predict_loader(model, loader, config.resolve_device(device))
    return compose_predictions(sub, space), sub


# --------------------------------------------------------------------------------------------- summaries


def summarize_runs(results: Sequence[RunResult]) -> pd.DataFrame:
    """One row per run: variant, scenario, decomposition, seed, subclasses, epochs, time and composed val/test
    accuracy."""
    keys = (
        "run_id",
        "scenario",
        "decomposition",
        "seed",
        "fold",
        "epochs_run",
        "best_epoch",
        "train_seconds",
        "n_train",
        "n_val",
        "n_test",
        "val_accuracy",
        "test_accuracy",
    )
    rows = [
        {
            **{k: r.info[k] for k in keys},
            "variant": RunSpec.from_record(r.info).variant,
            "n_subclasses": len(r.info["subclasses"]),
        }
        for r in results
    ]
    return pd.DataFrame(rows)


def describe_decomposition_effect(summary: pd.DataFrame) -> str:
    """Plain-language comparison of decomposition on vs off on inner validation, averaged over the folds both ran
    (point estimates; held-out numbers and intervals come in notebook 05)."""
    on, off = summary[summary["decomposition"]], summary[~summary["decomposition"]]
    if on.empty or off.empty:
        return "Only one decomposition setting was run: no comparison."
    both = set(zip(on["seed"], on["fold"], strict=True)) & set(zip(off["seed"], off["fold"], strict=True))
    on = on[[k in both for k in zip(on["seed"], on["fold"], strict=True)]]
    off = off[[k in both for k in zip(off["seed"], off["fold"], strict=True)]]
    seeds = sorted(both)
    lines = []
    for split in ("val",):
        x = pd.to_numeric(on[f"{split}_accuracy"], errors="coerce").dropna()
        y = pd.to_numeric(off[f"{split}_accuracy"], errors="coerce").dropna()
        if x.empty or y.empty:
            continue
        lines.append(
            f"{split}: {100 * x.mean():.1f}% with decomposition vs {100 * y.mean():.1f}% without "
            f"({100 * (x.mean() - y.mean()):+.1f} points, n={int(on[f'n_{split}'].iloc[0])} images per fold)"
        )
    return (
        f"{on['scenario'].iloc[0]} ({int(on['n_subclasses'].iloc[0])} subclasses vs "
        f"{int(off['n_subclasses'].iloc[0])} classes), mean over {len(seeds)} fold(s): " + "; ".join(lines)
    )
