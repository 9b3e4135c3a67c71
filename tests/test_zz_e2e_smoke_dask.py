"""End to end on Dask: the smoke profile on a local cluster of two one-thread worker processes bound to 127.0.0.1
writes the same tree, predictions and metrics as the local run, under another spelling of the run ids.

Named to run after ``test_zz_e2e_smoke.py``, whose local run is the reference: the local reproduce here then finds
every step cached (seconds); run alone, it makes the reference itself. The Dask run spells run ids differently (a
``sitecustomize`` on PYTHONPATH sets ``runspec``'s formats in every process: driver, workers, kernels), which
shows that nothing but ``RunSpec`` spells or parses a run id; its runs are matched to the local ones through
their run.json records.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cxrstudy import config, pipeline, runspec
from cxrstudy.executor import local_cluster
from cxrstudy.runspec import RunSpec

pytestmark = pytest.mark.e2e


#: Another spelling of run ids, set in every process of the Dask run.
SPELLING = {"CONFIG_ID_FORMAT": "{task}-{scenario}-{decomposition}-s{seed}-{backbone}", "FOLD_SUFFIX": "-f{fold}",
            "VARIANT_SUFFIX": "+{variant}"}


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


def test_smoke_profile_on_a_dask_cluster_equals_the_local_run(tmp_path, monkeypatch):
    local = reproduce(config.REPORTS_DIR)
    assert local["status"] == "ok" and local["executor"]["name"] == "local"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import cxrstudy.runspec as spec\n" + "".join(f"spec.{k} = {v!r}\n" for k, v in SPELLING.items())
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p))
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
    # both workers share this machine's cores: a step started beside another waits passively, one started alone
    # (data, the first) spins as in the local run
    assert ex["tasks_share_cores"] is True and "omp_wait_policy" not in record["steps"][0]
    assert all(s["omp_wait_policy"] == "PASSIVE" for s in record["steps"] if s["name"].startswith("04_transfer"))

    ref, out = config.profile_dir("smoke"), tmp_path / "reports" / "smoke"
    assert {f"html/{s}.html" for s in steps} | {f"notebooks/{s}.ipynb" for s in steps} <= files(out)
    assert {f"{s}.json" for s in steps} == {p.name for p in (out / ".stamps").iterdir()}
    expected = set(pipeline.expected_run_ids(pipeline.load_profile("smoke")))
    local_runs = {p.name for p in (ref / "runs").iterdir() if (p / "run.json").is_file()} & expected
    with monkeypatch.context() as m:  # the other spelling, in this process too
        for k, v in SPELLING.items():
            m.setattr(runspec, k, v)
        renamed = {r: RunSpec.from_record(json.loads((ref / "runs" / r / "run.json").read_text())).run_id
                   for r in local_runs}
    ours_runs = {p.name for p in (out / "runs").iterdir() if p.is_dir()}
    assert ours_runs == set(renamed.values()) and not any("__" in r for r in ours_runs)
    assert "covid_normal_pneumonia-deep-nodecomp-s0-efficientnet_lite0-f0+lung_adversary" in ours_runs
    for run, other in renamed.items():  # same seeds, same machine: the same predictions to the byte
        assert (out / "runs" / other / "predictions.csv").read_bytes() == (
            ref / "runs" / run / "predictions.csv"
        ).read_bytes(), run
    ours, theirs = (json.loads((d / "results.json").read_text()) for d in (out, ref))
    metrics = ("val_accuracy", "test", "fold", "task", "scenario", "decomposition", "variant")
    assert [{k: r.get(k) for k in metrics} for r in ours["runs"]] == [
        {k: r.get(k) for k in metrics} for r in theirs["runs"]
    ]
    configs = {c["run_id"] for c in ours["configurations"]}
    assert "covid_normal_pneumonia-deep-nodecomp-s0-efficientnet_lite0+lung_adversary" in configs
    assert {e["run_id"] for e in ours["scorecard"]} <= configs and ours["recommended_variant"]["name"]
    strip = lambda e: {k: v for k, v in e.items() if k not in ("run_id", "config_id")}  # noqa: E731
    assert [strip(e) for e in ours["scorecard"]] == [strip(e) for e in theirs["scorecard"]]
    def checks(c: dict) -> dict:
        """The shortcut checks without what names runs (saliency's run, the same-hospital check's run keys)."""
        sh = c.get("same_hospital") or {}
        runs = sorted(json.dumps(v, sort_keys=True) for v in (sh.get("runs_test") or {}).values())
        return {**{k: v for k, v in c.items() if k != "saliency"}, "same_hospital": {**sh, "runs_test": runs}}

    assert checks(ours["shortcut_checks"]) == checks(theirs["shortcut_checks"])
