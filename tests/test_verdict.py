"""The verdict's sentences follow the numbers: each check speaks only when present, in a fixed order."""

from __future__ import annotations

from cxrstudy.evaluation import verdict as V


def m(value, lo=None, hi=None):
    return {"value": value, "ci_low": lo, "ci_high": hi, "n_boot": 100}


def results(**checks):
    return {
        "headline": {"text": "Headline sentence.", "accuracy": m(0.9, 0.8, 0.95)},
        "shortcut_checks": checks,
        "comparisons": {
            "decomposition_effect": [
                {
                    "task": "covid_vs_normal",
                    "scenario": "deep",
                    "accuracy_difference": m(-0.039, -0.086, 0.0),
                },
                {
                    "task": "covid_vs_normal",
                    "scenario": "finetune",
                    "accuracy_difference": m(-0.034, -0.058, -0.011),
                },
            ]
        },
    }


def test_empty_results_give_only_the_closing_sentence():
    assert V.verdict({}) == [V.NOT_DIAGNOSTIC]
    assert not any("Trust the numbers" in s for s in V.verdict(results()))


def test_headline_first_then_interval_warning_then_closing():
    out = V.verdict(results())
    assert out[0] == "Headline sentence."
    assert out[1].startswith("The interval is 15 points wide")
    assert out[-1] == V.NOT_DIAGNOSTIC
    assert "deep -3.9 [-8.6, +0.0]; finetune -3.4 [-5.8, -1.1]" in out[-2]
    assert "above zero in 0 of 2 scenarios and below zero in 1: no evidence" in out[-2]


def test_closing_states_the_cross_validation_and_unequal_budgets():
    design = {"epochs_run_by_scenario": {"shallow": [14], "deep": [3], "finetune": [3], "scratch": [3]}}
    runs = [
        {"scenario": "shallow", "epochs": 30},
        {"scenario": "deep", "epochs": 3},
        {"scenario": "finetune", "epochs": 9},
        {"scenario": "scratch", "epochs": 3},
    ]
    protocol = {"kind": "cv", "folds": 5, "repeats": 1}
    (text,) = V.closing({"comparisons": {"design": design}, "runs": runs, "protocol": protocol})
    assert "Trust the numbers" not in text
    assert "cross-validated in 5 patient-grouped folds once" in text and "per-fold spread" in text
    assert "the image scenarios trained for unequal numbers of epochs (deep 3, finetune 9, scratch 3)" in text
    assert "shallow trains only a linear head on cached features (14 epochs run)" in text
    assert "paired interval excludes zero" in text and text.endswith(V.NOT_DIAGNOSTIC)
    runs = [{"scenario": "deep", "epochs": 3}, {"scenario": "scratch", "epochs": 3}]
    (text,) = V.closing({"comparisons": {"design": {"epochs_run_by_scenario": {"deep": [3]}}}, "runs": runs,
                         "protocol": {**protocol, "repeats": 2}})
    assert "repeated 2 times" in text and "deep, scratch had equal budgets (3 epochs, the same optimizer steps)" in text
    assert "unequal" not in text
    assert V.closing({}) == [V.NOT_DIAGNOSTIC] and "Actualmed" in V.NOT_DIAGNOSTIC


def test_source_identification_across_labels_is_read_against_the_label_only_rule():
    sid = {"accuracy": 0.71, "majority_baseline": 0.46, "label_only_baseline": 0.672}
    out = V.source_identification({"source_identification": sid})
    assert "71% accuracy across all labels" in out[0] and "knew only the label" in out[0] and "67%" in out[0]
    assert "mostly restates the label" in out[0] and "hospital rather than the disease" not in out[0]
    assert "easy to see" not in " ".join(out)
    assert out[-1].startswith("The shortcut checks use linear heads")
    far = V.source_identification({"source_identification": {**sid, "accuracy": 0.95}})
    assert "only the 28 points above that rule come from the images" in far[0]
    assert V.source_identification({}) == []


def test_source_identification_within_label_reads_against_chance():
    within = [
        {"label": "normal", "n": 457, "sources": ["actualmed", "nih"], "value": 0.52, "ci_low": 0.48,
         "ci_high": 0.54, "chance": 0.5, "p_value": 0.4, "reading": "no source signal"},
        {"label": "covid", "n": 963, "sources": ["cxnet", "ieee8023"], "value": 0.62, "ci_low": 0.58,
         "ci_high": 0.65, "chance": 0.5, "p_value": 0.05, "reading": "source signal present"},
        {"label": "pneumonia", "n": 3, "sources": [], "value": None, "note": "too few"},
    ]
    checks = {"source_identification": {"accuracy": 0.71, "majority_baseline": 0.46}, "source_id_within_label": within}
    text = V.source_identification(checks)[1]
    assert (
        "normal films (actualmed, nih; n=457) balanced accuracy 52.0% [48.0, 54.0] against a chance of 50%, "
        "permutation p = 0.40: no source signal" in text
    )
    assert "covid films (cxnet, ieee8023; n=963) balanced accuracy 62.0% [58.0, 65.0]" in text
    assert "source signal present" in text and "pneumonia films" not in text
    assert text.endswith(
        "Among covid films the repositories look different beyond the label: a model can tell "
        "sources apart there, which becomes a shortcut wherever label and source go together."
    )
    only_normal = V.source_identification({"source_id_within_label": within[:1]})[0]
    assert only_normal.endswith("no source signal.")
    # without a stored reading the entry is read from its interval against chance + 5 points
    assert V._within_reading({**within[1], "reading": None}) == "source signal present"


def test_masking_claims_only_what_the_three_views_support():
    checks = {
        "unmasked": {"accuracy": m(0.936, 0.904, 0.965)},
        "masked_lungs": {"accuracy": m(0.916, 0.88, 0.951)},
        "lungs_only": {"accuracy": m(0.936, 0.897, 0.97)},
        "lung_region": "fixed rectangle",
    }
    (sentence,) = V.masking(checks)
    assert (
        "93.6% [90.4, 96.5] out-of-fold accuracy on the whole film, 91.6% [88.0, 95.1] with the lungs hidden"
        in sentence
    )
    assert "central rectangle" in sentence and "signal is everywhere" in sentence
    assert "not show that the lungs are unused" in sentence and "does not need the lungs" not in sentence
    checks["masked_lungs"] = {"accuracy": m(0.6, 0.5, 0.7)}
    checks["lung_region"] = "segmented"
    hidden = V.masking(checks)[0]
    assert "Hiding the lungs costs 34 points" in hidden and "(lung region: segmented lungs)" in hidden
    checks["masked_lungs"], checks["lungs_only"] = {"accuracy": m(0.93)}, {"accuracy": m(0.7)}
    assert "outside the lung region" in V.masking(checks)[0]
    checks["masked_lungs"] = {"accuracy": m(0.7)}
    assert "spread over the lungs and their surroundings" in V.masking(checks)[0]
    assert V.masking({"masked_lungs": {"accuracy": m(None)}}) == []


def test_leave_one_source_out_reports_sensitivity_with_the_training_composition():
    nih = {
        "held_out": "nih",
        "n": 443,
        "labels": ["normal"],
        "accuracy": m(0.034, 0.016, 0.055),
        "sensitivity": {"normal": m(0.034, 0.016, 0.055)},
        "n_train": 980,
        "train_counts": {"covid": 963, "normal": 17},
        "train_sources": {"normal": {"actualmed": 14, "figure1": 3}},
    }
    am = {
        "held_out": "actualmed",
        "n": 40,
        "labels": ["covid", "normal"],
        "accuracy": m(0.6, 0.45, 0.75),
        "sensitivity": {"covid": m(0.808, 0.667, 0.944), "normal": m(0.214, 0.0, 0.429)},
        "train_counts": {"covid": 937, "normal": 446},
    }
    out = V.leave_one_source_out(
        {"leave_one_source_out": [am, nih, {"held_out": "x", "n": 3, "skipped": "few"}]}
    )
    assert out[0] == (
        "Each source held out of training in turn, a linear head on frozen features recognises (sensitivity per "
        "class on the held-out source): actualmed covid 80.8% [66.7, 94.4], normal 21.4% [0.0, 42.9] (n=40); "
        "nih normal 3.4% [1.6, 5.5] (n=443)."
    )
    assert len(out) == 3
    assert "does not carry over to actualmed" in out[1]
    assert (
        "the head saw 963 covid and 17 normal films (normal: actualmed 14, figure1 3) and calls 3% of nih's "
        "normal films normal" in out[2]
    )
    assert "with only 17 normal films left" in out[2] and "not how nih films look" in out[2]
    old = V.leave_one_source_out({"leave_one_source_out": [{**nih, "train_counts": None}]})
    assert "composition was not recorded" in old[1]
    few = V.leave_one_source_out({"leave_one_source_out": [{**am, "counts": {"covid": 26, "normal": 3}}]})
    assert (
        "calls 21% of actualmed's 3 normal films normal: with only 3 such films held out, too few" in few[1]
    )


def test_same_hospital_and_saliency():
    sh = V.same_hospital(
        {"same_hospital": {"source": "actualmed", "n": 40, "probe": {"accuracy": m(0.875, 0.76, 0.97)}}}
    )
    assert sh == [
        "On the one hospital with both COVID-19 and normal films (actualmed, n=40, held out of every training), a "
        "linear head on frozen features trained on every other source reaches 87.5% [76.0, 97.0] accuracy and n/a "
        "balanced accuracy: too few images for a firm conclusion."
    ]
    sal = {
        "n_used": 16,
        "cam_grid": 5,
        "image_size": 160,
        "in_lung_share": {**m(0.73, 0.69, 0.77), "n": 16},
        "uniform_reference": {**m(0.49, 0.49, 0.49), "n": 16},
        "excess_over_uniform": m(0.24, 0.2, 0.28),
    }
    coarse = V.saliency({"saliency_in_lung_share": 0.73, "saliency": sal})[0]
    assert "on 16 films of its own held-out fold" in coarse and "stratified by true class and outcome" in coarse
    assert (
        "73.0% [69.0, 77.0] of the saliency inside the central rectangle, against 49.0% for a uniform"
        in coarse
    )
    assert "only 5x5 cells at 160 px input, too coarse" in coarse
    fine = V.saliency({"lung_region": "segmented", "saliency": {**sal, "cam_grid": 12}})[0]
    assert "segmented lungs" in fine and fine.endswith("more than a uniform map would put there.")
    flat = V.saliency({"saliency": {**sal, "cam_grid": 12, "excess_over_uniform": m(0.01, -0.03, 0.05)}})[0]
    assert flat.endswith("no different from a uniform map.")
    assert V.saliency({}) == []


def test_scorecard_sentence_names_each_goal_of_the_headline_run():
    res = {
        "headline": {"run_id": "r", "task": "covid_vs_normal", "scenario": "deep", "decomposition": False},
        "scorecard": [
            {
                "run_id": "r",
                "variant": "baseline",
                "metric": "ieee8023_covid_vs_pneumonia_auc",
                "value": 0.7,
                "ci_low": 0.6,
                "ci_high": 0.78,
                "method": "probe",
                "confounders": {"view_only": {"value": 0.61}, "demographics_only": {"value": 0.55},
                                "confounders_only": {"value": 0.64},
                                "view_matched": {"value": 0.66, "ci_low": 0.5, "ci_high": 0.8, "n_pairs": 90}},
            },
            {
                "run_id": "r",
                "variant": "baseline",
                "metric": "nih_pneumonia_vs_normal_auc",
                "value": None,
                "ci_low": None,
                "ci_high": None,
                "method": "model",
                "note": "no pneumonia class",
            },
        ],
        "goals": [
            {
                "goal": "S1",
                "run_id": "r",
                "variant": "baseline",
                "metric": "ieee8023_covid_vs_pneumonia_auc",
                "op": ">=",
                "target": 0.8,
                "value": 0.7,
                "ci_low": 0.6,
                "ci_high": 0.78,
                "status": "missed",
                "met": False,
            },
            {
                "goal": "S4",
                "run_id": "r",
                "variant": "baseline",
                "metric": "nih_pneumonia_vs_normal_auc",
                "op": ">=",
                "target": 0.85,
                "value": None,
                "ci_low": None,
                "ci_high": None,
                "met": None,
            },
            {
                "goal": "S1",
                "run_id": "other",
                "variant": "baseline",
                "metric": "ieee8023_covid_vs_pneumonia_auc",
                "op": ">=",
                "target": 0.8,
                "value": 0.9,
                "ci_low": 0.8,
                "ci_high": 1.0,
                "status": "met",
                "met": True,
            },
        ],
    }
    (text,) = V.scorecard(res)
    assert text.startswith(
        "Confound-free scorecard of the headline covid_vs_normal configuration (deep, decomposition off"
    )
    assert (
        "S1 ieee8023 COVID-19 vs other pneumonia ROC-AUC 70.0% [60.0, 78.0] (linear probe on the out-of-fold "
        "features) (best confounder-only rule confounders only 64.0%; view-matched 66.0% [50.0, 80.0]), "
        "goal >= 80%: missed" in text
    )
    assert "S4 NIH pneumonia vs normal ROC-AUC not computed (no pneumonia class)" in text
    assert "Goals met: 0 of the 1 that could be judged (met: the whole interval" in text
    assert V.scorecard({"headline": {"run_id": "r"}}) == []


def test_comparisons_are_clustered_and_holm_adjusted():
    comps = {
        "scenarios_mcnemar": [
            {"a": "shallow", "b": "scratch", "mcnemar": {"p_value": 0.001, "p_holm": 0.004}}
        ],
        "decomposition_effect": [{"scenario": "deep", "mcnemar": {"p_value": 0.04, "p_holm": 0.12}}],
        "multiplicity": {"n_tests": 2, "n_below_0_05_raw": 2, "n_below_0_05_holm": 1},
    }
    (text,) = V.comparisons(comps)
    assert text.startswith("2 paired comparisons") and "clustered on patient groups (Obuchowski 1998)" in text
    assert (
        "2 have p < 0.05 before and 1 after Holm's adjustment for the 2 tests (shallow vs scratch (decomposition "
        "off))." in text
    )
    comps["decomposition_effect"][0]["mcnemar"]["p_holm"] = 0.01
    comps["decomposition_effect"][0]["task"] = "covid_normal_pneumonia"
    comps["scenarios_mcnemar"][0]["task"] = "covid_vs_normal"
    (text,) = V.comparisons(comps)
    assert (
        "(shallow vs scratch (decomposition off, covid_vs_normal); decomposition on vs off (deep, "
        "covid_normal_pneumonia))." in text
    )
    assert V.comparisons({}) == []


def test_scratch_with_decomposition_is_said_to_use_imagenet_features():
    runs = [
        {
            "task": "covid_vs_normal",
            "scenario": "scratch",
            "decomposition": True,
            "test": {"accuracy": m(0.8, 0.7, 0.9)},
        },
        {
            "task": "covid_vs_normal",
            "scenario": "scratch",
            "decomposition": False,
            "test": {"accuracy": m(0.85)},
        },
    ]
    (text,) = V.scratch_decomposition({"runs": runs})
    assert "(covid_vs_normal 80.0% [70.0, 90.0]) is not free of ImageNet" in text and "k-means" in text
    assert V.scratch_decomposition({"runs": runs[1:]}) == []


def test_decomposition_names_tasks_when_there_are_two():
    dec = [
        {"task": "covid_vs_normal", "scenario": "deep", "accuracy_difference": m(0.05, 0.01, 0.09)},
        {"task": "covid_normal_pneumonia", "scenario": "deep", "accuracy_difference": m(0.01, -0.02, 0.04)},
        {"task": "covid_normal_pneumonia", "scenario": "shallow", "accuracy_difference": m(None)},
    ]
    (sentence,) = V.decomposition({"decomposition_effect": dec})
    assert "deep (covid_vs_normal) +5.0 [+1.0, +9.0]; deep (covid_normal_pneumonia) +1.0" in sentence
    assert sentence.endswith("above zero in 1 of 2 scenarios and below zero in 0.")


def test_decomposition_and_comparisons_name_seeds_and_variants_and_pool_over_seeds():
    dec = [
        {
            "task": "covid_vs_normal",
            "scenario": "deep",
            "variant": "baseline",
            "seed": s,
            "accuracy_difference": m(d, d - 0.04, d + 0.04),
            "mcnemar": {"p_value": p, "p_holm": p},
        }
        for s, d, p in ((0, 0.02, 0.5), (1, -0.01, 0.01))
    ]
    pooled = [
        {
            "task": "covid_vs_normal",
            "scenario": "deep",
            "variant": "baseline",
            "n_seeds": 2,
            "accuracy_difference": {"mean": 0.005, "sd": 0.0212},
            "n_favour_a": 1,
            "n_favour_b": 1,
        }
    ]
    (sentence,) = V.decomposition({"decomposition_effect": dec, "decomposition_over_seeds": pooled})
    assert "deep seed 0 +2.0 [-2.0, +6.0]; deep seed 1 -1.0 [-5.0, +3.0]" in sentence
    assert "above zero in 0 of 2 scenario-seed pairs" in sentence
    assert sentence.endswith(
        "Pooled over seeds (points): deep mean +0.5 (sd 2.1), on better in 1 and off better in 1 of 2 seeds."
    )
    pairs = [
        {
            "task": "covid_vs_normal",
            "a": "shallow",
            "b": "deep",
            "decomposition": False,
            "variant": "lung",
            "seed": 1,
            "mcnemar": {"p_value": 0.001, "p_holm": 0.01},
        }
    ]
    (text,) = V.comparisons(
        {
            "scenarios_mcnemar": pairs,
            "decomposition_effect": dec,
            "multiplicity": {"n_tests": 3, "n_below_0_05_raw": 2, "n_below_0_05_holm": 2},
        }
    )
    assert (
        "(shallow vs deep (decomposition off, lung, seed 1); decomposition on vs off (deep, seed 1))." in text
    )


def test_variants_are_read_from_their_paired_intervals():
    def diff(variant, goal, value, lo, hi, reading):
        return {"task": "t", "scenario": "deep", "variant": variant, "goal": goal,
                "combined": {"value": value, "ci_low": lo, "ci_high": hi}, "reading": reading}

    results = {"comparisons": {"variants": [
        diff("lung", "S1", 0.12, 0.03, 0.2, "better"), diff("lung", "S2", -0.01, -0.1, 0.08, "undetermined"),
        diff("adv", "S1", -0.15, -0.25, -0.05, "worse"),
    ]}}
    (text,) = V.variants_against_baseline(results)
    assert "lung: S1 +12.0 [+3.0, +20.0] better, S2 -1.0 [-10.0, +8.0] undetermined" in text
    assert "adv: S1 -15.0 [-25.0, -5.0] worse" in text and "widened by the fold spread" in text
    assert V.variants_against_baseline({}) == []
    finding = V._finding_variants(results)[0]
    assert "lung (t): better on S1, undetermined on S2" in finding and "adv (t): worse on S1" in finding


def test_the_view_probe_sentence_reads_the_interval_against_chance():
    res = {"headline": {"run_id": "r", "task": "covid_vs_normal"},
           "scorecard": [{"run_id": "r", "metric": "view_id_within_covid_balanced_accuracy", "value": 0.8,
                          "ci_low": 0.7, "ci_high": 0.9, "n": 120, "chance": 0.5},
                         {"run_id": "r", "metric": "view_id_within_normal_balanced_accuracy", "value": 0.55,
                          "ci_low": 0.45, "ci_high": 0.65, "n": 60, "chance": 0.5},
                         {"run_id": "r", "metric": "view_id_within_pneumonia_balanced_accuracy", "value": None}]}
    (text,) = V.view_probe(res)
    assert "covid films 80.0% [70.0, 90.0] (names it; n=120)" in text
    assert "normal films 55.0% [45.0, 65.0] (no signal shown; n=60)" in text and "pneumonia" not in text
