"""Per-run penultimate features (a real Classifier saved as a run, synthetic films) and their cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxrstudy.evaluation import runfeatures as RF

SIZE = 64  # input pixels: small, so the test is fast on a CPU


def _manifest() -> pd.DataFrame:
    """COVID-19 films of two sources, ieee8023 pneumonia, NIH normal + pneumonia, and rows the scorecard skips."""
    rows = []
    for source, label, n in (
        ("cxnet", "covid", 10), ("ieee8023", "covid", 10), ("ieee8023", "pneumonia", 4),
        ("nih", "normal", 4), ("nih", "pneumonia", 4), ("actualmed", "normal", 3), ("figure1", "pneumonia", 2),
    ):
        for i in range(n):
            rows.append({"image": f"images/{source}/{label}_{i}.png", "label": label, "source_name": source,
                         "source": f"{source}/repo", "patient_group": f"pg_{source}_{label}_{i}",
                         "split": "test" if i % 3 == 0 else "train", "sha256": f"sha_{source}_{label}_{i}",
                         "width": 80, "height": 96})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Films under an image root and one saved run of a pretrained Classifier (decomposition off)."""
    from cxrstudy.models import Classifier

    root = tmp_path_factory.mktemp("films")
    m = _manifest()
    rng = np.random.default_rng(0)
    for i, p in enumerate(m["image"]):
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        base = np.linspace(0, 255, 80)[None, :] * (0.5 + 0.5 * (i % 2))
        arr = np.clip(base + rng.normal(0, 30, (96, 80)), 0, 255).astype(np.uint8)
        Image.fromarray(arr, mode="L").save(root / p)
    run_dir = tmp_path_factory.mktemp("runs") / "covid_vs_normal__efficientnet_lite0__deep__nodecomp__seed0"
    run_dir.mkdir()
    torch.manual_seed(0)
    model = Classifier("efficientnet_lite0", n_outputs=2, pretrained=True)
    torch.save(model.state_dict(), run_dir / "model.pth")
    info = {"run_id": run_dir.name, "task": "covid_vs_normal", "backbone": "efficientnet_lite0", "scenario": "deep",
            "decomposition": False, "seed": 0, "classes": ["covid", "normal"], "subclasses": ["covid", "normal"],
            "parent_of": {"covid": "covid", "normal": "normal"}, "image_size": SIZE, "params": {"dropout": 0.2}}
    (run_dir / "run.json").write_text(json.dumps(info))
    return m, root, run_dir, model.eval()


TWO = {"task": "covid_vs_normal", "classes": ["covid", "normal"]}
THREE = {"task": "covid_normal_pneumonia", "classes": ["covid", "normal", "pneumonia"]}


def test_scorecard_rows_are_the_films_the_run_never_saw_that_the_scorecard_needs():
    m = _manifest()  # every third film of a source and label is in the test split, the others in train
    got = RF.scorecard_rows(m, THREE).groupby(["source_name", "label", "split"]).size().to_dict()
    assert got == {("cxnet", "covid", "test"): 4, ("ieee8023", "covid", "test"): 4, ("ieee8023", "pneumonia", "test"): 2,
                   ("nih", "normal", "test"): 2, ("nih", "pneumonia", "test"): 2}
    # a binary run never saw pneumonia films of any split, and has no NIH metric
    got = RF.scorecard_rows(m, TWO).groupby(["source_name", "label", "split"]).size().to_dict()
    assert got == {("cxnet", "covid", "test"): 4, ("ieee8023", "covid", "test"): 4, ("ieee8023", "pneumonia", "test"): 2,
                   ("ieee8023", "pneumonia", "train"): 2}


def test_scorecard_order_puts_runs_of_one_view_and_task_together():
    infos = [{"task": "a"}, {"task": "b"}, {"task": "a", "input_view": "lung_mask"}, {"task": "a"}, {"task": "b"}]
    ident = {"backbone": "efficientnet_lite0", "scenario": "deep", "decomposition": False, "seed": 0}
    order = RF.scorecard_order([{"info": {**ident, **i}} for i in infos])
    assert order == [0, 3, 1, 4, 2]


def test_features_are_the_runs_backbone_on_model_transform_and_cached(study):
    from cxrstudy.images import load_xray
    from cxrstudy.models import get_spec, model_transform

    m, root, run_dir, model = study
    rows = RF.scorecard_rows(m, THREE)
    feats = RF.run_features(run_dir, rows, root, device="cpu")
    assert feats.shape == (len(rows), get_spec("efficientnet_lite0").num_features)
    assert list(feats.index) == list(rows["image"]) and feats.attrs["computed"] == len(rows)
    assert Path(feats.attrs["cache_file"]).is_file() and not (run_dir / "features.npz").exists()
    transform = model_transform(get_spec("efficientnet_lite0"), SIZE)
    with torch.inference_mode():
        direct = model.backbone(torch.stack([transform(load_xray(root / p)) for p in rows["image"][:4]])).numpy()
    np.testing.assert_allclose(feats.to_numpy()[:4], direct, rtol=1e-4, atol=1e-4)
    again = RF.run_features(run_dir, rows, root, device="cpu")
    assert again.attrs["computed"] == 0 and np.array_equal(again.to_numpy(), feats.to_numpy())
    subset = RF.run_features(run_dir, rows.iloc[::-1].head(5), root, device="cpu")  # any subset, any order
    assert subset.attrs["computed"] == 0
    np.testing.assert_array_equal(subset.to_numpy(), feats.loc[subset.index].to_numpy())
    more = RF.run_features(run_dir, m, root, device="cpu")  # a superset computes only the new films
    assert more.attrs["computed"] == len(m) - len(rows)
    # a film rewritten in place is computed again; the others still come from the cache
    path = root / rows["image"].iloc[0]
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert RF.run_features(run_dir, rows, root, device="cpu").attrs["computed"] == 1


def test_another_image_root_or_model_does_not_reuse_the_cache(study, tmp_path):
    m, root, run_dir, _ = study
    rows = RF.scorecard_rows(m, TWO).head(3)
    RF.run_features(run_dir, rows, root, device="cpu")
    other = tmp_path / "views"
    for p in rows["image"]:
        (other / p).parent.mkdir(parents=True, exist_ok=True)
        (other / p).write_bytes((root / p).read_bytes())
    assert RF.run_features(run_dir, rows, other, device="cpu").attrs["computed"] == 3  # e.g. lung-cropped views
    with pytest.raises(FileNotFoundError, match="image root"):
        RF.run_features(run_dir, RF.scorecard_rows(m, TWO), other, device="cpu")


def test_runs_share_features_only_when_their_backbone_weights_match(study, tmp_path):
    """Another head on the same backbone (e.g. every shallow run's frozen backbone) reuses the features;
    a changed backbone weight does not."""
    m, root, run_dir, _ = study
    rows = RF.scorecard_rows(m, TWO).head(4)
    first = RF.run_features(run_dir, rows, root, device="cpu")
    state = torch.load(run_dir / "model.pth", weights_only=True)
    for name, change in (("other_head", "head.weight"), ("other_backbone", "backbone.conv_stem.weight")):
        other = tmp_path / name
        other.mkdir()
        (other / "run.json").write_text((run_dir / "run.json").read_text())
        torch.save({**state, change: state[change] + 0.5}, other / "model.pth")
        feats = RF.run_features(other, rows, root, device="cpu")
        assert feats.attrs["computed"] == (0 if name == "other_head" else len(rows))
        assert (feats.attrs["cache_file"] == first.attrs["cache_file"]) == (name == "other_head")


def _preds(m: pd.DataFrame) -> pd.DataFrame:
    """A perfect binary run's predictions of the manifest's covid and normal films."""
    preds = m[m["label"].isin(["covid", "normal"])][["image", "split", "label", "source", "patient_group"]]
    preds = preds.assign(prob_covid=np.where(preds["label"] == "covid", 0.9, 0.2))
    return preds.assign(prob_normal=1 - preds["prob_covid"], pred=np.where(preds["prob_covid"] > 0.5, "covid", "normal"))


def test_scorecard_entries_for_a_run(study, monkeypatch):
    m, root, run_dir, _ = study
    info = json.loads((run_dir / "run.json").read_text())
    asked = []
    real = RF.run_features
    monkeypatch.setattr(RF, "run_features", lambda d, rows, *a: asked.append(rows) or real(d, rows, *a))
    # the probe reads only COVID-19 films the run never saw: 4 test films per source, below the 10 needed
    entries = RF.scorecard_entries([{"dir": run_dir, "info": info, "predictions": _preds(m)}], m, root, "cpu",
                                   n_bootstrap=50, n_permutations=3)
    got = {e["metric"]: e for e in entries}
    sid = got["source_id_within_covid_balanced_accuracy"]
    assert sid["method"] == "probe" and sid["n"] == 0 and sid["value"] is None and "fewer than two" in sid["note"]
    seen = asked[0]["split"].isin(["train", "val"]) & asked[0]["label"].isin(info["classes"])
    assert len(asked[0]) and not seen.any()  # features only of films the run never trained or validated on
    # the same films held out: the probe names their source
    unseen = m.assign(split=np.where(m["label"] == "covid", "test", m["split"]))
    entries = RF.scorecard_entries([{"dir": run_dir, "info": info, "predictions": _preds(unseen)}], unseen, root,
                                   "cpu", n_bootstrap=50, n_permutations=3)
    got = {e["metric"]: e for e in entries}
    assert {e["run_id"] for e in entries} == {run_dir.name} and {e["variant"] for e in entries} == {"baseline"}
    sid = got["source_id_within_covid_balanced_accuracy"]
    assert sid["method"] == "probe" and sid["n"] == 20 and sid["value"] is not None
    assert sid["majority"] == pytest.approx(0.5) and sid["chance"] == 0.5 and sid["n_permutations"] == 3
    assert got["paper_task_accuracy"]["value"] == 1.0
    assert got["nih_pneumonia_vs_normal_auc"]["value"] is None  # a binary run has no pneumonia class


def test_each_run_reads_its_films_through_its_input_view(monkeypatch, tmp_path):
    from cxrstudy.lungs import render

    m = _manifest()
    ident = {"task": "covid_vs_normal", "backbone": "efficientnet_lite0", "scenario": "deep", "decomposition": False}
    assert RF.run_image_root({**ident, "seed": 0}, m, None, tmp_path) == tmp_path  # the full film: the plain root
    lung = {**ident, "seed": 1, "variant": "lung", "input_view": "lung_crop", "equalize": True, "view_margin": 0.1}
    with pytest.raises(ValueError, match="lung_crop"):
        RF.run_image_root(lung, m, None, tmp_path)
    calls = []
    monkeypatch.setattr(render, "view_root", lambda *a: calls.append(a) or tmp_path / "views")
    assert RF.run_image_root(lung, m, "default", tmp_path) == tmp_path / "views"
    assert calls[0][1:] == ("default", "lung_crop", True, 0.1, tmp_path)


def test_view_masks_follow_the_views_crop():
    from cxrstudy.evaluation.saliency import ViewMasks
    from cxrstudy.lungs.region import cam_region
    from cxrstudy.lungs.views import apply_view

    film = Image.fromarray(np.full((100, 80), 128, np.uint8), mode="L")
    mask = np.zeros((100, 80), bool)
    mask[20:70, 10:60] = True
    view = apply_view(film, mask, "lung_crop", margin=0.05)
    cropped = ViewMasks({"f": mask}, "lung_crop", 0.05).get("f")
    assert cropped.shape == (view.height, view.width) and cropped.any() and not cropped.all()
    assert ViewMasks({}, "lung_crop", 0.05).get("f") is None
    region, kind = cam_region(cropped, view.size, (10, 10))
    assert kind == "segmented" and 0.3 < region.mean() < 0.9
