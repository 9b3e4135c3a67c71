"""Verdict sentences of the analysis plan and of each variant against its baseline (negative results included).

A variant is compared with the baseline of its task and scenario (decomposition off) on S1 (ieee8023 COVID-19 vs
other pneumonia ROC-AUC), S2 (Actualmed balanced accuracy), the view-matched within-source contrasts (S1's and
S4's same-view pair AUCs) and the worst-group accuracy, each read from the two out-of-fold intervals: *better* when
the variant's whole interval lies above the baseline's, *worse* when below, *undetermined* when they overlap (no
paired difference interval is computed for these metrics, so overlap decides nothing either way).
"""

from __future__ import annotations

from collections.abc import Callable

from cxrstudy.config import BASELINE_VARIANT

#: (name in the sentence, scorecard metric, read the view-matched block instead of the metric's own interval).
COMPARED: tuple[tuple[str, str, bool], ...] = (
    ("S1", "ieee8023_covid_vs_pneumonia_auc", False),
    ("S2", "actualmed_covid_vs_normal_balanced_accuracy", False),
    ("S1 view-matched", "ieee8023_covid_vs_pneumonia_auc", True),
    ("S4 view-matched", "nih_pneumonia_vs_normal_auc", True),
)


def compare_intervals(variant: dict | None, baseline: dict | None) -> str | None:
    """``better`` / ``worse`` when one 95% interval lies wholly above / below the other, ``undetermined`` when
    they overlap; None when either is missing."""
    if not variant or not baseline:
        return None
    lo, hi, blo, bhi = (variant.get("ci_low"), variant.get("ci_high"), baseline.get("ci_low"), baseline.get("ci_high"))
    if None in (lo, hi, blo, bhi):
        return None
    if lo > bhi:
        return "better"
    if hi < blo:
        return "worse"
    return "undetermined"


def _scorecard_reader(results: dict) -> Callable[[str, str, bool], dict | None]:
    """(config id, metric, view-matched) -> the interval of that scorecard entry."""
    card = {(e.get("config_id") or e.get("run_id"), e.get("metric")): e for e in results.get("scorecard") or []}

    def read(cid: str, metric: str, view_matched: bool) -> dict | None:
        e = card.get((cid, metric))
        if e is None:
            return None
        return ((e.get("confounders") or {}).get("view_matched") or None) if view_matched else e

    return read


def variant_sentences(results: dict) -> list[str]:
    """One sentence per variant (decomposition off) with a baseline of the same task and scenario: better, worse
    or undetermined on S1, S2, the view-matched contrasts and the worst-group accuracy, by interval overlap."""
    configs = [c for c in results.get("configurations") or [] if not c.get("decomposition")]
    base = {(c["task"], c["scenario"]): c for c in configs if c.get("variant") == BASELINE_VARIANT}
    read = _scorecard_reader(results)
    out = []
    for c in configs:
        b = base.get((c["task"], c["scenario"]))
        if c.get("variant") == BASELINE_VARIANT or b is None:
            continue
        parts = []
        for name, metric, vm in COMPARED:
            status = compare_intervals(read(c["run_id"], metric, vm), read(b["run_id"], metric, vm))
            if status:
                parts.append(f"{name} {status}")
        wg = compare_intervals(c.get("worst_group_accuracy"), b.get("worst_group_accuracy"))
        if wg:
            parts.append(f"worst-group accuracy {wg}")
        beats = [p for p in parts if p.endswith("better")]
        if not parts:
            summary = "no interval to compare"
        elif beats and not any(p.endswith("worse") for p in parts):
            summary = "beats the baseline beyond the intervals on " + ", ".join(p.rsplit(" ", 1)[0] for p in beats)
        else:
            summary = "does not beat the baseline beyond the intervals"
        detail = f" ({'; '.join(parts)})" if parts else ""
        out.append(f"{c['variant']} ({c['task']}, {c['scenario']}) {summary}{detail}.")
    return out


def plan_sentences(results: dict) -> list[str]:
    """What the verdict says of the analysis plan: its commit, and a warning when the file differs from HEAD's."""
    plan = results.get("plan") or {}
    if not plan:
        return []
    if plan.get("matches_head") is False:
        return [
            f"The analysis plan {plan['path']} differs from the committed one (uncommitted edits, sha256 "
            f"{str(plan.get('sha256'))[:12]}): the variants, the selection rule or the goals were not fixed in "
            "the repository before these numbers."
        ]
    if plan.get("commit"):
        return [f"The analysis plan {plan['path']} is the one committed in {plan['commit'][:10]}."]
    return [f"The analysis plan {plan['path']} is not committed: it was not fixed before these numbers."]
