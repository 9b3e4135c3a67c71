"""``make bench``: the study's pipelines against the best bare figures of the same model on this machine.

One process, re-executed with the allocator settings users get (``config.RUNTIME_ENV``), alternating rounds so
load from other processes hits every measurement alike, best of rounds kept:

* feature extraction (``extract_features``, images already in the shared uint8 tensor cache, as every
  extraction after the first decode sees them) against the bare forward pass of the same model on an
  in-memory normalised channels_last tensor, in fp32 and, where the CPU computes bf16 natively, under bf16
  autocast; ``pipeline_ratio`` compares with the bare figure of the precision the pipeline used;
* deep training through fastai (tensor cache, batch augmentation, the real learner) against a bare
  forward + backward + AdamW step on in-memory tensors run after every pipeline batch, so the two alternate
  batch by batch (``train_pipeline_ratio``: best round against best round; the median of the per-batch
  ratios beside it); shallow, finetune and scratch are timed too;
* the one-off cost: decoding and resizing the images (``decode_img_s``).

Needs ``make data`` first (real processed images). Writes ``reports/bench.json`` and prints it. Usage:
    python scripts/bench.py [--backbone efficientnet_lite0] [--image-size 160] [--batch-size 32] [--n-images 256]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cxrstudy import config, tensorcache, training
from cxrstudy.data.manifest import ManifestError, load_manifest
from cxrstudy.features import bf16_supported, extract_features, prepare_model
from cxrstudy.fileio import atomic_write_text
from cxrstudy.models import get_spec

#: The share of the bare figure each pipeline is meant to reach.
TARGET_RATIO = 0.85


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(device: str) -> dict[str, Any]:
    """CPU model and cores, torch version and threads, the device, the load average at the start."""
    dev = config.resolve_device(device)
    out = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": bf16_supported(dev),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(dev),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)
    return out


def sample_rows(n: int, seed: int, manifest_path: Path) -> pd.DataFrame:
    """``n`` training images of the manifest, classes interleaved; a clear message when there is no data."""
    try:
        manifest = load_manifest(manifest_path)
    except ManifestError as exc:
        sys.exit(f"bench: {exc} (it needs real processed images)")
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
        "--rounds", type=int, default=5, help="alternating pipeline/bare forward rounds; best kept"
    )
    p.add_argument("--train-rounds", type=int, default=3, help="alternating deep-training/bare-step rounds")
    p.add_argument(
        "--train-batches", type=int, default=4, help="timed training batches per round (+1 warm-up)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--manifest", type=Path, default=config.MANIFEST_PATH)
    p.add_argument("--image-root", type=Path, default=config.PROCESSED_DIR)
    p.add_argument("--out", type=Path, default=config.REPORTS_DIR / "bench.json")
    return p.parse_args(argv)


def bare_forward(model: torch.nn.Module, x: torch.Tensor, batch_size: int, bf16: bool) -> float:
    """Images/s of the model over an in-memory normalised tensor, batch by batch (one untimed warm-up batch)."""
    dev = next(model.parameters()).device
    cast = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    batches = [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
    with torch.inference_mode(), cast:
        model(batches[0])
        start = time.perf_counter()
        for xb in batches:
            model(xb).float()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    return len(x) / (time.perf_counter() - start)


def feature_rounds(rows: pd.DataFrame, a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Alternating rounds of the feature pipeline and the bare forward (fp32, and bf16 where native)."""
    spec, dev = get_spec(a.backbone), config.resolve_device(a.device)
    start = time.perf_counter()
    images = tensorcache.load_uint8_batch(rows, a.image_root, a.image_size, spec.interpolation, persist=False)
    decode = len(rows) / (time.perf_counter() - start)
    kw = dict(batch_size=a.batch_size, device=a.device, cache_dir=tmp / "features")
    # warm-up call: decides bf16 (recorded in the features folder), fills the tensor cache, warms the kernels
    warm = extract_features(rows, a.image_root, a.backbone, a.image_size, **kw)
    Path(warm.attrs["cache_file"]).unlink()
    model, _ = prepare_model(a.backbone, dev)
    x = tensorcache.to_model_input(images.to(dev), spec)
    precisions = ["fp32", "bf16"] if bf16_supported(dev) else ["fp32"]
    rates: dict[str, list[float]] = {"pipeline": [], **{p: [] for p in precisions}}
    for i in range(a.rounds):
        feats = extract_features(rows, a.image_root, a.backbone, a.image_size, **kw)
        Path(feats.attrs["cache_file"]).unlink()  # the next round extracts again
        rates["pipeline"].append(feats.attrs["images_per_s"])
        for p in precisions:
            rates[p].append(bare_forward(model, x, a.batch_size, bf16=p == "bf16"))
        print(
            f"round {i + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()) + " img/s",
            flush=True,
        )
    return {
        "rates": rates,
        "decode_img_s": decode,
        "precision": warm.attrs["precision"],
        "bf16_check": warm.attrs["bf16_check"],
    }


def train_rounds(rows: pd.DataFrame, feats: pd.DataFrame, a: argparse.Namespace) -> dict[str, Any]:
    """Deep training through the pipeline with a bare step after every batch (alternating batch by batch), in
    rounds; then shallow, finetune and scratch once each."""
    spec = get_spec(a.backbone)
    n = a.batch_size * (a.train_batches + 1)
    images = tensorcache.load_uint8_batch(rows.iloc[:n], a.image_root, a.image_size, spec.interpolation)
    y = torch.as_tensor((rows["label"].iloc[:n] != rows["label"].iloc[0]).to_numpy(dtype=np.int64))
    bare = training.BareStep(a.backbone, a.device, tensorcache.to_model_input(images, spec), torch.stack([y, y], 1),
                              a.batch_size)
    kw = dict(backbone=a.backbone, image_size=a.image_size, batch_size=a.batch_size, device=a.device)
    kw |= dict(n_batches=a.train_batches, features=feats, seed=a.seed)
    deep, bare_rates, pairs = [], [], []
    for i in range(a.train_rounds):
        bare.times.clear()
        r = training.training_throughput(rows, a.image_root, "deep", between=bare.step, **kw)
        steps = bare.times[1:]  # the step after the untimed first batch onwards: paired with timed batches
        deep.append(r["img_s"])
        bare_rates.append(a.batch_size * len(steps) / sum(steps))
        pairs += [b / p for p, b in zip(r["batch_s"], steps, strict=True)]
        print(f"train round {i + 1}: deep {deep[-1]:.1f}, bare step {bare_rates[-1]:.1f} img/s", flush=True)
    train: dict[str, float] = {"deep": max(deep)}
    stages: list[float] = []
    for scenario in ("shallow", "finetune", "scratch"):
        r = training.training_throughput(rows, a.image_root, scenario, **kw)
        train[scenario] = r["img_s"]
        stages = r["stages"] if scenario == "finetune" else stages
        print(f"training {scenario}: {train[scenario]:.1f} img/s", flush=True)
    return {"train": train, "stages": stages, "deep_rounds": deep, "bare_rounds": bare_rates, "pairs": pairs}


def bench_record(
    a: argparse.Namespace, host: dict, fr: dict[str, Any], tr: dict[str, Any], seconds: float
) -> dict:
    """The reports/bench.json record (its keys are a contract: see the module docstring)."""
    rates = fr["rates"]
    fe = max(rates["pipeline"])
    bare32 = max(rates["fp32"])
    bare16 = max(rates["bf16"]) if "bf16" in rates else None
    bare = bare16 if fr["precision"] == "bf16" and bare16 is not None else bare32
    bare_train = max(tr["bare_rounds"])
    r1 = lambda v: round(float(v), 1)  # noqa: E731
    return {
        "machine": {**host, "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "runtime_env": config.runtime_env(),
        "backbone": a.backbone,
        "image_size": a.image_size,
        "batch_size": a.batch_size,
        "n_images": a.n_images,
        "feature_extraction_img_s": r1(fe),
        "feature_precision": fr["precision"],
        "bf16_check": fr["bf16_check"],
        "bare_forward_fp32_img_s": r1(bare32),
        "bare_forward_bf16_img_s": r1(bare16) if bare16 is not None else None,
        "bare_forward_img_s": r1(bare),
        "pipeline_ratio": round(fe / bare, 3),
        "decode_img_s": r1(fr["decode_img_s"]),
        "train_img_s": {k: r1(v) for k, v in tr["train"].items()},
        "finetune_stage_img_s": [r1(s) for s in tr["stages"]],
        "bare_train_img_s": r1(bare_train),
        "train_pipeline_ratio": round(tr["train"]["deep"] / bare_train, 3),
        "train_pipeline_ratio_median_pair": round(float(np.median(tr["pairs"])), 3),
        "target_ratio": TARGET_RATIO,
        "pipeline_ratio_per_round": [
            round(p / (b16 if fr["precision"] == "bf16" and b16 else b32), 3)
            for p, b32, b16 in zip(
                rates["pipeline"], rates["fp32"], rates.get("bf16", [None] * len(rates["fp32"])), strict=True
            )
        ],
        "rounds": {
            "feature_extraction_img_s": [r1(v) for v in rates["pipeline"]],
            "bare_forward_fp32_img_s": [r1(v) for v in rates["fp32"]],
            "bare_forward_bf16_img_s": [r1(v) for v in rates.get("bf16", [])],
            "train_deep_img_s": [r1(v) for v in tr["deep_rounds"]],
            "bare_train_img_s": [r1(v) for v in tr["bare_rounds"]],
        },
        "notes": "best of alternating rounds; feature extraction with the images in the uint8 tensor cache "
        "(decode_img_s is the one-off decoding); shallow = linear head on cached features; deep/finetune/"
        "scratch = fastai with batch augmentation on tensors, data included; bare = in-memory tensors",
        "peak_rss_mb": peak_rss_mb(),
        "seconds": round(seconds, 1),
        "warning": busy_warning(host),
    }


def busy_warning(host: dict) -> str | None:
    """A warning when other processes loaded the CPUs (1-minute load above half the cores at the start, or at
    the end less the bench's own threads): with two threads on two cores, a contended run can fall 5-20x
    below the hardware, round by round."""
    peak = max(host["loadavg_start"][0], os.getloadavg()[0] - host["torch_threads"])
    cores = host["cpu_count"] or 1
    if peak <= cores / 2:
        return None
    return (
        f"load average reached {peak:.1f} on {cores} cores: other processes competed for the CPUs, so these "
        "figures (and the ratios, if rounds collapsed unevenly) understate the hardware; rerun when idle"
    )


def main(argv: list[str] | None = None) -> None:
    """Measure and write the benchmark record."""
    config.reexec_with_runtime_env()  # the allocator settings must be there when the process starts
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = sample_rows(a.n_images, a.seed, a.manifest)
    host = machine(a.device)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        tensorcache.DEFAULT_CACHE_DIR = Path(tmp) / "tensors"  # the bench's own tensor cache
        fr = feature_rounds(rows, a, Path(tmp))
        feats = extract_features(  # (the precision decision feature_rounds recorded applies)
            rows,
            a.image_root,
            a.backbone,
            a.image_size,
            a.batch_size,
            a.device,
            cache_dir=Path(tmp) / "features",
        )
        tr = train_rounds(rows, feats, a)
    record = bench_record(a, host, fr, tr, time.perf_counter() - t_start)
    atomic_write_text(a.out, json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
