"""The verdict's sentences follow the numbers: each check speaks only when present, in a fixed order."""

from __future__ import annotations

from cxrstudy.evaluation import report
from cxrstudy.evaluation import verdict as V


def m(value, lo=None, hi=None):
    return {"value": value, "ci_low": lo, "ci_high": hi, "n_boot": 100}


def results(**checks):
    return {
        "headline": {"text": "Headline sentence.", "accuracy": m(0.9, 0.8, 0.95)},
        "shortcut_checks": checks,
        "comparisons": {
            "decomposition_effect": [
                {"task": "covid_vs_normal", "scenario": "deep", "accuracy_difference": m(-0.039, -0.086, 0.0)},
                {"task": "covid_vs_normal", "scenario": "finetune", "accuracy_difference": m(-0.034, -0.058, -0.011)},
            ]
        },
    }


def test_empty_results_give_only_the_closing_sentence():
    assert V.verdict({}) == [V.CLOSING]
    assert report.verdict is V.verdict  # still reachable where notebooks and tests looked for it


def test_headline_first_then_interval_warning_then_closing():
    out = V.verdict(results())
    assert out[0] == "Headline sentence."
    assert out[1].startswith("The interval is 15 points wide")
    assert out[-1] == V.CLOSING
    assert "deep -3.9 [-8.6, +0.0]; finetune -3.4 [-5.8, -1.1]" in out[-2]
    assert "above zero in 0 of 2 scenarios and below zero in 1: no evidence" in out[-2]


def test_source_identification_strength():
    strong = V.source_identification({"source_identification": {"accuracy": 0.71, "majority_baseline": 0.46}})
    assert "71% accuracy (majority baseline 46%" in strong[0] and "hospital rather than the disease" in strong[0]
    assert strong[1].startswith("The shortcut checks use linear heads")
    weak = V.source_identification({"source_identification": {"accuracy": 0.5, "majority_baseline": 0.45}})
    assert "not trivially visible" in weak[0]
    assert V.source_identification({}) == []


def test_masking_says_whether_the_lungs_matter():
    checks = {
        "unmasked": {"accuracy": m(0.936, 0.904, 0.965)},
        "masked_lungs": {"accuracy": m(0.916, 0.88, 0.951)},
        "lungs_only": {"accuracy": m(0.936, 0.897, 0.97)},
    }
    (sentence,) = V.masking(checks)
    assert "still reaches 91.6% [88.0, 95.1] test accuracy (whole image: 93.6% [90.4, 96.5]" in sentence
    assert "does not need the lungs" in sentence
    checks["masked_lungs"] = {"accuracy": m(0.6, 0.5, 0.7)}
    assert "lung field matters" in V.masking(checks)[0]
    assert V.masking({"masked_lungs": {"accuracy": m(None)}}) == []


def test_leave_one_source_out_flags_sources_the_head_misses():
    out = V.leave_one_source_out(
        {
            "leave_one_source_out": [
                {"held_out": "actualmed", "n": 40, "labels": ["covid", "normal"], "accuracy": m(0.6, 0.45, 0.75)},
                {"held_out": "nih", "n": 443, "labels": ["normal"], "accuracy": m(0.034, 0.016, 0.055)},
                {"held_out": "x", "n": 3, "labels": ["covid"], "skipped": "too few"},
            ]
        }
    )
    assert out[0] == (
        "Held-out whole sources (trained without them): accuracy actualmed 60.0% [45.0, 75.0] (n=40); "
        "nih 3.4% [1.6, 5.5] (n=443)."
    )
    assert len(out) == 2 and "recognises only 3% of that source's normal images" in out[1]


def test_same_hospital_and_saliency():
    sh = V.same_hospital({"same_hospital": {"source": "actualmed", "n": 40, "probe": {"accuracy": m(0.875, 0.76, 0.97)}}})
    assert sh == [
        "Within the one hospital with both COVID-19 and normal films (actualmed, n=40), a cross-validated linear "
        "head reaches 87.5% [76.0, 97.0]: too few images for a firm conclusion."
    ]
    assert V.saliency({"saliency_in_lung_share": 0.68, "saliency_uniform_reference": 0.49})[0].endswith("there).")
    assert "does not look mainly" in V.saliency({"saliency_in_lung_share": 0.5, "saliency_uniform_reference": 0.49})[0]
    small = V.saliency({"saliency_in_lung_share": 0.9, "saliency": {"cam_grid": 3}})[0]
    assert "only 3x3 cells" in small


def test_decomposition_names_tasks_when_there_are_two():
    dec = [
        {"task": "covid_vs_normal", "scenario": "deep", "accuracy_difference": m(0.05, 0.01, 0.09)},
        {"task": "covid_normal_pneumonia", "scenario": "deep", "accuracy_difference": m(0.01, -0.02, 0.04)},
        {"task": "covid_normal_pneumonia", "scenario": "shallow", "accuracy_difference": m(None)},
    ]
    (sentence,) = V.decomposition({"decomposition_effect": dec})
    assert "deep (covid_vs_normal) +5.0 [+1.0, +9.0]; deep (covid_normal_pneumonia) +1.0" in sentence
    assert sentence.endswith("above zero in 1 of 2 scenarios and below zero in 0.")
