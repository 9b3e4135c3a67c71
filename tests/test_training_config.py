"""TrainConfig: defaults as before, every bad value refused with the parameter named, the notebook's parameters fit."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from cxrstudy import config, pipeline, training
from cxrstudy.training import TrainConfig, trainconfig


def test_defaults_are_the_study_defaults():
    cfg = TrainConfig()
    assert (cfg.task, cfg.scenario, cfg.decomposition, cfg.backbone) == (
        "covid_vs_normal",
        "shallow",
        False,
        "efficientnet_lite0",
    )
    assert (cfg.image_size, cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed, cfg.device) == (
        160,
        3,
        1e-3,
        32,
        0,
        "auto",
    )
    assert (cfg.num_workers, cfg.patience, cfg.use_lr_find, cfg.finetune_stages) == (0, 2, False, None)
    assert (cfg.lr_mult, cfg.wd, cfg.dropout) == (100.0, None, 0.2)
    assert (cfg.lr_range, cfg.lr_find_iters) == ((1e-5, 1e-2), 50)


def test_is_frozen_and_hashable_and_stages_become_a_tuple():
    cfg = TrainConfig(scenario="finetune", finetune_stages=[1, 2, 4])
    assert cfg.finetune_stages == (1, 2, 4) and hash(cfg) == hash(
        TrainConfig(scenario="finetune", finetune_stages=(1, 2, 4))
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 5  # type: ignore[misc]
    assert dataclasses.replace(cfg, seed=3).seed == 3


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("task", "covid_vs_everything", "unknown task"),
        ("scenario", "linear", "unknown scenario"),
        ("backbone", "resnet9000", "unknown backbone"),
        ("device", "gpu", "is not a device"),
        ("device", 0, "must be a string"),
        ("decomposition", 1, "True or False"),
        ("use_lr_find", "yes", "True or False"),
        ("image_size", 0, "integer >= 1"),
        ("epochs", 0, "integer >= 1"),
        ("epochs", 2.0, "integer >= 1"),
        ("epochs", True, "integer >= 1"),
        ("batch_size", 1, "integer >= 2"),
        ("seed", -1, "integer >= 0"),
        ("num_workers", -1, "integer >= 0"),
        ("patience", -1, "integer >= 0"),
        ("lr", 0.0, "number > 0"),
        ("lr", -1e-3, "number > 0"),
        ("lr", float("nan"), "finite number"),
        ("lr", "0.001", "finite number"),
        ("lr_mult", 0, "number > 0"),
        ("wd", -0.1, "number >= 0"),
        ("dropout", 1.0, "< 1"),
        ("dropout", -0.1, ">= 0"),
        ("finetune_stages", [], "strictly increasing"),
        ("finetune_stages", [2, 1], "strictly increasing"),
        ("finetune_stages", [0, 1], "strictly increasing"),
        ("finetune_stages", 3, "sequence of integers"),
        ("lr_range", (1e-2, 1e-5), "0 < low <= high"),
        ("lr_range", (0.0, 1e-2), "0 < low <= high"),
        ("lr_range", 1e-3, "two finite numbers"),
        ("lr_find_iters", 2, "integer >= 5"),
        ("variant", "Lung", "lower-case letters"),
        ("variant", "", "lower-case letters"),
        ("input_view", "lungs", "unknown view"),
        ("equalize", 1, "True or False"),
        ("view_margin", 0.5, "< 0.5"),
        ("adversary_weight", -1.0, ">= 0"),
        ("adversary_schedule", "linear", "must be one of"),
        ("adversary_lr", 0.0, "> 0"),
        ("adversary_hidden", 0, "integer >= 1"),
        ("sampling", "balanced", "must be one of"),
    ],
)
def test_bad_values_raise_naming_the_parameter(name: str, value: object, message: str):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{name}\b.*{message}") as err:
        TrainConfig(**{name: value})
    if name not in ("backbone",):
        assert repr(value) in str(err.value)


def test_a_variant_must_be_named_and_shallow_has_no_adversary():
    with pytest.raises(ValueError, match=r"TrainConfig\.variant is 'baseline' but the input view"):
        TrainConfig(scenario="deep", input_view="lung_mask")
    with pytest.raises(ValueError, match=r"TrainConfig\.variant is 'baseline'"):
        TrainConfig(scenario="deep", adversary_weight=0.5)
    with pytest.raises(ValueError, match=r"TrainConfig\.adversary_weight must be 0 for shallow"):
        TrainConfig(scenario="shallow", variant="adv", adversary_weight=0.5)
    with pytest.raises(ValueError, match=r"TrainConfig\.variant is 'baseline'.*sampling"):
        TrainConfig(scenario="deep", sampling="source_balanced")
    with pytest.raises(ValueError, match=r"TrainConfig\.sampling must be 'uniform' for shallow"):
        TrainConfig(scenario="shallow", variant="bal", sampling="source_balanced")
    cfg = TrainConfig(
        scenario="deep", variant="lung_adversary", input_view="lung_mask", equalize=True, adversary_weight=1
    )
    assert cfg.adversary == {"weight": 1.0, "schedule": "ganin", "lr": 1e-3, "hidden": 256}
    assert (
        TrainConfig().adversary is None
        and TrainConfig(variant="lung", input_view="lung_crop").adversary is None
    )
    assert TrainConfig(scenario="deep", seed=2, variant="lung", input_view="lung_crop").run_id == (
        "covid_vs_normal__efficientnet_lite0__deep__nodecomp__seed2__fold0__lung"
    )
    assert TrainConfig(scenario="deep", decomposition=True).run_id == (
        "covid_vs_normal__efficientnet_lite0__deep__decomp__seed0__fold0"
    )


def test_good_edge_values_pass():
    TrainConfig(lr=1, wd=0.0, dropout=0.0, patience=0, batch_size=2, device="cuda:1", finetune_stages=(2,))
    for task in config.TASKS:
        for scenario in config.SCENARIOS:
            TrainConfig(task=task, scenario=scenario)


def test_train_run_takes_the_manifest_a_config_and_paths_only():
    params = inspect.signature(training.train_run).parameters
    assert list(params) == ["manifest", "cfg", "image_root", "out_root", "profile_dir", "feature_cache_dir"]


def test_the_transfer_notebook_parameters_are_config_fields_or_its_own():
    declared = set(pipeline.declared_parameters(config.NOTEBOOKS_DIR / "04_transfer.ipynb"))
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert declared - fields == {"profile", "max_per_class", "repeats", "dfr", "only_fold"}


def test_finetune_epochs_are_the_total_over_its_stages():
    assert training.stage_epochs(3, 3) == [1, 1, 1] and training.stage_epochs(8, 3) == [2, 3, 3]
    assert training.stage_epochs(5, 1) == [5] and sum(training.stage_epochs(10, 4)) == 10
    with pytest.raises(ValueError, match="at least one each"):
        training.stage_epochs(2, 3)
    assert TrainConfig(scenario="finetune", epochs=8).stage_epochs() == [2, 3, 3]
    assert TrainConfig(scenario="finetune", epochs=4, finetune_stages=(1, 4)).stage_epochs() == [2, 2]
    assert TrainConfig(scenario="deep", epochs=8).stage_epochs() == [8]
    with pytest.raises(ValueError, match=r"TrainConfig\.epochs is the total over finetune's 3 stages") as err:
        TrainConfig(scenario="finetune", epochs=2)
    assert "(got 2)" in str(err.value)
    # the count TrainConfig assumes is the default schedule of a Classifier's four layer groups
    assert len(training.finetune_schedule(4)) == trainconfig.DEFAULT_FINETUNE_STAGE_COUNT
    assert "same number of optimizer steps" in training.BUDGET_RULE
