"""Benchmark the data build: a cold build into a temporary folder from $CXR_MIRROR, then a warm re-run.

Writes reports/bench_data.json (machine, cold_s, warm_s, per-stage timings, counts). Usage:
    python scripts/bench_data.py [--mirror ../shared/cxr-mirror] [--workers 8] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from cxrstudy import config
from cxrstudy.data.build import build_dataset, format_summary
from cxrstudy.fileio import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    """Run the cold and warm builds and record the timings."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--mirror", default=os.environ.get("CXR_MIRROR") or str(ROOT.parent / "shared" / "cxr-mirror")
    )
    p.add_argument("--workers", type=int, default=8)
    p.add_argument(
        "--keep", type=Path, default=None, help="build here and keep it (default: a temporary folder)"
    )
    p.add_argument("--out", type=Path, default=config.REPORTS_DIR / "bench_data.json")
    args = p.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="cxr-bench-"))
    dirs = {"out_dir": work / "processed", "raw_dir": work / "raw", "cache_dir": work / "cache" / "dedup"}
    try:
        runs = {}
        for name in ("cold", "warm"):
            t = time.perf_counter()
            result = build_dataset(args.mirror, workers=args.workers, progress=False, **dirs)
            runs[name] = {"seconds": round(time.perf_counter() - t, 2), "stages": result.info["timings_s"]}
            print(f"--- {name}: {runs[name]['seconds']:.1f} s")
        print(format_summary(result))
        try:
            import psutil

            load = os.getloadavg()
            cpu = {
                "logical": psutil.cpu_count(),
                "physical": psutil.cpu_count(logical=False),
                "loadavg": load,
            }
        except (ImportError, OSError):
            cpu = {"logical": os.cpu_count()}
        record = {
            "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu},
            "mirror": args.mirror,
            "workers": args.workers,
            "cold_s": runs["cold"]["seconds"],
            "warm_s": runs["warm"]["seconds"],
            "stages": {k: v["stages"] for k, v in runs.items()},
            "counts": result.info["counts"],
            "targets": {"cold_s": 300, "warm_s": 15},
        }
        atomic_write_text(args.out, json.dumps(record, indent=2))
        print(f"cold {record['cold_s']:.1f} s, warm {record['warm_s']:.1f} s -> {args.out}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
