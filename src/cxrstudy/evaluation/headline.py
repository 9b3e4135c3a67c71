"""The headline of results.json: the best transfer configuration of a task (chosen on validation
accuracy over its seeds) against the published figures, every run's headline metrics, and the counts of
the evaluated data. Pure functions of results.json entries and the manifest.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from cxrstudy import config
from cxrstudy.evaluation.formatting import fmt_pct, pct_plain
from cxrstudy.evaluation.seeds import config_key, config_order, run_variant, seed_summary

PAPER_TASK = "covid_vs_normal"


def paper_position(acc: dict) -> str:
    """Where the paper's accuracy lies against a metric's interval: above, below, inside or unknown."""
    lo, hi = acc.get("ci_low"), acc.get("ci_high")
    if lo is None:
        return "unknown"
    if config.PAPER_ACCURACY > hi:
        return "above"
    if config.PAPER_ACCURACY < lo:
        return "below"
    return "inside"


def _headline_text(task: str, best: dict, position: str, best_scratch: dict | None, over: dict) -> str:
    """The headline sentence: the chosen configuration's out-of-fold accuracy with its interval and films, the
    spread of its folds, against the published figures."""
    where = {
        "above": "above the interval",
        "below": "below the interval",
        "inside": "inside the interval",
        "unknown": "not comparable (no interval)",
    }[position]
    task_name = "Paper's task" if task == "covid_vs_normal" else "Three-class task"
    acc = over["test_accuracy"]
    config_txt = (
        f"{best['backbone']}, {best['scenario']}, decomposition {'on' if best['decomposition'] else 'off'}"
    )
    if best.get("val_accuracy") is not None:
        config_txt += f"; pooled inner-validation accuracy {100 * best['val_accuracy']:.1f}%"
    test = best["test"]
    folds_txt = (
        f" Its {over['n_seeds']} folds, each on its own films, range from {pct_plain(acc['min'])} to "
        f"{pct_plain(acc['max'])} (sd {100 * acc['sd']:.1f} points)."
        if over.get("n_seeds", 0) > 1 and acc.get("min") is not None
        else ""
    )
    text = (
        f"{task_name} ({task}): the best transfer configuration chosen on inner-validation accuracy (never on "
        f"held-out films) ({config_txt}) reaches {fmt_pct(test['accuracy'])} out of fold (95% CI, class-stratified "
        f"patient bootstrap; {test['n']} films of {test['n_groups']} patients, each scored by the fold model that "
        f"never saw it).{folds_txt} The paper's {100 * config.PAPER_ACCURACY:.2f}%, from one fixed split, is "
        f"{where}; DeTraC reported {100 * config.DETRAC_ACCURACY:.1f}%."
    )
    if best_scratch is not None:
        text += f" The scratch control reaches {fmt_pct(best_scratch['test']['accuracy'])}."
    return text


def headline_table(entries: Sequence[dict]) -> list[dict]:
    """Every run's headline metrics, sorted by configuration (``seeds.config_order``) and seed."""
    return [
        {
            "run_id": e["run_id"],
            "task": e["task"],
            "backbone": e["backbone"],
            "scenario": e["scenario"],
            "decomposition": e["decomposition"],
            "variant": run_variant(e),
            "seed": e["seed"],
            "val_accuracy": e.get("val_accuracy"),
            "accuracy": e["test"]["accuracy"],
            "hard_rule_accuracy": (e["test"].get("hard_rule") or {}).get("accuracy"),
            "balanced_accuracy": e["test"]["balanced_accuracy"],
            "roc_auc": e["test"]["roc_auc"],
        }
        for e in sorted(entries, key=lambda e: (*config_order(config_key(e)), str(e["seed"])))
    ]


def _over_seeds(entries: Sequence[dict], best: dict) -> dict:
    """Validation and test accuracy of the chosen configuration over its runs (``seed_summary`` fields): its
    folds when ``entries`` holds fold runs."""
    same = [e for e in entries if config_key(e) == config_key(best)]
    [summary] = seed_summary(same)
    return {k: summary[k] for k in ("n_seeds", "seeds", "val_accuracy", "test_accuracy")}


def _best_configuration(runs: Sequence[dict]) -> dict:
    """The first seed's run of the configuration with the best mean validation accuracy over its seeds
    (ties: configuration order); test numbers are never read."""
    by_config: dict[tuple, list[dict]] = {}
    for e in runs:
        by_config.setdefault(config_key(e), []).append(e)

    def mean_val(key: tuple) -> float:
        vals = [e["val_accuracy"] for e in by_config[key] if e.get("val_accuracy") is not None]
        return float(np.mean(vals)) if vals else -1.0

    key = max(sorted(by_config, key=config_order), key=mean_val)
    return min(by_config[key], key=lambda e: e["seed"])


def headline(entries: Sequence[dict], task: str = PAPER_TASK, fold_entries: Sequence[dict] | None = None) -> dict:
    """Best transfer configuration of ``task`` (out-of-fold entries; chosen on pooled inner-validation accuracy,
    never on held-out films; among baseline configurations when there are any: variants are chosen by
    ``selection``) against the published figures; ``fold_entries`` (its fold runs) give the spread over folds."""
    runs = [e for e in entries if e["task"] == task]
    if any(run_variant(e) == "baseline" for e in runs):
        runs = [e for e in runs if run_variant(e) == "baseline"]
    transfer = [e for e in runs if e["scenario"] != "scratch"]
    if not transfer:
        return {"task": task, "text": f"No transfer run of {task} was evaluated."}
    best = _best_configuration(transfer)
    scratch = [e for e in runs if e["scenario"] == "scratch"]
    best_scratch = _best_configuration(scratch) if scratch else None
    position = paper_position(best["test"]["accuracy"])
    over = _over_seeds(fold_entries if fold_entries else runs, best)
    text = _headline_text(task, best, position, best_scratch, over)
    return {
        "task": task,
        "run_id": best["run_id"],
        "config_id": best.get("config_id", best["run_id"]),
        "selected_on": "pooled inner-validation accuracy of the configuration's folds",
        "scenario": best["scenario"],
        "decomposition": best["decomposition"],
        "variant": run_variant(best),
        "seed": best["seed"],
        "accuracy": best["test"]["accuracy"],
        "over_seeds": over,
        "over_folds": over,
        "paper_accuracy": config.PAPER_ACCURACY,
        "paper_citation": config.PAPER_CITATION,
        "detrac_accuracy": config.DETRAC_ACCURACY,
        "detrac_citation": config.DETRAC_CITATION,
        "paper_position": position,
        "scratch_accuracy": best_scratch["test"]["accuracy"] if best_scratch else None,
        "text": text,
        "table": headline_table(entries),
    }


def dataset_summary(manifest: pd.DataFrame, excluded: pd.DataFrame | None = None) -> dict:
    """Counts of the evaluated manifest: images, patient groups, per split / label / source."""
    out: dict = {
        "n_images": int(len(manifest)),
        "n_patient_groups": int(manifest["patient_group"].nunique()),
        "by_split_label": {s: g["label"].value_counts().to_dict() for s, g in manifest.groupby("split")},
        "n_patients_by_label": manifest.groupby("label")["patient_group"].nunique().to_dict(),
        "by_source_label": {
            s: g["label"].value_counts().to_dict() for s, g in manifest.groupby("source_name")
        },
        "patient_groups_by_split": manifest.groupby("split")["patient_group"].nunique().to_dict(),
    }
    if excluded is not None:
        out["n_excluded"] = int(len(excluded))
        if "reason" in excluded.columns:
            out["excluded_by_reason"] = (
                excluded["reason"].str.split(":").str[0].str.split(" ").str[0].value_counts().to_dict()
            )
    return out
