"""The headline and shortcut-check figures: written where index.html looks for them, absent when there is no data."""

from __future__ import annotations

import json

from PIL import Image

from cxrstudy import reporting
from cxrstudy.evaluation import figures as F


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
    (tmp_path / "results.json").write_text(json.dumps({"runs": ENTRIES, "shortcut_checks": CHECKS}))
    page = reporting.write_index(tmp_path, {"profile": "t", "status": "ok", "steps": []}).read_text()
    assert f"<img src='{F.FIGURE_DIR}/{F.HEADLINE_FIGURE}'" in page
    assert f"<img src='{F.FIGURE_DIR}/{F.SHORTCUT_FIGURE}'" in page


def test_shortcut_figure_without_checks_removes_a_stale_one(tmp_path):
    path = tmp_path / F.SHORTCUT_FIGURE
    path.write_bytes(b"old")
    assert F.shortcut_figure({"level": "linear heads"}, path) is None and not path.exists()
