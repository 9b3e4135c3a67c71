"""results.json (metrics of every saved run, comparisons, shortcut checks, headline, verdict), model card
and CLAIM checklist. The schema is documented in docs/results_schema.md.

Statistics and tables live in ``evaluation.tables``, the verdict's prose in ``evaluation.verdict`` and the
figures in ``evaluation.figures``; the names notebooks and tests used from here are re-exported.
"""

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
from cxrstudy.evaluation.figures import evaluation_figures
from cxrstudy.evaluation.formatting import fmt_pct
from cxrstudy.evaluation.frames import (
    comparisons_frame,
    headline_frame,
    loso_frame,
    per_source_table,
    runs_frame,
)
from cxrstudy.evaluation.headline import PAPER_TASK, dataset_summary, headline
from cxrstudy.evaluation.metrics import evaluate_predictions, split_accuracy, split_rows
from cxrstudy.evaluation.scorecard import check_goals
from cxrstudy.evaluation.seeds import scorecard_summary, seed_summary
from cxrstudy.evaluation.shortcut_summary import assemble_shortcut_checks
from cxrstudy.evaluation.verdict import verdict
from cxrstudy.fileio import atomic_write_text, to_jsonable, write_json
from cxrstudy.runspec import RunSpec
from cxrstudy.templates import render

__all__ = [
    "PAPER_TASK",
    "SCHEMA_VERSION",
    "assemble_shortcut_checks",
    "build_results",
    "compare_runs",
    "comparisons_frame",
    "dataset_summary",
    "evaluate_runs",
    "evaluation_figures",
    "fmt_pct",
    "headline",
    "headline_frame",
    "load_runs",
    "loso_frame",
    "per_source_table",
    "run_entry",
    "runs_frame",
    "verdict",
    "write_claim_checklist",
    "write_model_card",
]

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
    """One element of results.json's ``runs``: identity, variant, budget, timing and the ``test`` metrics."""
    entry = {
        "run_id": info.get("run_id"),
        **RunSpec.from_record(info).to_record(),
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
    """Test metrics (patient-group bootstrap) of every run, as results.json ``runs`` entries."""
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
    write: bool = True,
) -> dict:
    """Evaluate every saved run of a profile and write ``results.json`` (schema: docs/results_schema.md).
    ``runs`` / ``entries``: already loaded runs and their ``evaluate_runs`` output, to avoid redoing them;
    ``scorecard``: ``runfeatures.scorecard_entries`` of the runs (``goals`` are checked from it);
    ``recommended_variant``: ``selection.select_variant`` (made on validation rows before any test number)."""
    profile_dir = Path(profile_dir)
    runs = load_runs(profile_dir) if runs is None else runs
    entries = evaluate_runs(runs, n_bootstrap, seed) if entries is None else entries
    results: dict = {
        "schema_version": SCHEMA_VERSION,
        "profile": profile_dir.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017 (py3.10)
        "params": {"n_bootstrap": n_bootstrap, "seed": seed, **(params or {})},
        "metric_definitions": "docs/results_schema.md",
        "dataset": dataset_summary(manifest, excluded),
        "runs": entries,
        "comparisons": compare_runs(runs, n_bootstrap, seed),
        "shortcut_checks": shortcut_checks or {},
        "seed_summary": seed_summary(entries),
        "scorecard": list(scorecard or []),
        "goals": check_goals(scorecard or []),
        "recommended_variant": recommended_variant,
        "lung_segmentation": lung_segmentation(profile_dir),
        "reference": reference(),
    }
    results["scorecard_summary"] = scorecard_summary(entries, results["scorecard"], results["goals"])
    results["headline"] = headline(entries)
    other = [t for t in config.TASKS if t != PAPER_TASK and any(e["task"] == t for e in entries)]
    results["headline_other_tasks"] = {t: headline(entries, t) for t in other}
    results["verdict"] = verdict(results)
    results = to_jsonable(results)
    if write:
        write_json(profile_dir / "results.json", results)
    return results


# --------------------------------------------------------------------------- model card and checklist


def _pct_or_na(value: Any) -> str:
    """A fraction as a percentage with one decimal, or ``n/a``."""
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "n/a"


def _cell(value: Any) -> str:
    """Text for one Markdown table cell (no ``|``)."""
    return str(value).replace("|", "/")


FILTERS = {"pct": fmt_pct, "pct_or_na": _pct_or_na, "cell": _cell}


def _sources(results: dict) -> list[str]:
    """Short names of the sources in the evaluated manifest, sorted."""
    return sorted((results.get("dataset") or {}).get("by_source_label") or {})


def model_card(results: dict) -> str:
    """A short Markdown model card filled from results.json (template ``model_card.md.j2``)."""
    head = results.get("headline") or {}
    best = next((r for r in results.get("runs", []) if r.get("run_id") == head.get("run_id")), None)
    entries = {e["metric"]: e for e in results.get("scorecard") or [] if e.get("run_id") == head.get("run_id")}
    goals = [
        {**g, "method": entries.get(g["metric"], {}).get("method"), "note": entries.get(g["metric"], {}).get("note")}
        for g in results.get("goals") or []
        if g.get("run_id") == head.get("run_id")
    ]
    scratch = [
        r["task"] for r in results.get("runs", []) if r.get("scenario") == "scratch" and r.get("decomposition")
    ]
    return render(
        "model_card.md.j2",
        FILTERS,
        head=head,
        ds=results.get("dataset") or {},
        sources=_sources(results),
        best=best,
        goals=goals,
        scratch_decomp=sorted(set(scratch)),
        limitations=(results.get("verdict") or [])[1:],
        config=config,
    )


def write_model_card(results: dict, path: Path) -> Path:
    """Write the model card to ``path``."""
    atomic_write_text(Path(path), model_card(results))
    return Path(path)


def claim_checklist(results: dict) -> str:
    """CLAIM-style reporting checklist: data sources, splits, reference standard, metrics, failure analysis."""
    return render(
        "claim_checklist.md.j2",
        FILTERS,
        ds=results.get("dataset") or {},
        checks=results.get("shortcut_checks") or {},
        head=results.get("headline") or {},
        params=results.get("params") or {},
        sources=_sources(results),
        scenarios=sorted({r["scenario"] for r in results.get("runs", [])}),
    )


def write_claim_checklist(results: dict, path: Path) -> Path:
    """Write the CLAIM checklist to ``path``."""
    atomic_write_text(Path(path), claim_checklist(results))
    return Path(path)
