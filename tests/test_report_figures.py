"""The headline and shortcut-check figures: written where index.html looks for them, absent when there is no data."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from cxrstudy.evaluation import figures as F
from cxrstudy.reporting import pages


def m(value, lo, hi):
    return {"value": value, "ci_low": lo, "ci_high": hi}


ENTRIES = [
    {"run_id": f"covid_vs_normal__efficientnet_lite0__{sc}__nodecomp__seed0", "task": "covid_vs_normal",
     "backbone": "efficientnet_lite0", "scenario": sc, "decomposition": False, "seed": 0,
     "test": {"accuracy": acc, "balanced_accuracy": acc, "roc_auc": acc}}
    for sc, acc in (("shallow", m(0.946, 0.913, 0.973)), ("deep", m(0.961, 0.932, 0.985)), ("scratch", m(0.872, 0.82, None)))
]
CHECKS = {
    "unmasked": {"accuracy": m(0.936, 0.904, 0.965)},
    "masked_lungs": {"accuracy": m(0.916, 0.88, 0.951)},
    "lungs_only": {"accuracy": m(0.936, 0.897, 0.97)},
    "leave_one_source_out": [
        {"held_out": "nih", "n": 443, "labels": ["normal"], "accuracy": m(0.034, 0.016, 0.055)},
        {"held_out": "x", "n": 2, "labels": ["covid"], "skipped": "too few"},
    ],
    "same_hospital": {"source": "actualmed", "n": 40, "probe": {"accuracy": m(0.875, 0.757, 0.974)}},
}


def test_shortcut_panels_list_every_check_with_an_interval():
    panels = list(F.shortcut_panels(CHECKS).values())
    assert list(panels[0]["label"]) == ["whole image", "lungs masked", "lungs only"]
    assert list(panels[1]["label"]) == ["without nih (normal, n=443)"] and panels[1]["ci_low"].iloc[0] == 0.016
    assert list(panels[2]["label"]) == ["actualmed (n=40)"]
    assert all(len(p) == 0 for p in F.shortcut_panels({}).values())


def test_figures_are_written_where_index_html_shows_them(tmp_path):
    fig_dir = tmp_path / F.FIGURE_DIR
    head = F.headline_figure(ENTRIES, fig_dir / F.HEADLINE_FIGURE)
    checks = F.shortcut_figure(CHECKS, fig_dir / F.SHORTCUT_FIGURE)
    for path in (head, checks):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 150
    (tmp_path / "results.json").write_text(json.dumps({"configurations": ENTRIES, "shortcut_checks": CHECKS}))
    page = pages.write_index(tmp_path, {"profile": "t", "status": "ok", "steps": []}).read_text()
    assert f"<img src='{F.FIGURE_DIR}/{F.HEADLINE_FIGURE}'" in page
    assert f"<img src='{F.FIGURE_DIR}/{F.SHORTCUT_FIGURE}'" in page


def test_shortcut_figure_without_checks_removes_a_stale_one(tmp_path):
    path = tmp_path / F.SHORTCUT_FIGURE
    path.write_bytes(b"old")
    assert F.shortcut_figure({"level": "linear heads"}, path) is None and not path.exists()


def _entry(run, metric, value, variant="baseline", method="model"):
    return {"run_id": run, "variant": variant, "task": "covid_vs_normal", "metric": metric, "value": value,
            "ci_low": None if value is None else value - 0.05, "ci_high": None if value is None else value + 0.04,
            "n": 50, "method": method}


def test_scorecard_panels_and_figure(tmp_path):
    from cxrstudy.evaluation.scorecard import check_goals
    from cxrstudy.evaluation.seeds import scorecard_summary

    a = "covid_vs_normal__efficientnet_lite0__deep__nodecomp__seed{}"
    b = "covid_vs_normal__efficientnet_lite0__shallow__nodecomp__seed0__lung_crop"
    runs = [{"run_id": a.format(s), "task": "covid_vs_normal", "backbone": "efficientnet_lite0", "scenario": "deep",
             "decomposition": False, "seed": s, "variant": "baseline"} for s in (0, 1)]
    runs.append({**runs[0], "run_id": b, "scenario": "shallow", "variant": "lung_crop"})
    entries = [
        _entry(a.format(0), "ieee8023_covid_vs_pneumonia_auc", 0.82, method="probe"),
        {**_entry(a.format(0), "source_id_within_covid_balanced_accuracy", 0.62, method="probe"), "chance": 0.43},
        {**_entry(a.format(0), "paper_task_accuracy", 0.95),
         "confounders": {"view_only": {"value": 0.71}, "demographics_only": {"value": 0.6},
                         "confounders_only": {"value": 0.74}, "view_matched": {"value": 0.9, "ci_low": 0.8, "ci_high": 0.95}}},
        _entry(a.format(0), "nih_pneumonia_vs_normal_auc", None),
        {**_entry(a.format(1), "source_id_within_covid_balanced_accuracy", 0.58, method="probe"), "chance": 0.45},
        _entry(a.format(1), "paper_task_accuracy", 0.91),
        _entry(b, "paper_task_accuracy", 0.93, variant="lung_crop"),
        {**_entry(b, "source_id_within_covid_balanced_accuracy", 0.5, variant="lung_crop", method="probe"),
         "chance": 0.40},
    ]
    summary = scorecard_summary(runs, entries, check_goals(entries))
    panels = F.scorecard_panels(summary)
    names = list(panels)
    assert len(names) == 5 and names[0].startswith("S1 ieee8023_covid_vs_pneumonia_auc (>= 0.8)")
    assert names[2] == "S3 source_id_within_covid_balanced_accuracy (<= chance + 5 points)"
    assert names[4] == "paper_task_accuracy (the paper's 94.17%; not a confound-free goal)"
    s3 = panels[names[2]]  # one row per configuration: the seeds pooled
    assert list(s3["label"]) == ["shallow nodecomp [lung_crop] (covid_vs_normal, out of fold, probe)",
                                 "deep nodecomp (covid_vs_normal, 2 cross-validations, probe)"]
    # each configuration's target is the mean of its seeds' majority + 5 points
    assert list(s3["target"]) == [pytest.approx(0.45), pytest.approx(0.49)]
    s5 = panels[names[4]]
    assert list(s5["value"]) == [0.93, pytest.approx(0.93)] and s5["target"].iloc[0] == pytest.approx(0.9417)
    # the bar: the lowest lower bound to the highest upper bound of the seeds' intervals
    assert (s5["ci_low"].iloc[1], s5["ci_high"].iloc[1]) == (pytest.approx(0.86), pytest.approx(0.99))
    # the rules that know only the confounders and the view-matched value ride along as reference marks
    assert s5["view_only"].iloc[1] == 0.71 and s5["confounders_only"].iloc[1] == 0.74
    assert s5["view_matched"].iloc[1] == pytest.approx(0.9) and s5["view_only"].isna().iloc[0]
    s1 = panels[names[0]]  # a seed without the metric does not count; a configuration without it reads n/a
    assert list(s1["label"]) == ["shallow nodecomp [lung_crop] (covid_vs_normal, out of fold)",
                                 "deep nodecomp (covid_vs_normal, 2 cross-validations, probe)"]
    assert s1["value"].iloc[1] == pytest.approx(0.82) and s1["value"].isna().iloc[0]
    assert panels[names[3]]["value"].isna().all()  # not computed: kept as a row, shown as n/a
    path = F.scorecard_figure(summary, tmp_path / F.FIGURE_DIR / F.SCORECARD_FIGURE)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 300
    assert F.scorecard_figure([], path) is None and not path.exists()
