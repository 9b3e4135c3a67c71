"""results.json: metrics of every saved run, comparisons, shortcut checks, headline, verdict (schema in
docs/results_schema.md). Statistics come from the ``evaluation`` modules (comparisons, headline, seeds,
scorecard, shortcut_summary), the verdict's prose from ``evaluation.verdict``."""

from __future__ import annotations

import json
import warnings
from collections.abc import Collection, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from cxrstudy import config
from cxrstudy.evaluation.comparisons import compare_runs
from cxrstudy.evaluation.groups import with_worst_group
from cxrstudy.evaluation.headline import PAPER_TASK, dataset_summary, headline
from cxrstudy.evaluation.metrics import evaluate_predictions, split_accuracy, split_rows
from cxrstudy.evaluation.scorecard import check_goals
from cxrstudy.evaluation.seeds import scorecard_summary, seed_summary
from cxrstudy.evaluation.variants import variant_differences
from cxrstudy.evaluation.verdict import findings, verdict
from cxrstudy.fileio import to_jsonable, write_json
from cxrstudy.plan import plan_record
from cxrstudy.runspec import RunSpec

#: Version of the results.json layout.
SCHEMA_VERSION = 1


# --------------------------------------------------------------------------- runs


def load_runs(profile_dir: Path, only: Collection[str] | None = None) -> list[dict]:
    """Every finished run of a profile (``runs/*/run.json`` present): {'dir', 'info', 'predictions'}.

    ``only``: the run ids to load (``pipeline.expected_run_ids``): one of them without a finished run raises
    FileNotFoundError, and run folders outside it (left by steps the profile no longer has) are skipped with
    a warning that names them, so that results never mix in runs the profile did not ask for."""
    paths = sorted((Path(profile_dir) / "runs").glob("*/run.json"))
    if only is not None:
        wanted = set(only)
        found = {p.parent.name for p in paths}
        if missing := sorted(wanted - found):
            raise FileNotFoundError(
                f"{Path(profile_dir) / 'runs'}: no finished run for {len(missing)} run id(s) the profile's steps "
                f"produce: {missing[:5]}{' ...' if len(missing) > 5 else ''} (re-run `make reproduce`)"
            )
        if stale := sorted(found - wanted):
            warnings.warn(
                f"{Path(profile_dir) / 'runs'}: skipped {len(stale)} run folder(s) that no step of the profile "
                f"produces (left by an earlier version of the profile): {stale}",
                stacklevel=2,
            )
        paths = [p for p in paths if p.parent.name in wanted]
    runs = []
    for info_path in paths:
        run_dir = info_path.parent
        info = json.loads(info_path.read_text())
        RunSpec.from_record(info, where=str(info_path))
        if "classes" not in info:
            raise ValueError(f"{info_path}: missing key(s) ['classes']")
        pred_path = run_dir / "predictions.csv"
        if not pred_path.is_file():
            raise FileNotFoundError(f"{pred_path} is missing although {info_path} marks the run finished")
        runs.append({"dir": run_dir, "info": info, "predictions": pd.read_csv(pred_path)})
    return runs


def run_entry(info: dict, test: dict, **extra: Any) -> dict:
    """One element of results.json's ``runs`` (a fold run) or ``configurations`` (an out-of-fold whole):
    identity, variant, budget, timing and the ``test`` metrics (a fold's own films, or every film out of fold)."""
    spec = RunSpec.from_record(info)
    entry = {
        "run_id": info.get("run_id"),
        "config_id": spec.config_id,
        **spec.to_record(),
        "scope": "fold" if spec.fold is not None else "out_of_fold",
        "input_view": str(info.get("input_view", "full")),
        "equalize": bool(info.get("equalize", False)),
        "epochs": info.get("epochs"),
        "epochs_run": info.get("epochs_run"),
        "train_seconds": info.get("train_seconds"),
        "image_size": info.get("image_size"),
        "classes": list(info["classes"]),
        "subclasses": list(info.get("subclasses") or info["classes"]),
        "test": test,
    }
    entry.update(extra)
    return entry


def evaluate_runs(runs: Sequence[dict], n_bootstrap: int = 1000, seed: int = 0) -> list[dict]:
    """Test metrics (class-stratified patient bootstrap) of every run or out-of-fold whole, as results.json
    ``runs`` / ``configurations`` entries."""
    out = []
    for run in runs:
        info, preds = run["info"], run["predictions"]
        test = split_rows(preds, "test")
        if len(test) == 0:
            raise ValueError(f"{run['dir'] / 'predictions.csv'}: no test rows")
        metrics = evaluate_predictions(test, info["classes"], n_bootstrap, seed, where=str(run["dir"]))
        out.append(run_entry(info, metrics, val_accuracy=split_accuracy(preds, "val")))
    return out


# --------------------------------------------------------------------------- results.json


#: What the cross-validation's folds are stratified by and grouped by (``data.splits.assign_folds``).
CV_STRATIFY = ("label", "source_name")
CV_GROUP = "patient_group"


def protocol(runs: Sequence[dict]) -> dict:
    """results.json ``protocol``: cross-validation, its folds and repeats (from the runs' records), strata, group."""
    infos = [r["info"] for r in runs]
    folds = sorted({int(i.get("folds") or i.get("n_folds") or 0) for i in infos})
    seeds: dict[tuple, set[int]] = {}
    for info in infos:
        spec = RunSpec.from_record(info)
        seeds.setdefault(spec.config_key, set()).add(spec.seed)
    repeats = max((len(v) for v in seeds.values()), default=0)
    return {
        "kind": "cv",
        "folds": folds[0] if len(folds) == 1 else folds,
        "repeats": repeats,
        "stratify": list(CV_STRATIFY),
        "group": CV_GROUP,
        "inner_validation": "a patient-grouped share of the training folds (early stopping, checkpoint, lr_find, selection)",
        "holdout": "actualmed: out of every fold and every probe's training; predicted by every fold model (ensemble)",
    }


def reference() -> dict:
    """The published figures the study is compared against, with their citations."""
    return {
        "paper_accuracy": config.PAPER_ACCURACY,
        "paper_citation": config.PAPER_CITATION,
        "detrac_accuracy": config.DETRAC_ACCURACY,
        "detrac_citation": config.DETRAC_CITATION,
    }


#: Fields of the lung stage's summary.json that results.json carries (a contract other tools read).
LUNG_FIELDS = ("dice", "iou", "n_test_masks", "qc_pass_rate", "train_seconds")


def lung_segmentation(profile_dir: Path) -> dict | None:
    """The lung stage's test Dice/IoU, QC pass rates and training time (``lungs/summary.json``); None without it."""
    path = Path(profile_dir) / "lungs" / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return {k: summary.get(k) for k in LUNG_FIELDS}


def build_results(
    profile_dir: Path,
    manifest: pd.DataFrame,
    *,
    shortcut_checks: dict | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    excluded: pd.DataFrame | None = None,
    runs: Sequence[dict] | None = None,
    entries: list[dict] | None = None,
    params: dict | None = None,
    scorecard: list[dict] | None = None,
    recommended_variant: dict | None = None,
    fold_entries: list[dict] | None = None,
    write: bool = True,
) -> dict:
    """Evaluate every saved run of a profile and write ``results.json`` (schema: docs/results_schema.md).
    ``runs`` / ``entries``: already loaded runs and their ``evaluate_runs`` output, to avoid redoing them;
    ``scorecard``: ``runfeatures.scorecard_entries`` of the runs (``goals`` are checked from it);
    ``recommended_variant``: ``selection.select_variant`` (made on inner-validation rows before any held-out
    number). ``runs`` are the configurations' out-of-fold wholes (``evaluation.cv.oof_runs``; loaded and pooled
    here when None), ``entries`` their metrics, ``fold_entries`` the fold runs' own (results.json ``runs``)."""
    from cxrstudy.evaluation.cv import oof_runs

    profile_dir = Path(profile_dir)
    fold_runs = None
    if runs is None:
        fold_runs = load_runs(profile_dir)
        runs = oof_runs(fold_runs)
    entries = evaluate_runs(runs, n_bootstrap, seed) if entries is None else entries
    entries = with_worst_group(entries, runs, manifest, n_bootstrap, seed)
    if fold_entries is None:
        fold_runs = fold_runs or [f for r in runs for f in r.get("fold_runs", ())]
        fold_entries = evaluate_runs(fold_runs, n_bootstrap, seed)
    results: dict = {
        "schema_version": SCHEMA_VERSION,
        "profile": profile_dir.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017 (py3.10)
        "params": {"n_bootstrap": n_bootstrap, "seed": seed, **(params or {})},
        "metric_definitions": "docs/results_schema.md",
        "protocol": protocol(runs),
        "dataset": dataset_summary(manifest, excluded),
        "runs": fold_entries,
        "configurations": entries,
        "comparisons": compare_runs(runs, n_bootstrap, seed),
        "shortcut_checks": shortcut_checks or {},
        "seed_summary": seed_summary(fold_entries),
        "scorecard": list(scorecard or []),
        "goals": check_goals(scorecard or []),
        "recommended_variant": recommended_variant,
        "lung_segmentation": lung_segmentation(profile_dir),
        "reference": reference(),
        "plan": plan_record(),
    }
    results["comparisons"]["variants"] = variant_differences(runs, manifest, n_bootstrap, seed)
    results["scorecard_summary"] = scorecard_summary(entries, results["scorecard"], results["goals"])
    results["headline"] = headline(entries, fold_entries=fold_entries)
    other = [t for t in config.TASKS if t != PAPER_TASK and any(e["task"] == t for e in entries)]
    results["headline_other_tasks"] = {t: headline(entries, t, fold_entries) for t in other}
    results["verdict"] = verdict(results)
    results["findings"] = findings(results)
    results = to_jsonable(results)
    if write:
        write_json(profile_dir / "results.json", results)
    return results
