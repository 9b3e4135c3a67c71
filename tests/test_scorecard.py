"""Scorecard on synthetic predictions with known answers, and on the real manifest with cheap real features."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrstudy import config
from cxrstudy.evaluation import confounders as C
from cxrstudy.evaluation import scorecard as SC

NB = 200  # bootstrap replicates in the synthetic tests
THREE = {"run_id": "r3", "task": "covid_normal_pneumonia", "classes": ["covid", "normal", "pneumonia"]}
TWO = {"run_id": "r2", "task": "covid_vs_normal", "classes": ["covid", "normal"]}


def _rows(source: str, label: str, n: int, split: str, tag: str = "") -> pd.DataFrame:
    """``n`` films of one source and label, one patient group each."""
    names = [f"images/{source}/{label}{tag}_{i}.png" for i in range(n)]
    return pd.DataFrame(
        {
            "image": names,
            "label": label,
            "source": f"{source}/repo",
            "source_name": source,
            "patient_group": [f"pg_{source}_{label}{tag}_{i}" for i in range(n)],
            "split": split,
        }
    )


def _manifest(n_ieee_test: int = 20) -> pd.DataFrame:
    parts = [
        _rows("cxnet", "covid", 30, "train"),
        _rows("nih", "normal", 30, "train"),
        _rows("nih", "pneumonia", 30, "train"),
        _rows("ieee8023", "covid", 30, "train", "t"),
        _rows("ieee8023", "pneumonia", 30, "train", "t"),
        _rows("ieee8023", "covid", n_ieee_test, "test"),
        _rows("ieee8023", "pneumonia", n_ieee_test, "test"),
        _rows("nih", "normal", 20, "test", "x"),
        _rows("nih", "pneumonia", 20, "test", "x"),
        _rows("cxnet", "covid", 10, "test", "x"),
    ]
    return pd.concat(parts, ignore_index=True)


def _predict(manifest: pd.DataFrame, classes: list[str], score=None) -> pd.DataFrame:
    """Predictions with the true class at 0.8 (others share 0.2), or from ``score(rows) -> probs``."""
    rows = manifest[manifest["label"].isin(classes)].reset_index(drop=True)
    if score is None:
        probs = np.full((len(rows), len(classes)), 0.2 / (len(classes) - 1))
        probs[np.arange(len(rows)), [classes.index(c) for c in rows["label"]]] = 0.8
    else:
        probs = score(rows)
    out = rows[["image", "split", "label", "source", "patient_group"]].copy()
    for j, c in enumerate(classes):
        out[f"prob_{c}"] = probs[:, j]
    out["pred"] = [classes[j] for j in probs.argmax(1)]
    return out


def _by_metric(entries: list[dict]) -> dict[str, dict]:
    return {e["metric"]: e for e in entries}


def _label_features(manifest: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Features that separate the labels well (label one-hot + noise), indexed by image."""
    rng = np.random.default_rng(seed)
    onehot = pd.get_dummies(manifest["label"]).to_numpy(float)
    return pd.DataFrame(onehot * 2 + rng.normal(size=onehot.shape), index=manifest["image"].to_numpy())


def test_contract_fields_and_perfect_model():
    m = _manifest()
    entries = SC.scorecard_for_run(THREE, _predict(m, THREE["classes"]), m, None, n_bootstrap=NB)
    json.dumps(entries, allow_nan=False)  # JSON-ready: no NaN anywhere
    for e in entries:
        assert set(SC.FIELDS) <= set(e), e
        assert e["run_id"] == "r3" and e["variant"] == "baseline" and e["task"] == THREE["task"]
        assert e["method"] in ("model", "probe")
        assert e["value"] is not None or "note" in e, e
        assert e["scope"] == ("holdout" if e["metric"].startswith("actualmed") else "out_of_fold")
        assert e["config_id"] == "r3"
    got = _by_metric(entries)
    assert list(got) == [
        "paper_task_accuracy",
        "ieee8023_covid_vs_pneumonia_auc",
        "actualmed_covid_vs_normal_balanced_accuracy",
        "source_id_within_covid_balanced_accuracy",
        "nih_pneumonia_vs_normal_auc",
    ]
    assert got["ieee8023_covid_vs_pneumonia_auc"]["n_patients"] == 40
    ieee = got["ieee8023_covid_vs_pneumonia_auc"]
    assert ieee["value"] == 1.0 and ieee["method"] == "model" and ieee["n"] == 40  # only test rows
    assert ieee["ci_low"] == 1.0 == ieee["ci_high"]
    assert got["nih_pneumonia_vs_normal_auc"]["value"] == 1.0
    assert got["nih_pneumonia_vs_normal_auc"]["n"] == 40
    paper = got["paper_task_accuracy"]
    assert paper["value"] == 1.0 and paper["n"] == 20 + 10 + 20  # ieee + cxnet covid, nih normal
    # no Actualmed rows and no features: reported with a reason, never dropped
    am = got["actualmed_covid_vs_normal_balanced_accuracy"]
    assert am["value"] is None and "Actualmed" in am["note"]
    assert got["source_id_within_covid_balanced_accuracy"]["value"] is None
    assert "features" in got["source_id_within_covid_balanced_accuracy"]["note"]


def test_constant_score_gives_auc_half_and_variant_is_kept():
    m = _manifest()
    entries = SC.scorecard_for_run(
        THREE,
        _predict(m, THREE["classes"], lambda r: np.full((len(r), 3), 1 / 3)),
        m,
        None,
        variant="masked",
        n_bootstrap=NB,
    )
    got = _by_metric(entries)
    assert got["ieee8023_covid_vs_pneumonia_auc"]["value"] == pytest.approx(0.5)
    assert got["nih_pneumonia_vs_normal_auc"]["value"] == pytest.approx(0.5)
    assert {e["variant"] for e in entries} == {"masked"}


def test_three_class_score_is_ratio_and_binary_run_uses_p_covid():
    m = _manifest()

    def score(rows: pd.DataFrame) -> np.ndarray:
        # P(covid) is small for everyone, but larger than P(pneumonia) exactly for covid films
        covid = (rows["label"] == "covid").to_numpy()
        p_c = np.where(covid, 0.2, 0.1)
        p_p = np.where(covid, 0.1, 0.2)
        return np.c_[p_c, 1 - p_c - p_p, p_p]

    got = _by_metric(
        SC.scorecard_for_run(THREE, _predict(m, THREE["classes"], score), m, None, n_bootstrap=NB)
    )
    assert got["ieee8023_covid_vs_pneumonia_auc"]["value"] == 1.0
    # binary run: pneumonia films scored by P(covid) only, when the caller predicted them
    rows = m[m["label"].isin(["covid", "pneumonia"]) | (m["label"] == "normal")].reset_index(drop=True)
    p = np.where(rows["label"] == "covid", 0.9, 0.3)
    preds = rows[["image", "split", "label", "source", "patient_group"]].assign(
        prob_covid=p, prob_normal=1 - p
    )
    got = _by_metric(SC.scorecard_for_run(TWO, preds, m, None, n_bootstrap=NB))
    assert got["ieee8023_covid_vs_pneumonia_auc"]["value"] == 1.0
    nih = got["nih_pneumonia_vs_normal_auc"]
    assert nih["value"] is None and "pneumonia" in nih["note"]


def test_actualmed_balanced_accuracy_by_hand():
    m = pd.concat(
        [_manifest(), _rows("actualmed", "covid", 4, "holdout"), _rows("actualmed", "normal", 2, "holdout")],
        ignore_index=True,
    )
    am = m["source_name"] == "actualmed"
    # covid films: 3 of 4 right (the third right although P(pneumonia) is largest); normal: 1 of 2 right
    table = {
        "images/actualmed/covid_0.png": (0.7, 0.2, 0.1),
        "images/actualmed/covid_1.png": (0.6, 0.3, 0.1),
        "images/actualmed/covid_2.png": (0.3, 0.1, 0.6),
        "images/actualmed/covid_3.png": (0.2, 0.7, 0.1),
        "images/actualmed/normal_0.png": (0.1, 0.8, 0.1),
        "images/actualmed/normal_1.png": (0.5, 0.4, 0.1),
    }
    base = _predict(m[~am], THREE["classes"])
    hand = _predict(m[am], THREE["classes"], lambda r: np.array([table[i] for i in r["image"]]))
    got = _by_metric(SC.scorecard_for_run(THREE, pd.concat([base, hand]), m, None, n_bootstrap=NB))
    e = got["actualmed_covid_vs_normal_balanced_accuracy"]
    assert e["value"] == pytest.approx((3 / 4 + 1 / 2) / 2) and e["n"] == 6 and e["method"] == "model"
    assert e["ci_low"] is None and e["note"].startswith("not estimable")  # 4 and 2 patients: no interval
    assert e["n_patients"] == 6 and e["auc"]["value"] is not None and e["per_fold"] == []
    per_fold = SC.scorecard_for_run(THREE, pd.concat([base, hand]), m, None, n_bootstrap=NB,
                                    fold_predictions=[pd.concat([base, hand])] * 2)
    assert _by_metric(per_fold)["actualmed_covid_vs_normal_balanced_accuracy"]["per_fold"] == [e["value"]] * 2
    # rows the run trained on never count: the same rows as a training split give no metric
    trained = pd.concat([base, hand.assign(split="train")])
    e = _by_metric(SC.scorecard_for_run(THREE, trained, m, None, n_bootstrap=NB))[
        "actualmed_covid_vs_normal_balanced_accuracy"
    ]
    assert e["value"] is None and e["n"] == 0
    # one class only: not computed, with a reason
    only = pd.concat([base, hand[hand["label"] == "covid"]])
    e = _by_metric(SC.scorecard_for_run(THREE, only, m, None, n_bootstrap=NB))[
        "actualmed_covid_vs_normal_balanced_accuracy"
    ]
    assert e["value"] is None and "only" in e["note"]


def test_probe_fallback_when_too_few_held_out_films():
    m = _manifest(n_ieee_test=6)  # < 10 held-out films per class
    preds = _predict(m, THREE["classes"])
    # a three-class run ranks covid against pneumonia itself: few films keep the model's own score, with a note
    # (a probe would see the same few unseen films), and no ranking needs features
    e = _by_metric(SC.scorecard_for_run(THREE, preds, m, None, n_bootstrap=NB))[
        "ieee8023_covid_vs_pneumonia_auc"
    ]
    assert e["method"] == "model" and e["n"] == 2 * 6 and "few films" in e["note"] and e["value"] > 0.9
    assert set(SC.feature_rows(THREE, preds, m)["label"]) == {"covid"}  # the source probe's films only
    feats = _label_features(m)
    got = _by_metric(SC.scorecard_for_run(THREE, preds, m, feats, n_bootstrap=NB))
    assert got["ieee8023_covid_vs_pneumonia_auc"] == e
    # a binary run has no P(pneumonia): the probe answers, on unseen films only; it never saw pneumonia
    # films, whatever their split, so they all enter, with the held-out covid films
    two_preds = _predict(m, TWO["classes"])
    two = _by_metric(SC.scorecard_for_run(TWO, two_preds, m, feats, n_bootstrap=NB))
    e2 = two["ieee8023_covid_vs_pneumonia_auc"]
    assert e2["method"] == "probe" and "probe fallback: the run does not score pneumonia" in e2["note"]
    assert e2["n"] == 6 + 30 + 6 and "held-out pneumonia" not in e2["note"]
    assert e2["value"] > 0.9
    # the features of feature_rows are all the scorecard reads: nothing reported missing
    needed = SC.feature_rows(TWO, two_preds, m)
    got_needed = _by_metric(
        SC.scorecard_for_run(TWO, two_preds, m, feats.loc[needed["image"]], n_bootstrap=NB)
    )
    assert {k: v["value"] for k, v in got_needed.items()} == {k: v["value"] for k, v in two.items()}
    assert not any("without features" in (v.get("note") or "") for v in got_needed.values())
    assert got["nih_pneumonia_vs_normal_auc"]["method"] == "model"  # 20 + 20 held out: enough
    # too few patient groups (many films of one patient) also sends it to the probe
    few = _manifest(n_ieee_test=20)
    test_ieee = (few["source_name"] == "ieee8023") & (few["split"] == "test")
    few.loc[test_ieee, "patient_group"] = few.loc[test_ieee, "label"] + "_one_patient"
    got = _by_metric(SC.scorecard_for_run(THREE, _predict(few, THREE["classes"]), few, feats, n_bootstrap=NB))
    e = got["ieee8023_covid_vs_pneumonia_auc"]
    assert e["method"] == "probe" and "in 1 patient groups" in e["note"]


def _covid_sources(n_big: int = 60, n_small: int = 40) -> pd.DataFrame:
    return pd.concat(
        [
            _rows("cxnet", "covid", n_big, "test"),
            _rows("ieee8023", "covid", n_small, "test"),
            _rows("mhh", "covid", 8, "test"),
            _rows("actualmed", "covid", 30, "holdout"),
        ],
        ignore_index=True,
    )


def test_source_probe_without_signal_reads_no_source_signal():
    """Random features: the within-COVID source probe's balanced accuracy sits at chance (1/2 here), its permutation
    p-value is large and S3 reads no source signal; the held-out hospital never enters the probe."""
    rng = np.random.default_rng(1)
    m = _covid_sources(1200, 800)  # enough films for an interval narrower than the 5-point margin
    feats = pd.DataFrame(rng.normal(size=(len(m), 5)), index=m["image"].to_numpy())
    got = _by_metric(SC.scorecard_for_run(TWO, _predict(m, ["covid", "normal"]), m, feats, n_bootstrap=NB,
                                          n_permutations=9))
    s3 = got["source_id_within_covid_balanced_accuracy"]
    assert s3["n"] == 2000 and s3["sources"] == ["cxnet", "ieee8023"]  # mhh (8 films) below min_films; no actualmed
    assert s3["chance"] == 0.5 and s3["majority"] == pytest.approx(0.6) and s3["method"] == "probe"
    assert s3["n_permutations"] == 9 and s3["p_value"] > 0.1
    assert s3["reading"] == "no source signal" and s3["ci_high"] <= 0.55
    [goal] = [g for g in SC.check_goals(list(got.values())) if g["goal"] == "S3"]
    assert goal["status"] == "met" and goal["target"] == pytest.approx(0.55)
    [row] = SC.source_id_within_label(feats, m, n_bootstrap=NB, n_permutations=0)
    assert row["label"] == "covid" and row["reading"] == "no source signal" and row["sources"] == ["cxnet", "ieee8023"]
    assert row["p_value"] is None and row["value"] == s3["value"]


def test_source_probe_with_a_planted_signal_reads_signal():
    """A weak real signal (one feature shifted by source): balanced accuracy above chance + 5 points, small
    permutation p-value, S3 missed."""
    rng = np.random.default_rng(2)
    m = _covid_sources(120, 80)
    x = rng.normal(size=(len(m), 5))
    x[:, 0] += np.where(m["source_name"] == "cxnet", 1.0, -1.0)
    feats = pd.DataFrame(x, index=m["image"].to_numpy())
    got = _by_metric(SC.scorecard_for_run(TWO, _predict(m, ["covid", "normal"]), m, feats, n_bootstrap=NB,
                                          n_permutations=9))
    s3 = got["source_id_within_covid_balanced_accuracy"]
    assert s3["ci_low"] > 0.55 and s3["p_value"] == pytest.approx(0.1) and s3["reading"] == "source signal present"
    [goal] = [g for g in SC.check_goals(list(got.values())) if g["goal"] == "S3"]
    assert goal["status"] == "missed"


def test_no_probe_trains_on_the_held_out_hospital():
    """Scrambling the held-out hospital's features changes no probe: the S3 probe, the view probes and the
    within-label source check read only films outside it."""
    rng = np.random.default_rng(3)
    m = _covid_sources()
    m["view"] = np.where(np.arange(len(m)) % 3 == 0, "AP", "PA")
    feats = pd.DataFrame(rng.normal(size=(len(m), 5)), index=m["image"].to_numpy())
    preds = _predict(m, ["covid", "normal"])
    before = SC.scorecard_for_run(TWO, preds, m, feats, n_bootstrap=NB, n_permutations=3)
    held = m.loc[m["split"] == "holdout", "image"].to_numpy()
    scrambled = feats.copy()
    scrambled.loc[held] = rng.normal(scale=50, size=(len(held), 5))
    after = SC.scorecard_for_run(TWO, preds, m, scrambled, n_bootstrap=NB, n_permutations=3)
    probes = [e["metric"] for e in before if e["method"] == "probe"]
    assert "source_id_within_covid_balanced_accuracy" in probes
    assert [e for e in before if e["method"] == "probe"] == [e for e in after if e["method"] == "probe"]
    assert SC.source_id_within_label(feats, m, n_bootstrap=NB, n_permutations=3) == SC.source_id_within_label(
        scrambled, m, n_bootstrap=NB, n_permutations=3
    )


def test_a_film_is_seen_when_train_or_val_and_a_class_of_the_run():
    m = pd.concat(
        [
            _rows("cxnet", "covid", 3, "train"),
            _rows("cxnet", "covid", 2, "val", "v"),
            _rows("cxnet", "covid", 2, "test", "x"),
            _rows("actualmed", "covid", 2, "holdout"),
            _rows("nih", "pneumonia", 4, "train"),
            _rows("nih", "pneumonia", 1, "test", "x"),
        ],
        ignore_index=True,
    )
    copy = m.iloc[[0]].assign(split="test")  # the same film again, in the test split
    m = pd.concat([m, copy], ignore_index=True)
    two = SC.unseen(m, TWO["classes"])
    assert two.groupby(["split", "label"]).size().to_dict() == {
        ("holdout", "covid"): 2,
        ("test", "covid"): 2,
        ("test", "pneumonia"): 1,
        ("train", "pneumonia"): 4,
    }
    assert m["image"].iloc[0] not in set(two["image"])  # a copy of a training film stays seen
    three = SC.unseen(m, THREE["classes"])
    assert set(three["split"]) == {"test", "holdout"} and len(three) == 5
    assert SC.held_out(m).equals(SC.unseen(m))  # without classes: every label counts as the run's


def test_feature_rows_are_unseen_covid_films_and_fallback_films_only():
    m = _manifest(n_ieee_test=20)  # enough held-out films: the model answers both rankings
    preds = _predict(m, THREE["classes"])
    rows = SC.feature_rows(THREE, preds, m)
    assert set(zip(rows["source_name"], rows["label"], rows["split"], strict=True)) == {
        ("ieee8023", "covid", "test"),
        ("cxnet", "covid", "test"),
    }
    few = _manifest(n_ieee_test=6)
    rows = SC.feature_rows(THREE, _predict(few, THREE["classes"]), few)
    assert set(rows["label"]) == {"covid"}  # few films, but the three-class run ranks the pair itself
    one = few.copy()  # one patient per class among the held-out ieee8023 films: the probe must answer
    test_ieee = (one["source_name"] == "ieee8023") & (one["split"] == "test")
    one.loc[test_ieee, "patient_group"] = one.loc[test_ieee, "label"] + "_one_patient"
    rows = SC.feature_rows(THREE, _predict(one, THREE["classes"]), one)
    assert set(rows.loc[rows["label"] != "covid", "source_name"]) == {"ieee8023"} and set(rows["split"]) == {
        "test"
    }
    every = SC.feature_rows(TWO, None, few)  # no predictions: every probe fallback's films
    assert every.groupby(["label", "split"]).size().to_dict() == {
        ("covid", "test"): 6 + 10,
        ("pneumonia", "test"): 6,
        ("pneumonia", "train"): 30,
    }


def test_reading_helper():
    def r(lo, hi, chance=0.25):
        return SC.reading({"value": (lo + hi) / 2, "ci_low": lo, "ci_high": hi, "chance": chance})

    assert r(0.20, 0.30) == "no source signal"  # the whole interval within 5 points of chance
    assert r(0.28, 0.32) == "undetermined"  # straddles chance + 5
    assert r(0.31, 0.45) == "source signal present"
    assert SC.reading({"value": None, "chance": 0.25}) == "not computed"


def test_check_goals_read_the_interval():
    def e(metric, value, lo, hi, run="a"):
        return {"run_id": run, "variant": "baseline", "metric": metric, "value": value, "ci_low": lo, "ci_high": hi}

    s3 = "source_id_within_covid_balanced_accuracy"
    entries = [
        e("ieee8023_covid_vs_pneumonia_auc", 0.86, 0.80, 0.92),  # whole interval on the goal's side (inclusive)
        e("actualmed_covid_vs_normal_balanced_accuracy", 0.88, 0.70, 0.95),  # point meets, interval straddles
        {**e(s3, 0.60, 0.55, 0.66), "chance": 0.44},
        e("nih_pneumonia_vs_normal_auc", None, None, None),
        e("paper_task_accuracy", 0.90, 0.85, 0.94),  # the paper's number: no goal
        {**e(s3, 0.45, 0.40, 0.49, run="b"), "chance": 0.44},
        e("nih_pneumonia_vs_normal_auc", 0.80, 0.70, 0.84, run="b"),  # wholly below 0.85
    ]
    goals = SC.check_goals(entries)
    a = {g["goal"]: g for g in goals if g["run_id"] == "a"}
    b = {g["goal"]: g for g in goals if g["run_id"] == "b"}
    assert len(goals) == 2 * len(SC.GOALS)
    assert a["S1"]["status"] == "met" and a["S1"]["met"] is True and a["S1"]["target"] == 0.80
    assert a["S2"]["status"] == "undetermined" and a["S2"]["met"] is False  # not met by the point estimate
    assert a["S3"]["target"] == pytest.approx(0.49) and a["S3"]["status"] == "missed"
    # a goal whose value could not be computed is undetermined, with why; every status is one of the three
    assert b["S3"]["status"] == "met" and b["S1"]["status"] == "undetermined" and b["S1"]["reason"] == "not computed"
    assert a["S4"]["status"] == "undetermined" and a["S4"]["met"] is False
    assert {g["status"] for g in goals} <= {"met", "missed", "undetermined"}
    binary = [{**x, "task": "covid_vs_normal"} for x in entries[:5]]  # S4 does not apply to a task without pneumonia
    assert [g["goal"] for g in SC.check_goals(binary)] == ["S1", "S2", "S3"]
    assert b["S4"]["status"] == "missed" and "S5" not in a and "paper_task_accuracy" not in {g["metric"] for g in goals}
    thin = {**e("nih_pneumonia_vs_normal_auc", 0.2, None, None, run="c"), "note": "not estimable: ...",
            "confounders": {"view_matched": {"value": 0.1, "ci_low": 0.0, "ci_high": 0.3}}}
    [s4] = [g for g in SC.check_goals([thin]) if g["goal"] == "S4"]
    assert s4["status"] == "undetermined" and s4["reason"].startswith("not estimable")  # no interval, no verdict
    assert set(goals[0]) >= {"goal", "metric", "target", "value", "ci_low", "ci_high", "status", "met"}
    assert SC.interval_status(0.5, 0.9, ">=", 0.8) == "undetermined" and SC.interval_status(None, None, ">=", 0.8) == "undetermined"


def test_a_goal_met_by_the_projection_is_not_met():
    """A model whose scores are the view: its interval clears the goal, but the view-matched value and the
    view-only rule show it knows nothing else, so the goal is not met."""
    from test_confounders import ACTUALMED, films

    rows = films({k: 3 * n for k, n in ACTUALMED.items()})
    score = np.where(rows["view"] == "AP", 0.95, 0.05)
    entry = {"run_id": "v", "variant": "baseline", "metric": "actualmed_covid_vs_normal_balanced_accuracy"}
    res = C.binary_metric(rows, score, "covid", "normal", "balanced_accuracy", 300, 0)
    entry.update(res, confounders=C.confounder_block(rows, score, "covid", "normal", "balanced_accuracy", 300, 0))
    low_goal = SC.Goal("S2", entry["metric"], ">=", 0.65)  # a goal the projection alone clears
    [g] = SC.check_goals([entry], [low_goal])
    assert SC.interval_status(res["ci_low"], res["ci_high"], ">=", 0.65) == "met"
    assert entry["confounders"]["view_matched"]["value"] == pytest.approx(0.5)  # no skill within a projection
    assert g["status"] == "missed" and g["met"] is False and "view-matched" in g["reason"]
    # the same scores with a view-matched interval that clears the goal still lose to the view-only rule
    entry["confounders"]["view_matched"].update(value=0.9, ci_low=0.8, ci_high=0.95)
    [g] = SC.check_goals([entry], [low_goal])
    assert g["status"] == "undetermined" and "confounder-only rule (view_only)" in g["reason"]


def test_scorecard_frame():
    entries = [
        {
            "run_id": "a",
            "variant": "baseline",
            "task": "t",
            "metric": "m",
            "value": None,
            "ci_low": None,
            "ci_high": None,
            "n": 0,
            "method": "model",
            "note": "why",
        },
        {
            "run_id": "a",
            "variant": "baseline",
            "task": "t",
            "metric": "k",
            "value": 0.5,
            "ci_low": 0.4,
            "ci_high": 0.6,
            "n": 3,
            "method": "probe",
        },
    ]
    df = SC.scorecard_frame(entries)
    assert list(df.columns[: len(SC.FIELDS) + 1]) == [*SC.FIELDS, "note"]
    assert len(df) == 2 and df["note"].iloc[0] == "why"


# ------------------------------------------------------------------------------------------ real data


@pytest.fixture(scope="module")
def real(study_manifest) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The real manifest and 8x8 thumbnails of its processed images as a cheap real feature table."""
    path = study_manifest
    m = pd.read_csv(path)
    X = np.stack(
        [
            np.asarray(
                Image.open(config.PROCESSED_DIR / p).convert("L").resize((8, 8), Image.BILINEAR), float
            ).ravel()
            for p in m["image"]
        ]
    )
    return m, pd.DataFrame(X / 255.0, index=m["image"].to_numpy())


def test_real_source_id_within_covid(real):
    """On the real manifest (every film outside Actualmed scored out of fold): S3 is the within-COVID source probe
    against chance on every COVID-19 film outside the held-out hospital; the rankings read every ieee8023 and NIH
    film of the pair."""
    m, feats = real
    preds = _predict(m, THREE["classes"], lambda r: np.full((len(r), 3), 1 / 3)).assign(split=m["split"].to_numpy())
    got = _by_metric(SC.scorecard_for_run(THREE, preds, m, feats, n_bootstrap=300, n_permutations=0))
    s3 = got["source_id_within_covid_balanced_accuracy"]
    covid = m[(m["label"] == "covid") & (m["split"] != "holdout")]
    counts = covid["source_name"].value_counts()
    assert "actualmed" not in s3["sources"] and s3["sources"] == sorted(counts[counts >= 10].index)
    assert s3["n"] == int(counts[counts >= 10].sum()) and s3["chance"] == pytest.approx(1 / len(s3["sources"]))
    assert s3["ci_low"] <= s3["value"] <= s3["ci_high"] and s3["n_patients"] <= s3["n"]
    assert s3["reading"] in {"no source signal", "source signal present", "undetermined"}
    ieee = got["ieee8023_covid_vs_pneumonia_auc"]
    want = (m["source_name"] == "ieee8023") & m["label"].isin(["covid", "pneumonia"])
    assert ieee["method"] == "model" and ieee["n"] == int(want.sum()) and ieee["n_patients"] > 100
    assert got["nih_pneumonia_vs_normal_auc"]["method"] == "model"
    assert got["nih_pneumonia_vs_normal_auc"]["value"] == pytest.approx(0.5)
    json.dumps(list(got.values()), allow_nan=False)


def test_an_out_of_fold_whole_counts_films_another_fold_validated_on():
    """In a configuration's out-of-fold whole every film also sits in some other fold's inner validation; those
    val rows come from other models and must not mark the film as seen."""
    m = _manifest(n_ieee_test=20)
    preds = _predict(m, THREE["classes"])
    test = preds[preds["split"] == "test"]
    pooled = pd.concat([test, test.assign(split="val")], ignore_index=True)
    whole = {**THREE, "fold": None}
    got = _by_metric(SC.scorecard_for_run(whole, pooled, m, None, n_bootstrap=NB))
    assert got["ieee8023_covid_vs_pneumonia_auc"]["n"] == 40 and got["nih_pneumonia_vs_normal_auc"]["n"] == 40
    run = _by_metric(SC.scorecard_for_run(THREE, pooled, m, None, n_bootstrap=NB))  # a fold run: val rows are seen
    assert run["ieee8023_covid_vs_pneumonia_auc"]["n"] == 0


def test_probes_on_identical_features_run_once(monkeypatch):
    """With a shared memo, a second configuration with the same feature values on the same films (a DFR run and its
    base) reuses the probes' results; different features compute them anew, and a memo entry is never shared out
    by reference."""
    rng = np.random.default_rng(5)
    m = _covid_sources(120, 80)
    m["view"] = np.where(np.arange(len(m)) % 3 == 0, "AP", "PA")
    feats = pd.DataFrame(rng.normal(size=(len(m), 5)), index=m["image"].to_numpy())
    preds = _predict(m, ["covid", "normal"])
    calls = []
    real = SC.source_probe
    monkeypatch.setattr(SC, "source_probe", lambda *a, **k: calls.append(1) or real(*a, **k))
    memo: dict = {}
    first = SC.scorecard_for_run(TWO, preds, m, feats, n_bootstrap=NB, n_permutations=3, memo=memo)
    again = SC.scorecard_for_run(TWO, preds, m, feats.copy(), n_bootstrap=NB, n_permutations=3, memo=memo)
    assert len(calls) == 1 and first == again
    _by_metric(again)["source_id_within_covid_balanced_accuracy"]["value"] = -1.0  # a caller's edit stays its own
    other = SC.scorecard_for_run(TWO, preds, m, feats + 1e-3, n_bootstrap=NB, n_permutations=3, memo=memo)
    assert len(calls) == 2 and _by_metric(other)["source_id_within_covid_balanced_accuracy"]["value"] >= 0
    assert SC.scorecard_for_run(TWO, preds, m, feats, n_bootstrap=NB, n_permutations=3, memo=memo) == first
