"""Paired comparisons of saved runs: scenario pairs and decomposition on minus off (clustered McNemar
and the paired accuracy difference), Holm's adjustment over all of them, spread over seeds, the design.

Pure functions of runs (``report.load_runs`` items); nothing is written here.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import pandas as pd

from cxrstudy import config
from cxrstudy.evaluation.metrics import (
    clustered_mcnemar,
    paired_difference_ci,
    probs_from_frame,
    split_accuracy,
    split_rows,
)
from cxrstudy.evaluation.seeds import CONFIG_KEYS, config_key, config_order, pooled_pairs, run_key
from cxrstudy.stats import holm, seed_spread


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
