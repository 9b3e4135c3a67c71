"""Run record helpers, index.html and the README's results section."""

from __future__ import annotations

import json

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
    assert "| covid_vs_normal | shallow | off | 95.0 [90.0, 99.0] |" in text
    assert "2026-11-26" in text and "abcdef1234" in text and "Verdict" in text
    assert "0.1 min for all steps" in text
