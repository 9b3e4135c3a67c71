"""The run specification: one place for a run's identity, its id's spelling, its record and its expansion."""

from __future__ import annotations

import pytest

from cxrstudy import pipeline, runspec
from cxrstudy.runspec import RunSpec
from cxrstudy.training import TrainConfig

#: Notebook 04 parameters that are not TrainConfig fields: where reports go, how many seeds, the subsample.
NOTEBOOK_ONLY = {"profile", "max_per_class", "repeats", "dfr", "only_fold"}


def test_record_round_trip_and_defaults():
    cfg = TrainConfig(task="covid_normal_pneumonia", scenario="deep", seed=4, variant="lung",
                      input_view="lung_mask", equalize=True, image_size=96)
    spec = cfg.spec
    record = {"run_id": cfg.run_id, **spec.to_record(), "image_size": 96, "input_view": "lung_mask",
              "equalize": True, "view_margin": 0.05, "classes": ["covid", "normal", "pneumonia"]}
    assert list(spec.to_record()) == list(runspec.IDENTITY)
    assert RunSpec.from_record(record) == spec and RunSpec.from_record(record).run_id == record["run_id"]
    old = {"task": "covid_vs_normal", "backbone": "b", "scenario": "shallow", "decomposition": True, "seed": 1}
    assert RunSpec.from_record(old).variant == "baseline" and RunSpec.from_record(old).view == ("full", False, 0.05)
    with pytest.raises(ValueError, match=r"run\.json: missing key\(s\) \['seed'\]"):
        RunSpec.from_record({k: v for k, v in old.items() if k != "seed"}, where="run.json")
    assert spec.config_key == ("covid_normal_pneumonia", "efficientnet_lite0", "deep", False, "lung")
    assert spec.key == (*spec.config_key, 4)
    assert spec.label(" ") == "covid_normal_pneumonia efficientnet_lite0 deep nodecomp seed4 fold0 lung"


def test_from_params_expands_seeds_then_decomposition_and_notebook_04_builds_its_configs_from_it():
    declared = pipeline.declared_parameters(pipeline.notebook_path(pipeline.Step("t", "04_transfer")))
    fields = set(TrainConfig.__dataclass_fields__)
    assert set(declared) - NOTEBOOK_ONLY <= fields, "a notebook 04 parameter that is no TrainConfig field"
    params = {**declared, "scenario": "deep", "seed": 3, "folds": 2, "repeats": 2, "decomposition": [False, True],
              "variant": "lung", "input_view": "lung_crop", "lr_range": [1e-4, 1e-3], "epochs": 5}
    configs = TrainConfig.from_params(params)
    assert [(c.seed, c.fold, c.decomposition) for c in configs] == [
        (s, f, d) for s in (3, 5) for f in (0, 1) for d in (False, True)
    ]
    assert [c.train_seed for c in configs] == [3, 3, 4, 4, 5, 5, 6, 6]
    assert all(c.folds == 2 for c in configs)
    assert [c.spec for c in configs] == RunSpec.from_params(params)
    assert all(c.lr_range == (1e-4, 1e-3) and c.epochs == 5 and c.input_view == "lung_crop" for c in configs)
    only = TrainConfig.from_params({**params, "only_fold": 1})  # one fold of every repeat, nothing else changed
    assert [c.spec for c in only] == [c.spec for c in configs if c.fold == 1]
    one = TrainConfig.from_params({**declared, "decomposition": True})
    assert [(c.seed, c.fold, c.decomposition) for c in one] == [
        (declared["seed"], f, True) for f in range(declared["folds"])
    ]


def test_the_run_id_format_lives_in_one_place(monkeypatch):
    """Changing the spelling in runspec changes every run id the package makes: configs, and the runs the
    pipeline expects notebook 05 to evaluate (the e2e smoke test runs the whole profile under such a change)."""
    before = pipeline.expected_run_ids(pipeline.load_profile("smoke"))
    monkeypatch.setattr(runspec, "CONFIG_ID_FORMAT", "{task}-{scenario}-{decomposition}-s{seed}-{backbone}")
    monkeypatch.setattr(runspec, "FOLD_SUFFIX", "-f{fold}")
    monkeypatch.setattr(runspec, "VARIANT_SUFFIX", "+{variant}")
    after = pipeline.expected_run_ids(pipeline.load_profile("smoke"))
    assert len(after) == len(before) and not set(after) & set(before)
    assert "covid_vs_normal-shallow-nodecomp-s0-efficientnet_lite0-f1" in after
    assert "covid_normal_pneumonia-deep-nodecomp-s0-efficientnet_lite0-f0+lung_adversary" in after
    cfg = TrainConfig(scenario="deep", variant="lung", input_view="lung_crop", fold=1)
    assert cfg.run_id == "covid_vs_normal-deep-nodecomp-s0-efficientnet_lite0-f1+lung"
    assert cfg.spec.config_id == "covid_vs_normal-deep-nodecomp-s0-efficientnet_lite0+lung"
