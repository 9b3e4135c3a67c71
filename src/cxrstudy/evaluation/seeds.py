"""Runs pooled over training seeds: configurations, seed summaries of test metrics and of the scorecard,
and per-seed paired comparisons summarised over seeds.

A *configuration* is (task, backbone, scenario, decomposition, variant); its runs differ only in the seed.
Each summary is a metric's spread over seeds (:func:`cxrstudy.stats.seed_spread`: n, mean,
sd, min, max) plus the range of the per-seed 95% patient-bootstrap intervals (``interval_low``: lowest
lower bound, ``interval_high``: highest upper bound). Pure functions of results.json entries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from cxrstudy import config
from cxrstudy.runspec import CONFIG_KEYS, RunSpec
from cxrstudy.stats import seed_spread

#: The variant of runs whose run.json names none.
BASELINE = config.BASELINE_VARIANT
#: Test-metric summaries of ``seed_summary`` entries: name -> the metric of a results.json ``runs`` entry.
SEED_METRICS: dict[str, Callable[[dict], dict | float | None]] = {
    "val_accuracy": lambda e: e.get("val_accuracy"),
    "test_accuracy": lambda e: (e.get("test") or {}).get("accuracy"),
    "hard_rule_accuracy": lambda e: ((e.get("test") or {}).get("hard_rule") or {}).get("accuracy"),
    "balanced_accuracy": lambda e: (e.get("test") or {}).get("balanced_accuracy"),
    "roc_auc": lambda e: (e.get("test") or {}).get("roc_auc"),
    "ece": lambda e: (e.get("test") or {}).get("ece"),
}


def run_variant(info: dict) -> str:
    """The variant of a run.json or results.json run entry (:class:`RunSpec`)."""
    return RunSpec.from_record(info).variant


def config_key(info: dict) -> tuple:
    """The configuration of a run.json or results.json run entry (:attr:`RunSpec.config_key`)."""
    return RunSpec.from_record(info).config_key


def run_key(info: dict) -> tuple:
    """What identifies one run of a run.json or results.json entry (:attr:`RunSpec.key`)."""
    return RunSpec.from_record(info).key


def config_order(key: tuple) -> tuple:
    """Sort key of a configuration: task, scenario (``config.SCENARIOS`` order), decomposition, baseline
    first, then the variant and backbone names."""
    task, backbone, scenario, dec, variant = key
    sc = config.SCENARIOS.index(scenario) if scenario in config.SCENARIOS else len(config.SCENARIOS)
    return (str(task), sc, bool(dec), variant != BASELINE, str(variant), str(backbone))


def group_by_config(items: Iterable[dict], info: Callable[[dict], dict] = lambda x: x) -> dict[tuple, list[dict]]:
    """Items grouped by the configuration of ``info(item)``, configurations in :func:`config_order`,
    items of one configuration by seed."""
    groups: dict[tuple, list[dict]] = {}
    for item in items:
        groups.setdefault(config_key(info(item)), []).append(item)
    return {
        k: sorted(groups[k], key=lambda x: str(info(x).get("seed")))
        for k in sorted(groups, key=config_order)
    }


def spread(metrics: Sequence[dict | float | None]) -> dict:
    """Spread over seeds of one metric (metric dicts or bare fractions): ``seed_spread`` plus the range of
    the per-seed intervals (``interval_low``, ``interval_high``; None without intervals)."""
    values = [m.get("value") if isinstance(m, dict) else m for m in metrics]
    out = seed_spread(values)
    lows = [m["ci_low"] for m in metrics if isinstance(m, dict) and m.get("ci_low") is not None]
    highs = [m["ci_high"] for m in metrics if isinstance(m, dict) and m.get("ci_high") is not None]
    out["interval_low"] = float(min(lows)) if lows else None
    out["interval_high"] = float(max(highs)) if highs else None
    return out


def seed_summary(entries: Sequence[dict]) -> list[dict]:
    """results.json ``seed_summary``: per configuration its runs (folds, and seeds when repeated), run ids and
    :data:`SEED_METRICS` spreads over them (``n_seeds`` counts the runs)."""
    out = []
    for key, runs in group_by_config(entries).items():
        out.append(
            {
                **dict(zip(CONFIG_KEYS, key, strict=True)),
                "n_seeds": len(runs),
                "n_runs": len(runs),
                "seeds": [r.get("seed") for r in runs],
                "folds": [r.get("fold") for r in runs],
                "run_ids": [r.get("run_id") for r in runs],
                **{name: spread([get(r) for r in runs]) for name, get in SEED_METRICS.items()},
            }
        )
    return out


def pooled_pairs(pairs: Sequence[dict], keys: Sequence[str], a: str | None = None, b: str | None = None) -> list[dict]:
    """Per-seed paired comparisons (``accuracy_difference`` a - b, ``mcnemar``) pooled over the seeds of
    each ``keys`` group: the difference's spread, and how many seeds favour a, favour b or tie."""
    groups: dict[tuple, list[dict]] = {}
    for c in pairs:
        groups.setdefault(tuple(c.get(k) for k in keys), []).append(c)
    out = []
    for key, cs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        diffs = np.array([np.nan if c["accuracy_difference"].get("value") is None
                          else c["accuracy_difference"]["value"] for c in cs], dtype=float)
        holm = [c["mcnemar"].get("p_holm") for c in cs]
        out.append(
            {
                **dict(zip(keys, key, strict=True)),
                **({"a": a, "b": b} if a is not None else {}),
                "n_seeds": len(cs),
                "seeds": sorted(c.get("seed") for c in cs),
                "accuracy_difference": spread([c["accuracy_difference"] for c in cs]),
                "n_favour_a": int((diffs > 0).sum()),
                "n_favour_b": int((diffs < 0).sum()),
                "n_tied": int((diffs == 0).sum()),
                "n_holm_below_0_05": sum(1 for p in holm if p is not None and p < 0.05),
            }
        )
    return out


# --------------------------------------------------------------------------- the scorecard over seeds


def _clears(goal: dict) -> bool | None:
    """Whether one run's whole interval clears its goal (None when the interval or target is missing)."""
    target = goal.get("target")
    bound = goal.get("ci_low") if goal.get("op") == ">=" else goal.get("ci_high")
    if target is None or bound is None:
        return None
    return bool(bound >= target) if goal.get("op") == ">=" else bool(bound <= target)


def goal_over_seeds(goals: Sequence[dict]) -> dict:
    """One goal over a configuration's seeds (results.json ``goals`` rows): ``status`` met when every seed's
    goal is met, missed when every seed's is missed, else undetermined (``met``: status == "met"); whether
    every seed's interval clears its target; how many seeds meet it."""
    first = goals[0]
    targets = [g["target"] for g in goals if g.get("target") is not None]
    target = float(np.mean(targets)) if targets else None
    s = spread(goals)
    statuses = [g.get("status") for g in goals if g.get("status") is not None]
    status = None
    if statuses:
        status = statuses[0] if len(set(statuses)) == 1 and statuses[0] != "undetermined" else "undetermined"
    met = None if status is None else status == "met"
    clears = [_clears(g) for g in goals]
    return {
        "goal": first["goal"],
        "metric": first["metric"],
        "op": first["op"],
        "target": target,
        **s,
        "status": status,
        "met": met,
        "all_seeds_clear": None if s["n"] == 0 or None in clears else all(clears),
        "n_seeds_met": sum(g.get("met") is True for g in goals),
    }


def confounders_over_seeds(blocks: Sequence[dict]) -> dict:
    """The confounder-only rules of a configuration's seeds (the first seed's: the seeds hold out the same
    films) and the spread of the view-matched value over seeds."""
    from cxrstudy.evaluation.confounders import RULES

    out = {name: blocks[0][name] for name in RULES if name in blocks[0]}
    matched = [b["view_matched"] for b in blocks if b.get("view_matched")]
    if matched:
        out["view_matched"] = spread(matched)
    return out


def scorecard_summary(entries: Sequence[dict], scorecard: Sequence[dict], goals: Sequence[dict]) -> list[dict]:
    """results.json ``scorecard_summary``: per configuration (runs from ``entries``, results.json ``runs``)
    every scorecard metric's spread over seeds (with ``methods`` used) and every goal over seeds."""
    by_run = {e.get("run_id"): e for e in entries}
    scored = [by_run[r] for r in dict.fromkeys(e["run_id"] for e in scorecard) if r in by_run]
    out = []
    for key, runs in group_by_config(scored).items():
        ids = [r["run_id"] for r in runs]
        metrics: dict[str, dict] = {}
        for metric in dict.fromkeys(e["metric"] for e in scorecard if e["run_id"] in ids):
            mine = [e for e in scorecard if e["run_id"] in ids and e["metric"] == metric]
            methods = sorted({str(e.get("method")) for e in mine})
            metrics[metric] = {**spread(mine), "methods": methods}
            if blocks := [e["confounders"] for e in mine if e.get("confounders")]:
                metrics[metric]["confounders"] = confounders_over_seeds(blocks)
        mine_goals = [g for g in goals if g.get("run_id") in ids]
        out.append(
            {
                **dict(zip(CONFIG_KEYS, key, strict=True)),
                "n_seeds": len(runs),
                "seeds": [r.get("seed") for r in runs],
                "run_ids": ids,
                "metrics": metrics,
                "goals": [
                    goal_over_seeds([g for g in mine_goals if g["goal"] == name])
                    for name in dict.fromkeys(g["goal"] for g in mine_goals)
                ],
            }
        )
    return out


# --------------------------------------------------------------------------- frames for the notebook


def _spread_cell(s: dict | None) -> str:
    """'94.1% (sd 1.2) [90.3, 97.0]': seed mean, sd in points and the range of the per-seed intervals."""
    if not s or s.get("mean") is None:
        return "n/a"
    text = f"{100 * s['mean']:.1f}%" + (f" (sd {100 * s['sd']:.1f})" if s.get("n", 0) > 1 else "")
    if s.get("interval_low") is not None:
        text += f" [{100 * s['interval_low']:.1f}, {100 * s['interval_high']:.1f}]"
    return text


def seed_frame(summary: Sequence[dict]) -> pd.DataFrame:
    """results.json ``seed_summary`` as a table: per configuration the seeds and each metric's seed mean,
    sd and range of the per-seed 95% intervals."""
    rows = [
        {
            **{k: s[k] for k in CONFIG_KEYS},
            "seeds": ", ".join(str(x) for x in s["seeds"]),
            "val. accuracy": _spread_cell(s["val_accuracy"]),
            "test accuracy": _spread_cell(s["test_accuracy"]),
            "hard-rule acc.": _spread_cell(s["hard_rule_accuracy"]),
            "balanced acc.": _spread_cell(s["balanced_accuracy"]),
            "ROC-AUC": _spread_cell(s["roc_auc"]),
        }
        for s in summary
    ]
    return pd.DataFrame(rows)


def pooled_frame(comparisons: dict) -> pd.DataFrame:
    """Paired comparisons pooled over seeds: mean difference (points), sd, seeds favouring each side."""
    rows = []
    for kind, key in (("scenarios_over_seeds", None), ("decomposition_over_seeds", "scenario")):
        for c in comparisons.get(kind, []):
            d = c["accuracy_difference"]
            rows.append({
                "comparison": f"decomposition on - off ({c[key]})" if key else f"{c['a']} vs {c['b']}",
                "task": c["task"],
                "variant": c.get("variant", "baseline"),
                "seeds": c["n_seeds"],
                "mean difference (points)": None if d["mean"] is None else round(100 * d["mean"], 1),
                "sd (points)": None if d["sd"] is None else round(100 * d["sd"], 1),
                "seeds favouring a / b / tied": f"{c['n_favour_a']} / {c['n_favour_b']} / {c['n_tied']}",
                "seeds with Holm p < 0.05": c["n_holm_below_0_05"],
            })
    return pd.DataFrame(rows)


def scorecard_frame(summary: Sequence[dict], recommended: dict | None = None) -> pd.DataFrame:
    """results.json ``scorecard_summary`` as a table: per configuration each goal's seed mean (sd)
    [interval range], the goal's status over seeds and whether every seed's interval clears it."""
    rec = recommended or {}
    rows = []
    for cfg in summary:
        row = {**{k: cfg[k] for k in CONFIG_KEYS}, "seeds": cfg["n_seeds"]}
        row["recommended"] = (cfg["task"], cfg["scenario"], cfg["variant"], cfg["decomposition"]) == (
            rec.get("task"), rec.get("scenario"), rec.get("name"), False)
        for g in cfg["goals"]:
            met = g.get("status") or "n/a"
            clear = {True: ", all seeds clear", False: ", not all seeds clear"}.get(g["all_seeds_clear"], "")
            row[f"{g['goal']} {g['metric']}"] = f"{_spread_cell(g)}: {met}{clear}"
        rows.append(row)
    return pd.DataFrame(rows)


def first_seed_runs(runs: Sequence[dict], keep: Iterable[str | None] = ()) -> list[dict]:
    """The runs (``reporting.results.load_runs`` items, in order) of each configuration's smallest seed, plus those
    whose run_id is in ``keep`` (e.g. the headline runs)."""
    keep = set(keep)
    first: dict[tuple, object] = {}
    for r in runs:
        key = config_key(r["info"])
        first[key] = min(first.get(key, r["info"]["seed"]), r["info"]["seed"])
    return [r for r in runs if r["info"]["seed"] == first[config_key(r["info"])] or r["info"].get("run_id") in keep]
