"""Cross-validation: folds on the real manifest, one film one fold, the out-of-fold whole, the stratified
bootstrap, and that no choice reads a held-out row."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxrstudy import config
from cxrstudy.data.manifest import load_manifest
from cxrstudy.data.sources import holdout_sources
from cxrstudy.data.splits import HOLDOUT_FOLD, assign_folds, cv_roles
from cxrstudy.evaluation import cv
from cxrstudy.evaluation.headline import headline
from cxrstudy.evaluation.metrics import compute_metrics
from cxrstudy.evaluation.selection import select_variant
from cxrstudy.reporting.results import evaluate_runs
from cxrstudy.runspec import RunSpec
from cxrstudy.stats import bootstrap_weights


@pytest.fixture(scope="module")
def manifest() -> pd.DataFrame:
    if not config.MANIFEST_PATH.is_file():
        pytest.skip("no built manifest")
    return load_manifest()


def test_the_manifest_records_the_default_folds(manifest):
    again = assign_folds(manifest, config.CV_FOLDS, 0, holdout_sources=holdout_sources())
    assert (again.to_numpy() == manifest["fold"].to_numpy()).all()
    held = manifest["source_name"].isin(holdout_sources())
    assert (manifest.loc[held, "fold"] == HOLDOUT_FOLD).all() and (manifest.loc[held, "split"] == "holdout").all()
    assert set(manifest.loc[~held, "fold"]) == set(range(config.CV_FOLDS))
    # patient groups never span two folds; every fold holds every label and its share of each source x label
    assert (manifest.groupby("patient_group")["fold"].nunique() == 1).all()
    free = manifest[~held]
    share = pd.crosstab([free["source_name"], free["label"]], free["fold"], normalize="index")
    big = free.groupby(["source_name", "label"]).size() >= 100
    assert (share[big.reindex(share.index).to_numpy()].sub(1 / config.CV_FOLDS).abs() < 0.05).all().all()


def test_folds_do_not_depend_on_row_order_or_other_folds(manifest):
    shuffled = manifest.sample(frac=1, random_state=7)
    a = assign_folds(manifest, 3, 1, holdout_sources=holdout_sources())
    b = assign_folds(shuffled, 3, 1, holdout_sources=holdout_sources()).loc[manifest.index]
    assert a.equals(b)
    with pytest.raises(ValueError, match="folds must be an integer >= 2"):
        assign_folds(manifest, 1)


def test_each_fold_tests_its_own_films_and_trains_on_the_rest(manifest):
    roles = [cv_roles(manifest, 5, f, 0) for f in range(5)]
    tested = pd.concat([r.loc[r["split"] == "test", "image"] for r in roles])
    outside = manifest.loc[manifest["split"] != "holdout", "image"]
    assert sorted(tested) == sorted(outside)  # every film outside the held-out hospital tested exactly once
    for f, r in enumerate(roles):
        train, val, test = (set(r.loc[r["split"] == s, "patient_group"]) for s in ("train", "val", "test"))
        assert not (train & test) and not (val & test) and not (train & val)
        assert (r.loc[r["split"] == "test", "fold"] == f).all()
        assert (r.loc[manifest["source_name"].isin(holdout_sources()), "split"] == "holdout").all()
        share = (r["split"] == "val").sum() / r["split"].isin(["train", "val"]).sum()
        assert 0.10 < share < 0.20


# ----------------------------------------------------------------------------------- out-of-fold whole


def _fold_run(fold: int, films: pd.DataFrame, held: pd.DataFrame, val: pd.DataFrame, p: float, variant="baseline"):
    """A fold run's record and predictions: P(covid) = ``p`` for covid films, 1 - p for the others."""
    spec = RunSpec("covid_vs_normal", "efficientnet_lite0", "deep", False, 0, variant, fold=fold)
    rows = pd.concat([films.assign(split="test"), held.assign(split="holdout"), val.assign(split="val")])
    pc = np.where(rows["label"] == "covid", p, 1 - p)
    preds = rows.assign(prob_covid=pc, prob_normal=1 - pc, pred=np.where(pc >= 0.5, "covid", "normal"))
    info = {**spec.to_record(), "run_id": spec.run_id, "classes": ["covid", "normal"], "folds": 2,
            "config_id": spec.config_id, "train_seconds": 1.0}
    return {"dir": f"runs/{spec.run_id}", "info": info, "predictions": preds.reset_index(drop=True)}


def _films(prefix: str, n: int) -> pd.DataFrame:
    return pd.DataFrame({"image": [f"{prefix}{i}.png" for i in range(n)],
                         "label": ["covid" if i % 2 else "normal" for i in range(n)],
                         "source": "ieee8023/covid-chestxray-dataset",
                         "patient_group": [f"pg_{prefix}{i}" for i in range(n)]})


def test_oof_whole_stacks_fold_tests_and_averages_the_held_out_hospital():
    held = _films("held", 6)
    runs = [_fold_run(0, _films("a", 10), held, _films("v0_", 4), 0.9),
            _fold_run(1, _films("b", 10), held, _films("v1_", 4), 0.6)]
    [whole] = cv.oof_runs(runs)
    p = whole["predictions"]
    assert whole["info"]["run_id"] == whole["info"]["config_id"] == RunSpec.from_record(runs[0]["info"]).config_id
    assert whole["info"]["fold"] is None and whole["info"]["n_folds"] == 2
    assert (p["split"] == "test").sum() == 20 and p.loc[p["split"] == "test", "image"].is_unique
    hold = p[p["split"] == "holdout"]
    assert len(hold) == 6
    covid = hold["label"] == "covid"
    assert np.allclose(hold.loc[covid, "prob_covid"], 0.75) and np.allclose(hold.loc[~covid, "prob_covid"], 0.25)
    assert (p.loc[p["split"] == "test", "fold"].to_numpy() == np.repeat([0, 1], 10)).all()
    dup = [runs[0], _fold_run(1, _films("a", 10), held, _films("v1_", 4), 0.6)]
    with pytest.raises(ValueError, match="two folds' test rows"):
        cv.oof_runs(dup)


def test_no_choice_reads_a_held_out_row():
    """The headline configuration and the recommended variant read only inner validation: scrambling every
    out-of-fold and held-out probability changes neither."""
    held = _films("held", 6)
    runs = [_fold_run(f, _films(f"{v}{f}_", 10), held, _films(f"v{f}_", 8), p, v)
            for v, p in (("baseline", 0.8), ("lung", 0.7)) for f in (0, 1)]

    def choices(rs):
        wholes = cv.oof_runs(rs)
        head = headline(evaluate_runs(wholes, 50, 0))["run_id"]
        rec = select_variant(wholes, "covid_vs_normal", "deep", max_drop=0.05)
        return head, rec["name"]

    before = choices(runs)
    rng = np.random.default_rng(0)
    for r in runs:
        p = r["predictions"]
        out = p["split"] != "val"
        p.loc[out, "prob_covid"] = rng.uniform(size=out.sum())
        p.loc[out, "prob_normal"] = 1 - p.loc[out, "prob_covid"]
        p.loc[out, "pred"] = np.where(p.loc[out, "prob_covid"] >= 0.5, "covid", "normal")
    assert choices(runs) == before


# ----------------------------------------------------------------------------------- intervals


def test_the_bootstrap_keeps_every_class_in_every_replicate():
    groups = np.array([f"g{i}" for i in range(40)])
    strata = np.array(["rare"] * 2 + ["common"] * 38)
    for W in bootstrap_weights(groups, 300, 0, strata):
        assert (W[:, :2].sum(axis=1) == 2).all()  # the rare class drawn exactly as often as it has groups
        assert (W.sum(axis=1) == 40).all()


def test_an_interval_needs_ten_patients_a_class():
    y = ["covid"] * 30 + ["normal"] * 9
    probs = np.array([[0.9, 0.1]] * 30 + [[0.2, 0.8]] * 9)
    res = compute_metrics(y, probs, ["covid", "normal"], [f"g{i}" for i in range(39)], 100, 0)
    assert res["accuracy"]["value"] == 1.0 and res["accuracy"]["ci_low"] is None
    assert res["not_estimable"].startswith("not estimable") and "normal: 9" in res["not_estimable"]
    ok = compute_metrics(y + ["normal"], np.vstack([probs, [[0.2, 0.8]]]), ["covid", "normal"],
                         [f"g{i}" for i in range(40)], 100, 0)
    assert "not_estimable" not in ok and ok["accuracy"]["ci_low"] is not None


def test_a_variant_is_read_against_its_baseline_on_the_same_films():
    """variant_differences: the paired difference on the films both score, per fold, and the reading."""
    from cxrstudy.evaluation.variants import variant_differences

    held = _films("held", 24)
    manifest = pd.concat([_films(f"{v}{f}_", 30) for v in ("x",) for f in (0, 1)] + [held]).assign(
        source_name="ieee8023")
    manifest.loc[manifest["image"].str.startswith("held"), "source_name"] = "actualmed"
    def runs(variant, p):
        return [_fold_run(f, _films(f"x{f}_", 30), held, _films(f"v{f}_", 4), p, variant) for f in (0, 1)]
    wholes = cv.oof_runs(runs("baseline", 0.6) + runs("lung", 0.9))
    got = {d["goal"]: d for d in variant_differences(wholes, manifest, n_bootstrap=200)}
    assert set(got) == {"S2", "paper"}  # a binary task scores no pneumonia: no S1 or S4
    paper = got["paper"]
    assert paper["variant"] == "lung" and paper["n"] == 60 and paper["n_patients"] == 60
    assert paper["difference"]["value"] == pytest.approx(0.0)  # both right on every film (0.6 and 0.9 > 0.5)
    assert got["S2"]["per_fold"] == [0.0, 0.0] and got["S2"]["reading"] == "undetermined"
    worse = cv.oof_runs(runs("baseline", 0.9) + runs("lung", 0.4))
    [s2] = [d for d in variant_differences(worse, manifest, n_bootstrap=200) if d["goal"] == "S2"]
    assert s2["difference"]["value"] == pytest.approx(-1.0) and s2["reading"] == "worse"
    assert s2["combined"]["ci_high"] < 0 and s2["per_fold"] == [-1.0, -1.0]
