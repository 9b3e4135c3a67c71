"""results.json (metrics of every saved run, comparisons, shortcut checks, headline, verdict), model card
and CLAIM checklist. The schema is documented in docs/results_schema.md.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrstudy import config
from cxrstudy.evaluation.metrics import (
    evaluate_predictions,
    mcnemar,
    paired_difference_ci,
    per_source_accuracy,
    probs_from_frame,
    seed_spread,
)
from cxrstudy.fileio import atomic_write_text, to_jsonable, write_json

SCHEMA_VERSION = 1
PAPER_TASK = "covid_vs_normal"
#: Sentences cite these for the comparison figures.
PAPER_CITATION = "Miroshnichenko & Mikhelev 2021, J. Phys.: Conf. Ser. 1801 012010"
DETRAC_CITATION = "Abbas, Abdelsamea & Gaber 2021, Applied Intelligence 51:854-864 (DeTraC, VGG19)"
RUN_KEYS = ("task", "backbone", "scenario", "decomposition", "seed")


# --------------------------------------------------------------------------- files


def _pct_or_na(value: Any) -> str:
    """A fraction as a percentage with one decimal, or ``n/a``."""
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "n/a"


def load_runs(profile_dir: Path) -> list[dict]:
    """Every finished run of a profile (``runs/*/run.json`` present): {'dir', 'info', 'predictions'}."""
    runs = []
    for info_path in sorted((Path(profile_dir) / "runs").glob("*/run.json")):
        run_dir = info_path.parent
        info = json.loads(info_path.read_text())
        missing = [k for k in (*RUN_KEYS, "classes") if k not in info]
        if missing:
            raise ValueError(f"{info_path}: missing key(s) {missing}")
        pred_path = run_dir / "predictions.csv"
        if not pred_path.is_file():
            raise FileNotFoundError(f"{pred_path} is missing although {info_path} marks the run finished")
        runs.append({"dir": run_dir, "info": info, "predictions": pd.read_csv(pred_path)})
    return runs


def run_entry(info: dict, test: dict, **extra: Any) -> dict:
    """One element of results.json's ``runs``: identity, timing and the ``test`` metrics."""
    entry = {
        "run_id": info.get("run_id"),
        **{k: info[k] for k in RUN_KEYS},
        "train_seconds": info.get("train_seconds"),
        "image_size": info.get("image_size"),
        "classes": list(info["classes"]),
        "subclasses": list(info.get("subclasses") or info["classes"]),
        "test": test,
    }
    entry.update(extra)
    return entry


def _split(df: pd.DataFrame, split: str) -> pd.DataFrame:
    """Rows of one split."""
    return df[df["split"] == split].reset_index(drop=True)


def _split_accuracy(df: pd.DataFrame, split: str) -> float | None:
    """Arg-max accuracy on one split (None when the split is empty)."""
    rows = _split(df, split)
    return float((rows["pred"] == rows["label"]).mean()) if len(rows) else None


def evaluate_runs(runs: Sequence[dict], n_bootstrap: int = 1000, seed: int = 0) -> list[dict]:
    """Test metrics (patient-group bootstrap) of every run, as results.json ``runs`` entries."""
    out = []
    for run in runs:
        info, preds = run["info"], run["predictions"]
        test = _split(preds, "test")
        if len(test) == 0:
            raise ValueError(f"{run['dir'] / 'predictions.csv'}: no test rows")
        metrics = evaluate_predictions(test, info["classes"], n_bootstrap, seed, where=str(run["dir"]))
        out.append(run_entry(info, metrics, val_accuracy=_split_accuracy(preds, "val")))
    return out


# --------------------------------------------------------------------------- comparisons


def _aligned_test(a: dict, b: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two runs' test predictions on their common images, in the same order."""
    ta, tb = _split(a["predictions"], "test"), _split(b["predictions"], "test")
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


def compare_runs(runs: Sequence[dict], n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """McNemar between scenarios; decomposition on minus off; spread over seeds (where several)."""
    by_key = {tuple(r["info"][k] for k in RUN_KEYS): r for r in runs}
    scenarios, decomp, spread = [], [], []
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
            scenarios.append({**entry, **_pair(a, b, n_bootstrap, seed)})
    for (task, bb, sc, dec, sd), r in sorted(by_key.items(), key=lambda kv: str(kv[0])):
        other = by_key.get((task, bb, sc, False, sd))
        if dec and other is not None:
            decomp.append(
                {
                    "task": task,
                    "backbone": bb,
                    "scenario": sc,
                    "seed": sd,
                    **_pair(r, other, n_bootstrap, seed),
                }
            )
    seeds: dict[tuple, list[float]] = {}
    for (task, bb, sc, dec, _sd), r in by_key.items():
        seeds.setdefault((task, bb, sc, dec), []).append(_split_accuracy(r["predictions"], "test"))
    for (task, bb, sc, dec), accs in sorted(seeds.items(), key=lambda kv: str(kv[0])):
        if len(accs) > 1:
            spread.append(
                {
                    "task": task,
                    "backbone": bb,
                    "scenario": sc,
                    "decomposition": dec,
                    "test_accuracy": seed_spread(accs),
                }
            )
    return {"scenarios_mcnemar": scenarios, "decomposition_effect": decomp, "seed_spread": spread}


# --------------------------------------------------------------------------- headline


def fmt_pct(m: dict | None) -> str:
    """'93.1% [90.2, 95.6]' from a metric dict."""
    if not m or m.get("value") is None:
        return "n/a"
    if m.get("ci_low") is None:
        return f"{100 * m['value']:.1f}%"
    return f"{100 * m['value']:.1f}% [{100 * m['ci_low']:.1f}, {100 * m['ci_high']:.1f}]"


def headline(entries: Sequence[dict], task: str = PAPER_TASK) -> dict:
    """Best transfer run of ``task`` (chosen on validation accuracy, not test) against the published figures."""
    runs = [e for e in entries if e["task"] == task]
    transfer = [e for e in runs if e["scenario"] != "scratch"]
    if not transfer:
        return {"task": task, "text": f"No transfer run of {task} was evaluated."}
    best = max(
        transfer, key=lambda e: -1 if e.get("val_accuracy") is None else e["val_accuracy"]
    )  # ties: first run_id; never test
    acc = best["test"]["accuracy"]
    scratch = [e for e in runs if e["scenario"] == "scratch"]
    best_scratch = max(scratch, key=lambda e: e.get("val_accuracy") or -1) if scratch else None
    lo, hi = acc.get("ci_low"), acc.get("ci_high")
    if lo is None:
        position = "unknown"
    elif config.PAPER_ACCURACY > hi:
        position = "above"
    elif config.PAPER_ACCURACY < lo:
        position = "below"
    else:
        position = "inside"
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
        f"reaches {fmt_pct(acc)} test accuracy (95% CI, patient-group bootstrap, {best['test']['n']} images of "
        f"{best['test']['n_groups']} patient groups). The paper's {100 * config.PAPER_ACCURACY:.2f}% is {where}; "
        f"DeTraC reported {100 * config.DETRAC_ACCURACY:.1f}%."
    )
    if best_scratch is not None:
        text += f" The scratch control reaches {fmt_pct(best_scratch['test']['accuracy'])}."
    table = [
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
    return {
        "task": task,
        "run_id": best["run_id"],
        "selected_on": "validation accuracy",
        "scenario": best["scenario"],
        "decomposition": best["decomposition"],
        "accuracy": acc,
        "paper_accuracy": config.PAPER_ACCURACY,
        "paper_citation": PAPER_CITATION,
        "detrac_accuracy": config.DETRAC_ACCURACY,
        "detrac_citation": DETRAC_CITATION,
        "paper_position": position,
        "scratch_accuracy": best_scratch["test"]["accuracy"] if best_scratch else None,
        "text": text,
        "table": table,
    }


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
            "scenario": f"reported: {PAPER_CITATION}",
            "accuracy": f"{100 * config.PAPER_ACCURACY:.2f}%",
        }
    )
    rows.append(
        {
            "task": PAPER_TASK,
            "scenario": f"reported: {DETRAC_CITATION}",
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


def comparisons_frame(comparisons: dict) -> pd.DataFrame:
    """McNemar and paired accuracy differences (scenario pairs and decomposition on - off) as one table."""
    rows = []
    for c in comparisons.get("scenarios_mcnemar", []):
        rows.append(
            {
                "comparison": f"{c['a']} vs {c['b']}",
                "task": c["task"],
                "decomposition": c["decomposition"],
                "seed": c["seed"],
                **_cmp_cells(c),
            }
        )
    for c in comparisons.get("decomposition_effect", []):
        rows.append(
            {
                "comparison": f"decomposition on - off ({c['scenario']})",
                "task": c["task"],
                "decomposition": "",
                "seed": c["seed"],
                **_cmp_cells(c),
            }
        )
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


def assemble_shortcut_checks(
    source_identification: dict | None = None,
    masking: dict | None = None,
    leave_one_source_out: list | None = None,
    same_hospital: dict | None = None,
    saliency: pd.DataFrame | None = None,
    saliency_run: str | None = None,
) -> dict:
    """results.json ``shortcut_checks`` from the separate checks (any of them may be missing).

    ``saliency``: ``saliency_for_runs`` table; ``saliency_in_lung_share`` is the mean over ``saliency_run``'s
    images (the headline run) when given, else over all rows; ``saliency.by_run`` has every run's mean.
    """
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
        all_rows = saliency
        if saliency_run is not None and "run_id" in saliency.columns:
            saliency = saliency[saliency["run_id"] == saliency_run]
        share = saliency["lung_share"].dropna()
        out["saliency_in_lung_share"] = float(share.mean()) if len(share) else None
        out["saliency_uniform_reference"] = (x1 - x0) * (y1 - y0)
        out["saliency"] = {
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
        }
    return out


def short_run_label(run_id: str, sep: str = "\n") -> str:
    """``task<sep>backbone scenario decomp seedN`` from a run_id (for figure titles and axes)."""
    parts = run_id.split("__")
    return parts[0] + sep + " ".join(parts[1:]) if len(parts) > 1 else run_id


def per_source_table(runs: Sequence[dict]) -> pd.DataFrame:
    """Test accuracy per run (rows) and source/label (columns, short source names), for the heat map."""
    from cxrstudy.data.sources import SOURCES

    short = {src.repo: name for name, src in SOURCES.items()}
    parts = []
    for r in runs:
        t = per_source_accuracy(_split(r["predictions"], "test"), r["info"]["classes"])
        t["run"] = short_run_label(r["info"].get("run_id") or r["dir"].name, " ")
        parts.append(t)
    if not parts:
        return pd.DataFrame()
    t = pd.concat(parts)
    t["column"] = t["source"].map(lambda s: short.get(s, str(s).split("/")[-1])) + " / " + t["label"]
    return t.pivot_table(index="run", columns="column", values="accuracy")


def evaluation_figures(runs: Sequence[dict], entries: Sequence[dict], fig_dir: Path) -> dict[str, Path]:
    """Save the study's evaluation figures under ``fig_dir``; returns name -> path.

    confusion_matrices, reliability, learning_curves (grids over runs), roc_pr_<run_id> per run,
    per_source_accuracy (heat map) and accuracy_vs_paper (every run's CI against the published figures).
    """
    import matplotlib.pyplot as plt

    from cxrstudy import plots
    from cxrstudy.evaluation.metrics import reliability_curve

    fig_dir = Path(fig_dir)
    paths: dict[str, Path] = {}
    if not runs:
        return paths
    n = len(runs)
    ncols = min(4, n)
    nrows = int(np.ceil(n / ncols))
    by_id = {e["run_id"]: e for e in entries}

    def grid(size: tuple[float, float]):
        fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
        for ax in axes.flat[n:]:
            ax.axis("off")
        return fig, axes.flat

    fig, axes = grid((3.0, 2.8))
    for ax, run in zip(axes, runs, strict=False):
        e = by_id[run["info"]["run_id"]]
        plots.plot_confusion(e["test"]["confusion_matrix"], e["classes"], short_run_label(e["run_id"]), ax=ax)
    fig.tight_layout()
    plots.save_figure(fig, fig_dir / "confusion_matrices.png", close=True)
    paths["confusion_matrices"] = fig_dir / "confusion_matrices.png"

    fig, axes = grid((3.6, 3.6))
    for ax, run in zip(axes, runs, strict=False):
        e = by_id[run["info"]["run_id"]]
        test = _split(run["predictions"], "test")
        curve = reliability_curve(test["label"], probs_from_frame(test, e["classes"]), e["classes"])
        plots.plot_reliability(curve, e["test"]["ece"], short_run_label(e["run_id"]), ax=ax)
    fig.tight_layout()
    plots.save_figure(fig, fig_dir / "reliability.png", close=True)
    paths["reliability"] = fig_dir / "reliability.png"

    fig, axes = grid((3.4, 2.6))
    for ax, run in zip(axes, runs, strict=False):
        hist_path = Path(run["dir"]) / "history.csv"
        if hist_path.is_file():
            h = pd.read_csv(hist_path)
            ax.plot(h["epoch"], h["train_loss"], "o-", ms=3, label="train loss")
            ax.plot(h["epoch"], h["valid_loss"], "s-", ms=3, label="valid loss")
            ax2 = ax.twinx()
            ax2.plot(h["epoch"], h["valid_accuracy"], "^--", ms=3, color="C3")
            ax2.set_ylim(0, 1.02)
            ax.legend(fontsize=6)
        ax.set_title(short_run_label(run["info"]["run_id"]), fontsize=7)
        ax.set_xlabel("epoch", fontsize=7)
    fig.tight_layout()
    plots.save_figure(fig, fig_dir / "learning_curves.png", close=True)
    paths["learning_curves"] = fig_dir / "learning_curves.png"

    for run in runs:
        e = by_id[run["info"]["run_id"]]
        test = _split(run["predictions"], "test")
        fig = plots.plot_roc_pr(
            test["label"].to_numpy(), probs_from_frame(test, e["classes"]), e["classes"], e["run_id"]
        )
        plots.save_figure(fig, fig_dir / f"roc_pr_{e['run_id']}.png", close=True)
        paths[f"roc_pr_{e['run_id']}"] = fig_dir / f"roc_pr_{e['run_id']}.png"

    table = per_source_table(runs)
    if not table.empty:
        plots.save_figure(
            plots.plot_per_source_heatmap(table, "test accuracy per source and label"),
            fig_dir / "per_source_accuracy.png",
            close=True,
        )
        paths["per_source_accuracy"] = fig_dir / "per_source_accuracy.png"

    bars = pd.DataFrame(
        [
            {
                "label": f"{e['task']} {e['scenario']} {'decomp' if e['decomposition'] else 'nodecomp'} s{e['seed']}",
                **{k: e["test"]["accuracy"][k] for k in ("value", "ci_low", "ci_high")},
            }
            for e in entries
        ]
    )
    fig = plots.plot_metric_bars(
        bars, "test accuracy", {"paper": config.PAPER_ACCURACY, "DeTraC": config.DETRAC_ACCURACY}
    )
    plots.save_figure(fig, fig_dir / "accuracy_vs_paper.png", close=True)
    paths["accuracy_vs_paper"] = fig_dir / "accuracy_vs_paper.png"
    return paths


# --------------------------------------------------------------------------- verdict


def verdict(results: dict) -> list[str]:
    """Plain sentences generated from the numbers: what the accuracy can and cannot be trusted for."""
    out: list[str] = []
    head = results.get("headline") or {}
    if head.get("text"):
        out.append(head["text"])
    acc = head.get("accuracy") or {}
    if acc.get("ci_low") is not None and acc["ci_high"] - acc["ci_low"] > 0.1:
        out.append(
            f"The interval is {100 * (acc['ci_high'] - acc['ci_low']):.0f} points wide: the test split is too small "
            "(in patients) to separate models that differ by a few points."
        )
    checks = results.get("shortcut_checks") or {}
    sid = checks.get("source_identification") or {}
    if sid.get("accuracy") is not None:
        strong = sid["accuracy"] >= 0.8 or sid["accuracy"] - sid.get("majority_baseline", 0) >= 0.2
        out.append(
            f"A linear classifier on frozen features names the source repository of an image with "
            f"{100 * sid['accuracy']:.0f}% accuracy (majority baseline {100 * sid.get('majority_baseline', 0):.0f}%, "
            f"balanced accuracy {100 * sid.get('balanced_accuracy', 0):.0f}%). "
            + (
                "The source is easy to see, and labels are largely confounded with sources (COVID-19 films come from "
                "different repositories than normal ones), so a high score may reflect the hospital rather than the disease."
                if strong
                else "The source is not trivially visible in the features."
            )
        )
    if sid or checks.get("masked_lungs"):
        out.append(
            "The shortcut checks use linear heads on frozen ImageNet features (cheap on a CPU): they show "
            "what the images make easy to learn, not what each trained network used."
        )
    unmasked, masked, lungs = checks.get("unmasked"), checks.get("masked_lungs"), checks.get("lungs_only")
    if masked and masked.get("accuracy", {}).get("value") is not None:
        m = masked["accuracy"]["value"]
        u = (unmasked or {}).get("accuracy", {}).get("value")
        sentence = f"With the central lung field blacked out, a linear head still reaches {fmt_pct(masked['accuracy'])} test accuracy"
        sentence += f" (whole image: {fmt_pct(unmasked['accuracy'])}" if u is not None else " ("
        sentence += f"; lung field only: {fmt_pct(lungs['accuracy'])})." if lungs else ")."
        if m >= 0.85 or (u is not None and u - m <= 0.05):
            sentence += " Most of the score does not need the lungs: borders, text, devices and exposure carry the label."
        else:
            sentence += " Masking the lungs costs a clear part of the score, so the lung field matters."
        out.append(sentence)
    loso = [e for e in checks.get("leave_one_source_out") or [] if "accuracy" in e]
    if loso:
        parts = [f"{e['held_out']} {fmt_pct(e['accuracy'])} (n={e['n']})" for e in loso]
        out.append("Held-out whole sources (trained without them): accuracy " + "; ".join(parts) + ".")
        for e in loso:
            value = e["accuracy"].get("value")
            if value is not None and value < 0.5:
                labels = " and ".join(e.get("labels") or []) or "its"
                out.append(
                    f"Trained without {e['held_out']}, the linear head recognises only {100 * value:.0f}% of that "
                    f"source's {labels} images: what it learned for that class is largely how {e['held_out']} "
                    "films look, not something that transfers to another hospital."
                )
    sh = checks.get("same_hospital") or {}
    probe = sh.get("probe") or {}
    if probe.get("accuracy"):
        out.append(
            f"Within the one hospital with both COVID-19 and normal films ({sh.get('source')}, n={sh.get('n')}), "
            f"a cross-validated linear head reaches {fmt_pct(probe['accuracy'])}"
            + (": too few images for a firm conclusion." if (sh.get("n") or 0) < 100 else ".")
        )
    share = checks.get("saliency_in_lung_share")
    if share is not None:
        ref = checks.get("saliency_uniform_reference", 0.49)
        grid = (checks.get("saliency") or {}).get("cam_grid")
        sentence = (
            f"On average {100 * share:.0f}% of the Grad-CAM saliency of the headline model falls in the "
            f"central lung region (a uniform map would put {100 * ref:.0f}% there)"
        )
        if grid is not None and grid < 4:
            sentence += (
                f"; at this input size the maps have only {grid}x{grid} cells, so the share says little "
                "(use a larger image_size)."
            )
        elif share < ref + 0.15:
            sentence += ": the model does not look mainly at the lungs."
        else:
            sentence += "."
        out.append(sentence)
    dec = (results.get("comparisons") or {}).get("decomposition_effect") or []
    if dec:
        parts, above, below = [], 0, 0
        for d in dec:
            diff = d["accuracy_difference"]
            lo, hi, value = diff.get("ci_low"), diff.get("ci_high"), diff.get("value")
            if value is None or lo is None or hi is None:
                continue
            above += lo > 0
            below += hi < 0
            name = f"{d['scenario']} ({d['task']})" if len({e["task"] for e in dec}) > 1 else d["scenario"]
            parts.append(f"{name} {100 * value:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]")
        out.append(
            "Class decomposition, test accuracy on minus off (points, 95% CI): " + "; ".join(parts) + ". "
            f"Its interval lies above zero in {above} of {len(parts)} scenarios and below zero in {below}"
            + (": no evidence here that decomposition helps." if above == 0 else ".")
        )
    out.append(
        "Trust the numbers for comparing scenarios on these images and sources; do not read them as diagnostic "
        "accuracy for patients elsewhere: the data are public, small, multi-source collections in which source and "
        "label are entangled, and no external test from another hospital is included."
    )
    return out


# --------------------------------------------------------------------------- build


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
    write: bool = True,
) -> dict:
    """Evaluate every saved run of a profile and write ``results.json`` (schema: docs/results_schema.md).

    ``runs`` / ``entries``: already loaded runs and their ``evaluate_runs`` output, to avoid redoing them.
    """
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
        "reference": {
            "paper_accuracy": config.PAPER_ACCURACY,
            "paper_citation": PAPER_CITATION,
            "detrac_accuracy": config.DETRAC_ACCURACY,
            "detrac_citation": DETRAC_CITATION,
        },
    }
    results["headline"] = headline(entries)
    other = [t for t in config.TASKS if t != PAPER_TASK and any(e["task"] == t for e in entries)]
    results["headline_other_tasks"] = {t: headline(entries, t) for t in other}
    results["verdict"] = verdict(results)
    results = to_jsonable(results)
    if write:
        write_json(profile_dir / "results.json", results)
    return results


# --------------------------------------------------------------------------- model card and checklist


def write_model_card(results: dict, path: Path) -> Path:
    """A short Markdown model card filled from results.json."""
    head = results.get("headline") or {}
    ds = results.get("dataset") or {}
    best = next((r for r in results.get("runs", []) if r.get("run_id") == head.get("run_id")), None)
    lines = [
        f"# Model card: {head.get('run_id', 'no run')}",
        "",
        "## Model",
        f"- Task: {head.get('task')}; classes: {', '.join(best['classes']) if best else 'n/a'}.",
    ]
    if best:
        lines += [
            f"- Backbone {best['backbone']} (ImageNet-pretrained unless scratch), scenario {best['scenario']}, "
            f"class decomposition {'on (' + ', '.join(best['subclasses']) + ')' if best['decomposition'] else 'off'}, "
            f"input {best.get('image_size')} px, seed {best['seed']}, training {best.get('train_seconds')} s.",
            "- Chosen among the transfer runs of the profile on validation accuracy.",
        ]
    lines += [
        "",
        "## Intended use",
        "- Research on reproducibility and shortcut learning in public COVID-19 chest X-ray collections.",
        "- **Not for clinical use.** Not validated on any hospital's consecutive patients.",
        "",
        "## Data",
        f"- {ds.get('n_images')} images of {ds.get('n_patient_groups')} patient groups from public repositories "
        f"({', '.join(sorted((ds.get('by_source_label') or {}).keys()))}); split by patient group "
        f"(train/val/test: {ds.get('by_split_label')}).",
        "",
        "## Performance (test split, 95% CI from a patient-group bootstrap)",
    ]
    if best:
        t = best["test"]
        lines += [
            f"- Accuracy {fmt_pct(t['accuracy'])}; balanced accuracy {fmt_pct(t['balanced_accuracy'])}; "
            f"ROC-AUC {fmt_pct(t['roc_auc'])}; PR-AUC {fmt_pct(t['pr_auc'])}.",
            f"- Calibration: ECE {t['ece']:.3f}, Brier {t['brier']:.3f}.",
        ]
        for c, pc in t["per_class"].items():
            lines.append(
                f"- {c}: sensitivity {fmt_pct(pc['sensitivity'])}, specificity {fmt_pct(pc['specificity'])}, "
                f"n={pc['support']}."
            )
    lines += [
        "",
        f"Reported for comparison: {PAPER_CITATION}: {100 * config.PAPER_ACCURACY:.2f}%; "
        f"{DETRAC_CITATION}: {100 * config.DETRAC_ACCURACY:.1f}%.",
        "",
        "## Limitations and shortcut checks",
    ]
    lines += [f"- {s}" for s in (results.get("verdict") or [])[1:]]
    text = "\n".join(lines) + "\n"
    atomic_write_text(Path(path), text)
    return Path(path)


def write_claim_checklist(results: dict, path: Path) -> Path:
    """CLAIM-style reporting checklist (data sources, splits, reference standard, metrics, failure analysis)."""
    ds = results.get("dataset") or {}
    checks = results.get("shortcut_checks") or {}
    head = results.get("headline") or {}
    params = results.get("params") or {}
    items = [
        (
            "Data sources",
            f"Public GitHub repositories pinned at fixed commits: {', '.join(sorted((ds.get('by_source_label') or {}).keys()))}; "
            f"counts per source and label: {ds.get('by_source_label')}.",
        ),
        (
            "Eligibility and exclusions",
            f"Frontal films labelled COVID-19, normal or non-COVID pneumonia; "
            f"{ds.get('n_excluded', 'n/a')} candidate files excluded (reasons: {ds.get('excluded_by_reason', 'see excluded.csv')}).",
        ),
        (
            "De-duplication",
            "Cross-source near-duplicates removed; duplicates, follow-ups and shared case URLs merged into patient groups.",
        ),
        (
            "Reference standard",
            "The label given by each source (metadata finding or folder); no re-reading by radiologists; "
            "COVID-19 labels partly PCR-confirmed, NIH labels NLP-mined.",
        ),
        (
            "Data partitions",
            f"Patient-group-disjoint train/val/test: images {ds.get('by_split_label')}; "
            f"patient groups {ds.get('patient_groups_by_split')}. k-means decomposition fitted on training data only.",
        ),
        (
            "Model",
            f"ImageNet-pretrained CNN, scenarios {sorted({r['scenario'] for r in results.get('runs', [])})}, "
            "with and without DeTraC class decomposition; scratch control.",
        ),
        (
            "Metrics",
            f"Accuracy, balanced accuracy, per-class sensitivity/specificity/precision/F1, ROC-AUC, PR-AUC with "
            f"95% percentile CIs from {params.get('n_bootstrap')} patient-group bootstrap resamples; ECE, Brier, "
            "reliability diagrams; McNemar between scenarios.",
        ),
        ("Headline", head.get("text", "n/a")),
        (
            "Robustness / shortcut analysis",
            f"Source identification accuracy {_pct_or_na(checks.get('source_identification_accuracy'))}; "
            "masked-lungs and lungs-only experiments; leave-one-source-out; same-hospital subset.",
        ),
        (
            "Failure analysis",
            f"Grad-CAM of correct and wrong test images per class; in-lung saliency share "
            f"{_pct_or_na(checks.get('saliency_in_lung_share'))}; per-source accuracy heat map.",
        ),
        (
            "External validation",
            "Not part of the study; `make evaluate EXTERNAL=labels.csv` runs every saved model on other images.",
        ),
        (
            "Code and reproducibility",
            "All code in the repository; `make reproduce PROFILE=...`; seeds fixed; run record in run.json.",
        ),
    ]
    lines = [
        "# Reporting checklist (after CLAIM, Mongan et al. 2020)",
        "",
        "| item | where / what |",
        "|---|---|",
    ]
    lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in items]
    atomic_write_text(Path(path), "\n".join(lines) + "\n")
    return Path(path)
