"""Metric code against hand-computed cases: confusion metrics, AUCs, calibration, patient bootstrap, McNemar."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from cxrstudy.evaluation import metrics as M

CLASSES = ["covid", "normal"]
# six images; covid probability below; labels: 3 covid then 3 normal -> predictions c, c, n, n, n, n
P_COVID = np.array([0.95, 0.85, 0.35, 0.45, 0.15, 0.05])
Y = ["covid"] * 3 + ["normal"] * 3


def _probs(p_covid: np.ndarray) -> np.ndarray:
    return np.c_[p_covid, 1 - p_covid]


def test_tiny_confusion_by_hand():
    res = M.compute_metrics(Y, _probs(P_COVID), CLASSES, groups=None, n_bootstrap=50, seed=0)
    assert res["confusion_matrix"] == [[2, 1], [0, 3]]
    assert res["accuracy"]["value"] == pytest.approx(5 / 6)
    assert res["balanced_accuracy"]["value"] == pytest.approx((2 / 3 + 1) / 2)
    covid, normal = res["per_class"]["covid"], res["per_class"]["normal"]
    assert covid["sensitivity"]["value"] == pytest.approx(2 / 3)
    assert covid["specificity"]["value"] == pytest.approx(1.0)
    assert covid["precision"]["value"] == pytest.approx(1.0)
    assert covid["f1"]["value"] == pytest.approx(0.8)
    assert normal["sensitivity"]["value"] == pytest.approx(1.0)
    assert normal["specificity"]["value"] == pytest.approx(2 / 3)
    assert normal["precision"]["value"] == pytest.approx(3 / 4)
    assert normal["f1"]["value"] == pytest.approx(6 / 7)
    assert res["macro_f1"]["value"] == pytest.approx((0.8 + 6 / 7) / 2)
    # 8 of 9 (covid, normal) pairs ranked correctly; AP = 1/3 + 1/3 + 1/3 * 3/4
    assert covid["roc_auc"]["value"] == pytest.approx(8 / 9)
    assert res["roc_auc"]["value"] == pytest.approx(8 / 9)
    assert covid["pr_auc"]["value"] == pytest.approx(11 / 12)
    assert res["pr_auc"]["value"] == pytest.approx(11 / 12)
    # confidences .95 .85 .65(wrong) .55 .85 .95 -> (2*.05 + 2*.15 + .65 + .45) / 6
    assert res["ece"] == pytest.approx(0.25)
    # binary Brier: mean of (p_covid - [1,1,1,0,0,0])^2
    assert res["brier"] == pytest.approx(0.675 / 6)
    assert res["n"] == 6 and res["n_groups"] == 6
    assert res["bootstrap"]["unit"] == "image"


def test_three_class_per_class_and_unknown_label():
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.5, 0.1, 0.4]])
    res = M.compute_metrics(["a", "b", "c", "c"], probs, ["a", "b", "c"], None, n_bootstrap=20)
    assert res["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert res["per_class"]["c"]["sensitivity"]["value"] == pytest.approx(0.5)
    assert res["per_class"]["a"]["precision"]["value"] == pytest.approx(0.5)
    assert res["balanced_accuracy"]["value"] == pytest.approx((1 + 1 + 0.5) / 3)
    with pytest.raises(ValueError, match=r"'pneumonia' \(row 1\)"):
        M.compute_metrics(["a", "pneumonia"], probs[:2], ["a", "b", "c"], None)
    with pytest.raises(ValueError, match="shape"):
        M.compute_metrics(["a", "b"], probs[:2, :2], ["a", "b", "c"], None)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_ranking_metrics_match_sklearn_on_replicated_rows(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.random(60), 1)  # many ties
    w = rng.integers(0, 4, 60)
    roc, ap = M._weighted_ranking_metrics(s, y == 1, w[None].astype(float))
    yy, ss = np.repeat(y, w), np.repeat(s, w)
    assert roc[0] == pytest.approx(roc_auc_score(yy, ss))
    assert ap[0] == pytest.approx(average_precision_score(yy, ss))


def test_patient_bootstrap_is_wider_than_image_bootstrap():
    # 10 patients x 10 identical images; patients 0-6 always right, 7-9 always wrong
    groups = np.repeat([f"p{i}" for i in range(10)], 10)
    y = np.array(["covid", "normal"] * 50)
    right = np.repeat(np.arange(10) < 7, 10)
    p_covid = np.where((y == "covid") == right, 0.9, 0.1)
    patient = M.compute_metrics(y, _probs(p_covid), CLASSES, groups, n_bootstrap=1000, seed=0)
    image = M.compute_metrics(y, _probs(p_covid), CLASSES, None, n_bootstrap=1000, seed=0)
    assert patient["accuracy"]["value"] == image["accuracy"]["value"] == pytest.approx(0.7)
    wp = patient["accuracy"]["ci_high"] - patient["accuracy"]["ci_low"]
    wi = image["accuracy"]["ci_high"] - image["accuracy"]["ci_low"]
    # accuracy over 10 drawn patients ~ Binomial(10, .7)/10 (sd .145) vs Binomial(100, .7)/100 (sd .046)
    assert wp > 2 * wi
    assert 0.3 <= patient["accuracy"]["ci_low"] <= 0.5 and patient["accuracy"]["ci_high"] >= 0.9
    assert patient["n_groups"] == 10 and patient["bootstrap"]["unit"] == "patient_group"
    # deterministic for a seed, different for another
    again = M.compute_metrics(y, _probs(p_covid), CLASSES, groups, n_bootstrap=1000, seed=0)
    assert again["accuracy"] == patient["accuracy"]


def test_the_bootstrap_resamples_patients_within_each_class():
    """Every replicate holds both classes (each class's patients drawn as often as it has patients), so no
    replicate is skipped; a class with fewer than 10 patients leaves every interval out."""
    groups = [f"c{i}" for i in range(10) for _ in range(2)] + [f"n{i}" for i in range(30)]
    y = ["covid"] * 20 + ["normal"] * 30
    p = _probs(np.linspace(0.05, 0.95, 50))
    res = M.compute_metrics(y, p, CLASSES, groups, n_bootstrap=500, seed=3)
    assert res["bootstrap"]["stratified_by"] == "label" and "not_estimable" not in res
    assert res["per_class"]["covid"]["sensitivity"]["n_boot"] == res["roc_auc"]["n_boot"] == 500
    assert res["patients_per_class"] == {"covid": 10, "normal": 30} and res["n_patients"] == 40
    thin = M.compute_metrics(y[2:], p[2:], CLASSES, groups[2:], n_bootstrap=100, seed=3)
    assert "covid: 9" in thin["not_estimable"] and thin["accuracy"]["ci_low"] is None
    assert thin["accuracy"]["value"] is not None and thin["accuracy"]["note"].startswith("not estimable")


def test_reliability_curve_and_ece_agree():
    curve = M.reliability_curve(Y, _probs(P_COVID), CLASSES, n_bins=10)
    assert curve["count"].sum() == 6
    row = curve[curve["bin_lower"].round(2) == 0.6].iloc[0]
    assert row["count"] == 1 and row["accuracy"] == 0 and row["confidence"] == pytest.approx(0.65)
    assert M.ece(Y, _probs(P_COVID), CLASSES) == pytest.approx(0.25)


def test_mcnemar_exact_and_chi_square_by_hand():
    y = np.zeros(6, dtype=int)
    a = np.array([0, 1, 1, 1, 1, 1])  # a right on image 0 only
    b = np.array([1, 0, 0, 0, 0, 0])  # b right on images 1-5
    res = M.mcnemar(a, b, y)
    assert (res["a_only_correct"], res["b_only_correct"]) == (1, 5)
    assert res["method"] == "exact binomial"
    assert res["p_value"] == pytest.approx(2 * (1 + 6) / 64)  # 2 * P(X <= 1), X ~ Bin(6, .5)
    y = np.zeros(40, dtype=int)
    a = np.r_[np.zeros(30), np.ones(10)]
    b = 1 - a
    res = M.mcnemar(a, b, y)
    assert res["statistic"] == pytest.approx((20 - 1) ** 2 / 40)
    assert res["p_value"] == pytest.approx(0.002663, abs=2e-5)
    assert M.mcnemar(a, a, y)["p_value"] == 1.0


def test_clustered_mcnemar_by_hand():
    # four patient groups: c1 three images a-only right, c2 one b-only, c3 two concordant, c4 one a-only + one concordant
    groups = ["c1"] * 3 + ["c2"] + ["c3"] * 2 + ["c4"] * 2
    y = np.zeros(8, dtype=int)
    a = np.array([0, 0, 0, 1, 0, 1, 0, 0])
    b = np.array([1, 1, 1, 0, 0, 1, 1, 0])
    res = M.clustered_mcnemar(a, b, y, groups)
    assert (res["a_only_correct"], res["b_only_correct"], res["n_clusters"]) == (4, 1, 4)
    # D = 3 - 1 + 0 + 1 = 3; residuals d_i - n_i D/N: 1.875, -1.375, -0.75, 0.25; variance sum x K/(K-1)
    var = (1.875**2 + 1.375**2 + 0.75**2 + 0.25**2) * 4 / 3
    assert res["statistic"] == pytest.approx(9 / var)
    assert res["p_value"] == pytest.approx(0.2902, abs=1e-3) and "Obuchowski" in res["method"]
    # each image its own cluster: McNemar's statistic up to the (N-1)/N and (B-C)^2/N terms
    y = np.zeros(40, dtype=int)
    a = np.r_[np.zeros(30), np.ones(10)]
    single = M.clustered_mcnemar(a, 1 - a, y, None)
    assert single["statistic"] == pytest.approx(400 * 39 / 40 / (40 - 400 / 40))
    # the same discordance inside one patient counts as one patient, not thirty images
    one_patient = M.clustered_mcnemar(a, 1 - a, y, ["p"] * 30 + [f"q{i}" for i in range(10)])
    assert one_patient["p_value"] > single["p_value"]
    assert M.clustered_mcnemar(a, a, y, None)["p_value"] == 1.0
    with pytest.raises(ValueError, match="aligned"):
        M.clustered_mcnemar(a, a[:3], y, None)




def test_paired_difference_uses_one_shared_bootstrap():
    groups = np.repeat([f"p{i}" for i in range(12)], 3)
    y = np.array(["covid", "normal", "covid"] * 12)
    right = np.where(y == "covid", 0.8, 0.2)
    wrong_on_p0 = right.copy()
    wrong_on_p0[:3] = 1 - wrong_on_p0[:3]  # 36 films of 12 patients, each with both classes
    same = M.paired_difference_ci(y, _probs(right), _probs(right), CLASSES, groups, n_bootstrap=200)
    assert (same["value"], same["ci_low"], same["ci_high"]) == (0.0, 0.0, 0.0)
    diff = M.paired_difference_ci(y, _probs(right), _probs(wrong_on_p0), CLASSES, groups, n_bootstrap=500)
    assert diff["value"] == pytest.approx(3 / 36)
    # each replicate: share of images from p0 (0 when p0 is not drawn), never negative
    assert diff["ci_low"] == pytest.approx(0.0) and 3 / 36 < diff["ci_high"] <= 0.5
    with pytest.raises(ValueError, match="unknown metric"):
        M.paired_difference_ci(y, _probs(right), _probs(right), CLASSES, groups, metric="kappa")




def test_evaluate_predictions_reports_hard_rule_and_per_source():
    df = pd.DataFrame(
        {
            "image": [f"i{i}.png" for i in range(6)],
            "label": Y,
            "patient_group": ["a", "a", "b", "c", "d", "d"],
            "source": ["s1", "s1", "s2", "s2", "s1", "s1"],
            "prob_covid": P_COVID,
            "prob_normal": 1 - P_COVID,
            "pred_hard": ["covid", "covid", "covid", "normal", "normal", "normal"],
        }
    )
    res = M.evaluate_predictions(df, CLASSES, n_bootstrap=100)
    assert res["accuracy"]["value"] == pytest.approx(5 / 6)
    assert res["hard_rule"]["accuracy"]["value"] == pytest.approx(1.0)
    assert res["n_groups"] == 4
    ps = M.per_source_accuracy(df, CLASSES).set_index(["source", "label"])
    assert ps.loc[("s2", "covid"), "accuracy"] == 0.0 and ps.loc[("s1", "normal"), "n"] == 2
    with pytest.raises(ValueError, match="missing probability columns"):
        M.evaluate_predictions(df.drop(columns="prob_normal"), CLASSES)


def test_metrics_of_composed_subclass_probabilities_by_hand():
    from cxrstudy.decomposition import compose, compose_hard

    subclasses = ["covid_1", "covid_2", "normal_1", "normal_2"]
    sub = np.array(
        [
            [0.30, 0.30, 0.40, 0.00],  # composed covid .6 (right); hard rule: normal_1 -> normal (wrong)
            [0.10, 0.05, 0.45, 0.40],  # normal .85 either way (right)
            [0.20, 0.15, 0.25, 0.40],  # normal .65 either way (wrong, truly covid)
            [0.00, 0.10, 0.30, 0.60],  # normal .9 (right)
        ]
    )
    probs = compose(sub, subclasses, CLASSES)
    np.testing.assert_allclose(probs[:, 0], [0.6, 0.15, 0.35, 0.1])
    hard = np.asarray(CLASSES)[compose_hard(sub, subclasses, CLASSES)]
    y = ["covid", "normal", "covid", "normal"]
    res = M.compute_metrics(y, probs, CLASSES, None, n_bootstrap=10)
    assert res["accuracy"]["value"] == pytest.approx(3 / 4)
    assert res["per_class"]["covid"]["sensitivity"]["value"] == pytest.approx(1 / 2)
    # covid scores .6 .35 vs normal .15 .1: all 4 pairs ranked right
    assert res["roc_auc"]["value"] == pytest.approx(1.0)
    hard_res = M.compute_metrics(y, probs, CLASSES, None, n_bootstrap=10, pred=hard)
    assert hard_res["accuracy"]["value"] == pytest.approx(2 / 4)
    assert hard_res["per_class"]["covid"]["sensitivity"]["value"] == 0.0
    assert hard_res["roc_auc"]["value"] == pytest.approx(1.0)  # ranking still uses the composed probabilities


# --------------------------------------------------------------------------- results.json from saved runs


def _synthetic_profile(root, scenarios=("shallow", "deep", "finetune", "scratch"), n_groups=12, folds=2):
    """Saved fold runs in the contract layout with hand-made predictions: run quality set per scenario; fold f
    tests the films of the patient groups g_i with i % folds == f, and validates on its own inner films."""
    import json

    rng = np.random.default_rng(0)
    groups = np.repeat([f"g{i}" for i in range(n_groups)], 2)
    labels = np.array(["covid", "normal"] * n_groups)
    fold_of = np.repeat(np.arange(n_groups) % folds, 2)
    skill = {"shallow": 0.9, "deep": 0.8, "finetune": 0.7, "scratch": 0.6}
    for sc in scenarios:
        for dec in (False, True):
            for fold in range(folds):
                run_id = f"covid_vs_normal__efficientnet_lite0__{sc}__{'decomp' if dec else 'nodecomp'}__seed0__fold{fold}"
                d = root / "runs" / run_id
                d.mkdir(parents=True)
                rows = []
                for split in ("val", "test"):
                    right = rng.random(len(labels)) < skill[sc] + (0.05 if dec else 0)
                    p = np.where((labels == "covid") == right, 0.8, 0.2)
                    for i in range(len(labels)):
                        if split == "test" and fold_of[i] != fold:
                            continue
                        rows.append(
                            {
                                "image": f"{split}{fold if split == 'val' else ''}_{i}.png",
                                "split": split,
                                "label": labels[i],
                                "source": "s/x",
                                "patient_group": f"{split}{fold if split == 'val' else ''}{groups[i]}",
                                "prob_covid": p[i],
                                "prob_normal": 1 - p[i],
                                "pred": "covid" if p[i] > 0.5 else "normal",
                            }
                        )
                pd.DataFrame(rows).to_csv(d / "predictions.csv", index=False)
                info = {
                    "run_id": run_id,
                    "task": "covid_vs_normal",
                    "backbone": "efficientnet_lite0",
                    "scenario": sc,
                    "decomposition": dec,
                    "seed": 0,
                    "fold": fold,
                    "folds": folds,
                    "classes": ["covid", "normal"],
                    "subclasses": ["covid", "normal"],
                    "image_size": 64,
                    "train_seconds": 2.0,
                }
                (d / "run.json").write_text(json.dumps(info))
    return root


def test_build_results_schema_headline_and_comparisons(tmp_path):
    import json

    from cxrstudy import config
    from cxrstudy.evaluation.frames import headline_frame
    from cxrstudy.evaluation.shortcut_summary import assemble_shortcut_checks
    from cxrstudy.reporting import pages
    from cxrstudy.reporting import results as R

    pdir = _synthetic_profile(tmp_path / "prof")
    manifest = pd.DataFrame(
        {
            "image": ["a", "b", "c"],
            "label": ["covid", "normal", "normal"],
            "split": ["train", "test", "val"],
            "source_name": ["mhh", "nih", "nih"],
            "patient_group": ["p1", "p2", "p2"],
        }
    )
    checks = assemble_shortcut_checks(
        source_identification={"accuracy": 0.97, "balanced_accuracy": 0.9, "majority_baseline": 0.4},
        masking={
            "unmasked": {"accuracy": {"value": 0.95, "ci_low": 0.9, "ci_high": 0.98}},
            "masked_lungs": {"accuracy": {"value": 0.93, "ci_low": 0.88, "ci_high": 0.97}},
            "lungs_only": {"accuracy": {"value": 0.9, "ci_low": 0.85, "ci_high": 0.95}},
        },
        saliency=pd.DataFrame(
            {
                "lung_share": [0.4, 0.6, np.nan],
                "outcome": ["correct", "wrong", "wrong"],
                "label": ["covid", "normal", "covid"],
            }
        ),
    )
    res = R.build_results(pdir, manifest, shortcut_checks=checks, n_bootstrap=100)
    assert json.loads((pdir / "results.json").read_text()) == res
    assert len(res["runs"]) == 16 and len(res["configurations"]) == 8 and res["dataset"]["n_images"] == 3
    assert {r["fold"] for r in res["runs"]} == {0, 1} and all(c["fold"] is None for c in res["configurations"])
    assert res["protocol"] == {**res["protocol"], "kind": "cv", "folds": 2, "repeats": 1, "group": "patient_group",
                               "stratify": ["label", "source_name"]}
    assert all(c["test"]["n"] == 24 and c["scope"] == "out_of_fold" for c in res["configurations"])
    assert all(r["test"]["n"] == 12 and r["config_id"] == r["run_id"].rsplit("__fold", 1)[0] for r in res["runs"])
    r0 = res["configurations"][0]
    assert {"task", "backbone", "scenario", "decomposition", "seed", "train_seconds", "test"} <= set(r0)
    assert {"accuracy", "balanced_accuracy", "roc_auc", "pr_auc", "ece", "brier", "per_class"} <= set(
        r0["test"]
    )
    assert isinstance(r0["test"]["ece"], float)
    head = res["headline"]
    # chosen on validation accuracy among transfer scenarios: never scratch
    transfer = [r for r in res["configurations"] if r["scenario"] != "scratch"]
    assert head["run_id"] == max(transfer, key=lambda r: r["val_accuracy"])["run_id"]
    assert head["paper_accuracy"] == config.PAPER_ACCURACY and head["scratch_accuracy"] is not None
    assert head["paper_position"] in {"above", "below", "inside"} and "94.17%" in head["text"]
    cmp = res["comparisons"]
    assert len(cmp["decomposition_effect"]) == 4 and len(cmp["scenarios_mcnemar"]) == 12
    mc = cmp["scenarios_mcnemar"][0]["mcnemar"]
    assert mc["unit"] == "patient_group" and mc["n_clusters"] == 12 and "p_holm" in mc
    assert cmp["multiplicity"]["n_tests"] == 16
    assert cmp["design"]["seeds_per_configuration"] == {"min": 1, "max": 1}
    assert res["configurations"][0]["variant"] == "baseline" and res["scorecard"] == [] and res["goals"] == []
    assert res["shortcut_checks"]["source_identification_accuracy"] == 0.97
    assert res["shortcut_checks"]["saliency_in_lung_share"] == pytest.approx(0.5)
    assert res["shortcut_checks"]["lung_region"] == "fixed rectangle"
    text = " ".join(res["verdict"])
    assert "mostly restates the label" in text and "signal is everywhere" in text
    assert "cross-validated in 2 patient-grouped folds once" in text and "Trust the numbers" not in text
    assert res["findings"] and "94.17%" in res["findings"][0]
    card = pages.write_model_card(res, pdir / "model_card.md").read_text()
    assert head["run_id"] in card and "Not for clinical use" in card
    checklist = pages.write_claim_checklist(res, pdir / "claim_checklist.md").read_text()
    for item in ("Data sources", "Data partitions", "Reference standard", "Metrics", "Failure analysis"):
        assert f"| {item} |" in checklist
    table = headline_frame(res)
    assert len(table) == 10 and table["accuracy (summed probabilities)"].iloc[-2] == "94.17%"
    assert table["accuracy (DeTraC hard rule)"].iloc[-1] == "93.1%" and "val. accuracy" in table.columns


def test_holdout_rows_stay_out_of_test_metrics(tmp_path):
    """An evaluation-only source (split "holdout") never enters test metrics, comparisons or figures' tables."""
    from cxrstudy.evaluation import cv
    from cxrstudy.evaluation.comparisons import compare_runs
    from cxrstudy.evaluation.frames import per_source_table
    from cxrstudy.reporting import results as R

    pdir = _synthetic_profile(tmp_path / "prof", scenarios=("shallow", "deep"))
    for path in (pdir / "runs").glob("*/predictions.csv"):
        df = pd.read_csv(path)
        extra = df[df["split"] == "test"].assign(
            split="holdout", image=lambda d: "holdout_" + d["image"], source="actualmed/x",
            patient_group=lambda d: "h" + d["patient_group"], prob_covid=0.0, prob_normal=1.0, pred="normal",
        )
        pd.concat([df, extra]).to_csv(path, index=False)
    runs = cv.oof_runs(R.load_runs(pdir))
    entries = R.evaluate_runs(runs, n_bootstrap=20)
    assert all(e["test"]["n"] == 24 for e in entries)
    assert all(r["predictions"].loc[r["predictions"]["split"] == "holdout", "image"].is_unique for r in runs)
    cmp = compare_runs(runs, n_bootstrap=20)
    assert all(c["n"] == 24 for c in cmp["scenarios_mcnemar"] + cmp["decomposition_effect"])
    assert "actualmed" not in " ".join(per_source_table(runs).columns)


def test_evaluation_figures_are_written(tmp_path):
    from cxrstudy.evaluation.figures import evaluation_figures
    from cxrstudy.reporting import results as R

    pdir = _synthetic_profile(tmp_path / "prof", scenarios=("shallow",))
    runs = R.load_runs(pdir)
    entries = R.evaluate_runs(runs, n_bootstrap=20)
    paths = evaluation_figures(runs, entries, tmp_path / "figs")
    assert {
        "confusion_matrices",
        "reliability",
        "learning_curves",
        "per_source_accuracy",
        "accuracy_vs_paper",
    } <= set(paths)
    assert all(p.stat().st_size > 2000 for p in paths.values())


def test_load_runs_keeps_only_the_profiles_runs_and_names_the_rest(tmp_path):
    """A run folder no step of the profile produces is skipped with a warning; a missing expected run raises."""
    from cxrstudy.reporting import results as R

    pdir = _synthetic_profile(tmp_path / "prof", scenarios=("shallow", "deep"))
    ids = sorted(p.name for p in (pdir / "runs").iterdir() if (p / "run.json").is_file())
    assert len(R.load_runs(pdir)) == len(ids) >= 2
    with pytest.warns(UserWarning, match=rf"skipped 1 run folder\(s\).*{ids[-1]}"):
        kept = R.load_runs(pdir, only=ids[:-1])
    assert [r["info"]["run_id"] for r in kept] == ids[:-1]
    with pytest.raises(FileNotFoundError, match=r"no finished run for 1 run id\(s\).*gone__seed0"):
        R.load_runs(pdir, only=[*ids, "gone__seed0"])
