"""Statistics of saved runs and their tables: comparisons, headline, dataset counts, shortcut checks, frames.

Pure functions of runs (``reporting.results.load_runs`` items), results.json entries and results dicts; nothing is
written here. Percentages in frames come from ``fmt_pct``.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np
import pandas as pd

from cxrstudy import config
from cxrstudy.evaluation.metrics import (
    clustered_mcnemar,
    holm,
    paired_difference_ci,
    per_source_accuracy,
    probs_from_frame,
    seed_spread,
)
from cxrstudy.evaluation.seeds import (
    CONFIG_KEYS,
    config_key,
    config_order,
    pooled_pairs,
    run_key,
    run_variant,
    seed_summary,
)
from cxrstudy.lungs.region import rectangle_region

PAPER_TASK = "covid_vs_normal"
#: What every run.json must hold (with ``classes``); a run is identified by these and its variant
#: (``seeds.run_key``: run.json ``variant``, ``baseline`` when absent).
RUN_KEYS = ("task", "backbone", "scenario", "decomposition", "seed")


# --------------------------------------------------------------------------- predictions


def split_rows(df: pd.DataFrame, split: str) -> pd.DataFrame:
    """Rows of one split."""
    return df[df["split"] == split].reset_index(drop=True)


def split_accuracy(df: pd.DataFrame, split: str) -> float | None:
    """Arg-max accuracy on one split (None when the split is empty)."""
    rows = split_rows(df, split)
    return float((rows["pred"] == rows["label"]).mean()) if len(rows) else None


def _pct_plain(value: float | None) -> str:
    """A bare fraction as '95.6%' ('n/a' for None)."""
    return "n/a" if value is None else f"{100 * value:.1f}%"


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
    """McNemar on patient clusters and the paired accuracy difference (a - b) of two runs of one task on
    the same test images."""
    ta, tb = _aligned_test(a, b)
    classes = a["info"]["classes"]
    return {
        "n": int(len(ta)),
        "mcnemar": clustered_mcnemar(ta["pred"], tb["pred"], ta["label"], ta["patient_group"]),
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
    """McNemar and accuracy difference of every pair of scenarios with the same task, backbone,
    decomposition, variant and seed."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for (task, bb, _sc, dec, variant, sd), r in by_key.items():
        groups.setdefault((task, bb, dec, variant, sd), []).append(r)
    for (task, bb, dec, variant, sd), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        rs = sorted(rs, key=lambda r: _scenario_order(r["info"]["scenario"]))
        for a, b in combinations(rs, 2):
            entry = {
                "task": task,
                "backbone": bb,
                "decomposition": dec,
                "variant": variant,
                "seed": sd,
                "a": a["info"]["scenario"],
                "b": b["info"]["scenario"],
            }
            out.append({**entry, **_pair(a, b, n_bootstrap, seed)})
    return out


def _decomposition_pairs(by_key: dict[tuple, dict], n_bootstrap: int, seed: int) -> list[dict]:
    """Decomposition on minus off for every run that has a twin without decomposition (same variant and seed)."""
    out = []
    for (task, bb, sc, dec, variant, sd), r in sorted(by_key.items(), key=lambda kv: str(kv[0])):
        other = by_key.get((task, bb, sc, False, variant, sd))
        if dec and other is not None:
            head = {"task": task, "backbone": bb, "scenario": sc, "variant": variant, "seed": sd}
            out.append({**head, **_pair(r, other, n_bootstrap, seed)})
    return out


def _seed_spreads(by_key: dict[tuple, dict]) -> list[dict]:
    """Spread of test accuracy over seeds, where a configuration ran several seeds."""
    seeds: dict[tuple, dict] = {}
    for key, r in by_key.items():
        seeds.setdefault(key[:-1], {})[key[-1]] = split_accuracy(r["predictions"], "test")
    return [
        {
            **dict(zip(CONFIG_KEYS, key, strict=True)),
            "seeds": sorted(accs, key=str),
            "test_accuracy": seed_spread(list(accs.values())),
        }
        for key, accs in sorted(seeds.items(), key=lambda kv: config_order(kv[0]))
        if len(accs) > 1
    ]


def _adjust_for_multiplicity(families: Sequence[list[dict]]) -> dict:
    """Holm-adjust every comparison's McNemar p-value over all of them (``mcnemar.p_holm``); the note."""
    tests = [c for fam in families for c in fam]
    adjusted = holm([c["mcnemar"].get("p_value") for c in tests])
    for c, p in zip(tests, adjusted, strict=True):
        c["mcnemar"]["p_holm"] = p
    below = sum(1 for p in adjusted if p is not None and p < 0.05)
    return {
        "n_tests": len(tests),
        "method": "Holm (family-wise error over every scenario pair and decomposition comparison)",
        "n_below_0_05_raw": sum(1 for c in tests if (c["mcnemar"].get("p_value") or 1.0) < 0.05),
        "n_below_0_05_holm": below,
    }


def _design(runs: Sequence[dict]) -> dict:
    """Seeds per configuration and epochs per scenario (what the comparisons can and cannot support)."""
    seeds: dict[tuple, set] = {}
    epochs: dict[str, set] = {}
    for r in runs:
        info = r["info"]
        seeds.setdefault(config_key(info), set()).add(info["seed"])
        ep = info.get("epochs_run", info.get("epochs"))
        if ep is not None:
            epochs.setdefault(info["scenario"], set()).add(int(ep))
    counts = [len(v) for v in seeds.values()]
    return {
        "n_configurations": len(seeds),
        "configuration_keys": list(CONFIG_KEYS),
        "seeds_per_configuration": {"min": min(counts, default=0), "max": max(counts, default=0)},
        "epochs_run_by_scenario": {sc: sorted(epochs[sc]) for sc in sorted(epochs, key=_scenario_order)},
    }


def _scenario_order(scenario: str) -> int:
    """Position of a scenario in ``config.SCENARIOS`` (unknown ones last)."""
    return config.SCENARIOS.index(scenario) if scenario in config.SCENARIOS else len(config.SCENARIOS)


def compare_runs(runs: Sequence[dict], n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Clustered McNemar between scenarios and decomposition on minus off, per variant and seed; Holm
    adjustment over both; both pooled over seeds; spread over seeds (where several); the design."""
    by_key: dict[tuple, dict] = {}
    for r in runs:
        key = run_key(r["info"])
        if key in by_key:
            raise ValueError(
                f"two runs share task, backbone, scenario, decomposition, variant and seed {key}: "
                f"{by_key[key]['dir']} and {r['dir']}"
            )
        by_key[key] = r
    pairs = _scenario_pairs(by_key, n_bootstrap, seed)
    dec = _decomposition_pairs(by_key, n_bootstrap, seed)
    multiplicity = _adjust_for_multiplicity([pairs, dec])
    return {
        "scenarios_mcnemar": pairs,
        "decomposition_effect": dec,
        "multiplicity": multiplicity,
        "scenarios_over_seeds": pooled_pairs(
            pairs, ("task", "backbone", "decomposition", "variant", "a", "b")
        ),
        "decomposition_over_seeds": pooled_pairs(
            dec, ("task", "backbone", "scenario", "variant"), "decomposition on", "decomposition off"
        ),
        "seed_spread": _seed_spreads(by_key),
        "design": _design(runs),
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
        f"per-seed 95% intervals from {_pct_plain(acc['interval_low'])} to {_pct_plain(acc['interval_high'])}); "
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


# --------------------------------------------------------------------------- frames for the notebook


def headline_frame(results: dict) -> pd.DataFrame:
    """The headline table as a DataFrame (percentages with CIs) with the published figures appended."""
    rows = [
        {
            "task": r["task"],
            "scenario": r["scenario"],
            "decomposition": "on" if r["decomposition"] else "off",
            "variant": r.get("variant", "baseline"),
            "seed": r["seed"],
            "val. accuracy": _pct_plain(r.get("val_accuracy")),
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
            "val. accuracy": _pct_plain(e.get("val_accuracy")),
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


def stratified_mean_ci(
    values: Sequence[np.ndarray], strata: np.ndarray, n_bootstrap: int = 1000, seed: int = 0
) -> list[dict]:
    """Mean of each per-image array with a 95% percentile interval from one bootstrap over images,
    resampled within each stratum (as the sample was drawn)."""
    strata = np.asarray(strata)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    reps = np.empty((n_bootstrap, len(values)))
    arrays = [np.asarray(v, dtype=float) for v in values]
    for b in range(n_bootstrap):
        idx = np.concatenate([rng.choice(m, size=len(m), replace=True) for m in members])
        reps[b] = [a[idx].mean() for a in arrays]
    out = []
    for j, a in enumerate(arrays):
        lo, hi = np.percentile(reps[:, j], [2.5, 97.5]) if n_bootstrap and len(a) else (np.nan, np.nan)
        value = float(a.mean()) if len(a) else None
        out.append(
            {
                "value": value,
                "ci_low": None if np.isnan(lo) else float(lo),
                "ci_high": None if np.isnan(hi) else float(hi),
                "n": int(len(a)),
            }
        )
    return out


def _saliency_stats(used: pd.DataFrame, n_bootstrap: int, seed: int) -> dict:
    """In-lung share, uniform reference and their difference over the sampled images, with intervals."""
    area = rectangle_region()["area_share"]
    uniform = (
        used["uniform_share"].fillna(area)
        if "uniform_share" in used.columns
        else used["lung_share"] * 0 + area
    )
    strata = (used["label"].astype(str) + "/" + used["outcome"].astype(str)).to_numpy()
    share, uni, excess = stratified_mean_ci(
        [used["lung_share"], uniform, used["lung_share"] - uniform], strata, n_bootstrap, seed
    )
    return {
        "in_lung_share": share,
        "uniform_reference": uni,
        "excess_over_uniform": excess,
        "per_stratum": pd.Series(strata).value_counts().sort_index().to_dict(),
        "bootstrap": {
            "unit": "image",
            "strata": "true class x outcome",
            "n_requested": n_bootstrap,
            "seed": seed,
        },
    }


def _saliency_summary(saliency: pd.DataFrame, saliency_run: str | None, n_bootstrap: int, seed: int) -> dict:
    """``saliency_in_lung_share``, ``saliency_uniform_reference`` and ``saliency`` of shortcut_checks."""
    all_rows = saliency
    if saliency_run is not None and "run_id" in saliency.columns:
        saliency = saliency[saliency["run_id"] == saliency_run]
    used = saliency.dropna(subset=["lung_share"])
    stats = _saliency_stats(used, n_bootstrap, seed)

    def first(col: str) -> int | None:
        """Smallest value of a per-image integer column (None when absent)."""
        return int(saliency[col].min()) if col in saliency.columns and len(saliency) else None

    return {
        "saliency_in_lung_share": stats["in_lung_share"]["value"],
        "saliency_uniform_reference": stats["uniform_reference"]["value"],
        "saliency": {
            "run_id": saliency_run,
            "n_images": int(len(saliency)),
            "n_used": int(len(used)),
            "cam_grid": first("cam_grid"),
            "image_size": first("image_size"),
            "sample": "seeded random sample of test images stratified by true class and outcome "
            "(correct / wrong); the mean is over the sample, not weighted to the test split",
            "regions": saliency["region"].value_counts().to_dict() if "region" in saliency.columns else {},
            **stats,
            "by_run": (
                all_rows.groupby("run_id")["lung_share"].mean().to_dict()
                if "run_id" in all_rows.columns
                else {}
            ),
            "by_outcome": used.groupby("outcome")["lung_share"].mean().to_dict(),
            "by_label": used.groupby("label")["lung_share"].mean().to_dict(),
        },
    }


def assemble_shortcut_checks(
    source_identification: dict | None = None,
    masking: dict | None = None,
    leave_one_source_out: list | None = None,
    same_hospital: dict | None = None,
    saliency: pd.DataFrame | None = None,
    saliency_run: str | None = None,
    *,
    lung_region: dict | None = None,
    source_id_within_label: list | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    input_view: str = "full",
    equalize: bool = False,
) -> dict:
    """results.json ``shortcut_checks`` from the separate checks (any of them may be missing).
    ``saliency``: ``saliency_for_runs`` table; the in-lung share is over ``saliency_run``'s images when given.
    ``lung_region``: ``lungs.region.lung_region_info`` of the masks used (None: the fixed rectangle);
    ``input_view`` / ``equalize``: the films of the checks other than masking (notebook 05's parameters)."""
    detail = lung_region or {"kind": "fixed rectangle", "rectangle": rectangle_region()}
    out: dict = {
        "lung_region": detail["kind"],
        "lung_region_detail": detail,
        "level": "linear heads on frozen features (shallow)",
        "input_view": input_view,
        "equalize": bool(equalize),
    }
    if source_identification is not None:
        out["source_identification_accuracy"] = source_identification.get("accuracy")
        out["source_identification"] = source_identification
    if source_id_within_label is not None:
        out["source_id_within_label"] = source_id_within_label
    if masking is not None:
        out["unmasked"] = masking.get("unmasked")
        out["masked_lungs"] = masking.get("masked_lungs")
        out["lungs_only"] = masking.get("lungs_only")
    if leave_one_source_out is not None:
        out["leave_one_source_out"] = leave_one_source_out
    if same_hospital is not None:
        out["same_hospital"] = same_hospital
    if saliency is not None and len(saliency):
        out.update(_saliency_summary(saliency, saliency_run, n_bootstrap, seed))
    return out
