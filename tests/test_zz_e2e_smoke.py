"""End to end: `make reproduce PROFILE=smoke` runs every notebook, and a second run is a fast no-op.

Named test_zz_* so that it runs after the unit tests. Uses the project's registered kernel
(`make setup`) and $CXR_MIRROR for the data (CI points it at the mirror beside the checkout).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from cxrstudy import config, pipeline

pytestmark = pytest.mark.e2e


def reproduce() -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "cxrstudy.pipeline", "reproduce", "--profile", "smoke"],
        cwd=config.ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=1500,
    )
    return proc, time.perf_counter() - t0


def test_smoke_profile_end_to_end():
    proc, seconds = reproduce()
    assert proc.returncode == 0, f"reproduce failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    out = config.profile_dir("smoke")
    steps = [s.name for s in pipeline.load_profile("smoke").steps]
    assert (out / "index.html").is_file()
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "ok" and [s["name"] for s in record["steps"]] == steps
    for name in steps:
        assert (out / "html" / f"{name}.html").stat().st_size > 10_000, f"{name}.html missing or empty"
        assert (out / "notebooks" / f"{name}.ipynb").is_file()
    results = json.loads((out / "results.json").read_text())
    assert {r["scenario"] for r in results["runs"]} == set(config.SCENARIOS)
    assert {r["decomposition"] for r in results["runs"]} == {True, False}
    for r in results["runs"]:
        acc = r["test"]["accuracy"]
        assert 0 <= acc["ci_low"] <= acc["ci_high"] <= 1 and 0 <= acc["value"] <= 1
    # the variant ran through its lung view with the source adversary, and one variant is recommended on validation
    adv = [r for r in results["runs"] if r.get("variant") == "lung_adversary"]
    assert [r["fold"] for r in adv] == [0, 1] and {r["input_view"] for r in adv} == {"lung_mask"}
    assert all((out / "runs" / r["run_id"] / "adversary.csv").is_file() for r in adv)
    # cross-validated: every run has its fold, every configuration is scored out of fold
    assert results["protocol"]["kind"] == "cv" and results["protocol"]["folds"] == 2
    assert all(isinstance(r["fold"], int) for r in results["runs"])
    assert len(results["configurations"]) == len(results["runs"]) // 2
    assert {e["scope"] for e in results["scorecard"]} == {"out_of_fold", "holdout"}
    assert results["findings"] and "What the numbers say" in (out / "index.html").read_text()
    assert record["reference_train_img_s"] > 0 and record["budget"]["limit_on_reference_s"] == 1800
    rec = results["recommended_variant"]
    assert rec["name"] in {"baseline", "lung_adversary"} and "validation" in rec["rule"]
    assert {e["variant"] for e in results["scorecard"]} >= {"baseline", "lung_adversary"}
    index = (out / "index.html").read_text()
    assert all(f"html/{name}.html" in index for name in steps)
    assert "Recommended variant" in index or "recommended variant" in index
    print(f"smoke reproduce: {seconds:.0f} s")

    # Nothing changed: every step is skipped and the whole run takes well under a minute.
    proc, seconds = reproduce()
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((out / "run.json").read_text())
    assert all(s["status"] == "cached" for s in record["steps"]), record["steps"]
    assert seconds < 60, f"second smoke run took {seconds:.0f} s"
