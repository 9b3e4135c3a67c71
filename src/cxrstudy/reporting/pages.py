"""The written pages: the profile's ``index.html``, the README's results block, the model card and the
CLAIM checklist, each rendered from a Jinja2 template in ``reporting/templates/``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cxrstudy import config
from cxrstudy.evaluation.formatting import fmt_pct
from cxrstudy.fileio import atomic_write_text, replace_section
from cxrstudy.reporting.templates import render


def _metric(metric: Any) -> dict[str, str] | None:
    """A metric dict ``{value, ci_low, ci_high}`` or a bare fraction as display percentages, None if absent:
    ``{'value': '96.1', 'sd': '', 'interval': '93.2, 98.5'}`` (``interval`` empty when the metric has none)."""
    if isinstance(metric, dict) and metric.get("value") is not None:
        v, lo, hi = metric["value"], metric.get("ci_low"), metric.get("ci_high")
        interval = "" if lo is None or hi is None else f"{100 * lo:.1f}, {100 * hi:.1f}"
        return {"value": f"{100 * v:.1f}", "sd": "", "interval": interval}
    if isinstance(metric, (int, float)):
        return {"value": f"{100 * metric:.1f}", "sd": "", "interval": ""}
    return None


def _spread(s: Any) -> dict[str, str] | None:
    """A spread over seeds (``seeds.spread``) as display percentages: ``value`` the seed mean, ``sd`` (empty
    for one seed), ``interval`` the lowest to highest bound of the per-seed 95% intervals; None if absent."""
    if not isinstance(s, dict) or s.get("mean") is None:
        return None
    lo, hi = s.get("interval_low"), s.get("interval_high")
    return {
        "value": f"{100 * s['mean']:.1f}",
        "sd": f"{100 * s['sd']:.1f}" if (s.get("n") or 0) > 1 and s.get("sd") is not None else "",
        "interval": "" if lo is None or hi is None else f"{100 * lo:.1f}, {100 * hi:.1f}",
    }


def goal_headers() -> list[dict[str, str]]:
    """The scorecard's goals for table headers: ``goal``, ``metric`` and ``rule`` (e.g. ``>= 80``)."""
    from cxrstudy.evaluation.scorecard import GOALS

    out = []
    for g in GOALS:
        if g.relative_to is not None:
            rule = f"{g.op} chance + {100 * g.margin:.0f} points"
        else:
            rule = f"{g.op} {100 * g.target:.2f}".rstrip("0").rstrip(".")
        out.append({"goal": g.goal, "metric": g.metric, "rule": rule})
    return out


def headline_run_ids(results: dict[str, Any]) -> list[str]:
    """run_ids of the headline runs (paper's task first, then the other tasks)."""
    heads = [results.get("headline") or {}, *(results.get("headline_other_tasks") or {}).values()]
    return [h["run_id"] for h in heads if h.get("run_id")]


def _recommended_key(results: dict[str, Any]) -> tuple | None:
    """(task, scenario, variant) of the recommended variant (decomposition off), None without one."""
    rec = results.get("recommended_variant") or {}
    return (rec.get("task"), rec.get("scenario"), rec["name"]) if rec.get("name") else None


def _goal_cells(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal of a ``scorecard_summary`` entry for display: seed spread, ``met`` (the goal's status over
    seeds: met, missed or undetermined) and ``clears`` (every seed's interval clears the goal)."""
    mine = {g["goal"]: g for g in cfg.get("goals") or []}
    cells = []
    for h in goal_headers():
        g = mine.get(h["goal"], {})
        met = g.get("status") or "n/a"
        clear = "" if (g.get("n") or 0) <= 1 else {True: "all clear", False: "not all clear"}.get(g.get("all_seeds_clear"), "")
        cells.append({"goal": h["goal"], "rule": h["rule"], "metric": _spread(g), "met": met, "clears": clear})
    return cells


def scorecard_table_rows(results: dict[str, Any], keep: Any = None) -> list[dict[str, Any]]:
    """One row per configuration of results.json ``scorecard_summary`` (all, or those ``keep(cfg)`` accepts):
    each goal's cell (:func:`_goal_cells`), goals met of those judged, and whether it is the recommended variant."""
    rec = _recommended_key(results)
    rows = []
    for cfg in results.get("scorecard_summary") or []:
        if keep is not None and not keep(cfg):
            continue
        cells = _goal_cells(cfg)
        n = cfg.get("n_seeds", 0)
        rows.append(
            {
                "run": f"{cfg['scenario']} {'decomp' if cfg['decomposition'] else 'nodecomp'} ({cfg['task']})",
                "variant": str(cfg["variant"]),
                "seeds": "out of fold" if n == 1 else f"{n} cross-validations",
                "recommended": rec == (cfg["task"], cfg["scenario"], cfg["variant"]) and not cfg["decomposition"],
                "goals": cells,
                "n_met": sum(c["met"] == "met" for c in cells),
                "n_judged": sum(c["metric"] is not None for c in cells),  # goals with a value
            }
        )
    return rows


def recommended_block(results: dict[str, Any]) -> dict[str, Any] | None:
    """The recommended variant for the pages: name, task, scenario, rule and its goal cells; None without one."""
    rec = results.get("recommended_variant") or {}
    if not rec.get("rule"):
        return None
    rows = [r for r in scorecard_table_rows(results) if r["recommended"]]
    return {"name": str(rec.get("name") or "none"), "task": str(rec.get("task")), "scenario": str(rec.get("scenario")),
            "rule": str(rec["rule"]), "goals": rows[0]["goals"] if rows else []}


def check_items(value: Any) -> list[dict[str, Any]]:
    """One shortcut check as display items ``{label, metric, n}``: a fraction, an accuracy, per-source accuracies."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [{"label": None, "metric": _metric(value), "n": None}]
    if isinstance(value, dict) and "accuracy" in value:
        return [{"label": None, "metric": _metric(value["accuracy"]), "n": value.get("n_test", value.get("n"))}]
    if isinstance(value, dict) and "probe" in value:
        return check_items(value["probe"])
    if isinstance(value, list):
        return [
            {"label": str(e.get("held_out", e.get("label"))), "metric": _metric(e["accuracy"]), "n": e.get("n")}
            for e in value
            if isinstance(e, dict) and "accuracy" in e and e["accuracy"] is not None
        ]
    return []


def headline_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per configuration (results.json ``configurations``, out of fold): films and patients, each metric's
    value [95% interval], and the accuracy's spread over the folds (``seed_summary``: mean ± sd of the folds,
    each on its own films)."""
    from cxrstudy.evaluation.seeds import config_key, config_order

    folds = {tuple(s.get(k) for k in ("task", "backbone", "scenario", "decomposition", "variant")): s
             for s in results.get("seed_summary") or []}
    rows = []
    for e in sorted(results.get("configurations") or [], key=lambda e: config_order(config_key(e))):
        test = e.get("test") or {}
        spread = folds.get(tuple(e.get(k) for k in ("task", "backbone", "scenario", "decomposition", "variant")))
        fold_acc = _spread({**(spread or {}).get("test_accuracy", {}), "interval_low": None})
        rows.append({
            "task": str(e.get("task")),
            "backbone": str(e.get("backbone")),
            "scenario": str(e.get("scenario")),
            "decomposition": "on" if e.get("decomposition") else "off",
            "variant": str(e.get("variant") or "baseline"),
            "films": f"{test.get('n')} / {test.get('n_groups')}",
            "folds": len((spread or {}).get("run_ids") or []),
            "val_accuracy": _metric(e.get("val_accuracy")),
            "accuracy": _metric(test.get("accuracy")),
            "fold_accuracy": fold_acc,
            "hard_rule_accuracy": _metric((test.get("hard_rule") or {}).get("accuracy")),
            **{k: _metric(test.get(k)) for k in ("balanced_accuracy", "roc_auc", "ece")},
        })
    return rows


def budget_line(record: dict[str, Any]) -> str:
    """The run's wall time and its budget on the reference machine (run.json ``budget``), as a sentence."""
    b = record.get("budget") or {}
    if not b:
        return ""
    return (
        f"Wall time {b['wall_seconds'] / 60:.1f} min on this machine, whose bare training step ran at "
        f"{record.get('reference_train_img_s')} img/s (make bench's figure, measured during the run); scaled to the "
        f"reference machine ({b['reference_img_s']:.0f} img/s) that is {b['wall_on_reference_s'] / 60:.1f} min against "
        f"a budget of {b['limit_on_reference_s'] / 60:.0f} min: {'within' if b['within'] else 'over'} budget."
    )


def lung_summary(seg: dict | None) -> dict[str, Any]:
    """The lung stage's figures as text for the index: Dice, IoU (value [interval]), QC rates, seconds."""
    if not seg or not isinstance(seg.get("dice"), dict):
        return {}

    def fmt(m: dict) -> str:
        return f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"

    rates = ", ".join(f"{k} {100 * v:.1f}%" for k, v in (seg.get("qc_pass_rate") or {}).items())
    return {"dice": fmt(seg["dice"]), "iou": fmt(seg["iou"]), "n": seg.get("n_test_masks"), "qc": rates,
            "seconds": f"{seg.get('train_seconds') or 0:.0f}"}


def index_figures(out: Path) -> dict[str, str | None]:
    """Paths (relative to index.html) of the headline, scorecard and shortcut-check figures that exist, else None."""
    from cxrstudy.evaluation.figures import FIGURE_DIR, HEADLINE_FIGURE, SCORECARD_FIGURE, SHORTCUT_FIGURE

    found = {}
    for key, name in (("headline", HEADLINE_FIGURE), ("scorecard", SCORECARD_FIGURE), ("shortcuts", SHORTCUT_FIGURE)):
        found[key] = f"{FIGURE_DIR}/{name}" if (out / FIGURE_DIR / name).is_file() else None
    found["lungs"] = "lungs/overlays.png" if (out / "lungs" / "overlays.png").is_file() else None
    return found


def _steps(out: Path, record: dict[str, Any]) -> list[dict[str, Any]]:
    """The run record's notebook steps for the index: link (when the HTML exists), status, seconds."""
    return [
        {
            "name": s.get("name", ""),
            "notebook": s.get("notebook", ""),
            "href": s.get("html") if (out / s.get("html", "-")).is_file() else None,
            "status": str(s.get("status")),
            "seconds": "" if s.get("seconds") is None else f"{s['seconds']:.1f}",
        }
        for s in record.get("steps", [])
    ]


def index_html(out: Path, record: dict[str, Any]) -> str:
    """The profile's index.html (template ``index.html.j2``): headline, figures, verdict, checks, steps, record."""
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    verdict = results.get("verdict") or []
    checks = results.get("shortcut_checks") or {}
    check_rows = [(k, check_items(v)) for k, v in checks.items()]
    return render(
        "index.html.j2",
        record=record,
        headline_text=str((results.get("headline") or {}).get("text", "")),
        findings=[str(f) for f in results.get("findings") or []],
        budget=budget_line(record),
        rows=headline_rows(results),
        verdict=[str(v) for v in (verdict if isinstance(verdict, list) else [verdict])],
        checks_level=str(checks.get("level", "")),
        check_rows=[(k, items) for k, items in check_rows if items],
        lung_region=str(checks.get("lung_region") or ""),
        lungs=lung_summary(results.get("lung_segmentation")),
        goal_headers=goal_headers(),
        goal_rows=scorecard_table_rows(results),
        recommended=recommended_block(results),
        figures=index_figures(out),
        steps=_steps(out, record),
        files=[p for p in ("model_card.md", "claim_checklist.md", "results.json", "run.json") if (out / p).is_file()],
        device=json.dumps(record.get("device", {})),
        wall_seconds=f"{record.get('wall_seconds') or 0:.1f}",
        config=config,
    )


def write_index(out: Path, record: dict[str, Any]) -> Path:
    """Write ``<profile>/index.html``: headline table and figure, verdict, shortcut checks, links, run record."""
    path = out / "index.html"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, index_html(out, record))
    return path


README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"


def _md_cell(value: Any) -> str:
    """Text for one Markdown table cell (``|`` escaped)."""
    return str(value).replace("|", "\\|")


def readme_results(results: dict[str, Any], record: dict[str, Any]) -> str:
    """Markdown for the README's results section (template ``readme_results.md.j2``): metrics, date, machine."""
    from cxrstudy.evaluation.verdict import recommendation

    headline = (results.get("headline") or {}).get("text")
    verdict = results.get("verdict") or []
    shown = {headline, *recommendation(results)}  # both have their own place in the block
    verdict = [v for v in (verdict if isinstance(verdict, list) else [verdict]) if v not in shown]
    text = render(
        "readme_results.md.j2",
        {"cell": _md_cell},
        record=record,
        date=str(record.get("ended", ""))[:10],
        commit=str(record.get("git", {}).get("commit", ""))[:10],
        dev=record.get("device", {}),
        ver=record.get("versions", {}),
        minutes=f"{sum(s.get('seconds') or 0 for s in record.get('steps', [])) / 60:.1f}",
        rows=headline_rows(results),
        findings=[str(f) for f in results.get("findings") or []],
        budget=budget_line(record),
        protocol=results.get("protocol") or {},
        headline=headline,
        verdict=verdict,
        goal_headers=goal_headers(),
        goal_rows=readme_scorecard_rows(results),
        recommended=recommended_block(results),
        config=config,
    )
    return text.rstrip("\n")


def readme_scorecard_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Scorecard rows for the README: the headline runs' configurations, and every configuration that has
    variants (baseline and variants side by side)."""
    heads = set(headline_run_ids(results))
    summary = results.get("scorecard_summary") or []
    varied = {(c["task"], c["backbone"], c["scenario"], c["decomposition"]) for c in summary if c["variant"] != "baseline"}
    return scorecard_table_rows(
        results,
        lambda c: bool(heads & set(c.get("run_ids") or []))
        or (c["task"], c["backbone"], c["scenario"], c["decomposition"]) in varied,
    )


def update_readme(profile: str = "default", readme: Path = config.ROOT / "README.md") -> None:
    """Replace the README's results section with the profile's latest results.json and run.json."""
    out = config.profile_dir(profile)
    for name in ("results.json", "run.json"):
        if not (out / name).is_file():
            raise FileNotFoundError(
                f"{out / name} does not exist; run `make reproduce PROFILE={profile}` first"
            )
    results = json.loads((out / "results.json").read_text())
    record = json.loads((out / "run.json").read_text())
    replace_section(readme, README_START, README_END, readme_results(results, record))


# --------------------------------------------------------------------------- model card and CLAIM checklist


def _pct_or_na(value: Any) -> str:
    """A fraction as a percentage with one decimal, or ``n/a``."""
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "n/a"


def _cell(value: Any) -> str:
    """Text for one Markdown table cell (no ``|``)."""
    return str(value).replace("|", "/")


FILTERS = {"pct": fmt_pct, "pct_or_na": _pct_or_na, "cell": _cell}


def _sources(results: dict) -> list[str]:
    """Short names of the sources in the evaluated manifest, sorted."""
    return sorted((results.get("dataset") or {}).get("by_source_label") or {})


def model_card(results: dict) -> str:
    """A short Markdown model card filled from results.json (template ``model_card.md.j2``)."""
    head = results.get("headline") or {}
    best = next((r for r in results.get("configurations", []) if r.get("run_id") == head.get("run_id")), None)
    entries = {e["metric"]: e for e in results.get("scorecard") or [] if e.get("run_id") == head.get("run_id")}
    goals = [
        {**g, "method": entries.get(g["metric"], {}).get("method"), "note": entries.get(g["metric"], {}).get("note")}
        for g in results.get("goals") or []
        if g.get("run_id") == head.get("run_id")
    ]
    scratch = [
        r["task"] for r in results.get("configurations", []) if r.get("scenario") == "scratch" and r.get("decomposition")
    ]
    return render(
        "model_card.md.j2",
        FILTERS,
        head=head,
        ds=results.get("dataset") or {},
        sources=_sources(results),
        best=best,
        protocol=results.get("protocol") or {},
        goals=goals,
        scratch_decomp=sorted(set(scratch)),
        limitations=(results.get("verdict") or [])[1:],
        config=config,
    )


def write_model_card(results: dict, path: Path) -> Path:
    """Write the model card to ``path``."""
    atomic_write_text(Path(path), model_card(results))
    return Path(path)


def claim_checklist(results: dict) -> str:
    """CLAIM-style reporting checklist: data sources, splits, reference standard, metrics, failure analysis."""
    return render(
        "claim_checklist.md.j2",
        FILTERS,
        ds=results.get("dataset") or {},
        checks=results.get("shortcut_checks") or {},
        head=results.get("headline") or {},
        protocol=results.get("protocol") or {},
        params=results.get("params") or {},
        sources=_sources(results),
        scenarios=sorted({r["scenario"] for r in results.get("configurations") or results.get("runs", [])}),
    )


def write_claim_checklist(results: dict, path: Path) -> Path:
    """Write the CLAIM checklist to ``path``."""
    atomic_write_text(Path(path), claim_checklist(results))
    return Path(path)
