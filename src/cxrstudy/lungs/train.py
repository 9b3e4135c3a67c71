"""Training and evaluation of the lung U-Net on the paired V7 masks.

Training uses only training-split patient groups; the checkpoint is the epoch with the best
validation Dice; the test split is scored once, at the processed images' own resolution, with a
patient-group bootstrap (the helper of :mod:`cxrstudy.evaluation.metrics`). Augmentation runs on
whole batches with ``affine_grid``/``grid_sample``: small rotation, scale, translation and shear
(image bilinear, mask bilinear as a soft target), then brightness, contrast and gamma. Horizontal
flips are off by default: the mask is one class, so a flip keeps image and mask consistent, but
every film of the study is in the standard orientation (heart on the image's right), and a flip
would teach the network mirrored anatomy it never meets; ``hflip`` > 0 allows them.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from cxrstudy.lungs.masks import MaskPair, load_pair
from cxrstudy.lungs.model import DEFAULT_DECODER, LungUNet
from cxrstudy.lungs.qc import clean_mask, shape_prior


@dataclass(frozen=True)
class LungTrainConfig:
    """Every setting that changes the trained model (all of it enters the cache key)."""

    image_size: int = 128
    epochs: int = 32
    batch_size: int = 8
    lr: float = 2e-3
    encoder_lr_mult: float = 1.0  # the pretrained encoder's learning rate as a fraction of ``lr``
    weight_decay: float = 1e-4
    pct_start: float = 0.2
    decoder: tuple[int, ...] = DEFAULT_DECODER
    rotate_deg: float = 15.0
    scale: float = 0.15
    translate: float = 0.08
    shear: float = 0.05
    brightness: float = 0.10  # +- fraction of the grey range
    contrast: float = 0.20  # multiplicative +-
    gamma: float = 0.20  # exponent in [1 - g, 1 + g]
    hflip: float = 0.0  # probability of a horizontal flip
    patience: int = 0  # stop after this many epochs without a better validation Dice (0: never)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size < 32 or self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 (>= 32), got {self.image_size}")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError(f"need epochs >= 1 and batch_size >= 2, got {self.epochs}, {self.batch_size}")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"hflip is a probability, got {self.hflip}")


@dataclass
class TrainResult:
    """The selected model, the per-epoch history and timings."""

    model: LungUNet
    history: pd.DataFrame
    best_epoch: int
    train_seconds: float
    prep_seconds: float
    n_train: int
    n_val: int
    extra: dict = field(default_factory=dict)


@contextmanager
def torch_threads(n: int = 0) -> Iterator[int]:
    """Run with ``n`` intra-op threads (0: the cores this process may use); restores the old setting."""
    old = torch.get_num_threads()
    want = (
        n if n > 0 else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    )
    torch.set_num_threads(max(1, int(want or 1)))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """Mode-L image -> uint8 (1,S,S), squish-resized bicubic as everywhere in the study."""
    from cxrstudy.models import resize_to_uint8

    return resize_to_uint8(img, size, "bicubic")


def mask_to_tensor(mask: np.ndarray, size: int) -> torch.Tensor:
    """Boolean mask -> float (1,S,S) soft target (area-averaged resize, values in [0, 1])."""
    im = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    im = im.resize((size, size), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).unsqueeze(0)


def load_tensors(
    pairs: list[MaskPair], image_root: Path, size: int
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Images uint8 (N,1,S,S), soft masks float (N,1,S,S) and the masks' shape prior, for the pairs."""
    xs, ys, masks = [], [], []
    for pair in pairs:
        img, mask = load_pair(pair, image_root)
        xs.append(to_tensor(img, size))
        ys.append(mask_to_tensor(mask, size))
        masks.append(mask)
    return torch.stack(xs), torch.stack(ys), shape_prior(masks)


def augment(
    x: torch.Tensor, y: torch.Tensor, cfg: LungTrainConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random affine (shared by image and mask) and intensity changes; x float 0..255, y float 0..1."""
    b = x.shape[0]

    def u(lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=gen)

    ang = u() * math.radians(cfg.rotate_deg)
    sc = 1.0 + u() * cfg.scale
    sh = u() * cfg.shear
    flip = torch.where(torch.rand(b, generator=gen) < cfg.hflip, -1.0, 1.0)
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = cos * flip
    theta[:, 0, 1] = -sin + sh
    theta[:, 1, 0] = sin * flip
    theta[:, 1, 1] = cos
    theta[:, 0, 2] = u() * cfg.translate * 2
    theta[:, 1, 2] = u() * cfg.translate * 2
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    shape = (b, 1, 1, 1)
    gamma = (1.0 + u() * cfg.gamma).view(shape).to(x.device)
    x = 255.0 * (x.clamp(0, 255) / 255.0) ** gamma
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (1.0 + u() * cfg.contrast).view(shape).to(x.device) + mean
    x = x + (u() * cfg.brightness * 255.0).view(shape).to(x.device)
    return x.clamp(0, 255), y


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + (1 - soft Dice), Dice per image then averaged."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=(1, 2, 3))
    denom = p.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3))
    dice = (2 * inter + 1.0) / (denom + 1.0)
    return bce + (1.0 - dice).mean()


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean masks (1.0 when both are empty)."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    inter = float((pred & truth).sum())
    total = float(pred.sum() + truth.sum())
    union = total - inter
    if total == 0:
        return 1.0, 1.0
    return 2 * inter / total, inter / union


@torch.inference_mode()
def _val_scores(model: LungUNet, x: torch.Tensor, y: torch.Tensor, dev: torch.device, bs: int) -> tuple:
    """Mean loss and mean per-image Dice (hard, at the training size) on a validation tensor set."""
    model.eval()
    losses, dices = [], []
    for i in range(0, len(x), bs):
        xb, yb = x[i : i + bs].to(dev), y[i : i + bs].to(dev)
        logits = model(xb)
        losses.append(float(seg_loss(logits, yb)) * len(xb))
        pred, truth = logits > 0, yb > 0.5
        inter = (pred & truth).sum(dim=(1, 2, 3)).float()
        total = (pred.sum(dim=(1, 2, 3)) + truth.sum(dim=(1, 2, 3))).float()
        dices.extend(torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total)).tolist())
    return sum(losses) / len(x), float(np.mean(dices))


def _train_epoch(model, opt, sched, xtr, ytr, cfg, gen, device, steps: int, bs: int) -> float:
    """One epoch over shuffled, augmented batches; returns the summed training loss."""
    model.train()
    order = torch.randperm(len(xtr), generator=gen)
    total = 0.0
    for s in range(steps):
        idx = order[s * bs : (s + 1) * bs]
        xb, yb = augment(xtr[idx].float(), ytr[idx], cfg, gen)
        xb = xb.to(device).contiguous(memory_format=torch.channels_last)
        loss = seg_loss(model(xb), yb.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += float(loss.detach()) * len(idx)
    return total


def train_unet(
    train_pairs: list[MaskPair],
    val_pairs: list[MaskPair],
    image_root: Path,
    cfg: LungTrainConfig,
    device: torch.device,
    threads: int = 0,
    log=print,
) -> TrainResult:
    """Train with AdamW + one-cycle; keep the epoch with the best validation Dice."""
    from cxrstudy.config import seed_everything

    if not train_pairs or not val_pairs:
        raise ValueError(f"need training and validation masks, got {len(train_pairs)} and {len(val_pairs)}")
    with torch_threads(threads) as n_threads:
        seed_everything(cfg.seed)
        t0 = time.perf_counter()
        xtr, ytr, prior = load_tensors(train_pairs, image_root, cfg.image_size)
        xva, yva, _ = load_tensors(val_pairs, image_root, cfg.image_size)
        prep = time.perf_counter() - t0
        model = LungUNet(cfg.decoder, pretrained=True)
        model.shape_prior.copy_(torch.from_numpy(prior))
        model = model.to(device, memory_format=torch.channels_last)
        gen = torch.Generator().manual_seed(cfg.seed)
        n = len(xtr)
        bs = min(cfg.batch_size, n)
        steps = n // bs  # drop the last partial batch (BatchNorm on tiny batches is noisy)
        enc = list(model.encoder.parameters())
        enc_ids = {id(p) for p in enc}
        rest = [p for p in model.parameters() if id(p) not in enc_ids]
        lrs = [cfg.lr * cfg.encoder_lr_mult, cfg.lr]
        opt = torch.optim.AdamW(
            [{"params": enc, "lr": lrs[0]}, {"params": rest, "lr": lrs[1]}], weight_decay=cfg.weight_decay
        )
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lrs, total_steps=cfg.epochs * steps, pct_start=cfg.pct_start
        )
        history, best, best_state, best_epoch, stale = [], -1.0, None, 0, 0
        t1 = time.perf_counter()
        for epoch in range(1, cfg.epochs + 1):
            total = _train_epoch(model, opt, sched, xtr, ytr, cfg, gen, device, steps, bs)
            val_loss, val_dice = _val_scores(model, xva, yva, device, 32)
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": total / (steps * bs),
                    "valid_loss": val_loss,
                    "valid_dice": val_dice,
                    "lr": sched.get_last_lr()[-1],
                    "seconds": time.perf_counter() - t1,
                }
            )
            log(
                f"epoch {epoch:3d}/{cfg.epochs}  train {history[-1]['train_loss']:.4f}  "
                f"valid {val_loss:.4f}  dice {val_dice:.4f}  {history[-1]['seconds']:.0f}s"
            )
            if val_dice > best:
                best, best_state, stale = val_dice, copy.deepcopy(model.state_dict()), 0
                best_epoch = epoch
            else:
                stale += 1
                if cfg.patience and stale >= cfg.patience:
                    log(f"early stop: no better validation Dice for {stale} epochs")
                    break
        train_seconds = time.perf_counter() - t1
        model.load_state_dict(best_state)
        model.eval()
    return TrainResult(
        model,
        pd.DataFrame(history),
        best_epoch,
        train_seconds,
        prep,
        n,
        len(xva),
        {"threads": n_threads, "device": str(device), "steps_per_epoch": steps},
    )


@torch.inference_mode()
def predict_probs(
    model: LungUNet, images: list[Image.Image], size: int, device: torch.device, batch_size: int = 32
) -> list[np.ndarray]:
    """Lung probability maps at each image's own size (logits upsampled bilinearly, then sigmoid)."""
    model.eval()
    out: list[np.ndarray] = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        xb = torch.stack([to_tensor(im, size) for im in chunk]).to(device)
        logits = model(xb).float()
        for im, lg in zip(chunk, logits, strict=True):
            up = F.interpolate(lg[None], size=(im.height, im.width), mode="bilinear", align_corners=False)
            out.append(torch.sigmoid(up)[0, 0].cpu().numpy())
    return out


def evaluate_test(
    model: LungUNet,
    pairs: list[MaskPair],
    image_root: Path,
    size: int,
    device: torch.device,
    n_bootstrap: int = 1000,
    seed: int = 0,
    threshold: float = 0.5,
) -> tuple[dict, pd.DataFrame]:
    """Dice / IoU on the test pairs at the processed images' resolution, with patient-group bootstrap CIs.

    ``dice``/``iou``: the post-processed mask (two largest components, holes filled), without the QC
    fallback; ``raw``: the thresholded map; ``as_used``: what later steps get (fallback included).
    """
    from cxrstudy.lungs.qc import postprocess

    if not pairs:
        raise ValueError("no test masks to evaluate")
    rows = []
    loaded = [load_pair(p, image_root) for p in pairs]
    probs = predict_probs(model, [img for img, _ in loaded], size, device)
    for pair, (img, truth), prob in zip(pairs, loaded, probs, strict=True):
        raw = prob > threshold
        clean, _ = clean_mask(raw)
        used, qc = postprocess(prob, np.asarray(img), threshold, model.shape_prior.cpu().numpy())
        d, j = dice_iou(clean, truth)
        dr, jr = dice_iou(raw, truth)
        du, ju = dice_iou(used, truth)
        rows.append(
            {
                "image": pair.image,
                "patient_group": pair.patient_group,
                "dice": d,
                "iou": j,
                "dice_raw": dr,
                "iou_raw": jr,
                "dice_as_used": du,
                "iou_as_used": ju,
                "true_area": float(truth.mean()),
                "pred_area": float(clean.mean()),
                "qc_pass": qc.qc_pass,
            }
        )
    table = pd.DataFrame(rows)
    return bootstrap_means(
        table, ["dice", "iou", "dice_raw", "iou_raw", "dice_as_used", "iou_as_used"], n_bootstrap, seed
    ), table


def bootstrap_means(
    table: pd.DataFrame, columns: list[str], n_bootstrap: int, seed: int, level: float = 0.95
) -> dict:
    """Mean of each column with a percentile CI from resampling whole patient groups."""
    from cxrstudy.stats import group_array, group_bootstrap_means

    groups = group_array(table["patient_group"].to_numpy(), len(table))
    stats = group_bootstrap_means([table[c].to_numpy(dtype=float) for c in columns], groups, n_bootstrap, seed, level)
    out: dict = dict(zip(columns, stats, strict=True))
    out["n_groups"] = int(len(np.unique(groups)))
    return out
