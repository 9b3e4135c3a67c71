"""Training scenarios on a tiny real dataset (mirror images, 32 px): what each scenario may change, outputs, seeds."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.data.core import DataLoaders

from cxrstudy import config, tensorcache, training
from cxrstudy.decomposition import Decomposition, save_decomposition
from cxrstudy.images import load_xray, resize_short_side
from cxrstudy.models import Classifier, create_backbone, get_spec, model_transform

BACKBONE = "efficientnet_lite0"
DARKCOVID = ("muhammedtalo/COVID-19", "ee3e2cffc0824711bed675275506b26f19be7198", "X-Ray Image DataSet")
FOLDERS = {"covid": "Covid-19", "normal": "No_findings"}
SPLIT_OF = ["train"] * 4 + ["val"] * 2 + ["test"] * 2
COMMON = dict(task="covid_vs_normal", backbone=BACKBONE, image_size=32, batch_size=8, seed=0, device="cpu")


@pytest.fixture(scope="module", autouse=True)
def tensor_cache(tmp_path_factory):
    """The shared uint8 tensor cache in a temporary folder, not data/cache/tensors."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tensorcache, "DEFAULT_CACHE_DIR", tmp_path_factory.mktemp("tensors"))
        yield


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the CPU is shared, and two spinning OpenMP threads under contention crawl."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, mirror_root: Path) -> tuple[pd.DataFrame, Path]:
    """8 covid + 8 normal real X-rays (4 train, 2 val, 2 test each) as small PNGs with a manifest."""
    repo, commit, top = DARKCOVID
    root = tmp_path_factory.mktemp("processed")
    rows = []
    for label, folder in FOLDERS.items():
        src = sorted((mirror_root / repo / commit / top / folder).iterdir())[: len(SPLIT_OF)]
        assert len(src) == len(SPLIT_OF), f"mirror folder {folder} has too few images"
        for i, (path, split) in enumerate(zip(src, SPLIT_OF, strict=True)):
            rel = f"images/darkcovid/{label}_{i}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            resize_short_side(load_xray(path), 48).save(root / rel)
            rows.append(
                {
                    "image": rel,
                    "label": label,
                    "split": split,
                    "source": repo,
                    "source_name": "darkcovid",
                    "patient_group": f"g_{label}_{i}",
                    "sha256": f"{label}{i:02d}",
                }
            )
    # a pneumonia row must be dropped by the two-class task
    rows.append({**rows[0], "image": "images/not/there.png", "label": "pneumonia", "patient_group": "gp"})
    return pd.DataFrame(rows), root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("features")


PATH_ARGS = ("profile_dir", "feature_cache_dir")  # train_run's own arguments; the rest is TrainConfig


def _run(tiny, out: Path, scenario: str, **kw) -> training.RunResult:
    manifest, root = tiny
    paths = {k: kw.pop(k) for k in PATH_ARGS if k in kw}
    cfg = training.TrainConfig(scenario=scenario, **{**COMMON, **kw})
    return training.train_run(
        manifest[manifest["label"] != "pneumonia"] if scenario == "shallow" else manifest,
        cfg,
        root,
        out_root=out,
        **paths,
    )


def _changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.equal(a, b)


@pytest.fixture(scope="module")
def deep_run(tiny, tmp_path_factory) -> training.RunResult:
    # 8 training images, batch 8: exactly one optimiser step; wd=0 so any change comes from gradients
    return _run(tiny, tmp_path_factory.mktemp("runs"), "deep", epochs=1, wd=0.0)


@pytest.fixture(scope="module")
def decomp_profile(tiny, tmp_path_factory) -> Path:
    """A profile folder with a k=2 decomposition of the training images (alternating subclasses)."""
    manifest, _ = tiny
    train = manifest[(manifest["split"] == "train") & (manifest["label"] != "pneumonia")]
    subs = [f"{lab}_{1 + i % 2}" for i, lab in enumerate(train["label"])]
    dec = Decomposition(
        k={"covid": 2, "normal": 2},
        subclasses=["covid_1", "covid_2", "normal_1", "normal_2"],
        parent_of={"covid_1": "covid", "covid_2": "covid", "normal_1": "normal", "normal_2": "normal"},
        silhouettes={},
        classes=["covid", "normal"],
    )
    profile = tmp_path_factory.mktemp("profile")
    save_decomposition(profile, dec, pd.Series(subs, index=pd.Index(train["image"], name="image")))
    return profile


def test_composed_loss_is_cross_entropy_without_decomposition_and_composed_nll_for_unlabelled_rows():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 0.3, 0.4], [1.0, 1.0, -2.0, 3.0]])
    ident = training.ComposedLoss(np.eye(2, dtype=np.float32))
    tgt = torch.tensor([[0, 0], [-1, 1]])
    assert torch.allclose(
        ident(logits[:2, :2], tgt), torch.nn.functional.cross_entropy(logits[:2, :2], tgt[:, 1])
    )
    m = training.LabelSpace(("covid", "normal"), ("covid_1", "covid_2", "normal_1", "normal_2"), {}).matrix()
    loss = training.ComposedLoss(m)
    p = torch.softmax(logits, 1)
    # row 0: known subclass 1 (covid_2); row 1: val row of class normal; row 2: val row of class covid
    got = torch.stack(
        [loss(logits[i : i + 1], t[None]) for i, t in enumerate(torch.tensor([[1, 0], [-1, 1], [-1, 0]]))]
    )
    want = -torch.log(torch.stack([p[0, 1], p[1, 2] + p[1, 3], p[2, 0] + p[2, 1]]))
    assert torch.allclose(got, want, atol=1e-6)
    acc = loss.composed_accuracy(logits, torch.tensor([[-1, 0], [-1, 1], [-1, 0]]))
    assert acc.item() == pytest.approx(2 / 3)  # row 2: e^1+e^1 (covid) < e^-2+e^3 (normal): wrong


def test_targets_carry_subclasses_for_training_rows_only(tiny, decomp_profile):
    manifest, _ = tiny
    rows = training.task_rows(manifest, "covid_vs_normal")
    assert "pneumonia" not in set(rows["label"])
    space, sub_of = training.decomposition_labels(decomp_profile, ("covid", "normal"))
    t = training.make_targets(rows, space, sub_of)
    train = (rows["split"] == "train").to_numpy()
    assert (t[~train, 0] == -1).all() and (t[train, 0] >= 0).all()
    assert [space.subclasses[i] for i in t[train, 0]] == sub_of.loc[rows.loc[train, "image"]].tolist()
    assert (t[:, 1] == rows["label"].map({"covid": 0, "normal": 1})).all()
    with pytest.raises(ValueError, match="no subclass in the decomposition"):
        training.make_targets(rows, space, sub_of.iloc[1:])


def test_shallow_changes_the_head_and_no_backbone_weight(tiny, tmp_path, cache_dir):
    r = _run(tiny, tmp_path, "shallow", epochs=2, feature_cache_dir=cache_dir)
    state = torch.load(r.run_dir / "model.pth", weights_only=True)
    pretrained = create_backbone(BACKBONE).state_dict()
    assert pretrained, "backbone has no state"
    for k, v in pretrained.items():  # weights and batch-norm statistics alike
        assert torch.equal(state[f"backbone.{k}"], v), f"shallow changed backbone.{k}"
    config.seed_everything(0)
    initial = Classifier(BACKBONE, 2).head
    assert _changed(state["head.weight"], initial.weight.detach())
    assert _changed(state["head.bias"], initial.bias.detach())
    assert r.info["params"]["augmentation"].startswith("none")


def test_deep_updates_every_layer_after_one_step(deep_run):
    state = torch.load(deep_run.run_dir / "model.pth", weights_only=True)
    config.seed_everything(0)
    ref = Classifier(BACKBONE, 2)
    unchanged = [n for n, p in ref.named_parameters() if not _changed(state[n], p.detach())]
    assert not unchanged, f"deep left {len(unchanged)} parameter tensors unchanged, e.g. {unchanged[:3]}"
    assert _changed(
        state["backbone.bn1.running_mean"], ref.backbone.bn1.running_mean
    )  # BN statistics train too
    assert deep_run.history["trainable_params"].tolist() == [sum(p.numel() for p in ref.parameters())]


def test_finetune_unfreezes_group_by_group_and_frozen_groups_stay_frozen(tiny, tmp_path):
    r = _run(tiny, tmp_path, "finetune", epochs=3, finetune_stages=(1, 2, 3))  # 3 epochs over 3 stages
    ref = Classifier(BACKBONE, 2)
    sizes = [sum(p.numel() for p in g.parameters()) for g in ref.layer_groups()]
    assert len(sizes) == 4 and training.finetune_schedule(4) == [1, 2, 4]
    assert r.history["stage"].tolist() == [1, 2, 3]
    assert r.history["trainable_params"].tolist() == [sum(sizes[-n:]) for n in (1, 2, 3)]
    assert r.history["trainable_params"].is_monotonic_increasing
    # the first group never opened: weights and batch-norm statistics as pretrained; the third did change
    state = torch.load(r.run_dir / "model.pth", weights_only=True)
    pretrained = {f"backbone.{k}": v for k, v in create_backbone(BACKBONE).state_dict().items()}
    first = [
        k
        for k in pretrained
        if k.startswith(("backbone.conv_stem", "backbone.bn1.", *(f"backbone.blocks.{i}." for i in range(3))))
    ]
    assert first and all(torch.equal(state[k], pretrained[k]) for k in first)
    assert _changed(state["backbone.conv_head.weight"], pretrained["backbone.conv_head.weight"])
    assert r.info["params"]["finetune_stages"] == [1, 2, 3]


def test_outputs_follow_the_contract_and_reload(deep_run, tiny):
    manifest, root = tiny
    d = deep_run.run_dir
    assert d.name == "covid_vs_normal__efficientnet_lite0__deep__nodecomp__seed0__fold0"
    assert {p.name for p in d.iterdir()} == {
        "run.json",
        "model.pth",
        "history.csv",
        "learning_curve.png",
        "predictions.csv",
    }
    assert (d / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    hist = pd.read_csv(d / "history.csv")
    assert list(hist.columns[:7]) == [
        "epoch",
        "stage",
        "train_loss",
        "valid_loss",
        "valid_accuracy",
        "lr",
        "seconds",
    ]
    preds = pd.read_csv(d / "predictions.csv")
    assert list(preds.columns) == [
        "image",
        "split",
        "label",
        "source",
        "patient_group",
        "prob_covid",
        "prob_normal",
        "pred",
    ]
    assert sorted(preds["split"].unique()) == ["test", "val"] and len(preds) == 8
    assert np.allclose(preds[["prob_covid", "prob_normal"]].sum(axis=1), 1, atol=1e-5)
    info = json.loads((d / "run.json").read_text())
    for key in (
        "task",
        "backbone",
        "scenario",
        "decomposition",
        "seed",
        "classes",
        "subclasses",
        "parent_of",
        "image_size",
        "epochs",
        "lr",
        "train_seconds",
        "best_epoch",
        "n_train",
        "n_val",
        "n_test",
        "params",
    ):
        assert key in info, key
    assert (info["n_train"], info["n_val"], info["n_test"]) == (8, 4, 4)
    model, info2 = training.load_run_model(d)
    val = preds[preds["split"] == "val"]
    probs, sub = training.predict_images(
        model, [load_xray(root / p) for p in val["image"]], info2, device="cpu"
    )
    assert np.allclose(probs, val[["prob_covid", "prob_normal"]].to_numpy(), atol=1e-5)
    assert np.allclose(sub, probs)  # no decomposition: subclasses are the classes


def test_decomposition_on_predicts_subclasses_that_compose_to_classes(
    tiny, tmp_path, cache_dir, decomp_profile
):
    r = _run(
        tiny,
        tmp_path,
        "shallow",
        epochs=2,
        decomposition=True,
        profile_dir=decomp_profile,
        feature_cache_dir=cache_dir,
    )
    assert r.run_dir.name.endswith("__shallow__decomp__seed0__fold0")
    assert r.info["subclasses"] == ["covid_1", "covid_2", "normal_1", "normal_2"]
    p = pd.read_csv(r.run_dir / "predictions.csv")
    sub_cols = [f"prob_sub_{s}" for s in r.info["subclasses"]]
    assert np.allclose(p[sub_cols].sum(axis=1), 1, atol=1e-5)
    assert np.allclose(p["prob_covid"], p["prob_sub_covid_1"] + p["prob_sub_covid_2"], atol=1e-6)
    assert np.allclose(p["prob_normal"], p["prob_sub_normal_1"] + p["prob_sub_normal_2"], atol=1e-6)
    top = p[sub_cols].to_numpy().argmax(1)
    assert p["pred_hard"].tolist() == [r.info["parent_of"][r.info["subclasses"][i]] for i in top]
    assert set(p["pred"]) <= {"covid", "normal"}


def test_same_seed_same_predictions_and_scratch_starts_random(tiny, tmp_path):
    a = _run(tiny, tmp_path / "a", "scratch", epochs=1)
    b = _run(tiny, tmp_path / "b", "scratch", epochs=1)
    cols = ["prob_covid", "prob_normal"]
    assert np.array_equal(a.predictions[cols].to_numpy(), b.predictions[cols].to_numpy())
    assert (a.run_dir / "predictions.csv").read_bytes() == (b.run_dir / "predictions.csv").read_bytes()
    assert a.history[["train_loss", "valid_loss"]].equals(b.history[["train_loss", "valid_loss"]])
    c = _run(tiny, tmp_path / "c", "scratch", epochs=1, seed=1)  # the seed reaches weights and shuffling
    assert c.run_id.endswith("__seed1__fold0") and not np.array_equal(
        a.predictions[cols].to_numpy(), c.predictions[cols].to_numpy()
    )
    state = torch.load(a.run_dir / "model.pth", weights_only=True)
    pretrained = create_backbone(BACKBONE).state_dict()
    assert a.info["pretrained"] is False
    assert not torch.allclose(state["backbone.conv_stem.weight"], pretrained["conv_stem.weight"], atol=1e-2)


def test_bad_requests_fail_clearly(tiny, tmp_path):
    manifest, root = tiny
    with pytest.raises(ValueError, match="TrainConfig.scenario unknown scenario"):
        training.TrainConfig(scenario="linear", **COMMON)
    deep = training.TrainConfig(scenario="deep", **COMMON)
    with pytest.raises(TypeError, match="cfg must be a TrainConfig"):
        training.train_run(manifest, root, out_root=tmp_path)  # the old call style: a path, no config
    with pytest.raises(FileNotFoundError, match="notebook 03"):
        training.train_run(
            manifest,
            training.TrainConfig(scenario="deep", decomposition=True, **COMMON),
            root,
            profile_dir=tmp_path,
        )
    with pytest.raises(ValueError, match="needs profile_dir"):
        training.train_run(manifest, replace(deep, decomposition=True), root, out_root=tmp_path)
    with pytest.raises(ValueError, match="give out_root or profile_dir"):
        training.train_run(manifest, deep, root)
    with pytest.raises(ValueError, match="no val images"):
        training.train_run(manifest[manifest["split"] != "val"], deep, root, out_root=tmp_path)
    with pytest.raises(FileNotFoundError, match="not a finished training run"):
        training.load_run_model(tmp_path)


def test_training_images_get_the_one_preprocessing_and_augmentation_keeps_shape(tiny):
    manifest, root = tiny
    spec = get_spec(BACKBONE)
    paths = [root / p for p in manifest["image"].iloc[:2]]
    plain = training.XrayDataset(paths, np.zeros((2, 2)), spec, 32)
    for i, p in enumerate(paths):
        assert torch.equal(plain[i][0], model_transform(spec, 32)(load_xray(p)))
    # the in-memory batches training and evaluation use: the same numbers, channels_last
    images = tensorcache.load_uint8_batch(manifest.iloc[:2], root, 32, spec.interpolation)
    xb, yb = next(iter(training.TensorBatches(images, np.arange(2), spec, 8, train=False, seed=0)))
    assert xb.is_contiguous(memory_format=torch.channels_last) and yb.tolist() == [0, 1]
    assert torch.equal(xb, torch.stack([plain[0][0], plain[1][0]]))
    torch.manual_seed(0)
    aug = training.XrayDataset(paths, np.zeros((2, 2)), spec, 32, training.train_augmentation())
    x1, x2 = aug[0][0], aug[0][0]
    assert x1.shape == x2.shape == (3, 32, 32) and not torch.equal(x1, x2)
    # a small perturbation of the same image: closer to it than the other image is
    assert (x1 - plain[0][0]).abs().mean() < (plain[1][0] - plain[0][0]).abs().mean()


def test_batch_augmentation_keeps_shape_and_dtype_and_stays_within_the_ranges():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    aug = training.train_augmentation(torch.Generator().manual_seed(0))
    p = aug.sample(2000)
    r = training.AugmentRanges()
    assert p["angle"].abs().max() <= r.degrees and p["angle"].abs().max() > 0.9 * r.degrees
    assert r.scale[0] <= p["scale"].min() and p["scale"].max() <= r.scale[1]
    assert p["shift"].shape == (2000, 2) and p["shift"].abs().max() <= r.translate
    for k, width in (("brightness", r.brightness), ("contrast", r.contrast)):
        assert (p[k] - 1).abs().max() <= width and (p[k] - 1).abs().max() > 0.9 * width
    x = torch.randint(0, 256, (6, 1, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = aug(x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert aug(x.float()).dtype == torch.float32 and not torch.equal(aug(x), out)  # fresh draws each call
    same = aug(x[:1].expand(4, 1, 40, 40))
    assert not torch.equal(same[0], same[1])  # drawn per image, not per batch
    ident = {"angle": torch.zeros(6), "scale": torch.ones(6), "shift": torch.zeros(6, 2)}
    ident |= {"brightness": torch.ones(6), "contrast": torch.ones(6)}
    assert torch.equal(training.BatchAugment.apply(x, ident), x)
    flat = torch.full((2, 1, 8, 8), 100, dtype=torch.uint8)
    lo_hi = {**ident, "brightness": torch.tensor([0.85, 1.15]), "contrast": torch.ones(2)}
    lo_hi = {k: v[:2] for k, v in lo_hi.items()}
    assert training.BatchAugment.apply(flat, lo_hi).flatten(1).tolist() == [[85] * 64, [115] * 64]
    # the geometry is torchvision's affine (same angle convention, shift in pixels, scale), per image
    one = {
        "angle": torch.tensor([-7.0]),
        "scale": torch.tensor([0.95]),
        "shift": torch.tensor([[2 / 40, 1 / 40]]),
    }
    one |= {"brightness": torch.ones(1), "contrast": torch.ones(1)}
    xf = x[:1].float()
    ref = TF.affine(
        xf,
        angle=-7.0,
        translate=[2, 1],
        scale=0.95,
        shear=[0.0, 0.0],
        interpolation=InterpolationMode.BILINEAR,
    )
    assert (training.BatchAugment.apply(xf, one) - ref).abs().max() < 1e-2


def test_deep_finetune_and_scratch_get_equal_budgets_and_one_lr_rule(tiny, tmp_path):
    # 8 training images in batches of 4: 2 optimizer steps per epoch, 3 epochs in total each
    kw = dict(epochs=3, batch_size=4, patience=10, use_lr_find=True, lr_find_iters=6, lr_range=(1e-4, 1e-3))
    runs = {s: _run(tiny, tmp_path / s, s, **kw) for s in ("deep", "finetune", "scratch")}
    steps = {s: r.info["params"]["optimizer_steps"] for s, r in runs.items()}
    assert steps == {"deep": 6, "finetune": 6, "scratch": 6}, steps
    assert all(r.info["params"]["budget_steps"] == 6 for r in runs.values())
    assert runs["finetune"].info["params"]["stage_epochs"] == [1, 1, 1]
    assert runs["finetune"].history["stage"].tolist() == [1, 2, 3]
    for r in runs.values():  # the lr rule: lr_find's valley, clamped to lr_range, recorded in run.json
        p = r.info["params"]
        assert p["lr_rule"].startswith("lr_find valley") and p["lr_range"] == [1e-4, 1e-3]
        assert 1e-4 <= r.info["lr"] <= 1e-3 and r.info["lr"] == min(max(p["lr_found"], 1e-4), 1e-3)
    # the counter is a fastai callback: one count per optimizer step of the fit it joins
    counter = training.StepCounter()
    learn = training.make_learner(
        torch.nn.Linear(3, 2),
        DataLoaders(*[[(torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.long))] * 5] * 2),
        training.ComposedLoss(np.eye(2, dtype=np.float32)),
        lr=1e-3,
        path=tmp_path,
    )
    with learn.no_logging(), learn.no_bar():
        learn.fit(2, cbs=[counter])
    assert counter.steps == 10


def _two_sources(manifest: pd.DataFrame, scramble_held_out: bool = False) -> pd.DataFrame:
    """The tiny manifest with two training sources per class (alternating); optionally the validation and
    test rows' sources replaced by a third, unseen one."""
    m = manifest.copy()
    train = (m["split"] == "train").to_numpy()
    m.loc[train, "source_name"] = np.where(np.arange(train.sum()) % 2 == 0, "site_a", "site_b")
    if scramble_held_out:
        m.loc[~train, "source_name"] = "site_z"
    return m


def test_source_adversary_trains_from_training_sources_only_and_logs(tiny, tmp_path):
    manifest, root = tiny
    kw = dict(
        COMMON,
        scenario="deep",
        epochs=2,
        wd=0.0,
        variant="adv",
        adversary_weight=1.0,
        adversary_schedule="constant",
    )
    plain = training.train_run(
        _two_sources(manifest),
        training.TrainConfig(**{**COMMON, "scenario": "deep", "epochs": 2, "wd": 0.0}),
        root,
        out_root=tmp_path / "plain",
    )
    a = training.train_run(_two_sources(manifest), training.TrainConfig(**kw), root, out_root=tmp_path / "a")
    b = training.train_run(
        _two_sources(manifest, True), training.TrainConfig(**kw), root, out_root=tmp_path / "b"
    )
    assert a.run_id.endswith("__seed0__fold0__adv") and a.info["variant"] == "adv"
    assert a.info["adversary"] == {"weight": 1.0, "schedule": "constant", "lr": 1e-3, "hidden": 256}
    assert a.info["params"]["adversary_sources"] == {
        "covid": ["site_a", "site_b"],
        "normal": ["site_a", "site_b"],
    }
    log = pd.read_csv(a.run_dir / "adversary.csv")
    assert list(log["epoch"]) == [1, 2] and (log["items"] == 8).all() and (log["weight"] == 1.0).all()
    assert not (plain.run_dir / "adversary.csv").exists() and plain.info["adversary"] is None
    wa = torch.load(a.run_dir / "model.pth", weights_only=True)
    wb = torch.load(b.run_dir / "model.pth", weights_only=True)
    wp = torch.load(plain.run_dir / "model.pth", weights_only=True)
    # the adversary changed what the backbone learned ...
    assert any(not torch.equal(wa[k], wp[k]) for k in wa if k.startswith("backbone"))
    # ... and never saw a validation or test source: scrambling them changes nothing
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_source_balance_weights_make_label_independent_of_source_where_sources_share_labels():
    # site_a: 8 covid + 2 normal; site_b: 2 covid + 8 normal; site_c: 5 covid only
    labels = ["covid"] * 8 + ["normal"] * 2 + ["covid"] * 2 + ["normal"] * 8 + ["covid"] * 5
    sources = ["site_a"] * 10 + ["site_b"] * 10 + ["site_c"] * 5
    w, cells = training.source_balance_weights(labels, sources)
    assert w.shape == (25,) and np.isclose(w.mean(), 1.0)
    frame = pd.DataFrame({"label": labels, "source": sources, "w": w})
    share = frame.groupby(["source", "label"])["w"].sum() / frame.groupby("source")["w"].sum()
    prior = frame["label"].value_counts(normalize=True)  # P(covid) = 15/25
    for site in ("site_a", "site_b"):  # both labels present: weighted P(label | site) = P(label)
        assert np.isclose(share[(site, "covid")], prior["covid"]) and np.isclose(share[(site, "normal")], prior["normal"])
    assert cells[["label", "source", "n"]].values.tolist() == [
        ["covid", "site_a", 8], ["covid", "site_b", 2], ["covid", "site_c", 5],
        ["normal", "site_a", 2], ["normal", "site_b", 8],
    ]
    # a rare cell is up-weighted only up to the clip: normal at site a (1 film against 99 covid) would get
    # 34 before the clip, 4 after it, against 2/3 for site a's covid films
    w2, _ = training.source_balance_weights(["covid"] * 99 + ["normal"] * 51, ["a"] * 100 + ["b"] * 50)
    assert np.isclose(w2[99] / w2[0], 6.0)
    with pytest.raises(ValueError, match="label and a source"):
        training.source_balance_weights(["covid", "normal"], ["a", ""])
    with pytest.raises(ValueError, match="no training films"):
        training.source_balance_weights([], [])


def test_weighted_batches_draw_by_weight_reproducibly():
    spec = get_spec(BACKBONE)
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 1, 8, 8).contiguous()
    weights = np.r_[np.full(20, 9.0), np.ones(20)]  # the first half drawn nine times as often
    def drawn(seed: int) -> torch.Tensor:
        tb = training.TensorBatches(images, np.arange(40), spec, 8, train=True, seed=seed, weights=weights)
        return torch.cat([y for _, y in tb])
    a, b = drawn(0), drawn(0)
    assert torch.equal(a, b) and len(a) == 40 and not torch.equal(a, drawn(1))
    many = torch.cat([drawn(s) for s in range(30)])
    assert 0.85 < (many < 20).float().mean() < 0.95  # 0.9 expected
    with pytest.raises(ValueError, match="training batches only"):
        training.TensorBatches(images, np.arange(40), spec, 8, train=False, seed=0, weights=weights)
    with pytest.raises(ValueError, match="40 finite non-negative weights"):
        training.TensorBatches(images, np.arange(40), spec, 8, train=True, seed=0, weights=np.ones(39))


def test_source_balanced_run_records_its_weights_and_changes_only_the_order(tiny, tmp_path):
    manifest, root = tiny
    m = _two_sources(manifest)
    train = (m["split"] == "train").to_numpy()
    # site_a holds most covid films, site_b most normal ones: the weights differ by cell
    lab = m.loc[train, "label"].to_numpy()
    idx = np.flatnonzero(train)
    covid, normal = idx[lab == "covid"], idx[lab == "normal"]
    m.loc[covid, "source_name"] = np.where(np.arange(len(covid)) < len(covid) - 1, "site_a", "site_b")
    m.loc[normal, "source_name"] = np.where(np.arange(len(normal)) < len(normal) - 1, "site_b", "site_a")
    kw = dict(COMMON, scenario="deep", epochs=1, wd=0.0)
    plain = training.train_run(m, training.TrainConfig(**kw), root, out_root=tmp_path / "plain")
    bal = training.train_run(
        m, training.TrainConfig(**kw, variant="bal", sampling="source_balanced"), root, out_root=tmp_path / "bal"
    )
    assert plain.info["sampling"] == "uniform" and "sampling_weights" not in plain.info["params"]
    assert bal.info["sampling"] == "source_balanced" and bal.run_id.endswith("__bal")
    cells = {(c["label"], c["source"]): c for c in bal.info["params"]["sampling_weights"]}
    assert {k: c["n"] for k, c in cells.items()} == {
        ("covid", "site_a"): len(covid) - 1, ("covid", "site_b"): 1,
        ("normal", "site_a"): 1, ("normal", "site_b"): len(normal) - 1,
    }
    assert cells[("covid", "site_b")]["weight"] > cells[("covid", "site_a")]["weight"]
    assert bal.info["params"]["sampling_rule"].startswith("weights P(label)/P(label|source)")
    wp = torch.load(plain.run_dir / "model.pth", weights_only=True)
    wb = torch.load(bal.run_dir / "model.pth", weights_only=True)
    assert any(not torch.equal(wp[k], wb[k]) for k in wp)


def test_a_cross_validated_run_tests_its_own_fold_and_predicts_the_held_out_hospital(tiny, tmp_path):
    """With the manifest's ``split`` = cv / holdout, fold i of 2 trains on the other fold less an inner validation
    part, predicts its own fold once, and the held-out rows; the weights are seeded by seed + fold."""
    manifest, root = tiny
    two = manifest[manifest["label"] != "pneumonia"].assign(split="cv")
    two.loc[two.index[-2:], ["split", "source_name"]] = ["holdout", "actualmed"]
    runs = [
        training.train_run(two, training.TrainConfig(scenario="deep", epochs=1, fold=f, folds=2, **COMMON), root,
                           out_root=tmp_path)
        for f in (0, 1)
    ]
    tested = [set(r.predictions.loc[r.predictions["split"] == "test", "image"]) for r in runs]
    assert not tested[0] & tested[1] and len(tested[0] | tested[1]) == len(two) - 2
    for r, f in zip(runs, (0, 1), strict=True):
        assert r.info["fold"] == f and r.info["train_seed"] == f and r.run_id.endswith(f"__seed0__fold{f}")
        assert r.info["config_id"] == r.run_id.removesuffix(f"__fold{f}")
        assert (r.predictions["split"] == "holdout").sum() == 2
        assert r.info["n_train"] + r.info["n_val"] + r.info["n_test"] == len(two) - 2
