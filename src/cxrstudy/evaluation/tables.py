"""Statistics of saved runs and their tables: comparisons, headline, dataset counts, shortcut checks, frames.

Pure functions of runs (``report.load_runs`` items), results.json entries and results dicts; nothing is
written here. Percentages in frames come from ``fmt_pct``.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import pandas as pd

from cxrstudy import config
from cxrstudy.evaluation.metrics import (
    mcnemar,
    paired_difference_ci,
    per_source_accuracy,
    probs_from_frame,
    seed_spread,
)

PAPER_TASK = "covid_vs_normal"
#: What identifies a run (with ``classes``, required in every run.json).
RUN_KEYS = ("task", "backbone", "scenario", "decomposition", "seed")


# --------------------------------------------------------------------------- predictions


def split_rows(df: pd.DataFrame, split: str) -> pd.DataFrame:
    """Rows of one split."""
    return df[df["split"] == split].reset_index(drop=True)


def split_accuracy(df: pd.DataFrame, split: str) -> float | None:
    """Arg-max accuracy on one split (None when the split is empty)."""
    rows = split_rows(df, split)
    return float((rows["pred"] == rows["label"]).mean()) if len(rows) else None


def fmt_pct(m: dict | None) -> str:
    """'93.1% [90.2, 95.6]' from a metric dict."""
    if not m or m.get("value") is None:
        return "n/a"
    if m.get("ci_low") is None:
        return f"{100 * m['value']:.1f}%"
    return f"{100 * m['value']:.1f}% [{100 * m['ci_low']:.1f}, {100 * m['ci_high']:.1f}]"


def short_run_label(run_id: str, sep: str = "\n") -> str:
    """``task<sep>backbone scenario decomp seedN`` from a run_id (for figure titles and axes)."""
    parts = run_id.split("__")
    return parts[0] + sep + " ".join(parts[1:]) if len(parts) > 1 else run_id


# --------------------------------------------------------------------------- comparisons


def _aligned_test(a: dict, b: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two runs' test predictions on their common images, in the same order."""
    ta, tb = split_rows(a["predictions"], "test"), split_rows(b["predictions"], "test")
    common = sorted(set(ta["image"]) & set(tb["image"]))
    return ta.set_index("image").loc[common].reset_index(), tb.set_index("image").loc[common].reset_index()


def _pair(a: dict, b: dict, n_bootstrap: int, seed: int) -> dict:
    """McNemar and the paired accuracy difference (a - b) of two runs of one task on the same test images."""
    ta, tb = _aligned_test(a, b)
    classes = a["info"]["classes"]
    return {
        "n": int(len(ta)),
        "mcnemar": mcnemar(ta["pred"], tb["pred"], ta["label"]),
        "accuracy_difference": paired_difference_ci(
            ta["label"],
            probs_from_frame(ta, classes),
            probs_from_frame(tb, classes),
            classes,
            ta["patient_group"],
            "accuracy",
            n_bootstrap,
            seed,
        ),
    }


def _scenario_pairs(by_key: dict[tuple, dict], n_bootstrap: int, seed: int) -> list[dict]:
    """McNemar and accuracy difference of every pair of scenarios with the same task, backbone, decomposition, seed."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for (task, bb, _sc, dec, sd), r in by_key.items():
        groups.setdefault((task, bb, dec, sd), []).append(r)
    for (task, bb, dec, sd), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        rs = sorted(rs, key=lambda r: config.SCENARIOS.index(r["info"]["scenario"]))
        for a, b in combinations(rs, 2):
            entry = {
                "task": task,
                "backbone": bb,
                "decomposition": dec,
                "seed": sd,
                "a": a["info"]["scenario"],
                "b": b["info"]["scenario"],
            }
            out.append({**entry, **_pair(a, b, n_bootstrap, seed)})
    return out


def _decomposition_pairs(by_key: dict[tuple, dict], n_bootstrap: int, seed: int) -> list[dict]:
    """Decomposition on minus off for every run that has a twin without decomposition."""
    out = []
    for (task, bb, sc, dec, sd), r in sorted(by_key.items(), key=lambda kv: str(kv[0])):
        other = by_key.get((task, bb, sc, False, sd))
        if dec and other is not None:
            out.append(
                {"task": task, "backbone": bb, "scenario": sc, "seed": sd, **_pair(r, other, n_bootstrap, seed)}
            )
    return out


def _seed_spreads(by_key: dict[tuple, dict]) -> list[dict]:
    """Spread of test accuracy over seeds, where a setting ran several seeds."""
    seeds: dict[tuple, list[float]] = {}
    for (task, bb, sc, dec, _sd), r in by_key.items():
        seeds.setdefault((task, bb, sc, dec), []).append(split_accuracy(r["predictions"], "test"))
    return [
        {"task": task, "backbone": bb, "scenario": sc, "decomposition": dec, "test_accuracy": seed_spread(accs)}
        for (task, bb, sc, dec), accs in sorted(seeds.items(), key=lambda kv: str(kv[0]))
        if len(accs) > 1
    ]


def compare_runs(runs: Sequence[dict], n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """McNemar between scenarios; decomposition on minus off; spread over seeds (where several)."""
    by_key = {tuple(r["info"][k] for k in RUN_KEYS): r for r in runs}
    return {
        "scenarios_mcnemar": _scenario_pairs(by_key, n_bootstrap, seed),
        "decomposition_effect": _decomposition_pairs(by_key, n_bootstrap, seed),
        "seed_spread": _seed_spreads(by_key),
    }


# --------------------------------------------------------------------------- headline


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


def _headline_text(task: str, best: dict, position: str, best_scratch: dict | None) -> str:
    """The headline sentence: the chosen run's test accuracy against the published figures."""
    where = {
        "above": "above the interval",
        "below": "below the interval",
        "inside": "inside the interval",
        "unknown": "not comparable (no interval)",
    }[position]
    task_name = "Paper's task" if task == "covid_vs_normal" else "Three-class task"
    text = (
        f"{task_name} ({task}): the best transfer model "
        "chosen on validation accuracy "
        f"({best['backbone']}, {best['scenario']}, decomposition {'on' if best['decomposition'] else 'off'}) "
        f"reaches {fmt_pct(best['test']['accuracy'])} test accuracy (95% CI, patient-group bootstrap, "
        f"{best['test']['n']} images of {best['test']['n_groups']} patient groups). "
        f"The paper's {100 * config.PAPER_ACCURACY:.2f}% is {where}; "
        f"DeTraC reported {100 * config.DETRAC_ACCURACY:.1f}%."
    )
    if best_scratch is not None:
        text += f" The scratch control reaches {fmt_pct(best_scratch['test']['accuracy'])}."
    return text


def headline_table(entries: Sequence[dict]) -> list[dict]:
    """Every run's headline metrics, sorted by task, scenario and decomposition."""
    return [
        {
            "run_id": e["run_id"],
            "task": e["task"],
            "backbone": e["backbone"],
            "scenario": e["scenario"],
            "decomposition": e["decomposition"],
            "seed": e["seed"],
            "accuracy": e["test"]["accuracy"],
            "balanced_accuracy": e["test"]["balanced_accuracy"],
            "roc_auc": e["test"]["roc_auc"],
            "hard_rule_accuracy": (e["test"].get("hard_rule") or {}).get("accuracy"),
        }
        for e in sorted(
            entries, key=lambda e: (e["task"], config.SCENARIOS.index(e["scenario"]), e["decomposition"])
        )
    ]


def headline(entries: Sequence[dict], task: str = PAPER_TASK) -> dict:
    """Best transfer run of ``task`` (chosen on validation accuracy, not test) against the published figures."""
    runs = [e for e in entries if e["task"] == task]
    transfer = [e for e in runs if e["scenario"] != "scratch"]
    if not transfer:
        return {"task": task, "text": f"No transfer run of {task} was evaluated."}
    best = max(
        transfer, key=lambda e: -1 if e.get("val_accuracy") is None else e["val_accuracy"]
    )  # ties: first run_id; never test
    scratch = [e for e in runs if e["scenario"] == "scratch"]
    best_scratch = max(scratch, key=lambda e: e.get("val_accuracy") or -1) if scratch else None
    position = paper_position(best["test"]["accuracy"])
    return {
        "task": task,
        "run_id": best["run_id"],
        "selected_on": "validation accuracy",
        "scenario": best["scenario"],
        "decomposition": best["decomposition"],
        "accuracy": best["test"]["accuracy"],
        "paper_accuracy": config.PAPER_ACCURACY,
        "paper_citation": config.PAPER_CITATION,
        "detrac_accuracy": config.DETRAC_ACCURACY,
        "detrac_citation": config.DETRAC_CITATION,
        "paper_position": position,
        "scratch_accuracy": best_scratch["test"]["accuracy"] if best_scratch else None,
        "text": _headline_text(task, best, position, best_scratch),
        "table": headline_table(entries),
    }


# --------------------------------------------------------------------------- frames for the notebook


def headline_frame(results: dict) -> pd.DataFrame:
    """The headline table as a DataFrame (percentages with CIs) with the published figures appended."""
    rows = [
        {
            "task": r["task"],
            "scenario": r["scenario"],
            "decomposition": "on" if r["decomposition"] else "off",
            "seed": r["seed"],
            "accuracy": fmt_pct(r["accuracy"]),
            "balanced accuracy": fmt_pct(r["balanced_accuracy"]),
            "ROC-AUC": fmt_pct(r["roc_auc"]),
            "DeTraC hard rule": fmt_pct(r["hard_rule_accuracy"]),
        }
        for r in (results.get("headline") or {}).get("table", [])
    ]
    rows.append(
        {
            "task": PAPER_TASK,
            "scenario": f"reported: {config.PAPER_CITATION}",
            "accuracy": f"{100 * config.PAPER_ACCURACY:.2f}%",
        }
    )
    rows.append(
        {
            "task": PAPER_TASK,
            "scenario": f"reported: {config.DETRAC_CITATION}",
            "accuracy": f"{100 * config.DETRAC_ACCURACY:.1f}%",
        }
    )
    return pd.DataFrame(rows).fillna("")


def runs_frame(entries: Sequence[dict]) -> pd.DataFrame:
    """One row per run: test metrics as percentages with CIs, calibration and per-class sensitivity."""
    rows = []
    for e in entries:
        t = e["test"]
        row = {
            "run_id": e["run_id"],
            "n": t["n"],
            "groups": t["n_groups"],
            "accuracy": fmt_pct(t["accuracy"]),
            "balanced acc.": fmt_pct(t["balanced_accuracy"]),
            "ROC-AUC": fmt_pct(t["roc_auc"]),
            "PR-AUC": fmt_pct(t["pr_auc"]),
            "ECE": round(t["ece"], 3),
            "Brier": round(t["brier"], 3),
        }
        for c, pc in t["per_class"].items():
            row[f"sens. {c}"] = fmt_pct(pc["sensitivity"])
            row[f"spec. {c}"] = fmt_pct(pc["specificity"])
        if t.get("hard_rule"):
            row["hard-rule acc."] = fmt_pct(t["hard_rule"]["accuracy"])
        rows.append(row)
    return pd.DataFrame(rows).set_index("run_id") if rows else pd.DataFrame()


def _cmp_cells(c: dict) -> dict:
    """Table cells of one paired comparison."""
    d, m = c["accuracy_difference"], c["mcnemar"]
    diff = (
        "n/a"
        if d.get("value") is None
        else (f"{100 * d['value']:+.1f} [{100 * (d['ci_low'] or 0):+.1f}, {100 * (d['ci_high'] or 0):+.1f}]")
    )
    return {
        "n": c["n"],
        "accuracy difference (points)": diff,
        "only a right": m["a_only_correct"],
        "only b right": m["b_only_correct"],
        "McNemar p": round(m["p_value"], 4),
        "test": m["method"],
    }


def comparisons_frame(comparisons: dict) -> pd.DataFrame:
    """McNemar and paired accuracy differences (scenario pairs and decomposition on - off) as one table."""
    rows = [
        {
            "comparison": f"{c['a']} vs {c['b']}",
            "task": c["task"],
            "decomposition": c["decomposition"],
            "seed": c["seed"],
            **_cmp_cells(c),
        }
        for c in comparisons.get("scenarios_mcnemar", [])
    ]
    rows += [
        {
            "comparison": f"decomposition on - off ({c['scenario']})",
            "task": c["task"],
            "decomposition": "",
            "seed": c["seed"],
            **_cmp_cells(c),
        }
        for c in comparisons.get("decomposition_effect", [])
    ]
    return pd.DataFrame(rows)


def loso_frame(entries: Sequence[dict]) -> pd.DataFrame:
    """Leave-one-source-out results as a table (accuracy and per-class sensitivity as percentages)."""
    rows = []
    for e in entries:
        row = {
            "held out": e["held_out"],
            "n": e["n"],
            "labels": ", ".join(e["labels"]),
            "n train": e.get("n_train"),
        }
        row["accuracy"] = fmt_pct(e.get("accuracy")) if "accuracy" in e else e.get("skipped", "")
        for c, m in (e.get("sensitivity") or {}).items():
            row[f"sens. {c}"] = fmt_pct(m)
        rows.append(row)
    return pd.DataFrame(rows)


def masking_frame(masking: dict) -> pd.DataFrame:
    """The masking experiment (whole image, lungs masked, lungs only) as percentages with CIs."""
    return pd.DataFrame(
        {k: {m: fmt_pct(v[m]) for m in ("accuracy", "balanced_accuracy", "roc_auc")} for k, v in masking.items()}
    ).T


def per_source_table(runs: Sequence[dict]) -> pd.DataFrame:
    """Test accuracy per run (rows) and source/label (columns, short source names), for the heat map."""
    from cxrstudy.data.sources import SOURCES

    short = {src.repo: name for name, src in SOURCES.items()}
    parts = []
    for r in runs:
        t = per_source_accuracy(split_rows(r["predictions"], "test"), r["info"]["classes"])
        t["run"] = short_run_label(r["info"].get("run_id") or r["dir"].name, " ")
        parts.append(t)
    if not parts:
        return pd.DataFrame()
    t = pd.concat(parts)
    t["column"] = t["source"].map(lambda s: short.get(s, str(s).split("/")[-1])) + " / " + t["label"]
    return t.pivot_table(index="run", columns="column", values="accuracy")


# --------------------------------------------------------------------------- dataset and shortcut checks


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


def _saliency_summary(saliency: pd.DataFrame, saliency_run: str | None, uniform: float) -> dict:
    """``saliency_in_lung_share``, ``saliency_uniform_reference`` and ``saliency`` of shortcut_checks."""
    all_rows = saliency
    if saliency_run is not None and "run_id" in saliency.columns:
        saliency = saliency[saliency["run_id"] == saliency_run]
    share = saliency["lung_share"].dropna()
    return {
        "saliency_in_lung_share": float(share.mean()) if len(share) else None,
        "saliency_uniform_reference": uniform,
        "saliency": {
            "run_id": saliency_run,
            "n_images": int(len(saliency)),
            "cam_grid": int(saliency["cam_grid"].min())
            if "cam_grid" in saliency.columns and len(saliency)
            else None,
            "by_run": (
                all_rows.groupby("run_id")["lung_share"].mean().to_dict()
                if "run_id" in all_rows.columns
                else {}
            ),
            "by_outcome": share.groupby(saliency.loc[share.index, "outcome"]).mean().to_dict(),
            "by_label": share.groupby(saliency.loc[share.index, "label"]).mean().to_dict(),
        },
    }


def assemble_shortcut_checks(
    source_identification: dict | None = None,
    masking: dict | None = None,
    leave_one_source_out: list | None = None,
    same_hospital: dict | None = None,
    saliency: pd.DataFrame | None = None,
    saliency_run: str | None = None,
) -> dict:
    """results.json ``shortcut_checks`` from the separate checks (any of them may be missing).
    ``saliency``: ``saliency_for_runs`` table; the in-lung share is over ``saliency_run``'s images when given."""
    from cxrstudy.evaluation.shortcuts import LUNG_REGION

    x0, y0, x1, y1 = LUNG_REGION
    out: dict = {
        "lung_region": {"x": [x0, x1], "y": [y0, y1], "area_share": (x1 - x0) * (y1 - y0)},
        "level": "linear heads on frozen features (shallow)",
    }
    if source_identification is not None:
        out["source_identification_accuracy"] = source_identification.get("accuracy")
        out["source_identification"] = source_identification
    if masking is not None:
        out["unmasked"] = masking.get("unmasked")
        out["masked_lungs"] = masking.get("masked_lungs")
        out["lungs_only"] = masking.get("lungs_only")
    if leave_one_source_out is not None:
        out["leave_one_source_out"] = leave_one_source_out
    if same_hospital is not None:
        out["same_hospital"] = same_hospital
    if saliency is not None and len(saliency):
        out.update(_saliency_summary(saliency, saliency_run, (x1 - x0) * (y1 - y0)))
    return out
