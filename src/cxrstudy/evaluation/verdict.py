"""The verdict: plain sentences generated from results.json's numbers (what the accuracy can be trusted for).

One function per check; each returns its sentences (none when the check is missing) and ``verdict``
joins them in a fixed order. Every sentence quotes the numbers it rests on, all of them in results.json.
"""

from __future__ import annotations

from cxrstudy.evaluation.formatting import fmt_pct
from cxrstudy.evaluation.scorecard import reading
from cxrstudy.evaluation.variant_verdict import plan_sentences, variant_sentences

#: Two masking accuracies within this many points (as a fraction) count as alike.
ALIKE = 0.05
#: Grad-CAM maps with fewer cells per side than this are too coarse to place saliency on the lungs.
COARSE_GRID = 8
#: How the verdict names the scorecard's metrics.
METRIC_NAMES = {
    "ieee8023_covid_vs_pneumonia_auc": "ieee8023 COVID-19 vs other pneumonia ROC-AUC",
    "actualmed_covid_vs_normal_balanced_accuracy": "Actualmed (held-out hospital) balanced accuracy",
    "source_id_within_covid_balanced_accuracy": "source identification within COVID-19 films (balanced accuracy)",
    "nih_pneumonia_vs_normal_auc": "NIH pneumonia vs normal ROC-AUC",
    "paper_task_accuracy": "paper's task accuracy",
}
#: The last sentence when results.json says nothing about the design.
NOT_DIAGNOSTIC = (
    "The numbers are not diagnostic accuracy for patients elsewhere: the data are public, small, multi-source "
    "collections in which source and label are entangled, and the one hospital held out of training (Actualmed) "
    "is small."
)


def _pct(value: float) -> str:
    """A fraction as a whole percentage."""
    return f"{100 * value:.0f}%"


def _region(checks: dict) -> str:
    """How the sentences name the lung region used by the checks."""
    if checks.get("lung_region") == "segmented":
        return "segmented lungs"
    return "the central rectangle, x and y 15-85% of the film, not segmented lungs"


def interval_width(head: dict) -> list[str]:
    """A warning when the headline interval is wider than ten points."""
    acc = head.get("accuracy") or {}
    if acc.get("ci_low") is not None and acc["ci_high"] - acc["ci_low"] > 0.1:
        return [
            f"The interval is {100 * (acc['ci_high'] - acc['ci_low']):.0f} points wide: the films are too few "
            "(in patients) to separate models that differ by a few points."
        ]
    return []


def _goal_part(goal: dict, entry: dict) -> str:
    """One goal of the scorecard sentence: name, value with interval, target and whether it is met."""
    name = f"{goal['goal']} {METRIC_NAMES.get(goal['metric'], goal['metric'])}"
    if goal.get("value") is None:
        return f"{name} not computed ({entry.get('note') or 'no value'})"
    how = " (linear probe on the out-of-fold features)" if entry.get("method") == "probe" else ""
    target = (
        "n/a" if goal.get("target") is None else f"{100 * goal['target']:.2f}".rstrip("0").rstrip(".") + "%"
    )
    if entry.get("chance") is not None:
        target += f" (chance {100 * entry['chance']:.0f}% + 5 points)"
    if entry.get("p_value") is not None:
        how += f", permutation p = {entry['p_value']:.2f}"
    films = f", {entry['n']} films of {entry['n_patients']} patients" if entry.get("n_patients") else ""
    verdict = goal.get("status") or "not judged"
    why = f" ({goal['reason']})" if goal.get("reason") else ""
    note = f" ({entry['note']})" if str(entry.get("note", "")).startswith("not estimable") else ""
    return (
        f"{name} {fmt_pct(entry or {'value': goal['value']})}{how}{films}{_reference(entry)}{note}, goal {goal['op']} "
        f"{target}: {verdict}{why}"
    )


def _reference(entry: dict) -> str:
    """The best confounder-only rule and the view-matched value of an entry, as a clause (empty without)."""
    from cxrstudy.evaluation.confounders import best_rule

    block = entry.get("confounders") or {}
    rule, best = best_rule(block)
    parts = []
    if rule is not None:
        parts.append(f"best confounder-only rule {rule.replace('_', ' ')} {100 * best:.1f}%")
    vm = block.get("view_matched") or {}
    if vm.get("value") is not None:
        parts.append(f"view-matched {fmt_pct(vm)}")
    return f" ({'; '.join(parts)})" if parts else ""


def scorecard(results: dict) -> list[str]:
    """The confound-free scorecard of each headline configuration (paper's task, other tasks) against its goals,
    with the paper's task accuracy beside it (the paper's number, not a confound-free goal)."""
    heads = [results.get("headline") or {}, *(results.get("headline_other_tasks") or {}).values()]
    goals, entries = results.get("goals") or [], results.get("scorecard") or []
    out = []
    for head in heads:
        run_id = head.get("run_id")
        mine = [g for g in goals if g.get("run_id") == run_id]
        if not run_id or not mine:
            continue
        by_metric = {e["metric"]: e for e in entries if e.get("run_id") == run_id}
        parts = [_goal_part(g, by_metric.get(g["metric"], {})) for g in mine]
        met = sum(g.get("status") == "met" for g in mine)
        judged = sum(g.get("value") is not None for g in mine)
        paper = by_metric.get("paper_task_accuracy") or {}
        beside = (
            f" Beside it, the paper's task accuracy out of fold is {fmt_pct(paper)}{_reference(paper)}: the paper's "
            "number, not a confound-free goal (its normal films come almost all from one source)."
            if paper.get("value") is not None
            else ""
        )
        out.append(
            f"Confound-free scorecard of the headline {head.get('task')} configuration ({head.get('scenario')}, "
            f"decomposition {'on' if head.get('decomposition') else 'off'}; every film scored out of fold, the "
            "held-out hospital by the folds' ensemble; 95% CI): "
            + "; ".join(parts)
            + f". Goals met: {met} of the {judged} that could be judged (met: the whole interval on the goal's side; "
            "missed: wholly on the other; else undetermined)."
            + beside
        )
    return out


def view_probe(results: dict) -> list[str]:
    """Whether each headline run's own features name the projection (AP or PA) within a label."""
    heads = [results.get("headline") or {}, *(results.get("headline_other_tasks") or {}).values()]
    out = []
    for head in heads:
        mine = [
            e for e in results.get("scorecard") or []
            if e.get("run_id") == head.get("run_id") and str(e.get("metric", "")).startswith("view_id_within_")
        ]
        parts = []
        for e in mine:
            if e.get("value") is None:
                continue
            label = e["metric"][len("view_id_within_"):-len("_balanced_accuracy")]
            read = "names it" if (e.get("ci_low") or 0) > e.get("chance", 0.5) else "no signal shown"
            parts.append(f"{label} films {fmt_pct(e)} ({read}; n={e['n']})")
        if parts:
            out.append(
                f"Projection in the features of the headline {head.get('task')} run: a grouped linear probe names AP "
                "against PA, balanced accuracy against a chance of 50%, within " + "; ".join(parts) + "."
            )
    return out


def mask_shape(checks: dict) -> list[str]:
    """What the lung mask's shape alone says about the paper's contrast, on the film and as the lung views show it."""
    m = checks.get("mask_shape") or {}
    film, view = m.get("film") or {}, m.get("lung_view") or {}
    if film.get("value") is None:
        return []
    return [
        f"The lung mask's shape alone (eight numbers: box size, aspect and position, lung area, left/right "
        f"balance, shape score) tells {m.get('contrast', 'covid vs normal')} films apart at a balanced accuracy of "
        f"{fmt_pct(film)} on the film, and of {fmt_pct(view)} as the lung views frame it (lung box centred on a "
        f"square, aspect kept; chance 50%; n={film.get('n')}, patient-grouped cross-validation): a lung-field "
        "input carries that shape."
    ]


def _goal_over_seeds_part(g: dict) -> str:
    """One goal of the recommended variant: seed mean (sd, interval range), target, met, all seeds clear."""
    name = f"{g['goal']} {METRIC_NAMES.get(g['metric'], g['metric'])}"
    if g.get("mean") is None:
        return f"{name} not computed"
    target = "n/a" if g.get("target") is None else f"{100 * g['target']:.2f}".rstrip("0").rstrip(".") + "%"
    met = g.get("status") or "not judged"
    clear = {
        True: "every seed's interval clears it",
        False: "not every seed's interval clears it",
        None: "intervals incomplete",
    }[g.get("all_seeds_clear")]
    spread = f"sd {100 * g['sd']:.1f} points, " if g.get("n", 0) > 1 else ""
    lo, hi = g.get("interval_low"), g.get("interval_high")
    ivs = f"intervals {100 * lo:.1f}-{100 * hi:.1f}%" if lo is not None and hi is not None else "no intervals"
    return f"{name} {100 * g['mean']:.1f}% ({spread}{ivs}), goal {g['op']} {target}: {met}, {clear}"


def recommendation(results: dict) -> list[str]:
    """The variant recommended on validation rows only, and its scorecard over seeds against S1-S5."""
    rec = results.get("recommended_variant") or {}
    if not rec.get("name"):
        return [f"No variant was recommended: {rec['rule']}"] if rec.get("rule") else []
    cfgs = [
        c
        for c in results.get("scorecard_summary") or []
        if (c["task"], c["scenario"], c["variant"]) == (rec.get("task"), rec.get("scenario"), rec["name"])
        and not c["decomposition"]
    ]
    text = (
        f"Recommended variant: {rec['name']}, chosen by the profile's fixed rule on the folds' pooled inner-validation "
        f"predictions only. {rec['rule']}"
    )
    if not cfgs or not cfgs[0].get("goals"):
        return [text + " Its scorecard was not computed."]
    cfg = cfgs[0]
    return [
        text
        + " Out of fold (met: the 95% interval on the goal's side and clear of the confounder-only rules; missed: "
        "wholly on the other side; else undetermined): " + "; ".join(_goal_over_seeds_part(g) for g in cfg["goals"])
        + "."
    ]


def variants_against_baseline(results: dict) -> list[str]:
    """Per (task, scenario) with variants, each variant against its baseline on the same films: the paired
    difference of each goal metric with its interval (patient bootstrap widened by the fold spread), read as
    better, worse or undetermined."""
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for d in (results.get("comparisons") or {}).get("variants") or []:
        groups.setdefault((d["task"], d["scenario"]), {}).setdefault(d["variant"], []).append(d)
    out = []
    for (task, scenario), variants in groups.items():
        parts = [f"{name}: " + ", ".join(_difference_part(d) for d in diffs) for name, diffs in variants.items()]
        out.append(
            f"Variants against the baseline ({task}, {scenario}; variant minus baseline on the same out-of-fold films, "
            "points, 95% interval from the class-stratified patient bootstrap widened by the fold spread): "
            + "; ".join(parts) + "."
        )
    return out


def _difference_part(d: dict) -> str:
    """``S1 +3.2 [-1.0, +7.4] undetermined``."""
    c = d.get("combined") or {}
    if c.get("value") is None:
        return f"{d['goal']} not computed"
    if c.get("ci_low") is None:
        return f"{d['goal']} {100 * c['value']:+.1f} (no interval: {(d.get('difference') or {}).get('note', 'too few films')})"
    return f"{d['goal']} {100 * c['value']:+.1f} [{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}] {d['reading']}"


def _within_reading(w: dict) -> str:
    """The scorecard's reading of a within-label source probe against chance (:func:`scorecard.reading`)."""
    return w.get("reading") or reading(w)


def _within_label_part(w: dict) -> str:
    """One label of the within-label source sentence."""
    p = f", permutation p = {w['p_value']:.2f}" if w.get("p_value") is not None else ""
    return (
        f"{w['label']} films ({', '.join(w.get('sources') or [])}; n={w.get('n')}) balanced accuracy {fmt_pct(w)} "
        f"against a chance of {100 * (w.get('chance') or 0):.0f}%{p}: {_within_reading(w)}"
    )


def source_identification(checks: dict) -> list[str]:
    """Source identification across labels (against the label-only rule) and within each label (against
    its majority source), and the caveat that the checks are shallow."""
    out = []
    sid = checks.get("source_identification") or {}
    if sid.get("accuracy") is not None:
        base = sid.get("label_only_baseline")
        sentence = (
            f"A linear probe on frozen features names the source repository of a film with {_pct(sid['accuracy'])} "
            f"accuracy across all labels (always naming the largest source: {_pct(sid.get('majority_baseline') or 0)})"
        )
        if base is not None:
            sentence += (
                f", but a rule that knew only the label (each label's largest source) would score {_pct(base)}: "
                "labels and sources are entangled, so "
                + (
                    "this figure mostly restates the label."
                    if sid["accuracy"] - base <= 0.1
                    else f"only the {100 * (sid['accuracy'] - base):.0f} points above that rule come from the images."
                )
            )
        else:
            sentence += "; labels and sources are entangled, so this figure mostly restates the label."
        out.append(sentence)
    within = [w for w in checks.get("source_id_within_label") or [] if w.get("value") is not None]
    if within:
        present = [w["label"] for w in within if _within_reading(w) == "source signal present"]
        out.append(
            "Within one label, where the label cannot help, the probe (patient-grouped 5-fold CV, sources with at "
            "least 10 films, the held-out hospital left out; no source signal: the whole interval within 5 points of "
            "chance) names the source of "
            + "; ".join(_within_label_part(w) for w in within)
            + "."
            + (
                f" Among {' and '.join(present)} films the repositories look different beyond the label: a model "
                "can tell sources apart there, which becomes a shortcut wherever label and source go together."
                if present
                else ""
            )
        )
    if sid or checks.get("masked_lungs"):
        out.append(
            "The shortcut checks use linear heads on frozen ImageNet features (cheap on a CPU): they show "
            "what the images make easy to learn, not what each trained network used."
        )
    return out


def _masking_reading(u: float, hidden: float, only: float) -> str:
    """What whole film vs lungs hidden vs lungs alone supports, and no more."""
    hidden_costs, only_costs = u - hidden > ALIKE, u - only > ALIKE
    if abs(u - hidden) <= ALIKE and abs(u - only) <= ALIKE:
        return (
            "All three are alike (within 5 points): the label can be read both inside and outside the lung "
            "region, so the signal is everywhere in the film; this does not show that the lungs are unused."
        )
    if hidden_costs and not only_costs:
        return (
            f"Hiding the lungs costs {100 * (u - hidden):.0f} points while the lungs alone keep the score: for a "
            "linear head most of the usable signal is inside the lung region (disease, source or both)."
        )
    if only_costs and not hidden_costs:
        return (
            f"The lungs alone lose {100 * (u - only):.0f} points while hiding them costs little: most of the usable "
            "signal lies outside the lung region (borders, text, devices, exposure)."
        )
    if hidden_costs and only_costs:
        return "Both hiding and isolating the lungs cost accuracy: the signal is spread over the lungs and their surroundings."
    return "Neither region clearly carries more of the signal."


def masking(checks: dict) -> list[str]:
    """What a linear head reaches from the whole film, with the lungs hidden and from the lungs alone."""
    unmasked, masked, lungs = checks.get("unmasked"), checks.get("masked_lungs"), checks.get("lungs_only")
    values = [((x or {}).get("accuracy") or {}).get("value") for x in (unmasked, masked, lungs)]
    if any(v is None for v in values):
        return []
    sentence = (
        f"A linear head on frozen features reaches {fmt_pct(unmasked['accuracy'])} out-of-fold accuracy on the whole film, "
        f"{fmt_pct(masked['accuracy'])} with the lungs hidden and {fmt_pct(lungs['accuracy'])} from the lungs alone "
        f"(lung region: {_region(checks)}). "
    )
    return [sentence + _masking_reading(*values)]


def _loso_part(e: dict) -> str:
    """One held-out source: per-class sensitivity with intervals and n."""
    sens = e.get("sensitivity") or {}
    if not sens:
        return f"{e['held_out']} accuracy {fmt_pct(e.get('accuracy'))} (n={e['n']})"
    return f"{e['held_out']} " + ", ".join(f"{c} {fmt_pct(m)}" for c, m in sens.items()) + f" (n={e['n']})"


def _loso_failure(e: dict, label: str, m: dict) -> str:
    """Why a held-out source's class is mostly missed, naming what the head was trained on."""
    src, value = e["held_out"], m["value"]
    counts = e.get("train_counts")
    if not counts:
        return (
            f"Trained without {src}, the linear head recognises {_pct(value)} of that source's {label} films; "
            "the training composition was not recorded, so this says nothing about how those films look."
        )
    comp = " and ".join(f"{n} {c}" for c, n in counts.items())
    origin = (e.get("train_sources") or {}).get(label) or {}
    origin_txt = f" ({label}: {', '.join(f'{s} {n}' for s, n in origin.items())})" if origin else ""
    n_label, total = counts.get(label, 0), sum(counts.values())
    held = (e.get("counts") or {}).get(label)
    films = f"{held} {label} films" if held is not None else f"{label} films"
    if held is not None and held < 10:
        why = f"with only {held} such films held out, too few to read either way"
    elif n_label < 50 or n_label < 0.1 * total:
        why = (
            f"with only {n_label} {label} films left the head has learned little about the class, so this measures "
            f"how small the {label} class becomes without {src}, not how {src} films look"
        )
    else:
        why = f"what it learned about {label} films from the other sources does not carry over to {src}"
    return (
        f"Trained without {src}, the head saw {comp} films{origin_txt} and calls {_pct(value)} of "
        f"{src}'s {films} {label}: {why}."
    )


def leave_one_source_out(checks: dict) -> list[str]:
    """Per-class sensitivity on each held-out source, and for every class mostly missed, the training
    composition that explains it."""
    loso = [e for e in checks.get("leave_one_source_out") or [] if "accuracy" in e]
    if not loso:
        return []
    out = [
        "Each source held out of training in turn, a linear head on frozen features recognises (sensitivity per "
        "class on the held-out source): " + "; ".join(_loso_part(e) for e in loso) + "."
    ]
    for e in loso:
        for label, m in (e.get("sensitivity") or {}).items():
            if (m or {}).get("value") is not None and m["value"] < 0.5:
                out.append(_loso_failure(e, label, m))
    return out


def same_hospital(checks: dict) -> list[str]:
    """The within-hospital probe (the one source with both COVID-19 and normal films)."""
    sh = checks.get("same_hospital") or {}
    probe = sh.get("probe") or {}
    if not probe.get("accuracy"):
        return []
    return [
        f"On the one hospital with both COVID-19 and normal films ({sh.get('source')}, n={sh.get('n')}, held out of "
        f"every training), a linear head on frozen features trained on every other source reaches "
        f"{fmt_pct(probe['accuracy'])} accuracy and {fmt_pct(probe.get('balanced_accuracy'))} balanced accuracy"
        + (": too few images for a firm conclusion." if (sh.get("n") or 0) < 100 else ".")
    ]


def saliency(checks: dict) -> list[str]:
    """The share of Grad-CAM saliency inside the lung region against a uniform map, with n, intervals and
    the maps' resolution."""
    sal = checks.get("saliency") or {}
    share = sal.get("in_lung_share") or {"value": checks.get("saliency_in_lung_share")}
    uniform = sal.get("uniform_reference") or {"value": checks.get("saliency_uniform_reference")}
    if share.get("value") is None or uniform.get("value") is None:
        return []
    n = sal.get("n_used", sal.get("n_images"))
    flat = uniform.get("ci_low") is not None and uniform["ci_low"] == uniform.get("ci_high")
    sentence = (
        f"Grad-CAM of the headline configuration's first fold model on {n if n is not None else 'a sample of'} films "
        "of its own held-out fold (a seeded random "
        f"sample stratified by true class and outcome) puts {fmt_pct(share)} of the saliency inside the "
        f"{'segmented lungs' if checks.get('lung_region') == 'segmented' else 'central rectangle'}, against "
        f"{fmt_pct({'value': uniform['value']} if flat else uniform)} for a uniform map (the region's area)"
    )
    grid, size = sal.get("cam_grid"), sal.get("image_size")
    excess = sal.get("excess_over_uniform") or {}
    if grid is not None and grid < COARSE_GRID:
        at = f" at {size} px input" if size else ""
        return [
            sentence
            + f". The maps have only {grid}x{grid} cells{at}, too coarse to tell lung from mediastinum or "
            "chest wall: the share says where the coarse evidence sits, not that the model reads the lungs."
        ]
    if excess.get("ci_low") is not None and excess["ci_low"] > 0:
        return [sentence + ": more than a uniform map would put there."]
    if excess.get("ci_high") is not None and excess["ci_high"] < 0:
        return [sentence + ": less than a uniform map, so the model does not look mainly at the lungs."]
    if excess:
        return [sentence + ": no different from a uniform map."]
    return [sentence + " (no interval recorded)."]


def comparisons(comps: dict) -> list[str]:
    """How many paired comparisons were made, with the clustered McNemar and Holm's adjustment."""
    mult = comps.get("multiplicity") or {}
    if not mult.get("n_tests"):
        return []
    tests = [*comps.get("scenarios_mcnemar", []), *comps.get("decomposition_effect", [])]
    several = len({c.get("task") for c in tests}) > 1
    seeds = len({c.get("seed") for c in tests}) > 1
    names = [
        (
            f"{c['a']} vs {c['b']} (decomposition {'on' if c.get('decomposition') else 'off'}"
            if "a" in c
            else f"decomposition on vs off ({c['scenario']}"
        )
        + (f", {c['variant']}" if c.get("variant", "baseline") != "baseline" else "")
        + (f", seed {c.get('seed')}" if seeds else "")
        + (f", {c.get('task')})" if several else ")")
        for c in tests
        if (c["mcnemar"].get("p_holm") is not None and c["mcnemar"]["p_holm"] < 0.05)
    ]
    return [
        f"{mult['n_tests']} paired comparisons on the same out-of-fold films (scenario pairs and decomposition on vs off) "
        "use McNemar's test clustered on patient groups (Obuchowski 1998); "
        f"{mult.get('n_below_0_05_raw', 0)} have p < 0.05 before and {mult.get('n_below_0_05_holm', 0)} after Holm's "
        f"adjustment for the {mult['n_tests']} tests" + (f" ({'; '.join(names)})." if names else ".")
    ]


def _pooled_decomposition(comps: dict, several_tasks: bool) -> str:
    """Decomposition on minus off pooled over seeds, where a configuration ran several seeds."""
    parts = []
    for c in comps.get("decomposition_over_seeds") or []:
        d = c["accuracy_difference"]
        if c["n_seeds"] < 2 or d.get("mean") is None:
            continue
        name = c["scenario"] + (f" ({c['task']})" if several_tasks else "")
        name += f" [{c['variant']}]" if c.get("variant", "baseline") != "baseline" else ""
        parts.append(
            f"{name} mean {100 * d['mean']:+.1f} (sd {100 * d['sd']:.1f}), on better in {c['n_favour_a']} "
            f"and off better in {c['n_favour_b']} of {c['n_seeds']} seeds"
        )
    return (" Pooled over seeds (points): " + "; ".join(parts) + ".") if parts else ""


def decomposition(comps: dict) -> list[str]:
    """Class decomposition on minus off per scenario (and seed), how many intervals exclude zero, and the
    difference pooled over seeds."""
    dec = comps.get("decomposition_effect") or []
    if not dec:
        return []
    several_tasks = len({e["task"] for e in dec}) > 1
    several_seeds = len({e.get("seed") for e in dec}) > 1
    parts, above, below = [], 0, 0
    for d in dec:
        diff = d["accuracy_difference"]
        lo, hi, value = diff.get("ci_low"), diff.get("ci_high"), diff.get("value")
        if value is None or lo is None or hi is None:
            continue
        above += lo > 0
        below += hi < 0
        name = f"{d['scenario']} ({d['task']})" if several_tasks else d["scenario"]
        name += f" [{d['variant']}]" if d.get("variant", "baseline") != "baseline" else ""
        name += f" seed {d.get('seed')}" if several_seeds else ""
        parts.append(f"{name} {100 * value:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]")
    unit = "scenario-seed pairs" if several_seeds else "scenarios"
    return [
        "Class decomposition, out-of-fold accuracy on minus off (points, 95% CI): " + "; ".join(parts) + ". "
        f"Its interval lies above zero in {above} of {len(parts)} {unit} and below zero in {below}"
        + (": no evidence here that decomposition helps." if above == 0 else ".")
        + _pooled_decomposition(comps, several_tasks)
    ]


def scratch_decomposition(results: dict) -> list[str]:
    """The scratch control with decomposition takes its subclasses from ImageNet features."""
    runs = [r for r in results.get("runs") or [] if r.get("scenario") == "scratch" and r.get("decomposition")]
    if not runs:
        return []
    several = len(runs) > len({r["task"] for r in runs})  # seeds or variants: name them
    accs = "; ".join(
        f"{r['task']}" + (f" seed {r.get('seed')}" if several else "") + f" {fmt_pct(r['test']['accuracy'])}"
        for r in runs
    )
    return [
        f"The scratch control with class decomposition ({accs}) is not free of ImageNet: its subclasses come from "
        "k-means on ImageNet-pretrained features (notebook 03), so pretrained knowledge enters through its "
        "training labels; only scratch without decomposition is a no-transfer control."
    ]


def _budget_text(runs: list[dict], epochs: dict) -> str:
    """The training budgets in words: equal epochs (hence optimizer steps) for the image scenarios of a task, or
    what differed; shallow's own budget (a linear head on cached features) named beside them."""
    planned: dict[str, set] = {}
    for r in runs:
        if r.get("scenario") not in (None, "shallow") and r.get("epochs") is not None:
            planned.setdefault(r["scenario"], set()).add(int(r["epochs"]))
    shallow = epochs.get("shallow")
    shallow_txt = (
        f"; shallow trains only a linear head on cached features ({'/'.join(map(str, shallow))} epochs run)"
        if shallow
        else ""
    )
    if not planned:
        return ""
    if len({frozenset(v) for v in planned.values()}) == 1:
        n = "/".join(str(x) for x in sorted(next(iter(planned.values()))))
        return f"; {', '.join(planned)} had equal budgets ({n} epochs, the same optimizer steps){shallow_txt}"
    parts = ", ".join(f"{sc} {'/'.join(str(x) for x in sorted(v))}" for sc, v in planned.items())
    return f", and the image scenarios trained for unequal numbers of epochs ({parts}){shallow_txt}"


def closing(results: dict) -> list[str]:
    """What the numbers do and do not support, given the cross-validation and the training budgets."""
    design = (results.get("comparisons") or {}).get("design") or {}
    epochs = design.get("epochs_run_by_scenario") or {}
    proto = results.get("protocol") or {}
    if not proto.get("folds"):
        return [NOT_DIAGNOSTIC]
    repeats = proto.get("repeats") or 1
    cv_txt = (
        f"Every configuration was cross-validated in {proto['folds']} patient-grouped folds"
        + (f", repeated {repeats} times" if repeats > 1 else " once")
        + " (each film scored once by the fold model that never saw it; the per-fold spread is under seed_summary)"
    )
    budget = _budget_text(results.get("runs") or [], epochs)
    return [
        "The intervals cover the sampling of patients, not the variation between trainings. "
        + cv_txt
        + budget
        + ": the numbers describe these trainings on these films; a difference between configurations counts "
        "only where its paired interval excludes zero. "
        + NOT_DIAGNOSTIC
    ]


def verdict(results: dict) -> list[str]:
    """Plain sentences generated from the numbers: what the accuracy can and cannot be trusted for."""
    head = results.get("headline") or {}
    checks = results.get("shortcut_checks") or {}
    comps = results.get("comparisons") or {}
    return [
        *([head["text"]] if head.get("text") else []),
        *interval_width(head),
        *scorecard(results),
        *view_probe(results),
        *recommendation(results),
        *variants_against_baseline(results),
        *variant_sentences(results),
        *plan_sentences(results),
        *source_identification(checks),
        *masking(checks),
        *mask_shape(checks),
        *leave_one_source_out(checks),
        *same_hospital(checks),
        *saliency(checks),
        *comparisons(comps),
        *decomposition(comps),
        *scratch_decomposition(results),
        *closing(results),
    ]


def findings(results: dict) -> list[str]:
    """What the numbers say, in a few generated sentences (the README's and the index's summary): the paper's
    number, the goals over every configuration, projection on the held-out hospital, the lung mask's shape,
    the variants against the baseline and class decomposition."""
    return [
        *_finding_paper(results),
        *_finding_goals(results),
        *_finding_projection(results),
        *mask_shape(results.get("shortcut_checks") or {}),
        *_finding_variants(results),
        *_finding_decomposition(results),
    ]


def _finding_paper(results: dict) -> list[str]:
    """The paper's number against the headline configuration's out-of-fold accuracy."""
    head = results.get("headline") or {}
    acc = head.get("accuracy") or {}
    if acc.get("value") is None:
        return []
    where = {"above": "above", "below": "below", "inside": "inside"}.get(head.get("paper_position"), "not comparable to")
    return [
        f"The paper's {100 * head['paper_accuracy']:.2f}% on its own task: the headline configuration "
        f"({head.get('scenario')}, decomposition {'on' if head.get('decomposition') else 'off'}) scores "
        f"{fmt_pct(acc)} out of fold, so the paper's figure lies {where} that interval. The task is confounded by "
        "source (its normal films come almost all from NIH), so this is the paper's number, not a confound-free goal."
    ]


def _finding_goals(results: dict) -> list[str]:
    """How many configuration x goal pairs are met, missed or undetermined, and which goals are met anywhere."""
    goals = [g for g in results.get("goals") or [] if g.get("status") is not None]
    if not goals:
        return []
    count = {s: sum(g["status"] == s for g in goals) for s in ("met", "missed", "undetermined")}
    met = sorted({g["goal"] for g in goals if g["status"] == "met"})
    configs = len({g["run_id"] for g in goals})
    return [
        f"Confound-free goals over {configs} configurations, read from their 95% intervals: {count['met']} met, "
        f"{count['missed']} missed, {count['undetermined']} undetermined"
        + (f" (met: {', '.join(met)})." if met else "; no configuration meets any confound-free goal.")
    ]


def _finding_projection(results: dict) -> list[str]:
    """On the held-out hospital, the rule that knows only the projection against the best configuration's S2, and
    how many view probes name the projection."""
    s2 = [e for e in results.get("scorecard") or [] if e.get("metric") == "actualmed_covid_vs_normal_balanced_accuracy"
          and e.get("value") is not None]
    out = []
    rule = next(((e.get("confounders") or {}).get("view_only") for e in s2 if (e.get("confounders") or {}).get("view_only")), None)
    if s2 and rule and rule.get("value") is not None:
        best = max(s2, key=lambda e: e["value"])
        out.append(
            f"On the held-out hospital, the rule that knows only the projection (AP → COVID-19, PA → normal) scores "
            f"{fmt_pct(rule)} balanced accuracy; the best configuration's ensemble scores {fmt_pct(best)} "
            f"({best.get('run_id')})."
        )
    probes = [e for e in results.get("scorecard") or [] if str(e.get("metric", "")).startswith("view_id_within_")
              and e.get("value") is not None]
    if probes:
        names = sum((e.get("ci_low") or 0) > (e.get("chance") or 0.5) for e in probes)
        out.append(
            f"Projection is in the models' own features: a grouped linear probe names AP against PA above chance "
            f"(interval above 50%) in {names} of {len(probes)} (configuration, label) probes."
        )
    return out


def _finding_variants(results: dict) -> list[str]:
    """Per variant: how many of its paired differences from the baseline are better, worse or undetermined."""
    by: dict[tuple, list[dict]] = {}
    for d in (results.get("comparisons") or {}).get("variants") or []:
        if d.get("goal") != "paper":
            by.setdefault((d["variant"], d["task"]), []).append(d)
    if not by:
        return []
    parts = []
    for (variant, task), diffs in by.items():
        read = {r: [d["goal"] for d in diffs if d.get("reading") == r] for r in ("better", "worse", "undetermined")}
        parts.append(
            f"{variant} ({task}): "
            + ", ".join(f"{r} on {'/'.join(g)}" for r, g in read.items() if g)
        )
    return [
        "Variants against the baseline on the same films (paired patient bootstrap widened by the fold spread): "
        + "; ".join(parts) + "."
    ]


def _finding_decomposition(results: dict) -> list[str]:
    """Class decomposition on minus off: intervals above, below or around zero."""
    dec = [d for d in (results.get("comparisons") or {}).get("decomposition_effect") or []
           if (d.get("accuracy_difference") or {}).get("ci_low") is not None]
    if not dec:
        return []
    above = sum(d["accuracy_difference"]["ci_low"] > 0 for d in dec)
    below = sum(d["accuracy_difference"]["ci_high"] < 0 for d in dec)
    return [
        f"Class decomposition (on minus off, out-of-fold accuracy, paired): its interval lies above zero in {above} "
        f"and below zero in {below} of {len(dec)} scenarios"
        + ("; no evidence here that decomposition helps." if above == 0 else ".")
    ]
