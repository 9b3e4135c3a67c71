"""The verdict: plain sentences generated from results.json's numbers (what the accuracy can be trusted for).

One function per check; each returns its sentences (none when the check is missing) and ``verdict``
joins them in a fixed order.
"""

from __future__ import annotations

from cxrstudy.evaluation.tables import fmt_pct

CLOSING = (
    "Trust the numbers for comparing scenarios on these images and sources; do not read them as diagnostic "
    "accuracy for patients elsewhere: the data are public, small, multi-source collections in which source and "
    "label are entangled, and no external test from another hospital is included."
)


def interval_width(head: dict) -> list[str]:
    """A warning when the headline interval is wider than ten points."""
    acc = head.get("accuracy") or {}
    if acc.get("ci_low") is not None and acc["ci_high"] - acc["ci_low"] > 0.1:
        return [
            f"The interval is {100 * (acc['ci_high'] - acc['ci_low']):.0f} points wide: the test split is too small "
            "(in patients) to separate models that differ by a few points."
        ]
    return []


def source_identification(checks: dict) -> list[str]:
    """How well frozen features name the source repository, and the caveat that the checks are shallow."""
    out = []
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
    return out


def masking(checks: dict) -> list[str]:
    """What a linear head reaches with the lung field blacked out (against the whole image and lungs only)."""
    unmasked, masked, lungs = checks.get("unmasked"), checks.get("masked_lungs"), checks.get("lungs_only")
    if not (masked and masked.get("accuracy", {}).get("value") is not None):
        return []
    m = masked["accuracy"]["value"]
    u = (unmasked or {}).get("accuracy", {}).get("value")
    sentence = f"With the central lung field blacked out, a linear head still reaches {fmt_pct(masked['accuracy'])} test accuracy"
    sentence += f" (whole image: {fmt_pct(unmasked['accuracy'])}" if u is not None else " ("
    sentence += f"; lung field only: {fmt_pct(lungs['accuracy'])})." if lungs else ")."
    if m >= 0.85 or (u is not None and u - m <= 0.05):
        sentence += " Most of the score does not need the lungs: borders, text, devices and exposure carry the label."
    else:
        sentence += " Masking the lungs costs a clear part of the score, so the lung field matters."
    return [sentence]


def leave_one_source_out(checks: dict) -> list[str]:
    """Accuracy on each held-out source, and a warning for every source the head mostly gets wrong."""
    loso = [e for e in checks.get("leave_one_source_out") or [] if "accuracy" in e]
    if not loso:
        return []
    parts = [f"{e['held_out']} {fmt_pct(e['accuracy'])} (n={e['n']})" for e in loso]
    out = ["Held-out whole sources (trained without them): accuracy " + "; ".join(parts) + "."]
    for e in loso:
        value = e["accuracy"].get("value")
        if value is not None and value < 0.5:
            labels = " and ".join(e.get("labels") or []) or "its"
            out.append(
                f"Trained without {e['held_out']}, the linear head recognises only {100 * value:.0f}% of that "
                f"source's {labels} images: what it learned for that class is largely how {e['held_out']} "
                "films look, not something that transfers to another hospital."
            )
    return out


def same_hospital(checks: dict) -> list[str]:
    """The within-hospital probe (the one source with both COVID-19 and normal films)."""
    sh = checks.get("same_hospital") or {}
    probe = sh.get("probe") or {}
    if not probe.get("accuracy"):
        return []
    return [
        f"Within the one hospital with both COVID-19 and normal films ({sh.get('source')}, n={sh.get('n')}), "
        f"a cross-validated linear head reaches {fmt_pct(probe['accuracy'])}"
        + (": too few images for a firm conclusion." if (sh.get("n") or 0) < 100 else ".")
    ]


def saliency(checks: dict) -> list[str]:
    """The share of Grad-CAM saliency inside the lung region against a uniform map."""
    share = checks.get("saliency_in_lung_share")
    if share is None:
        return []
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
    return [sentence]


def decomposition(comparisons: dict) -> list[str]:
    """Class decomposition on minus off per scenario, and how many intervals exclude zero."""
    dec = comparisons.get("decomposition_effect") or []
    if not dec:
        return []
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
    return [
        "Class decomposition, test accuracy on minus off (points, 95% CI): " + "; ".join(parts) + ". "
        f"Its interval lies above zero in {above} of {len(parts)} scenarios and below zero in {below}"
        + (": no evidence here that decomposition helps." if above == 0 else ".")
    ]


def verdict(results: dict) -> list[str]:
    """Plain sentences generated from the numbers: what the accuracy can and cannot be trusted for."""
    head = results.get("headline") or {}
    checks = results.get("shortcut_checks") or {}
    return [
        *([head["text"]] if head.get("text") else []),
        *interval_width(head),
        *source_identification(checks),
        *masking(checks),
        *leave_one_source_out(checks),
        *same_hospital(checks),
        *saliency(checks),
        *decomposition(results.get("comparisons") or {}),
        CLOSING,
    ]
