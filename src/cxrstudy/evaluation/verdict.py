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
    "source_id_within_covid_accuracy": "source identification within COVID-19 films",
    "nih_pneumonia_vs_normal_auc": "NIH pneumonia vs normal ROC-AUC",
    "paper_task_accuracy": "paper's task accuracy",
}
#: The last sentence when results.json says nothing about the design.
NOT_DIAGNOSTIC = (
    "The numbers are not diagnostic accuracy for patients elsewhere: the data are public, small, multi-source "
    "collections in which source and label are entangled, and no external test from another hospital is included."
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
            f"The interval is {100 * (acc['ci_high'] - acc['ci_low']):.0f} points wide: the test split is too small "
            "(in patients) to separate models that differ by a few points."
        ]
    return []


def _goal_part(goal: dict, entry: dict) -> str:
    """One goal of the scorecard sentence: name, value with interval, target and whether it is met."""
    name = f"{goal['goal']} {METRIC_NAMES.get(goal['metric'], goal['metric'])}"
    if goal.get("value") is None:
        return f"{name} not computed ({entry.get('note') or 'no value'})"
    how = " (linear probe on the run's features)" if entry.get("method") == "probe" else ""
    target = (
        "n/a" if goal.get("target") is None else f"{100 * goal['target']:.2f}".rstrip("0").rstrip(".") + "%"
    )
    verdict = goal.get("status") or "not judged"
    why = f" ({goal['reason']})" if goal.get("reason") else ""
    return f"{name} {fmt_pct(entry or {'value': goal['value']})}{how}{_reference(entry)}, goal {goal['op']} {target}: {verdict}{why}"


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
    """The confound-free scorecard of each headline run (paper's task, other tasks) against its goals."""
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
        judged = sum(g.get("status") is not None for g in mine)
        out.append(
            f"Confound-free scorecard of the headline {head.get('task')} run ({head.get('scenario')}, decomposition "
            f"{'on' if head.get('decomposition') else 'off'}; held-out films only, 95% CI): "
            + "; ".join(parts)
            + f". Goals met: {met} of the {judged} that could be judged."
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
        f"Recommended variant: {rec['name']}, by a rule fixed before any test number was read. {rec['rule']}"
    )
    if not cfgs or not cfgs[0].get("goals"):
        return [text + " Its scorecard was not computed."]
    cfg = cfgs[0]
    return [
        text
        + f" On films its runs never trained or validated on, over its {cfg['n_seeds']} seed(s) (met: every "
        "seed's goal is met, its 95% interval on the goal's side and clear of the confounder-only rules; missed: "
        "every seed's missed; else undetermined): " + "; ".join(_goal_over_seeds_part(g) for g in cfg["goals"]) + "."
    ]


def variants_against_baseline(results: dict) -> list[str]:
    """Per (task, scenario) with variants, each variant against its baseline: the difference of the seed means
    of every goal's metric (points), marked where the seed spread covers it."""
    groups: dict[tuple, dict[str, dict]] = {}
    for c in results.get("scorecard_summary") or []:
        if not c["decomposition"]:
            groups.setdefault((c["task"], c["scenario"]), {})[c["variant"]] = c
    out = []
    for (task, scenario), cfgs in groups.items():
        base = cfgs.get("baseline")
        if base is None or len(cfgs) < 2:
            continue
        parts = [
            f"{name}: " + ", ".join(_goal_differences(cfg, base))
            for name, cfg in cfgs.items()
            if name != "baseline"
        ]
        out.append(
            f"Variants against the baseline ({task}, {scenario}; difference of seed means, points; S3 lower is "
            "better, the others higher): " + "; ".join(parts) + "."
        )
    return out


def _goal_differences(cfg: dict, base: dict) -> list[str]:
    """``S1 +12.0`` per goal both configurations have, with "(within the seed sd)" where the larger sd covers it."""
    goals = {g["goal"]: g for g in base["goals"]}
    diffs = []
    for g in cfg["goals"]:
        b = goals.get(g["goal"]) or {}
        if g.get("mean") is None or b.get("mean") is None:
            continue
        d = 100 * (g["mean"] - b["mean"])
        noise = 100 * max(g.get("sd") or 0.0, b.get("sd") or 0.0)
        diffs.append(f"{g['goal']} {d:+.1f}{'' if abs(d) > noise else ' (within the seed sd)'}")
    return diffs


def _within_reading(w: dict) -> str:
    """The scorecard's reading of a within-label source probe against its majority."""
    return reading(w["accuracy"], w.get("ci_low"), w.get("majority"))


def _within_label_part(w: dict) -> str:
    """One label of the within-label source sentence."""
    iv = {"value": w["accuracy"], "ci_low": w.get("ci_low"), "ci_high": w.get("ci_high")}
    return (
        f"{w['label']} films ({', '.join(w.get('sources') or [])}; n={w.get('n')}) {fmt_pct(iv)} against "
        f"{100 * (w.get('majority') or 0):.1f}% for always naming the largest source: {_within_reading(w)}"
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
    within = [w for w in checks.get("source_id_within_label") or [] if w.get("accuracy") is not None]
    if within:
        present = [w["label"] for w in within if _within_reading(w) == "source signal present"]
        out.append(
            "Within one label, where the label cannot help, the probe (patient-grouped 5-fold CV, sources with at "
            "least 10 films) names the source of "
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
        f"A linear head on frozen features reaches {fmt_pct(unmasked['accuracy'])} test accuracy on the whole film, "
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
        f"Within the one hospital with both COVID-19 and normal films ({sh.get('source')}, n={sh.get('n')}), "
        f"a cross-validated linear head reaches {fmt_pct(probe['accuracy'])}"
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
        f"Grad-CAM of the headline model on {n if n is not None else 'a sample of'} test images (a seeded random "
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
        f"{mult['n_tests']} paired comparisons on the same test images (scenario pairs and decomposition on vs off) "
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
        "Class decomposition, test accuracy on minus off (points, 95% CI): " + "; ".join(parts) + ". "
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
    """What the numbers do and do not support, given the seeds per configuration and training budgets."""
    design = (results.get("comparisons") or {}).get("design") or {}
    seeds = design.get("seeds_per_configuration") or {}
    epochs = design.get("epochs_run_by_scenario") or {}
    if not seeds.get("max"):
        return [NOT_DIAGNOSTIC]
    if seeds["max"] == 1:
        seed_txt = "Each configuration ran once (one seed), so seed-to-seed variation is not measured"
    else:
        n_txt = (
            f"{seeds['max']} seeds each"
            if seeds["min"] == seeds["max"]
            else f"{seeds['min']} to {seeds['max']} seeds"
        )
        seed_txt = (
            f"Configurations ran with {n_txt} (mean, sd and the range of the per-seed intervals under "
            "seed_summary); seed-to-seed spread is measured, but a few seeds do not pin it down"
        )
    budget = _budget_text(results.get("runs") or [], epochs)
    return [
        "The intervals cover only the sampling of test patients. "
        + seed_txt
        + budget
        + ": the numbers describe "
        "these runs on these films; they do not rank the scenarios or settle whether decomposition helps. "
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
