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
    assert len(adv) == 1 and adv[0]["input_view"] == "lung_mask"
    assert (out / "runs" / adv[0]["run_id"] / "adversary.csv").is_file()
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


def test_smoke_profile_runs_and_evaluates_under_another_run_id_format(tmp_path):
    """A run id is spelled in one place (``runspec.CONFIG_ID_FORMAT``, ``FOLD_SUFFIX``, ``VARIANT_SUFFIX``): with
    another spelling, set in every process
    (kernels included) by a ``sitecustomize`` on PYTHONPATH, the whole smoke profile still runs and evaluates."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import cxrstudy.runspec as spec\n"
        "spec.CONFIG_ID_FORMAT = '{task}-{scenario}-{decomposition}-s{seed}-{backbone}'\n"
        "spec.FOLD_SUFFIX = '-f{fold}'\n"
        "spec.VARIANT_SUFFIX = '+{variant}'\n"
    )
    reports = tmp_path / "reports"
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "cxrstudy.pipeline", "reproduce", "--profile", "smoke"],
        cwd=config.ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path, "CXR_REPORTS_DIR": str(reports)},
        timeout=1500,
    )
    assert proc.returncode == 0, f"reproduce failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    out = reports / "smoke"
    results = json.loads((out / "results.json").read_text())
    ids = {r["run_id"] for r in results["runs"]}
    assert ids == {p.name for p in (out / "runs").iterdir() if (p / "run.json").is_file()}
    assert "covid_vs_normal-shallow-nodecomp-s0-efficientnet_lite0-f1" in ids
    assert "covid_normal_pneumonia-deep-nodecomp-s0-efficientnet_lite0-f0+lung_adversary" in ids
    assert not any("__" in i for i in ids)
    configs = {c["run_id"] for c in results["configurations"]}
    assert "covid_normal_pneumonia-deep-nodecomp-s0-efficientnet_lite0+lung_adversary" in configs
    assert {e["run_id"] for e in results["scorecard"]} <= configs and results["recommended_variant"]["name"]
    assert results["protocol"]["kind"] == "cv" and results["protocol"]["folds"] == 2
    assert {r["fold"] for r in results["runs"]} == {0, 1}
    assert (out / "index.html").is_file()
