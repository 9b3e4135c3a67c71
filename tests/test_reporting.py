"""Run record helpers, index.html and the README's results section."""

from __future__ import annotations

import json
import re

import pytest

from cxrstudy import config, reporting

RESULTS = {
    "runs": [
        {
            "task": "covid_vs_normal",
            "backbone": "efficientnet_lite0",
            "scenario": "deep",
            "decomposition": True,
            "seed": 0,
            "test": {
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
            "test": {"accuracy": {"value": 0.95, "ci_low": 0.9, "ci_high": 0.99}},
        },
    ],
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
    v = reporting.versions()
    assert v["torch"] != "not installed" and v["python"].count(".") == 2
    assert reporting.device_info("cpu")["resolved"] == "cpu"
    with pytest.raises(ValueError, match="bad device"):
        reporting.device_info("tpu")
    assert len(reporting.git_info()["commit"]) in (40, 7)  # a commit hash, or "unknown" outside git


def test_index_shows_results_sorted_and_escaped(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(RESULTS))
    (tmp_path / "html").mkdir()
    (tmp_path / "html" / "00_data.html").write_text("<html></html>")
    page = reporting.write_index(tmp_path, RECORD).read_text()
    assert page.index("95.0 <small>[90.0, 99.0]</small>") < page.index("90.0 <small>[85.0, 95.0]</small>")
    assert "94.17" in page and "href='html/00_data.html'" in page
    assert "&lt;b&gt;here&lt;/b&gt;" in page and "<b>here</b>" not in page
    assert "97.0" in page  # shortcut check as a percentage


def test_index_without_results(tmp_path):
    page = reporting.write_index(tmp_path, {**RECORD, "status": "failed"}).read_text()
    assert "No results.json yet" in page and "Run status: failed" in page


def test_update_readme_replaces_only_its_section(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "REPORTS_DIR", tmp_path / "reports")
    out = tmp_path / "reports" / "default"
    out.mkdir(parents=True)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{reporting.README_START}\nold\n{reporting.README_END}\nrest\n")
    with pytest.raises(FileNotFoundError, match="make reproduce PROFILE=default"):
        reporting.update_readme("default", readme)
    (out / "results.json").write_text(json.dumps(RESULTS))
    (out / "run.json").write_text(json.dumps(RECORD))
    reporting.update_readme("default", readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old" not in text
    assert "| covid_vs_normal | shallow | off | – | 95.0 [90.0, 99.0] |" in text
    assert "2026-11-26" in text and "abcdef1234" in text and "Verdict" in text
    assert "0.1 min for all steps" in text


def test_readme_table_is_markdown_from_data(tmp_path, monkeypatch):
    results = json.loads(json.dumps(RESULTS))
    results["runs"][1]["task"] = "a|b"
    results["runs"][0]["val_accuracy"] = 0.96
    results["runs"][0]["test"]["hard_rule"] = {"accuracy": {"value": 0.88, "ci_low": 0.83, "ci_high": 0.93}}
    text = reporting.readme_results(results, RECORD)
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0].startswith("| task | scenario | decomposition | validation accuracy % | accuracy % (summed "
                               "probabilities) | accuracy % (DeTraC hard rule) |")
    assert table[2:4] == [
        "| a\\|b | shallow | off | – | 95.0 [90.0, 99.0] | – | – | – | – |",
        "| covid_vs_normal | deep | on | 96.0 | 90.0 [85.0, 95.0] | 88.0 [83.0, 93.0] | 80.0 [70.0, 90.0] | – | 5.0 |",
    ]
    assert table[4:] == [
        f"| {config.PAPER_CITATION} | reported | | | 94.17 | | | | |",
        f"| {config.DETRAC_CITATION} | reported | on | | | 93.1 | | | |",
    ]
    assert not any("<" in line or ">" in line for line in table)


def _figure_files(out):
    from cxrstudy.evaluation.figures import FIGURE_DIR, HEADLINE_FIGURE, SHORTCUT_FIGURE

    (out / FIGURE_DIR).mkdir(parents=True)
    for name in (HEADLINE_FIGURE, SHORTCUT_FIGURE):
        (out / FIGURE_DIR / name).write_bytes(b"\x89PNG\r\n")
    return [f"{FIGURE_DIR}/{HEADLINE_FIGURE}", f"{FIGURE_DIR}/{SHORTCUT_FIGURE}"]


def test_index_shows_the_figures_that_exist(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(RESULTS))
    page = reporting.write_index(tmp_path, RECORD).read_text()
    assert "<img" not in page and "appears here once the evaluation notebook (05) has run" in page
    srcs = _figure_files(tmp_path)
    page = reporting.write_index(tmp_path, RECORD).read_text()
    found = re.findall(r"<img src='([^']+)'", page)
    assert found == srcs and all((tmp_path / s).is_file() for s in found)
    assert page.index(srcs[0]) < page.index("<h2>Verdict</h2>") < page.index("<h2>Shortcut checks</h2>") < page.index(srcs[1])
    (tmp_path / srcs[1]).unlink()
    page = reporting.write_index(tmp_path, RECORD).read_text()
    assert re.findall(r"<img src='([^']+)'", page) == srcs[:1]


def test_index_without_results_has_no_broken_images(tmp_path):
    page = reporting.write_index(tmp_path, RECORD).read_text()
    assert "<img" not in page and "No results.json yet" in page


def test_index_escapes_run_fields_and_record(tmp_path):
    evil = "<script>alert(1)</script>"
    results = json.loads(json.dumps(RESULTS))
    results["runs"][0]["task"] = evil
    results["headline"]["text"] = f"best {evil}"
    results["shortcut_checks"]["leave_one_source_out"] = [{"held_out": evil, "accuracy": {"value": 0.5}}]
    (tmp_path / "results.json").write_text(json.dumps(results))
    page = reporting.write_index(tmp_path, {**RECORD, "profile": evil, "versions": {evil: evil}}).read_text()
    assert "<script" not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 7


def _goal(goal, metric, run, value, met, variant="baseline", target=0.8):
    return {"goal": goal, "run_id": run, "variant": variant, "metric": metric, "op": ">=", "target": target,
            "value": value, "ci_low": None if value is None else value - 0.05,
            "ci_high": None if value is None else value + 0.05, "met": met}


HEAD = "covid_vs_normal__efficientnet_lite0__deep__nodecomp__seed0"
LUNGCROP = "covid_vs_normal__efficientnet_lite0__deep__nodecomp__seed0__lungs"
GOALS = [
    _goal("S1", "ieee8023_covid_vs_pneumonia_auc", HEAD, 0.7, False),
    _goal("S5", "paper_task_accuracy", HEAD, 0.95, True, target=0.9417),
    _goal("S4", "nih_pneumonia_vs_normal_auc", HEAD, None, None),
    _goal("S1", "ieee8023_covid_vs_pneumonia_auc", "other_run", 0.9, True),
    _goal("S1", "ieee8023_covid_vs_pneumonia_auc", LUNGCROP, 0.85, True, variant="lung_crop"),
]


def test_goal_rows_and_headers():
    headers = reporting.goal_headers()
    assert [h["goal"] for h in headers] == ["S1", "S2", "S3", "S4", "S5"]
    assert headers[0]["rule"] == ">= 80" and headers[2]["rule"] == "<= majority + 5 points"
    assert headers[4]["rule"] == ">= 94.17"
    results = {"goals": GOALS, "headline": {"run_id": HEAD}}
    rows = reporting.goal_rows(results)
    assert [(r["run_id"], r["variant"]) for r in rows] == [(HEAD, "baseline"), ("other_run", "baseline"),
                                                            (LUNGCROP, "lung_crop")]
    head = rows[0]
    assert head["run"] == "deep nodecomp seed0 (covid_vs_normal)"
    assert [c["met"] for c in head["goals"]] == ["missed", "n/a", "n/a", "n/a", "met"]
    assert head["goals"][0]["metric"] == {"value": "70.0", "interval": "65.0, 75.0"}
    assert head["n_met"] == 1 and head["n_judged"] == 2
    readme = reporting.readme_goal_rows(results)
    assert [r["run_id"] for r in readme] == [HEAD, LUNGCROP]  # the headline run and every variant


def test_index_and_readme_show_the_scorecard(tmp_path):
    from cxrstudy.evaluation.figures import FIGURE_DIR, SCORECARD_FIGURE

    results = {**json.loads(json.dumps(RESULTS)), "goals": GOALS, "headline": {"text": "h", "run_id": HEAD}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    page = reporting.write_index(tmp_path, RECORD).read_text()
    assert "<h2>Confound-free scorecard</h2>" in page and "<img" not in page
    assert "<th>S3 &lt;= majority + 5 points</th>" in page
    assert "<td>deep nodecomp seed0 (covid_vs_normal)</td><td>baseline</td><td>70.0 <small>[65.0, 75.0]</small> " \
        "<b>missed</b></td>" in page
    assert page.index("<h2>Confound-free scorecard</h2>") < page.index("<h2>Verdict</h2>")
    (tmp_path / FIGURE_DIR).mkdir()
    (tmp_path / FIGURE_DIR / SCORECARD_FIGURE).write_bytes(b"\x89PNG\r\n")
    page = reporting.write_index(tmp_path, RECORD).read_text()
    assert f"<img src='{FIGURE_DIR}/{SCORECARD_FIGURE}'" in page
    md = reporting.readme_results(results, RECORD)
    assert "**Confound-free scorecard**" in md
    rows = [line for line in md.splitlines() if line.startswith("| deep nodecomp")]
    assert rows[0] == "| deep nodecomp seed0 (covid_vs_normal) | baseline | 70.0 [65.0, 75.0] missed | – n/a | " \
        "– n/a | – n/a | 95.0 [90.0, 100.0] met | 1 of 2 |"
    assert len(rows) == 2 and "lung_crop" in rows[1] and "other_run" not in md


def test_index_shows_the_lung_stage(tmp_path):
    """results.json's lung_segmentation block (from lungs/summary.json) and the overlay strip reach index.html."""
    from cxrstudy import reporting
    from cxrstudy.evaluation.report import lung_segmentation

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
    html = reporting.index_html(out, {"profile": "p", "steps": []})
    assert "test Dice 0.957 [0.947, 0.966]" in html and "nih 99.2%" in html and "src='lungs/overlays.png'" in html
