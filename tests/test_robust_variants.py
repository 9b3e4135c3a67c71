"""Group DRO and deep feature reweighting (DFR) on a tiny real dataset (mirror films, 32 px): the q update, the
groups log, the retrained head, and that held-out films' sources and views never reach the trained weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cxrstudy import tensorcache, training
from cxrstudy.data import splits
from cxrstudy.images import load_xray, resize_short_side
from cxrstudy.runspec import RunSpec
from cxrstudy.training.dfr import balanced_sample, choose_c, choose_grouping
from cxrstudy.training.groupdro import group_losses

DARKCOVID = ("muhammedtalo/COVID-19", "ee3e2cffc0824711bed675275506b26f19be7198", "X-Ray Image DataSet")
FOLDERS = {"covid": "Covid-19", "normal": "No_findings"}
PER_CLASS = 24
COMMON = dict(task="covid_vs_normal", backbone="efficientnet_lite0", image_size=32, batch_size=8, seed=0,
              device="cpu", scenario="deep", epochs=1, wd=0.0, folds=2, fold=0, inner_val=0.45)


@pytest.fixture(scope="module", autouse=True)
def tensor_cache(tmp_path_factory):
    """The shared uint8 tensor cache in a temporary folder; one torch thread (shared CPU)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tensorcache, "DEFAULT_CACHE_DIR", tmp_path_factory.mktemp("tensors"))
        yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, mirror_root: Path) -> tuple[pd.DataFrame, Path]:
    """24 covid + 24 normal real films (32 px PNGs), two sites and two views alternating, four films of the
    held-out hospital (actualmed)."""
    repo, commit, top = DARKCOVID
    root = tmp_path_factory.mktemp("processed")
    rows = []
    for label, folder in FOLDERS.items():
        src = sorted((mirror_root / repo / commit / top / folder).iterdir())[:PER_CLASS]
        assert len(src) == PER_CLASS, f"mirror folder {folder} has too few images"
        for i, path in enumerate(src):
            rel = f"images/darkcovid/{label}_{i}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            resize_short_side(load_xray(path), 40).save(root / rel)
            rows.append({
                "image": rel, "label": label, "split": "holdout" if i >= PER_CLASS - 2 else "cv", "source": repo,
                "source_name": "actualmed" if i >= PER_CLASS - 2 else ("site_a", "site_b")[i % 2],
                "view": ("PA", "AP")[(i // 2) % 2], "patient_group": f"g_{label}_{i}", "sha256": f"{label}{i:02d}",
            })
    return pd.DataFrame(rows), root


def _scrambled(manifest: pd.DataFrame, roles_of: pd.DataFrame, splits_hit: tuple[str, ...]) -> pd.DataFrame:
    """The manifest with the sources and views of the rows whose fold-0 role is in ``splits_hit`` replaced."""
    m = manifest.copy()
    hit = roles_of["split"].isin(splits_hit).to_numpy()
    assert hit.sum() >= 4
    m.loc[hit, "source_name"] = "site_z"
    m.loc[hit, "view"] = np.where(m.loc[hit, "view"] == "PA", "AP", "PA")
    return m


@pytest.fixture
def fixed_roles(monkeypatch, tiny):
    """Fold roles from the unscrambled manifest (folds are stratified by source: a scrambled source would move
    films between folds, which is a different experiment); returns the fold-0 roles."""
    manifest, _ = tiny
    original = splits.cv_roles

    def roles(m, folds, fold, seed=0, val_fraction=0.15):
        clean = original(manifest, folds, fold, seed, val_fraction)
        return m.assign(fold=clean["fold"].to_numpy(), split=clean["split"].to_numpy())

    monkeypatch.setattr(splits, "cv_roles", roles)
    return original(manifest, 2, 0, 0, COMMON["inner_val"])


def test_dro_step_moves_weight_to_the_worst_group():
    q = torch.full((3,), 1 / 3)
    losses = torch.tensor([0.2, 0.2, 0.2, 2.0, 2.0, 0.5])  # group 1 is worst
    per_group, counts = group_losses(losses, torch.tensor([0, 0, 0, 1, 1, 2]), 3)
    assert torch.allclose(per_group, torch.tensor([0.2, 2.0, 0.5])) and counts.tolist() == [3, 2, 1]
    new_q, loss = training.dro_step(q, per_group.requires_grad_(), eta=0.5)
    assert torch.isclose(new_q.sum(), torch.tensor(1.0))
    assert new_q[1] > q[1] and new_q[0] < q[0] and new_q.argmax() == 1
    expected = torch.exp(0.5 * torch.tensor([0.2, 2.0, 0.5])) / torch.exp(0.5 * torch.tensor([0.2, 2.0, 0.5])).sum()
    assert torch.allclose(new_q, expected) and torch.isclose(loss, (expected * per_group).sum())
    loss.backward()  # the loss is differentiable in the group losses, q is not
    # an absent group (0 items) keeps a loss of 0 and loses weight relative to the others
    _, counts = group_losses(losses[:3], torch.tensor([0, 0, 0]), 3)
    assert counts.tolist() == [3, 0, 0]


def test_group_dro_config_is_validated():
    with pytest.raises(ValueError, match=r"TrainConfig.objective must be one of"):
        training.TrainConfig(objective="dro", variant="x")
    with pytest.raises(ValueError, match=r"TrainConfig.dro_eta"):
        training.TrainConfig(scenario="deep", objective="group_dro", dro_eta=0.0, variant="x")
    with pytest.raises(ValueError, match=r"TrainConfig.objective must be 'erm' for shallow"):
        training.TrainConfig(scenario="shallow", objective="group_dro", variant="x")
    with pytest.raises(ValueError, match=r"TrainConfig.objective group_dro cannot be combined"):
        training.TrainConfig(scenario="deep", objective="group_dro", adversary_weight=1.0, variant="x")
    with pytest.raises(ValueError, match=r"TrainConfig.variant is 'baseline'"):
        training.TrainConfig(scenario="deep", objective="group_dro")


def test_group_dro_run_logs_groups_from_training_rows_only(tiny, tmp_path, fixed_roles):
    manifest, root = tiny
    cfg = training.TrainConfig(**COMMON, variant="group_dro", objective="group_dro", dro_eta=0.5)
    a = training.train_run(manifest, cfg, root, out_root=tmp_path / "a")
    b = training.train_run(_scrambled(manifest, fixed_roles, ("test", "holdout")), cfg, root, out_root=tmp_path / "b")
    info = json.loads((a.run_dir / "run.json").read_text())
    train = fixed_roles[(fixed_roles["split"] == "train")]
    expected = train.groupby(["label", "source_name"]).size()
    assert [(g["label"], g["source"], g["n_train"]) for g in info["params"]["dro_groups"]] == [
        (lab, src, int(n)) for (lab, src), n in expected.items()
    ]
    assert info["objective"] == "group_dro" and info["params"]["dro_eta"] == 0.5
    q = info["params"]["dro_final_q"]
    assert set(q) == {f"{lab}|{src}" for lab, src in expected.index} and np.isclose(sum(q.values()), 1.0)
    log = pd.read_csv(a.run_dir / "groups.csv")
    assert list(log.columns) == ["epoch", "group", "label", "source", "n_train", "train_loss", "items", "q"]
    assert (log["epoch"] == 1).all() and log["items"].sum() == len(train)  # every training film once per epoch
    assert np.isclose(log["q"].sum(), 1.0) and not log["q"].nunique() == 1  # the weights moved
    # the held-out films' sources and views never reach the weights
    wa, wb = (torch.load(r.run_dir / "model.pth", weights_only=True) for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # ... while a scrambled training source does change the groups
    c = training.train_run(_scrambled(manifest, fixed_roles, ("train",)), cfg, root, out_root=tmp_path / "c")
    assert {g["source"] for g in c.info["params"]["dro_groups"]} == {"site_z"}


def test_dfr_retrains_the_head_on_inner_validation_only(tiny, tmp_path, fixed_roles):
    manifest, root = tiny
    base = training.train_run(manifest, training.TrainConfig(**COMMON), root, out_root=tmp_path / "base")
    a = training.train_dfr(base.run_dir, manifest, root)
    b = training.train_dfr(base.run_dir, _scrambled(manifest, fixed_roles, ("test", "holdout")), root,
                           out_root=tmp_path / "b")
    spec = RunSpec.from_record(base.info).dfr
    assert a["run_id"] == spec.run_id and a["run_id"].endswith("__fold0__dfr") and a["variant"] == "dfr"
    assert a["base_run_id"] == base.run_id and a["config_id"] == spec.config_id
    run_dir = base.run_dir.parent / a["run_id"]
    preds = pd.read_csv(run_dir / "predictions.csv")
    roles = fixed_roles[fixed_roles["label"].isin(["covid", "normal"])]
    assert sorted(preds["split"].unique()) == ["holdout", "test", "val"]
    assert set(preds["image"]) == set(roles.loc[roles["split"] != "train", "image"])
    assert a["dfr"]["c"] in training.dfr.C_GRID and a["dfr"]["n_val_films"] == (roles["split"] == "val").sum()
    assert a["dfr"]["val_predictions"].startswith("cross-fitted") and any(t["splits"] for t in a["dfr"]["c_grid"])
    # the head changed, the backbone did not
    w0 = torch.load(base.run_dir / "model.pth", weights_only=True)
    wa = torch.load(run_dir / "model.pth", weights_only=True)
    assert not torch.equal(w0["head.weight"], wa["head.weight"])
    assert all(torch.equal(w0[k], wa[k]) for k in w0 if not k.startswith("head."))
    model, info = training.load_run_model(run_dir)  # loads as any run
    assert info["variant"] == "dfr" and model.head.weight.shape == (2, w0["head.weight"].shape[1])
    # scrambling the held-out films' sources and views leaves the retrained head bit-identical ...
    wb = torch.load(tmp_path / "b" / a["run_id"] / "model.pth", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and b["dfr"]["c_grid"] == a["dfr"]["c_grid"]
    # ... while the inner-validation films' groups are what it reads
    c = training.train_dfr(base.run_dir, _scrambled(manifest, fixed_roles, ("val",)), root, out_root=tmp_path / "c")
    assert c["dfr"]["grouping"] != ["label"] and {g["group"].split("|")[1] for g in c["dfr"]["groups"]} == {"site_z"}
    assert c["dfr"]["groups"] != a["dfr"]["groups"]
    # decomposition-on runs have no DFR
    with pytest.raises(ValueError, match="decomposition-off runs only"):
        _ = RunSpec.from_record({**base.info, "decomposition": True}).dfr


def test_balanced_sample_and_grouping():
    groups = pd.Series(["a"] * 5 + ["b"] * 3 + ["c"])  # c: one film, left out
    pick = balanced_sample(groups, np.random.default_rng(0))
    assert groups.iloc[pick].value_counts().to_dict() == {"a": 3, "b": 3}
    assert np.array_equal(pick, balanced_sample(groups, np.random.default_rng(0)))
    rows = pd.DataFrame({"label": ["covid", "covid", "normal", "normal"], "source_name": ["x", "y", "z", "z"],
                         "view": ["PA", "PA", "AP", "PA"]})
    cols, g = choose_grouping(rows)  # covid has no (label, source[, view]) group of two: label only
    assert cols == ("label",) and g.tolist() == ["covid", "covid", "normal", "normal"]
    # four films cannot be cross-fitted (every split's training part lacks a class): the grid's first C, no CV
    c, table, probs = choose_c(np.eye(4), np.array([0, 0, 1, 1]), rows.assign(patient_group=list("abcd")), 2, 0)
    assert c == training.dfr.C_GRID[0] and probs is None and all(t["splits"] == 0 for t in table)


def test_run_ids_list_the_dfr_runs_of_decomposition_off_runs_only():
    params = {"task": "covid_vs_normal", "backbone": "efficientnet_lite0", "scenario": "deep", "seed": 0, "folds": 2,
              "decomposition": [False, True], "variant": "lung", "dfr": True}
    ids = [s.run_id for s in RunSpec.from_params(params)]
    assert len(ids) == 6 and sum(i.endswith("__lung_dfr") for i in ids) == 2
    assert ids[1] == ids[0] + "_dfr"
    assert len(training.TrainConfig.from_params({**params, "input_view": "lung_mask", "equalize": True})) == 4
    assert [s.variant for s in RunSpec.from_params({**params, "variant": "baseline"})][:2] == ["baseline", "dfr"]


def test_adversary_logs_the_kept_epoch_and_the_last(tiny, tmp_path):
    manifest, root = tiny
    cfg = training.TrainConfig(**{**COMMON, "epochs": 3, "patience": 5}, variant="adv", adversary_weight=1.0,
                               adversary_schedule="constant")
    run = training.train_run(manifest, cfg, root, out_root=tmp_path)
    log = pd.read_csv(run.run_dir / "adversary.csv")
    kept, last = run.info["params"]["adversary_kept_epoch"], run.info["params"]["adversary_last_epoch"]
    assert kept["epoch"] == run.info["best_epoch"] and last["epoch"] == 3 == len(log)
    assert kept["adv_accuracy"] == log.loc[log["epoch"] == kept["epoch"], "adv_accuracy"].item()
    assert last["adv_accuracy"] == log["adv_accuracy"].iloc[-1]
