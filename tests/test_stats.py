"""The general statistics of cxrstudy.stats: Holm, spread over seeds, group and stratified bootstrap, grouped CV."""

from __future__ import annotations

import numpy as np
import pytest

from cxrstudy.stats import group_bootstrap_means, grouped_cv_predict, holm, seed_spread, stratified_mean_ci


def test_holm_adjustment():
    assert holm([0.01, 0.04, 0.03, None]) == pytest.approx([0.03, 0.06, 0.06, None])
    assert holm([0.5, 0.9]) == [1.0, 1.0] and holm([]) == []


def test_seed_spread_by_hand():
    s = seed_spread([0.9, 0.8, 1.0])
    assert s["mean"] == pytest.approx(0.9) and s["sd"] == pytest.approx(0.1) and s["n"] == 3
    assert seed_spread([0.5])["sd"] == 0.0


def test_group_bootstrap_means_resample_whole_groups_with_one_shared_draw():
    # two patient groups of three images each: every replicate takes whole groups, so the mean of `a` can only
    # be 0, 1/2 or 1, and `b` (= 1 - a) moves exactly opposite in the same replicate
    groups = np.array(["p1"] * 3 + ["p2"] * 3)
    a = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    ra, rb = group_bootstrap_means([a, 1 - a], groups, n_bootstrap=400, seed=3)
    assert ra["value"] == rb["value"] == 0.5 and ra["n_boot"] == 400
    assert {ra["ci_low"], ra["ci_high"]} <= {0.0, 0.5, 1.0} and ra["ci_low"] < ra["ci_high"]
    assert ra["ci_low"] == 1 - rb["ci_high"] and ra["ci_high"] == 1 - rb["ci_low"]
    assert group_bootstrap_means([a], groups, 400, 3) == [ra]  # seeded


def test_stratified_mean_ci_resamples_within_each_stratum():
    # constant within each stratum of fixed size: every replicate's mean is the same, unlike a plain bootstrap
    values = np.array([0.0] * 4 + [1.0] * 4)
    [r] = stratified_mean_ci([values], np.array(["a"] * 4 + ["b"] * 4), n_bootstrap=200, seed=1)
    assert r == {"value": 0.5, "ci_low": 0.5, "ci_high": 0.5, "n": 8}
    [mixed] = stratified_mean_ci([values], np.array(["a", "b"] * 4), n_bootstrap=200, seed=1)
    assert mixed["ci_low"] < 0.5 < mixed["ci_high"]


def test_grouped_cv_predict_gives_out_of_fold_probabilities_per_label():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(20), 3).astype(str)
    y = np.where(np.repeat(np.arange(20), 3) % 2 == 0, "covid", "normal")
    X = rng.normal(size=(60, 4)) + (y == "covid")[:, None]
    probs, labels = grouped_cv_predict(X, y, groups, n_splits=5, seed=0)
    assert labels == ["covid", "normal"] and probs.shape == (60, 2)
    assert np.allclose(probs.sum(axis=1), 1.0)
    again, _ = grouped_cv_predict(X, y, groups, n_splits=5, seed=0)
    assert np.array_equal(probs, again)
    assert ((probs[:, 0] > 0.5) == (y == "covid")).mean() > 0.7
