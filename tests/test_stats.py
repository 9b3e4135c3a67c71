"""The general statistics of cxrstudy.stats: Holm, spread over seeds, group bootstrap."""

from __future__ import annotations

import numpy as np
import pytest

from cxrstudy.stats import group_bootstrap_means, holm, seed_spread


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
