"""The notebook's tables of saved runs and results.json (DataFrames, percentages with intervals): runs,
headline, comparisons, leave-one-source-out, masking and accuracy per source.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from cxrstudy import config
from cxrstudy.evaluation.formatting import fmt_pct, pct_plain
from cxrstudy.evaluation.headline import PAPER_TASK
from cxrstudy.evaluation.metrics import per_source_accuracy, split_rows
from cxrstudy.runspec import RunSpec


def headline_frame(results: dict) -> pd.DataFrame:
    """The headline table as a DataFrame (percentages with CIs) with the published figures appended."""
    rows = [
        {
            "task": r["task"],
            "scenario": r["scenario"],
            "decomposition": "on" if r["decomposition"] else "off",
            "variant": r.get("variant", "baseline"),
            "seed": r["seed"],
            "val. accuracy": pct_plain(r.get("val_accuracy")),
            "accuracy (summed probabilities)": fmt_pct(r["accuracy"]),
            "accuracy (DeTraC hard rule)": fmt_pct(r.get("hard_rule_accuracy")),
            "balanced accuracy": fmt_pct(r["balanced_accuracy"]),
            "ROC-AUC": fmt_pct(r["roc_auc"]),
        }
        for r in (results.get("headline") or {}).get("table", [])
    ]
    rows.append(
        {
            "task": PAPER_TASK,
            "scenario": f"reported: {config.PAPER_CITATION}",
            "accuracy (summed probabilities)": f"{100 * config.PAPER_ACCURACY:.2f}%",
        }
    )
    rows.append(
        {
            "task": PAPER_TASK,
            "scenario": f"reported: {config.DETRAC_CITATION}",
            "accuracy (DeTraC hard rule)": f"{100 * config.DETRAC_ACCURACY:.1f}%",
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
            "val. accuracy": pct_plain(e.get("val_accuracy")),
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
        row["hard-rule acc."] = fmt_pct((t.get("hard_rule") or {}).get("accuracy"))
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
        "patient groups": m.get("n_clusters"),
        "accuracy difference (points)": diff,
        "only a right": m["a_only_correct"],
        "only b right": m["b_only_correct"],
        "McNemar p (clustered)": None if m.get("p_value") is None else round(m["p_value"], 4),
        "Holm p": None if m.get("p_holm") is None else round(m["p_holm"], 4),
        "test": m["method"],
    }


def comparisons_frame(comparisons: dict) -> pd.DataFrame:
    """McNemar and paired accuracy differences (scenario pairs and decomposition on - off) as one table."""
    rows = [
        {
            "comparison": f"{c['a']} vs {c['b']}",
            "task": c["task"],
            "decomposition": c["decomposition"],
            "variant": c.get("variant", "baseline"),
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
            "variant": c.get("variant", "baseline"),
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
            "trained on": ", ".join(f"{k} {v}" for k, v in (e.get("train_counts") or {}).items()),
        }
        row["accuracy"] = fmt_pct(e.get("accuracy")) if "accuracy" in e else e.get("skipped", "")
        for c, m in (e.get("sensitivity") or {}).items():
            row[f"sens. {c}"] = fmt_pct(m)
        rows.append(row)
    return pd.DataFrame(rows)


def masking_frame(masking: dict) -> pd.DataFrame:
    """The masking experiment (whole image, lungs masked, lungs only) as percentages with CIs."""
    return pd.DataFrame(
        {
            k: {m: fmt_pct(v[m]) for m in ("accuracy", "balanced_accuracy", "roc_auc")}
            for k, v in masking.items()
        }
    ).T


def per_source_table(runs: Sequence[dict]) -> pd.DataFrame:
    """Test accuracy per run (rows) and source/label (columns, short source names), for the heat map."""
    from cxrstudy.data.sources import SOURCES

    short = {src.repo: name for name, src in SOURCES.items()}
    parts = []
    for r in runs:
        t = per_source_accuracy(split_rows(r["predictions"], "test"), r["info"]["classes"])
        t["run"] = RunSpec.from_record(r["info"]).label(" ")
        parts.append(t)
    if not parts:
        return pd.DataFrame()
    t = pd.concat(parts)
    t["column"] = t["source"].map(lambda s: short.get(s, str(s).split("/")[-1])) + " / " + t["label"]
    return t.pivot_table(index="run", columns="column", values="accuracy")
