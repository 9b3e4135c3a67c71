"""End to end on Dask: the smoke profile on a local cluster of two one-thread worker processes bound to 127.0.0.1
writes the same tree, predictions and metrics as the local run.

Named to run after ``test_zz_e2e_smoke.py``, whose local run is the reference: the local reproduce here then finds
every step cached (seconds); run alone, it makes the reference itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cxrstudy import config, pipeline
from cxrstudy.executor import local_cluster

pytestmark = pytest.mark.e2e


def reproduce(reports: Path, *extra: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "cxrstudy.pipeline", "reproduce", "--profile", "smoke", *extra],
        cwd=config.ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "CXR_REPORTS_DIR": str(reports)},
        timeout=1500,
    )
    assert proc.returncode == 0, f"reproduce {extra} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads((reports / "smoke" / "run.json").read_text())


def files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")}


def test_smoke_profile_on_a_dask_cluster_equals_the_local_run(tmp_path):
    local = reproduce(config.REPORTS_DIR)
    assert local["status"] == "ok" and local["executor"]["name"] == "local"
    with local_cluster(n_workers=2, cpus_per_task=1) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tcp://127.0.0.1:")
        record = reproduce(tmp_path / "reports", "--executor", "dask", "--scheduler", address)
    ex = record["executor"]
    assert record["status"] == "ok" and ex["name"] == "dask" and ex["scheduler"] == address
    assert len(ex["workers"]) == 2 and all(w.startswith("tcp://127.0.0.1:") for w in ex["workers"])
    assert all(w["nthreads"] == 1 for w in ex["workers"].values())
    steps = [s.name for s in pipeline.load_profile("smoke").steps]
    assert [s["name"] for s in record["steps"]] == steps and {s["status"] for s in record["steps"]} == {"ran"}
    assert all(s["worker"] in ex["workers"] and s["node"] and s["seconds"] > 0 for s in record["steps"])
    assert len({s["worker"] for s in record["steps"]}) == 2  # the independent steps spread over both workers

    ref, out = config.profile_dir("smoke"), tmp_path / "reports" / "smoke"
    assert files(out) <= files(ref), sorted(files(out) - files(ref))
    assert {f"html/{s}.html" for s in steps} | {f"notebooks/{s}.ipynb" for s in steps} <= files(out)
    assert {f"{s}.json" for s in steps} == {p.name for p in (out / ".stamps").iterdir()}
    runs = sorted(p.name for p in (out / "runs").iterdir() if p.is_dir())
    assert runs and runs == sorted(p.name for p in (ref / "runs").iterdir() if p.is_dir())
    for run in runs:  # same seeds, same machine: the same predictions to the byte
        assert (out / "runs" / run / "predictions.csv").read_bytes() == (
            ref / "runs" / run / "predictions.csv"
        ).read_bytes(), run
    ours, theirs = (json.loads((d / "results.json").read_text()) for d in (out, ref))
    metrics = ("run_id", "val", "test", "holdout")
    assert [{k: r.get(k) for k in metrics} for r in ours["runs"]] == [
        {k: r.get(k) for k in metrics} for r in theirs["runs"]
    ]
    assert ours["scorecard"] == theirs["scorecard"] and ours["shortcut_checks"] == theirs["shortcut_checks"]
