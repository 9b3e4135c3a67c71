"""Run record helpers, index.html and the README's results section."""

from __future__ import annotations

import json
import re

import pytest

from cxrstudy import config
from cxrstudy.reporting import pages, record

RESULTS = {
    "configurations": [
        {
            "task": "covid_vs_normal",
            "backbone": "efficientnet_lite0",
            "scenario": "deep",
            "decomposition": True,
            "seed": 0,
            "test": {
                "n": 197,
                "n_groups": 118,
                "accuracy": {"value": 0.9, "ci_low": 0.85, "ci_high": 0.95},
                "balanced_accuracy": {"value": 0.8, "ci_low": 0.7, "ci_high": 0.9},
                "ece": 0.05,
            },
        },
        {
            "task": "covid_vs_normal",
            "backbone": "efficientnet_lite0",
            "scenario": "shallow",
            "decomposition": False,
            "seed": 0,
            "test": {"n": 197, "n_groups": 118, "accuracy": {"value": 0.95, "ci_low": 0.9, "ci_high": 0.99}},
        },
    ],
    "protocol": {"kind": "cv", "folds": 5, "repeats": 1, "stratify": ["label", "source_name"]},
    "findings": ["A finding <i>generated</i>."],
    "headline": {"text": "Best transfer scenario: shallow."},
    "verdict": ["Source identification is easy <b>here</b>."],
    "shortcut_checks": {"source_identification_accuracy": 0.97},
}
RECORD = {
    "profile": "default",
    "status": "ok",
    "ended": "2026-11-26T12:00:00+00:00",
    "wall_seconds": 600,
    "git": {"commit": "abcdef1234567"},
    "device": {"resolved": "cpu", "cpu_count": 2},
    "versions": {"platform": "Linux"},
    "steps": [
        {
            "name": "00_data",
            "notebook": "00_data.ipynb",
            "html": "html/00_data.html",
            "status": "ran",
            "seconds": 3.0,
        }
    ],
}


def test_versions_and_device():
    v = record.versions()
    assert v["torch"] != "not installed" and v["python"].count(".") == 2
    assert record.device_info("cpu")["resolved"] == "cpu"
    with pytest.raises(ValueError, match="bad device"):
        record.device_info("tpu")
    assert len(record.git_info()["commit"]) in (40, 7)  # a commit hash, or "unknown" outside git


def test_index_shows_results_sorted_and_escaped(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(RESULTS))
    (tmp_path / "html").mkdir()
    (tmp_path / "html" / "00_data.html").write_text("<html></html>")
    page = pages.write_index(tmp_path, RECORD).read_text()
    assert page.index("95.0 <small>[90.0, 99.0]</small>") < page.index("90.0 <small>[85.0, 95.0]</small>")
    assert "94.17" in page and "href='html/00_data.html'" in page
    assert "&lt;b&gt;here&lt;/b&gt;" in page and "<b>here</b>" not in page
    assert "97.0" in page  # shortcut check as a percentage


def test_index_without_results(tmp_path):
    page = pages.write_index(tmp_path, {**RECORD, "status": "failed"}).read_text()
    assert "No results.json yet" in page and "Run status: failed" in page


def test_update_readme_replaces_only_its_section(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "REPORTS_DIR", tmp_path / "reports")
    out = tmp_path / "reports" / "default"
    out.mkdir(parents=True)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{pages.README_START}\nOLD-BLOCK\n{pages.README_END}\nrest\n")
    with pytest.raises(FileNotFoundError, match="make reproduce PROFILE=default"):
        pages.update_readme("default", readme)
    (out / "results.json").write_text(json.dumps(RESULTS))
    (out / "run.json").write_text(json.dumps(RECORD))
    pages.update_readme("default", readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "OLD-BLOCK" not in text
    assert "| covid_vs_normal | shallow | off | baseline | 197 / 118 | – | 95.0 [90.0, 99.0] |" in text
    assert "2026-11-26" in text and "abcdef1234" in text and "Verdict" in text
    assert "0.1 min for all steps" in text and "5 patient-grouped folds, stratified by label × source_name" in text
    assert "**What the numbers say** (generated from `results.json`):\n\n- A finding <i>generated</i>." in text


def test_readme_table_is_markdown_from_data(tmp_path, monkeypatch):
    results = json.loads(json.dumps(RESULTS))
    results["configurations"][1]["task"] = "a|b"
    results["configurations"][0]["val_accuracy"] = 0.96
    results["configurations"][0]["test"]["hard_rule"] = {"accuracy": {"value": 0.88, "ci_low": 0.83, "ci_high": 0.93}}
    text = pages.readme_results(results, RECORD)
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0].startswith("| task | scenario | decomposition | variant | films / patients | inner-validation "
                               "accuracy % | accuracy % (summed probabilities) | folds: accuracy % |")
    assert table[2:4] == [
        "| a\\|b | shallow | off | baseline | 197 / 118 | – | 95.0 [90.0, 99.0] | – | – | – | – | – |",
        "| covid_vs_normal | deep | on | baseline | 197 / 118 | 96.0 | 90.0 [85.0, 95.0] | – | 88.0 [83.0, 93.0] "
        "| 80.0 [70.0, 90.0] | – | 5.0 |",
    ]
    assert table[4:6] == [
        f"| {config.PAPER_CITATION} | reported (one split) | | | | | 94.17 | | | | | |",
        f"| {config.DETRAC_CITATION} | reported | on | | | | | | 93.1 | | | |",
    ]
    assert not any("<" in line or ">" in line for line in table)


def test_run_tables_give_the_out_of_fold_value_and_the_fold_spread():
    def conf(acc, lo, hi, variant="baseline"):
        return {"run_id": f"c{variant}", "task": "covid_normal_pneumonia", "backbone": "b", "scenario": "deep",
                "decomposition": False, "seed": 0, "variant": variant, "val_accuracy": acc,
                "test": {"n": 300, "n_groups": 200, "accuracy": {"value": acc, "ci_low": lo, "ci_high": hi}}}

    def folds(variant, accs):
        from cxrstudy.evaluation.seeds import spread

        return {"task": "covid_normal_pneumonia", "backbone": "b", "scenario": "deep", "decomposition": False,
                "variant": variant, "run_ids": [f"f{i}" for i in range(len(accs))],
                "test_accuracy": spread([{"value": a, "ci_low": a - 0.1, "ci_high": a + 0.1} for a in accs])}

    results = {"configurations": [conf(0.70, 0.60, 0.80, "lung"), conf(0.82, 0.76, 0.87)],
               "seed_summary": [folds("baseline", [0.80, 0.82, 0.84]), folds("lung", [0.7])]}
    rows = pages.headline_rows(results)
    assert [(r["variant"], r["folds"]) for r in rows] == [("baseline", 3), ("lung", 1)]
    assert rows[0]["accuracy"] == {"value": "82.0", "sd": "", "interval": "76.0, 87.0"}
    assert rows[0]["fold_accuracy"] == {"value": "82.0", "sd": "2.0", "interval": ""}
    md = pages.readme_results(results, RECORD)
    assert "| covid_normal_pneumonia | deep | off | baseline | 300 / 200 | 82.0 | 82.0 [76.0, 87.0] | 82.0 ± 2.0 |" in md


def _figure_files(out):
    from cxrstudy.evaluation.figures import FIGURE_DIR, HEADLINE_FIGURE, SHORTCUT_FIGURE

    (out / FIGURE_DIR).mkdir(parents=True)
    for name in (HEADLINE_FIGURE, SHORTCUT_FIGURE):
        (out / FIGURE_DIR / name).write_bytes(b"\x89PNG\r\n")
    return [f"{FIGURE_DIR}/{HEADLINE_FIGURE}", f"{FIGURE_DIR}/{SHORTCUT_FIGURE}"]


def test_index_shows_the_figures_that_exist(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(RESULTS))
    page = pages.write_index(tmp_path, RECORD).read_text()
    assert "<img" not in page
    srcs = _figure_files(tmp_path)
    page = pages.write_index(tmp_path, RECORD).read_text()
    found = re.findall(r"<img src='([^']+)'", page)
    assert found == srcs and all((tmp_path / s).is_file() for s in found)
    assert page.index(srcs[0]) < page.index("<h2>Verdict</h2>") < page.index("<h2>Shortcut checks</h2>") < page.index(srcs[1])
    (tmp_path / srcs[1]).unlink()
    page = pages.write_index(tmp_path, RECORD).read_text()
    assert re.findall(r"<img src='([^']+)'", page) == srcs[:1]


def test_index_without_results_has_no_broken_images(tmp_path):
    page = pages.write_index(tmp_path, RECORD).read_text()
    assert "<img" not in page and "No results.json yet" in page


def test_index_escapes_run_fields_and_record(tmp_path):
    evil = "<script>alert(1)</script>"
    results = json.loads(json.dumps(RESULTS))
    results["configurations"][0]["task"] = evil
    results["headline"]["text"] = f"best {evil}"
    results["shortcut_checks"]["leave_one_source_out"] = [{"held_out": evil, "accuracy": {"value": 0.5}}]
    (tmp_path / "results.json").write_text(json.dumps(results))
    page = pages.write_index(tmp_path, {**RECORD, "profile": evil, "versions": {evil: evil}}).read_text()
    assert "<script" not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 7


THREE = "covid_normal_pneumonia__efficientnet_lite0__deep__nodecomp__seed{}"
HEAD = "covid_vs_normal__efficientnet_lite0__deep__nodecomp__seed0"


def _scorecard_results() -> dict:
    """results.json parts of a profile whose three-class deep configuration ran two seeds of the baseline and
    of the ``lung`` variant, plus the paper's task headline run; ``scorecard_summary`` from the real code."""
    from cxrstudy.evaluation.scorecard import check_goals
    from cxrstudy.evaluation.seeds import scorecard_summary

    runs, card = [], []
    values = {("baseline", 0): (0.70, 0.97), ("baseline", 1): (0.74, 0.95), ("lung", 0): (0.86, 0.95),
              ("lung", 1): (0.90, 0.93), ("head", 0): (0.60, 0.96)}
    for (variant, seed), (ieee, paper) in values.items():
        run_id = HEAD if variant == "head" else THREE.format(seed) + ("__lung" if variant == "lung" else "")
        task = "covid_vs_normal" if variant == "head" else "covid_normal_pneumonia"
        runs.append({"run_id": run_id, "task": task, "backbone": "efficientnet_lite0", "scenario": "deep",
                     "decomposition": False, "seed": seed, "variant": "baseline" if variant == "head" else variant})
        for metric, value in (("ieee8023_covid_vs_pneumonia_auc", ieee), ("paper_task_accuracy", paper)):
            card.append({"run_id": run_id, "variant": runs[-1]["variant"], "task": task, "metric": metric,
                         "value": value, "ci_low": value - 0.03, "ci_high": value + 0.03, "n": 50,
                         "method": "model"})
    goals = check_goals(card)
    return {"runs": runs, "scorecard": card, "goals": goals, "scorecard_summary": scorecard_summary(runs, card, goals),
            "headline": {"text": "h", "run_id": HEAD},
            "recommended_variant": {"name": "lung", "task": "covid_normal_pneumonia", "scenario": "deep",
                                    "rule": "Keep validation accuracy >= 0.9; the highest contrast wins."}}


def test_scorecard_rows_per_configuration_over_seeds():
    headers = pages.goal_headers()
    assert [h["goal"] for h in headers] == ["S1", "S2", "S3", "S4"]
    assert headers[0]["rule"] == ">= 80" and headers[2]["rule"] == "<= chance + 5 points"
    results = _scorecard_results()
    rows = pages.scorecard_table_rows(results)
    assert [(r["run"], r["variant"], r["seeds"], r["recommended"]) for r in rows] == [
        ("deep nodecomp (covid_normal_pneumonia)", "baseline", "2 cross-validations", False),
        ("deep nodecomp (covid_normal_pneumonia)", "lung", "2 cross-validations", True),
        ("deep nodecomp (covid_vs_normal)", "baseline", "out of fold", False),
    ]
    base, lung, head = rows
    # S1 of the baseline: seed mean 72.0, sd over the two seeds, intervals 67.0 to 77.0: missed
    assert base["goals"][0]["metric"] == {"value": "72.0", "sd": "2.8", "interval": "67.0, 77.0"}
    assert base["goals"][0]["met"] == "missed" and base["goals"][0]["clears"] == "not all clear"
    # S1 of lung: mean 88 meets 80 and both intervals (83-89, 87-93) clear it
    assert lung["goals"][0]["met"] == "met" and lung["goals"][0]["clears"] == "all clear"
    # the paper's task is no goal; S2 and S3 were not computed here (undetermined); S4 needs a pneumonia class
    assert [c["met"] for c in head["goals"]] == ["missed", "undetermined", "undetermined", "n/a"]
    assert head["goals"][0]["metric"] == {"value": "60.0", "sd": "", "interval": "57.0, 63.0"}
    assert lung["n_met"] == 1 and lung["n_judged"] == 1
    readme = pages.readme_scorecard_rows(results)  # the headline's configuration, baseline beside variants
    assert [(r["variant"], r["seeds"]) for r in readme] == [
        ("baseline", "2 cross-validations"), ("lung", "2 cross-validations"), ("baseline", "out of fold")]
    block = pages.recommended_block(results)
    assert block["name"] == "lung" and block["goals"] == lung["goals"]


def test_index_and_readme_show_the_scorecard(tmp_path):
    from cxrstudy.evaluation.figures import FIGURE_DIR, SCORECARD_FIGURE

    results = {**json.loads(json.dumps(RESULTS)), **_scorecard_results()}
    (tmp_path / "results.json").write_text(json.dumps(results))
    page = pages.write_index(tmp_path, RECORD).read_text()
    assert "<h2>Confound-free scorecard: the paper's number beside" in page and "<img" not in page
    assert "<th>S3 &lt;= chance + 5 points</th>" in page
    assert "<td>deep nodecomp (covid_normal_pneumonia)</td><td><b>lung (recommended)</b></td><td>2 cross-validations</td>" \
        "<td>88.0 <small>± 2.8</small> <small>[83.0, 93.0]</small> <b>met</b> <small>all clear</small></td>" in page
    assert "<b>Recommended variant: lung</b> (covid_normal_pneumonia, deep). Keep validation accuracy &gt;= 0.9" in page
    assert "S1 <b>met</b> (all clear); S2 <b>undetermined</b>" in page
    assert page.index("<h2>What the numbers say</h2>") < page.index("<h2>Confound-free scorecard")
    assert page.index("<h2>Confound-free scorecard") < page.index("<h2>Every configuration, out of fold</h2>")
    assert page.index("<h2>Every configuration, out of fold</h2>") < page.index("<h2>Verdict</h2>")
    (tmp_path / FIGURE_DIR).mkdir()
    (tmp_path / FIGURE_DIR / SCORECARD_FIGURE).write_bytes(b"\x89PNG\r\n")
    page = pages.write_index(tmp_path, RECORD).read_text()
    assert f"<img src='{FIGURE_DIR}/{SCORECARD_FIGURE}'" in page
    md = pages.readme_results(results, RECORD)
    assert "**Confound-free scorecard**" in md and "**Recommended variant: lung**" in md
    rows = [line for line in md.splitlines() if line.startswith("| deep nodecomp")]
    assert rows[1] == "| deep nodecomp (covid_normal_pneumonia) | **lung** (recommended) | 2 cross-validations | " \
        "88.0 ± 2.8 [83.0, 93.0] met (all clear) | – undetermined | – undetermined | – undetermined | 1 of 1 |"
    assert len(rows) == 3


def test_index_shows_the_lung_stage(tmp_path):
    """results.json's lung_segmentation block (from lungs/summary.json) and the overlay strip reach index.html."""
    from cxrstudy.reporting.results import lung_segmentation

    out = tmp_path / "p"
    (out / "lungs").mkdir(parents=True)
    assert lung_segmentation(out) is None
    summary = {"dice": {"value": 0.957, "ci_low": 0.947, "ci_high": 0.966},
               "iou": {"value": 0.92, "ci_low": 0.90, "ci_high": 0.935}, "n_test_masks": 45,
               "qc_pass_rate": {"nih": 0.992, "mhh": 0.99}, "train_seconds": 210.4, "extra": 1}
    (out / "lungs" / "summary.json").write_text(json.dumps(summary))
    block = lung_segmentation(out)
    assert set(block) == {"dice", "iou", "n_test_masks", "qc_pass_rate", "train_seconds"}
    (out / "results.json").write_text(json.dumps({"lung_segmentation": block}))
    (out / "lungs" / "overlays.png").write_bytes(b"\x89PNG")
    html = pages.index_html(out, {"profile": "p", "steps": []})
    assert "test Dice 0.957 [0.947, 0.966]" in html and "nih 99.2%" in html and "src='lungs/overlays.png'" in html
