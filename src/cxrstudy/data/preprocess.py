"""Decode raw upstream images with `cxrstudy.images.load_xray`, shrink them and write 8-bit grayscale PNGs.

Outputs go to ``out_dir/images/<source_name>/<upstream path>.png`` (shorter side ``short_side``, never
upscaled), each written to a temporary name and renamed. ``out_dir/images/index.json`` remembers the
input SHA-256 and size behind every PNG, so a warm run skips images whose input did not change. An
undecodable file is reported (status ``undecodable`` with the decoder's reason), never fatal.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd
from tqdm import tqdm

from cxrstudy.fileio import atomic_path, write_json
from cxrstudy.images import ImageDecodeError, load_xray, resize_short_side

#: Default shorter side of processed images (the mirror's images already have it).
TARGET_SHORT_SIDE = 256
INDEX_NAME = "images/index.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class ProcessJob:
    """One image to process: the raw file, its SHA-256 and the output path relative to out_dir."""

    raw_path: Path
    sha256: str
    image: str


@dataclass
class ProcessResult:
    """Outcome: status written, cached or undecodable; width/height of the PNG; reason when undecodable."""

    job: ProcessJob
    status: str
    width: int = 0
    height: int = 0
    reason: str = ""


def processed_names(source_names: Sequence[str], upstream_paths: Sequence[str]) -> list[str]:
    """Output paths ``images/<source_name>/<sanitised upstream path>.png``, unique even when two upstream
    files differ only by extension."""

    def name(src: str, path: str, keep_ext: bool) -> str:
        p = PurePosixPath(path)
        stem = p.name if keep_ext else p.stem
        parts = [*p.parent.parts, stem] if str(p.parent) != "." else [stem]
        return "images/" + "/".join(_UNSAFE.sub("_", s) for s in [src, *parts]) + ".png"

    short = [name(s, p, False) for s, p in zip(source_names, upstream_paths, strict=True)]
    counts = pd.Series(short).value_counts()
    out = [
        name(s, p, True) if counts[n] > 1 else n
        for s, p, n in zip(source_names, upstream_paths, short, strict=True)
    ]
    if len(set(out)) != len(out):
        dup = pd.Series(out)[pd.Series(out).duplicated()].iloc[0]
        raise ValueError(f"two upstream files map to the same processed image {dup}")
    return out


def process_one(raw_path: Path, out_path: Path, short_side: int = TARGET_SHORT_SIDE) -> tuple[int, int]:
    """Decode one file, resize it and write the PNG atomically; returns (width, height); raises ImageDecodeError."""
    im = resize_short_side(load_xray(raw_path), short_side)
    with atomic_path(out_path) as tmp:
        im.save(tmp, format="PNG", compress_level=1)  # ~3x faster than the default, ~15% larger
    return im.size


def _load_index(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError, ValueError):
        return {}  # a bad index only costs re-processing


def preprocess_images(
    jobs: Sequence[ProcessJob],
    out_dir: Path,
    short_side: int = TARGET_SHORT_SIDE,
    workers: int = 2,
    progress: bool = True,
) -> list[ProcessResult]:
    """Process many images in parallel threads, skipping those whose PNG exists for the same input SHA."""
    out_dir = Path(out_dir)
    index_path = out_dir / INDEX_NAME
    index = _load_index(index_path)
    results: dict[int, ProcessResult] = {}
    todo: list[int] = []
    for i, job in enumerate(jobs):
        entry = index.get(job.image)
        if (
            entry
            and entry.get("sha256") == job.sha256
            and entry.get("short_side") == short_side
            and (out_dir / job.image).is_file()
        ):
            results[i] = ProcessResult(job, "cached", entry["width"], entry["height"])
        else:
            todo.append(i)

    def run(i: int) -> ProcessResult:
        job = jobs[i]
        try:
            w, h = process_one(job.raw_path, out_dir / job.image, short_side)
        except ImageDecodeError as exc:
            (out_dir / job.image).unlink(missing_ok=True)  # never leave a stale PNG for a now-bad input
            return ProcessResult(job, "undecodable", reason=exc.reason)
        return ProcessResult(job, "written", w, h)

    def save_index() -> None:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(index_path, dict(sorted(index.items())), indent=0)

    try:
        if todo:
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                futures = {pool.submit(run, i): i for i in todo}
                bar = tqdm(
                    total=len(futures), desc="preprocess", unit="img", disable=not progress, leave=False
                )
                for n, fut in enumerate(as_completed(futures), 1):
                    res = fut.result()
                    results[futures[fut]] = res
                    if res.status == "written":
                        index[res.job.image] = {
                            "sha256": res.job.sha256,
                            "short_side": short_side,
                            "width": res.width,
                            "height": res.height,
                        }
                    else:
                        index.pop(res.job.image, None)
                    if n % 250 == 0:
                        save_index()
                    bar.update()
                bar.close()
    finally:
        if todo:
            save_index()
    return [results[i] for i in range(len(jobs))]
