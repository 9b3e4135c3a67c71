"""Choosing the recommended variant on validation rows only, by a rule fixed before any test number is read.

Rule (notebook 05's parameters ``selection_task``, ``selection_scenario``, ``selection_max_drop``): among the
variants (baseline included) of that task and scenario without class decomposition, each averaged over
its seeds, keep those whose mean validation COVID-19-vs-normal accuracy (covid/normal validation rows,
the larger of P(covid) and P(normal)) is at least the floor, ``selection_max_drop`` below the baseline's
(:func:`baseline_floor`; :func:`select_variant` also takes an absolute ``floor``); among them pick the highest mean validation
within-source contrast (``Source.contrasts``), the mean of (ieee8023 COVID-19 vs other pneumonia ROC-AUC by
P(covid) / (P(covid) + P(pneumonia)), NIH pneumonia vs normal ROC-AUC by
P(pneumonia) / (P(pneumonia) + P(normal))), each on the run's validation rows. With ``contrast`` =
``view_matched`` (notebook 05's ``selection_contrast``) each ROC-AUC counts only (positive, negative) pairs
of the same view (``evaluation.confounders.view_matched``), so projection cannot earn a variant its place.
When no variant reaches the floor, the highest mean validation COVID-19-vs-normal accuracy wins, and the
rule says so.

Only rows whose ``split`` is ``val`` are read: :func:`validation_rows` filters each run's predictions once,
first, and nothing else here sees them; results, metrics and scorecard entries are never read.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from cxrstudy.data.sources import contrasts
from cxrstudy.evaluation.confounders import view_matched
from cxrstudy.evaluation.metrics import compute_metrics
from cxrstudy.evaluation.scorecard import pair_score, with_film_facts, with_source_names
from cxrstudy.evaluation.seeds import BASELINE, run_variant

#: The one split the selection reads.
SPLIT = "val"
#: How the within-source contrast is read: every pair, or same-view pairs only.
CONTRASTS: tuple[str, ...] = ("all_pairs", "view_matched")


def validation_rows(predictions: pd.DataFrame, manifest: pd.DataFrame | None = None) -> pd.DataFrame:
    """The validation rows of a run's predictions (with ``source_name``, and view, age and sex from ``manifest``):
    the only rows the selection reads."""
    val = with_source_names(predictions[predictions["split"] == SPLIT], manifest)
    return val if manifest is None else with_film_facts(val, manifest)


def _binary(rows: pd.DataFrame, positive: str, negative: str) -> dict:
    """Point metrics (no bootstrap) of ``positive`` vs ``negative`` rows scored by the pair ratio."""
    score = pair_score(rows, positive, negative)
    return compute_metrics(rows["label"], np.column_stack([score, 1.0 - score]), [positive, negative], None, 0)


def validation_scores(val: pd.DataFrame, contrast: str = "all_pairs") -> dict[str, float | None]:
    """``val_paper_task_accuracy`` and ``val_within_source_auc`` (mean of the defined contrasts, over every pair
    or same-view pairs only) of one run's validation rows (:func:`validation_rows`)."""
    if not (val["split"] == SPLIT).all():
        raise ValueError("validation_scores reads validation rows only")
    if contrast not in CONTRASTS:
        raise ValueError(f"selection: contrast must be one of {CONTRASTS}, got {contrast!r}")
    paper = val[val["label"].isin(["covid", "normal"])]
    acc = _binary(paper, "covid", "normal")["accuracy"]["value"] if len(paper) else None
    aucs = []
    for source, pos, neg in contrasts():
        rows = val[(val["source_name"] == source) & val["label"].isin([pos, neg])]
        if f"prob_{pos}" not in rows.columns or rows["label"].nunique() < 2:
            continue
        if contrast == "view_matched":
            aucs.append(view_matched(rows, pair_score(rows, pos, neg), pos, neg, "auc", 0, 0)["value"])
        else:
            aucs.append(_binary(rows, pos, neg)["per_class"][pos]["roc_auc"]["value"])
    aucs = [a for a in aucs if a is not None]
    return {"val_paper_task_accuracy": acc, "val_within_source_auc": float(np.mean(aucs)) if aucs else None}


def _mean(values: Sequence[float | None]) -> float | None:
    """Mean of the defined values (None when none is)."""
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def candidates(
    runs: Sequence[dict],
    task: str,
    scenario: str,
    floor: float,
    contrast: str = "all_pairs",
    manifest: pd.DataFrame | None = None,
) -> list[dict]:
    """Per variant of ``task`` / ``scenario`` without decomposition (``reporting.results.load_runs`` items): seeds and
    the seed means of the validation scores, and whether the accuracy floor is passed."""
    by_variant: dict[str, list[dict]] = {}
    for run in runs:
        info = run["info"]
        if info["task"] == task and info["scenario"] == scenario and not info["decomposition"]:
            scores = validation_scores(validation_rows(run["predictions"], manifest), contrast)
            by_variant.setdefault(run_variant(info), []).append({"seed": info["seed"], **scores})
    out = []
    for variant in sorted(by_variant, key=lambda v: (v != BASELINE, v)):
        seeds = by_variant[variant]
        acc = _mean([s["val_paper_task_accuracy"] for s in seeds])
        out.append({
            "variant": variant,
            "n_seeds": len(seeds),
            "seeds": sorted(s["seed"] for s in seeds),
            "val_paper_task_accuracy": acc,
            "val_within_source_auc": _mean([s["val_within_source_auc"] for s in seeds]),
            "passes_floor": acc is not None and acc >= floor,
        })
    return out


def _rule_text(task: str, scenario: str, floor: float, contrast: str) -> str:
    """The rule in words with its numbers."""
    pairs = " over same-view pairs only" if contrast == "view_matched" else ""
    return (
        f"Among the variants of {task} {scenario} without decomposition, averaged over seeds, on validation rows "
        f"only: keep those whose mean validation COVID-19-vs-normal accuracy is >= {floor:g} "
        f"({100 * floor:g}%); among them pick the highest mean validation within-source contrast (mean of the "
        f"ieee8023 COVID-19-vs-pneumonia and NIH pneumonia-vs-normal ROC-AUCs{pairs}); if none reaches the floor, "
        "pick the highest mean validation COVID-19-vs-normal accuracy."
    )


def _fmt(value: float | None) -> str:
    """A score with three decimals, 'n/a' for None."""
    return "n/a" if value is None else f"{value:.3f}"


def baseline_floor(runs: Sequence[dict], task: str, scenario: str, max_drop: float) -> float:
    """The accuracy floor ``max_drop`` below the baseline's mean validation COVID-19-vs-normal accuracy (a
    variant may cost at most that much); ValueError without a baseline run to measure it on."""
    base = [c for c in candidates(runs, task, scenario, 0.0) if c["variant"] == BASELINE]  # accuracy only
    if not base or base[0]["val_paper_task_accuracy"] is None:
        raise ValueError(f"selection: no baseline run of {task} {scenario} to set the floor {max_drop:g} below")
    return float(base[0]["val_paper_task_accuracy"]) - float(max_drop)


def select_variant(
    runs: Sequence[dict],
    task: str,
    scenario: str,
    floor: float | None = None,
    max_drop: float | None = None,
    contrast: str = "all_pairs",
    manifest: pd.DataFrame | None = None,
) -> dict:
    """results.json ``recommended_variant``: ``name`` (None without candidates), ``rule`` (in words, with
    the numbers and the outcome), ``task``, ``scenario``, ``floor``, ``contrast``, ``candidates``. The floor is
    either absolute (``floor``) or ``max_drop`` below the baseline's validation accuracy; give exactly one.
    ``contrast="view_matched"`` needs the ``manifest`` (each film's view)."""
    if contrast == "view_matched" and manifest is None:
        raise ValueError("selection: the view-matched contrast needs the manifest (each film's view)")
    if (floor is None) == (max_drop is None):
        raise ValueError("selection: give exactly one of floor (absolute) and max_drop (below the baseline)")
    relative = ""
    if max_drop is not None:
        floor = baseline_floor(runs, task, scenario, max_drop)
        relative = f" (the floor is the baseline's mean validation accuracy minus {max_drop:g})"
    assert floor is not None
    cands = candidates(runs, task, scenario, floor, contrast, manifest)
    rule = _rule_text(task, scenario, floor, contrast) + relative
    out = {"name": None, "rule": rule, "task": task, "scenario": scenario, "floor": floor, "contrast": contrast,
           "selected_on": "validation rows only", "candidates": cands}
    if not cands:
        out["rule"] = f"{rule} No run of {task} {scenario} without decomposition was found: nothing recommended."
        return out
    passing = [c for c in cands if c["passes_floor"]]
    if passing:  # ties: baseline first, then by name (candidates' order)
        best = max(passing, key=lambda c: -np.inf if c["val_within_source_auc"] is None else c["val_within_source_auc"])
        outcome = (
            f" {len(passing)} of {len(cands)} variants reach the floor; {best['variant']!r} has the highest "
            f"within-source contrast ({_fmt(best['val_within_source_auc'])}, validation accuracy "
            f"{_fmt(best['val_paper_task_accuracy'])}, {best['n_seeds']} seed(s))."
        )
    else:
        best = max(cands, key=lambda c: -np.inf if c["val_paper_task_accuracy"] is None else c["val_paper_task_accuracy"])
        outcome = (
            f" No variant reaches the floor of {floor:g}; {best['variant']!r} has the highest validation "
            f"accuracy ({_fmt(best['val_paper_task_accuracy'])}, {best['n_seeds']} seed(s))."
        )
    out.update(name=best["variant"], rule=rule + outcome, passed_floor=bool(passing))
    return out
