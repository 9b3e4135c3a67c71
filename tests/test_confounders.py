"""Confounder-only reference rules and view-matched metrics (evaluation.confounders)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxrstudy.evaluation import confounders as C


def films(counts: dict[tuple[str, str], int], seed: int = 0) -> pd.DataFrame:
    """One film per patient: (label, view) -> how many; random age and sex."""
    rng = np.random.default_rng(seed)
    rows = [
        {"label": label, "view": view}
        for (label, view), n in counts.items()
        for _ in range(n)
    ]
    df = pd.DataFrame(rows)
    df["patient_group"] = [f"p{i}" for i in range(len(df))]
    df["age"] = rng.integers(20, 90, len(df)).astype(float)
    df["sex"] = rng.choice(["M", "F", ""], len(df))
    return df


ACTUALMED = {("covid", "AP"): 21, ("covid", "PA"): 5, ("normal", "AP"): 3, ("normal", "PA"): 11}


def test_view_only_reproduces_the_actualmed_projection_rule():
    """21 of 26 COVID-19 films are AP and 11 of 14 normals PA (the manifest's view column): 0.797."""
    rows = films({**ACTUALMED, ("covid", "unknown"): 4})
    res = C.view_only(rows, "covid", "normal", "balanced_accuracy", 200, 0)
    assert res["value"] == pytest.approx((21 / 26 + 11 / 14) / 2) and round(res["value"], 3) == 0.797
    assert res["rule"] == "AP -> covid, PA -> normal" and res["n"] == 40 and res["n_unknown"] == 4
    assert res["ci_low"] < res["value"] < res["ci_high"]
    flipped = films({("covid", "PA"): 21, ("covid", "AP"): 5, ("normal", "PA"): 3, ("normal", "AP"): 11})
    assert C.view_only(flipped, "covid", "normal", "auc", 200, 0)["rule"] == "AP -> normal, PA -> covid"


def test_a_model_that_scores_the_view_gains_nothing_view_matched():
    rows = films(ACTUALMED)
    score = (rows["view"] == "AP").to_numpy(float) * 0.6 + 0.2  # the projection, as a probability
    auc = C.binary_metric(rows, score, "covid", "normal", "auc", 200, 0)["value"]
    assert auc == pytest.approx(C.view_only(rows, "covid", "normal", "auc", 200, 0)["value"]) and auc > 0.75
    vm = C.view_matched(rows, score, "covid", "normal", "auc", 200, 0)
    assert vm["value"] == 0.5 and vm["n_pairs"] == 21 * 3 + 5 * 11 and vm["strata"] == {"AP": 24, "PA": 16}
    ba = C.view_matched(rows, score, "covid", "normal", "balanced_accuracy", 200, 0)
    assert ba["value"] == pytest.approx(0.5)
    # a model that ranks within each view does get credit
    good = np.where(rows["label"] == "covid", 0.9, 0.1)
    assert C.view_matched(rows, good, "covid", "normal", "auc", 200, 0)["value"] == 1.0


def test_demographic_rules_find_planted_age_and_nothing_in_noise():
    rows = films({("pneumonia", "AP"): 60, ("normal", "AP"): 60}, seed=1)
    noise = C.cv_rule(rows, C.confounder_design(rows, view=False), "pneumonia", "normal", "auc", 200, 0)
    assert noise["ci_low"] < 0.5 < noise["ci_high"]
    rows.loc[rows["label"] == "pneumonia", "age"] += 40
    planted = C.cv_rule(rows, C.confounder_design(rows, view=False), "pneumonia", "normal", "auc", 200, 0)
    assert planted["value"] > 0.85 and planted["ci_low"] > 0.7
    block = C.confounder_block(rows, None, "pneumonia", "normal", "auc", 200, 0)
    assert list(block) == list(C.RULES[:3]) and C.best_rule(block)[0] in ("demographics_only", "confounders_only")
    # no view stratum with both labels: the view-only rule cannot be scored, with the reason
    one_view = films({("pneumonia", "AP"): 5, ("normal", "PA"): 5})
    vm = C.view_matched(one_view, np.full(10, 0.5), "pneumonia", "normal", "auc", 50, 0)
    assert vm["value"] is None and vm["n_pairs"] == 0 and "both labels" in vm["note"]


def test_design_has_missing_as_its_own_level():
    rows = pd.DataFrame({"view": ["AP", "PA", "unknown", ""], "age": [50.0, None, 30.0, None], "sex": ["M", "F", "", "x"]})
    X = C.confounder_design(rows)
    assert X.shape == (4, 3 + 2 + 3)
    assert X[:, :3].tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]]
    assert X[:, 3].tolist() == [1, 0, 1, 0] and X[:, 4].tolist() == [50, 40, 30, 40]  # median-filled
    assert X[:, 5:].tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]]


def test_the_view_probe_reads_no_signal_in_noise_and_finds_a_planted_one():
    from cxrstudy.evaluation.scorecard import view_probe

    rows = films({("covid", "AP"): 60, ("covid", "PA"): 40, ("covid", "unknown"): 7}, seed=3)
    rows["image"] = [f"f{i}.png" for i in range(len(rows))]
    rng = np.random.default_rng(0)
    noise = pd.DataFrame(rng.normal(size=(len(rows), 8)), index=rows["image"])
    res = view_probe(noise, rows, 200, 0)
    assert res["n"] == 100 and res["chance"] == 0.5 and res["majority"] == 0.6
    assert res["ci_low"] < 0.5 < res["ci_high"]
    planted = noise.copy()
    planted[0] += 3 * (rows["view"] == "AP").to_numpy()
    res = view_probe(planted, rows, 200, 0)
    assert res["value"] > 0.9 and res["ci_low"] > 0.8
    one_view = rows[rows["view"] == "AP"]
    assert view_probe(noise, one_view, 50, 0)["value"] is None


def test_the_lung_mask_shape_is_one_more_confounder_only_rule(monkeypatch):
    from cxrstudy.lungs import stage

    rows = films({("covid", "AP"): 40, ("normal", "AP"): 40}, seed=4)
    rows["image"] = [f"f{i}.png" for i in range(len(rows))]
    rows = rows.assign(width=200, height=200)
    wide = np.where(rows["label"] == "covid", 150, 110)  # COVID-19 films' lung boxes are wider here
    table = pd.DataFrame({"image": rows["image"], "x0": 20, "y0": 30, "x1": 20 + wide, "y1": 150, "area_fraction": 0.3,
                          "lr_balance": 0.9, "shape_score": 0.8, "qc_pass": True})
    monkeypatch.setattr(stage, "lung_table", lambda profile: table)
    shaped = stage.with_mask_shape(rows, "p")
    assert list(shaped.columns[-8:]) == list(stage.MASK_SHAPE_COLUMNS)
    assert shaped["mask_shape_box_aspect"].iloc[0] == pytest.approx(150 / 120)
    block = C.confounder_block(shaped, None, "covid", "normal", "balanced_accuracy", 100, 0)
    assert block["mask_shape_only"]["value"] == 1.0 and C.best_rule(block)[0] == "mask_shape_only"
    assert "mask_shape_only" not in C.confounder_block(rows, None, "covid", "normal", "balanced_accuracy", 50, 0)

    def no_lungs(profile):
        raise FileNotFoundError(profile)

    monkeypatch.setattr(stage, "lung_table", no_lungs)
    assert stage.with_mask_shape(rows, "p") is rows


def test_mask_shape_check_on_the_film_and_as_the_lung_views_frame_it(monkeypatch):
    from cxrstudy.evaluation import verdict as V
    from cxrstudy.lungs import stage

    rows = films({("covid", "AP"): 40, ("normal", "AP"): 40, ("covid", "PA"): 5}, seed=5)
    rows["image"] = [f"f{i}.png" for i in range(len(rows))]
    rows = rows.assign(width=200, height=250, split=["holdout"] * 2 + ["train"] * (len(rows) - 2))
    cx = np.where(rows["label"] == "covid", 60, 100)  # the box sits elsewhere on COVID-19 films: lost in the frame
    table = pd.DataFrame({"image": rows["image"], "x0": cx - 40, "y0": 40, "x1": cx + 40, "y1": 200,
                          "area_fraction": 0.3, "lr_balance": 0.9, "shape_score": 0.8, "qc_pass": True})
    monkeypatch.setattr(stage, "lung_table", lambda profile: table)
    res = C.mask_shape_check(stage.with_mask_shape(rows, "p"), n_bootstrap=100)
    assert res["film"]["n"] == len(rows) - 2  # the held-out hospital stays out
    assert res["film"]["value"] == 1.0 and res["lung_view"]["ci_low"] <= 0.5 <= res["lung_view"]["ci_high"]
    frame = C.lung_view_frame(stage.with_mask_shape(rows, "p"))
    assert frame["mask_shape_box_height"].iloc[0] == 1.0 and frame["mask_shape_box_width"].iloc[0] == 0.5
    assert C.mask_shape_check(rows) is None
    (text,) = V.mask_shape({"mask_shape": res})
    assert "at a balanced accuracy of 100.0%" in text and "as the lung views frame it" in text
