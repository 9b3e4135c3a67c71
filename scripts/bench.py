"""``make bench``: feature-extraction vs bare-forward throughput, training images/s per scenario, peak memory.

Needs ``make data`` first (real processed images). Writes ``reports/bench.json`` and prints it. Usage:
    python scripts/bench.py [--backbone efficientnet_lite0] [--image-size 160] [--batch-size 32] [--n-images 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from cxrstudy import config, training
from cxrstudy.features import extract_features, forward_throughput
from cxrstudy.fileio import atomic_write_text


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def machine(device: str) -> dict:
    """Platform, CPU count and load, torch threads, resolved device."""
    dev = config.resolve_device(device)
    out = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(dev),
        "loadavg_start": list(os.getloadavg()),
    }
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)
    return out


def sample_rows(n: int, seed: int) -> pd.DataFrame:
    """``n`` training images of the manifest, classes interleaved; a clear message when there is no data."""
    if not config.MANIFEST_PATH.is_file():
        sys.exit(
            f"bench: {config.MANIFEST_PATH} not found: run `make data` first (it needs real processed images)"
        )
    manifest = pd.read_csv(config.MANIFEST_PATH)
    train = manifest[manifest["split"] == "train"].sample(frac=1.0, random_state=seed)
    if len(train) < n:
        sys.exit(f"bench: need {n} training images, the manifest has {len(train)}")
    return train.iloc[:n].reset_index(drop=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--n-images", type=int, default=256, help="images through the feature pipeline per round")
    p.add_argument(
        "--rounds", type=int, default=3, help="alternating pipeline/bare rounds; best of each kept"
    )
    p.add_argument(
        "--train-batches", type=int, default=4, help="timed training batches per scenario (+1 warm-up)"
    )
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=config.REPORTS_DIR / "bench.json")
    return p.parse_args(argv)


def feature_rounds(
    rows: pd.DataFrame, a: argparse.Namespace
) -> tuple[list[float], list[float], pd.DataFrame]:
    """Feature-pipeline and bare-forward img/s per round (alternating), and the last round's features."""
    fe, bare = [], []
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        # warm-up: weights, allocator, oneDNN kernels for this shape (not timed)
        extract_features(
            rows.iloc[: a.batch_size],
            config.PROCESSED_DIR,
            a.backbone,
            a.image_size,
            a.batch_size,
            a.device,
            a.num_workers,
            cache_dir=Path(tmp) / "warm",
        )
        for i in range(a.rounds):  # alternate, so load from other processes hits both alike
            feats = extract_features(
                rows,
                config.PROCESSED_DIR,
                a.backbone,
                a.image_size,
                a.batch_size,
                a.device,
                a.num_workers,
                cache_dir=Path(tmp) / f"r{i}",
            )  # fresh folder: no cache hit
            fe.append(feats.attrs["images_per_s"])
            bare.append(
                forward_throughput(
                    a.backbone,
                    a.image_size,
                    a.batch_size,
                    a.device,
                    n_batches=max(1, a.n_images // a.batch_size),
                )
            )
            print(
                f"round {i + 1}: pipeline {fe[-1]:.1f} img/s, bare forward {bare[-1]:.1f} img/s", flush=True
            )
    return fe, bare, feats


def train_rates(
    rows: pd.DataFrame, feats: pd.DataFrame, a: argparse.Namespace
) -> tuple[dict[str, float], list[float]]:
    """Training img/s per scenario, and per finetune stage."""
    train, stages = {}, []
    for scenario in config.SCENARIOS:
        r = training.training_throughput(
            rows,
            config.PROCESSED_DIR,
            scenario,
            backbone=a.backbone,
            image_size=a.image_size,
            batch_size=a.batch_size,
            n_batches=a.train_batches,
            device=a.device,
            features=feats,
            seed=a.seed,
        )
        train[scenario] = round(r["img_s"], 1)
        if scenario == "finetune":
            stages = [round(s, 1) for s in r["stages"]]
        print(f"training {scenario}: {train[scenario]} img/s", flush=True)
    return train, stages


def bench_record(
    a: argparse.Namespace,
    host: dict,
    fe: list[float],
    bare: list[float],
    train: dict[str, float],
    stages: list[float],
    seconds: float,
) -> dict:
    """The reports/bench.json record."""
    best_fe, best_bare = max(fe), max(bare)
    return {
        "machine": host,
        "backbone": a.backbone,
        "image_size": a.image_size,
        "batch_size": a.batch_size,
        "n_images": a.n_images,
        "num_workers": a.num_workers,
        "feature_extraction_img_s": round(best_fe, 1),
        "bare_forward_img_s": round(best_bare, 1),
        "pipeline_ratio": round(best_fe / best_bare, 3),
        "pipeline_target": 0.85,
        "pipeline_ratio_per_round": [round(x / y, 3) for x, y in zip(fe, bare, strict=True)],
        "rounds": {
            "feature_extraction_img_s": [round(x, 1) for x in fe],
            "bare_forward_img_s": [round(x, 1) for x in bare],
        },
        "train_img_s": train,
        "train_note": "shallow = linear head on cached features (its real cost is one feature extraction); "
        "deep/finetune/scratch = augmented images through fastai, data loading included",
        "finetune_stage_img_s": stages,
        "peak_rss_mb": peak_rss_mb(),
        "seconds": round(seconds, 1),
        "loadavg_end": list(os.getloadavg()),
    }


def main(argv: list[str] | None = None) -> None:
    """Measure and write the benchmark record."""
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = sample_rows(a.n_images, a.seed)
    host = machine(a.device)
    t_start = time.perf_counter()
    fe, bare, feats = feature_rounds(rows, a)
    train, stages = train_rates(rows, feats, a)
    record = bench_record(a, host, fe, bare, train, stages, time.perf_counter() - t_start)
    atomic_write_text(a.out, json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
