"""A profile's wall time with the local executor and with Dask on this machine, side by side.

Each executor runs ``python -m cxrstudy.pipeline reproduce --profile P --force`` in a fresh process with its own
reports folder (``CXR_REPORTS_DIR``), local first; the data caches under ``data/cache`` are shared, so the second
run may find features the first one computed, unless ``--cold`` gives each run its own empty cache folder
(``CXR_CACHE_DIR``). ``--local-record run.json`` (``--dask-record``) reads the local (Dask) side from an earlier
run's record instead of running it (for a profile too long to run twice in a sitting; such a run should have been
cold too, and the bare training figures of both records say whether the machine ran at the same speed). Dask
runs on a cluster of this machine (``--workers`` one-thread workers, 127.0.0.1), its steps started longest first
by the local run's seconds (``--timings``; with ``--no-timings`` its own folder is empty, so in profile order).
Beside the wall times: each step's seconds, the node each ran on, and the critical path (the longest chain of
dependent steps, ``pipeline.step_dependencies``, timed with the local run's seconds: no number of workers
finishes sooner). Writes ``reports/bench_executor_<profile>.json`` and prints it. ``--readme`` instead writes the
README's executor table from every such file (no run). Usage:
    python scripts/bench_executor.py [--profile smoke] [--workers 2] [--cold] [--local-record RUN_JSON]
                                     [--dask-record RUN_JSON] [--local-reports DIR] [--dask-reports DIR] [--no-timings]
    python scripts/bench_executor.py --readme
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cxrstudy import config, pipeline
from cxrstudy.fileio import replace_section, write_json

README_START, README_END = "<!-- executor:start -->", "<!-- executor:end -->"


def reproduce(profile: str, reports: Path, extra: list[str], cache: Path | None = None) -> dict[str, Any]:
    """One forced run of ``profile`` into ``reports`` (with ``cache`` as its data cache folder, if given): its wall
    time and run.json."""
    cmd = [sys.executable, "-m", "cxrstudy.pipeline", "reproduce", "--profile", profile, "--force", *extra]
    env = {**os.environ, "CXR_REPORTS_DIR": str(reports), **({"CXR_CACHE_DIR": str(cache)} if cache else {})}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=config.ROOT, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"bench_executor: `{' '.join(cmd)}` failed ({proc.returncode})")
    record = json.loads((reports / profile / "run.json").read_text())
    return {"command": " ".join(cmd[2:]), "wall_s": round(wall, 1), "pipeline_wall_s": record["wall_seconds"], "record": record}


def from_record(path: Path, executor: str = "local") -> dict[str, Any]:
    """One side from an earlier run's run.json (its pipeline wall time stands for the process's)."""
    record = json.loads(path.read_text())
    if record.get("status") != "ok" or record.get("executor", {}).get("name", "local") != executor:
        sys.exit(f"bench_executor: {path} is not a finished {executor} run (status {record.get('status')!r})")
    return {"command": f"record {path}", "wall_s": record["wall_seconds"], "pipeline_wall_s": record["wall_seconds"],
            "record": record}


def critical_path(profile: str, seconds: dict[str, float]) -> dict[str, Any]:
    """The longest chain of dependent steps, weighted by ``seconds``."""
    steps = pipeline.load_profile(profile).steps
    deps = pipeline.step_dependencies(steps, config.profile_dir(profile))
    best: dict[str, tuple[float, list[str]]] = {}
    for s in steps:  # dependencies come earlier in the profile
        before = max((best[d] for d in deps[s.name]), default=(0.0, []))
        best[s.name] = (before[0] + seconds[s.name], [*before[1], s.name])
    total, chain = max(best.values())
    return {"steps": chain, "seconds": round(total, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--local-reports", type=Path, help="reports folder of the local run (default: a temporary one)")
    parser.add_argument("--dask-reports", type=Path, help="reports folder of the Dask run (default: a temporary one)")
    parser.add_argument("--cold", action="store_true", help="each run starts with its own empty data cache")
    parser.add_argument("--local-record", type=Path, help="run.json of an earlier local run of the profile to compare with")
    parser.add_argument("--dask-record", type=Path, help="run.json of an earlier Dask run of the profile instead of running it")
    parser.add_argument("--no-timings", action="store_true", help="do not order Dask's steps by the local run's seconds")
    parser.add_argument("--out", type=Path, help="default: reports/bench_executor_<profile>.json")
    parser.add_argument("--readme", action="store_true", help="only write README.md's table from the reports' files")
    args = parser.parse_args()
    if args.readme:
        update_readme(sorted(config.REPORTS_DIR.glob("bench_executor_*.json")))
        return
    out = args.out or config.REPORTS_DIR / f"bench_executor_{args.profile}.json"
    with tempfile.TemporaryDirectory(prefix="bench-executor-") as tmp:
        caches = (Path(tmp) / "cache-local", Path(tmp) / "cache-dask") if args.cold else (None, None)
        local_reports = args.local_reports or Path(tmp) / "local"
        local = (
            from_record(args.local_record)
            if args.local_record
            else reproduce(args.profile, local_reports, [], caches[0])
        )
        timings = None if args.no_timings else args.local_record or local_reports / args.profile / "run.json"
        dask = (
            from_record(args.dask_record, "dask")
            if args.dask_record
            else reproduce(
                args.profile, args.dask_reports or Path(tmp) / "dask",
                ["--executor", "dask", "--workers", str(args.workers), *(["--timings", str(timings)] if timings else [])],
                caches[1],
            )
        )
    local_s = {s["name"]: s["seconds"] for s in local["record"]["steps"]}
    result = {
        "profile": args.profile,
        "cold": bool(args.cold),
        "local_from_record": str(args.local_record) if args.local_record else None,
        "dask_from_record": str(args.dask_record) if args.dask_record else None,
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "local": {
            "wall_s": local["wall_s"],
            "pipeline_wall_s": local["pipeline_wall_s"],
            "steps_s": local_s,
            "bare_train_img_s": local["record"].get("reference_train_img_s"),
            "started": local["record"].get("started"),
        },
        "dask": {
            "wall_s": dask["wall_s"],
            "pipeline_wall_s": dask["pipeline_wall_s"],
            "workers": len(dask["record"]["executor"]["workers"]),
            "executor": dask["record"]["executor"],
            "steps": {
                s["name"]: {
                    "seconds": s["seconds"],
                    "worker": s.get("worker"),
                    "omp_wait_policy": s.get("omp_wait_policy"),
                    "expected_seconds": s.get("expected_seconds"),
                    "finished": s.get("finished"),
                }
                for s in dask["record"]["steps"]
            },
            "bare_train_img_s": dask["record"].get("reference_train_img_s"),
            "started": dask["record"].get("started"),
            "git": dask["record"].get("git"),
        },
        "speedup": round(local["wall_s"] / dask["wall_s"], 2),
        "dask_slower_pct": round(100 * (dask["pipeline_wall_s"] / local["pipeline_wall_s"] - 1), 1),  # pipeline walls
        "critical_path_local_s": critical_path(args.profile, local_s),
        "sum_of_steps_local_s": round(sum(local_s.values()), 1),
    }
    write_json(out, result)
    print(json.dumps(result, indent=2))


ORDER_NOTE = {
    "timed": "longest first, by an earlier run's seconds",
    "untimed": "profile order (no earlier seconds)",
    "unbounded": "as Dask assigned them (every ready step submitted at once)",
}


def _order(bench: dict[str, Any]) -> str:
    """How the bench's Dask run started its steps (a key of ``ORDER_NOTE``; ``unbounded``: a run from before the
    driver kept one step per task slot)."""
    order = bench["dask"]["executor"].get("order")
    if order is None:
        return "unbounded"
    return "timed" if order.get("timings") else "untimed"


def _started(side: dict[str, Any]) -> str:
    """When one side's run started, to the minute (``n/a`` unknown)."""
    started = side.get("started")
    return started[:16].replace("T", " ") if isinstance(started, str) else "n/a"


def readme_table(benches: list[dict[str, Any]]) -> str:
    """Markdown: one row per profile's measurement, local against Dask, with the machine and the runs' bare figures."""
    rows = [
        "| profile | caches | local (s) | Dask (s) | Dask vs local | workers | Dask's step order | runs started, local / Dask (UTC) "
        "| bare step, local / Dask (img/s) | machine | Dask run's commit |",
        "|---|---|---:|---:|---:|---:|---|---|---|---|---|",
    ]
    for b in benches:
        bare = " / ".join(f"{v:.1f}" if isinstance(v, (int, float)) else "n/a"
                          for v in (b["local"].get("bare_train_img_s"), b["dask"].get("bare_train_img_s")))
        commit = str((b["dask"].get("git") or {}).get("commit") or "")[:10] or "n/a"
        rows.append(
            f"| {b['profile']} | {'cold' if b['cold'] else 'shared'} | {b['local']['pipeline_wall_s']:.0f} "
            f"| {b['dask']['pipeline_wall_s']:.0f} | {b['dask_slower_pct']:+.1f}% | {b['dask']['workers']} "
            f"| {ORDER_NOTE[_order(b)]} | {_started(b['local'])} / {_started(b['dask'])} "
            f"| {bare} | {b['machine']['cpus']} CPUs, {b['machine']['platform']} | {commit} |"
        )
    return "\n".join(rows)


def update_readme(paths: list[Path], readme: Path = config.ROOT / "README.md") -> None:
    """Replace README.md's executor table with the one ``readme_table`` makes of ``paths``."""
    if not paths:
        sys.exit(f"bench_executor: no {config.REPORTS_DIR}/bench_executor_*.json; run `make bench-executor` first")
    try:
        replace_section(readme, README_START, README_END, readme_table([json.loads(p.read_text()) for p in paths]))
    except ValueError as exc:
        sys.exit(f"bench_executor: {exc}")


if __name__ == "__main__":
    main()
