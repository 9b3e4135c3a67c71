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
    """The headline sentence: the chosen configuration's test accuracy over its seeds, its first seed's run
    with its interval, against the published figures."""
    where = {
        "above": "above the interval",
        "below": "below the interval",
        "inside": "inside the interval",
        "unknown": "not comparable (no interval)",
    }[position]
    task_name = "Paper's task" if task == "covid_vs_normal" else "Three-class task"
    acc, val = over["test_accuracy"], over.get("val_accuracy") or {}
    n = over["n_seeds"]
    config_txt = (
        f"{best['backbone']}, {best['scenario']}, decomposition {'on' if best['decomposition'] else 'off'}"
    )
    if val.get("mean") is not None:
        config_txt += f"; mean validation accuracy {100 * val['mean']:.1f}%"
    seeds_txt = (
        f"{100 * acc['mean']:.1f}% test accuracy on average over its {n} seeds (sd {100 * acc['sd']:.1f} points; "
        f"per-seed 95% intervals from {pct_plain(acc['interval_low'])} to {pct_plain(acc['interval_high'])}); "
        if n > 1
        else ""
    )
    text = (
        f"{task_name} ({task}): the best transfer configuration chosen on validation accuracy "
        f"(mean over seeds, never test) ({config_txt}) reaches {seeds_txt}"
        f"its seed-{best['seed']} run reaches {fmt_pct(best['test']['accuracy'])} (95% CI, patient-group "
        f"bootstrap, {best['test']['n']} images of {best['test']['n_groups']} patient groups). "
        f"The paper's {100 * config.PAPER_ACCURACY:.2f}% is {where} of that run; "
        f"DeTraC reported {100 * config.DETRAC_ACCURACY:.1f}%."
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
    """Validation and test accuracy of the chosen run's configuration over its seeds (``seed_summary`` fields)."""
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


def headline(entries: Sequence[dict], task: str = PAPER_TASK) -> dict:
    """Best transfer run of ``task`` (chosen on validation accuracy, not test; among baseline runs when
    there are any: variants are chosen by ``selection``) against the published figures."""
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
    over = _over_seeds(runs, best)
    text = _headline_text(task, best, position, best_scratch, over)
    return {
        "task": task,
        "run_id": best["run_id"],
        "selected_on": "mean validation accuracy over the configuration's seeds (its first seed's run)",
        "scenario": best["scenario"],
        "decomposition": best["decomposition"],
        "variant": run_variant(best),
        "seed": best["seed"],
        "accuracy": best["test"]["accuracy"],
        "over_seeds": over,
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
