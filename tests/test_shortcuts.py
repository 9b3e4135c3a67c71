"""Shortcut checks on real frozen features of real mirror images (small, 64 px)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrstudy.evaluation import shortcuts as SC
from cxrstudy.lungs import region as LR
from cxrstudy.lungs import render as LV

N_PER = 10


@pytest.fixture(scope="module")
def manifest(mirror_root) -> pd.DataFrame:
    """40 images: Actualmed covid + normal, MHH covid, NIH normal; patient groups from the metadata."""
    from cxrstudy.data.sources import SOURCES

    rows = []
    am = SOURCES["actualmed"]
    base = f"{am.repo}/{am.commit}"
    meta = pd.read_csv(mirror_root / base / "metadata.csv")
    meta = meta[meta["imagename"].map(lambda n: (mirror_root / base / "images" / str(n)).is_file())]
    for finding, label in (("COVID-19", "covid"), ("No finding", "normal")):
        for _, r in meta[meta["finding"] == finding].sort_values("imagename").head(N_PER).iterrows():
            rows.append(
                (f"{base}/images/{r['imagename']}", label, "actualmed", f"actualmed:{r['patientid']}")
            )
    mhh = SOURCES["mhh"]
    base = f"{mhh.repo}/{mhh.commit}"
    data = pd.read_csv(mirror_root / base / "data.csv").set_index("image_id")
    for p in sorted((mirror_root / base / "png").glob("*.png"))[:N_PER]:
        rows.append((f"{base}/png/{p.name}", "covid", "mhh", f"mhh:{data.loc[p.stem, 'patient_id']}"))
    nih = SOURCES["nih"]
    base = f"{nih.repo}/{nih.commit}/X-Ray Image DataSet/No_findings"
    for p in sorted((mirror_root / base).glob("*.png"))[:N_PER]:
        rows.append((f"{base}/{p.name}", "normal", "nih", f"nih:{int(p.name[:8])}"))
    df = pd.DataFrame(rows, columns=["image", "label", "source_name", "patient_group"])
    df["sha256"] = df["image"]  # stand-in content key for the feature cache
    groups = sorted(df["patient_group"].unique())
    df["split"] = df["patient_group"].map(lambda g: "test" if groups.index(g) % 3 == 0 else "train")
    assert df["label"].value_counts().min() >= N_PER
    return df


@pytest.fixture(scope="module")
def features(manifest, mirror_root, tmp_path_factory) -> dict[str, pd.DataFrame]:
    from cxrstudy.features import extract_features

    cache = tmp_path_factory.mktemp("features")
    out = {
        "unmasked": extract_features(
            manifest, mirror_root, "efficientnet_lite0", 64, device="cpu", cache_dir=cache
        )
    }
    for name, (fn, tag) in LR.MASK_VARIANTS.items():
        out[name] = extract_features(
            manifest,
            mirror_root,
            "efficientnet_lite0",
            64,
            device="cpu",
            cache_dir=cache,
            transform=fn,
            cache_tag=tag,
        )
    return out


def test_masks_are_complementary_on_a_real_image(mirror_file):
    from cxrstudy.images import load_xray

    img = load_xray(mirror_file("mhh", "png/006f3a8a.png"))
    masked, kept = np.asarray(LR.mask_lungs(img)), np.asarray(LR.keep_lungs_only(img))
    orig = np.asarray(img)
    inside = LR.lung_mask(*orig.shape)
    assert masked.shape == orig.shape and LR.mask_lungs(img).mode == "L"
    assert (masked[inside] == 0).all() and (masked[~inside] == orig[~inside]).all()
    assert (kept[~inside] == 0).all() and (kept[inside] == orig[inside]).all()
    np.testing.assert_array_equal(masked.astype(int) + kept, orig)
    h, w = orig.shape
    assert inside[h // 2, w // 2] and not inside[0, 0] and not inside[h - 1, w // 2]
    with pytest.raises(ValueError, match="mode 'L'"):
        LR.mask_lungs(img.convert("RGB"))


def test_source_identification_beats_majority(manifest, features):
    res = SC.source_identification(features["unmasked"], manifest, seed=0)
    assert res["n"] == len(manifest) and set(res["classes"]) == {"actualmed", "mhh", "nih"}
    assert res["majority_baseline"] == pytest.approx(20 / 40)
    # three repositories with distinct looks: frozen ImageNet features tell them apart easily
    assert res["accuracy"] >= res["majority_baseline"] + 0.2
    assert res["balanced_accuracy"] > 1 / 3 + 0.2
    normal = res["within_label"]["normal"]
    assert set(normal["classes"]) == {"actualmed", "nih"} and normal["n"] == 2 * N_PER
    assert res == SC.source_identification(features["unmasked"], manifest, seed=0)  # deterministic


def test_masking_experiment_uses_each_variant(manifest, features):
    assert not np.allclose(features["unmasked"].to_numpy(), features["masked_lungs"].to_numpy())
    manifest = manifest.assign(split=np.where(manifest["source_name"] == "actualmed", "holdout", manifest["split"]))
    res = SC.masking_experiment(features, manifest, ["covid", "normal"], seed=0, n_bootstrap=50)
    assert set(res) == {"unmasked", "masked_lungs", "lungs_only"}
    n = int((manifest["split"] != "holdout").sum())  # out of fold over every film outside the held-out hospital
    for v in res.values():
        assert v["n"] == n and v["n_splits"] == 5 and 0 <= v["accuracy"]["value"] <= 1
        acc = v["accuracy"]
        assert acc["ci_low"] <= acc["value"] <= acc["ci_high"] if acc["ci_low"] is not None else "not estimable" in acc["note"]
    held = manifest.loc[manifest["split"] == "holdout", "image"]
    assert len(held) and n < len(manifest)
    if len(held):  # the held-out hospital's features never enter: scrambling them changes nothing
        scrambled = {k: f.assign(**{c: f[c].where(~f.index.isin(held), 99.0) for c in f.columns})
                     for k, f in features.items()}
        again = SC.masking_experiment(scrambled, manifest, ["covid", "normal"], seed=0, n_bootstrap=50)
        assert again == res


def test_leave_one_source_out_and_skips(manifest, features):
    folds = [
        (s, manifest[manifest["source_name"] != s], manifest[manifest["source_name"] == s])
        for s in ("mhh", "nih", "actualmed")
    ]
    folds.append(
        (
            "nih-without-normals",
            manifest[manifest["source_name"] == "mhh"],
            manifest[manifest["source_name"] == "nih"],
        )
    )
    res = {
        e["held_out"]: e
        for e in SC.leave_one_source_out(
            features["unmasked"], manifest, folds, ["covid", "normal"], n_bootstrap=50
        )
    }
    assert res["mhh"]["labels"] == ["covid"] and set(res["mhh"]["sensitivity"]) == {"covid"}
    # on a single-class source accuracy is that class's sensitivity
    assert res["mhh"]["accuracy"]["value"] == res["mhh"]["sensitivity"]["covid"]["value"]
    assert res["nih"]["n"] == N_PER and "balanced_accuracy" not in res["nih"]
    assert "balanced_accuracy" in res["actualmed"]
    assert res["nih-without-normals"]["skipped"] == "training lacks ['normal']"


def test_same_hospital_probe_and_run_predictions(manifest, features):
    am = manifest[manifest["source_name"] == "actualmed"]
    preds = pd.DataFrame(
        {
            "image": am["image"].iloc[[0, 1, -1]].to_list() + [manifest["image"].iloc[-1]],
            "split": ["holdout", "holdout", "test", "holdout"],
            "label": am["label"].iloc[[0, 1, -1]].to_list() + ["normal"],
        }
    )
    preds["pred"] = [
        preds["label"][0],
        "normal" if preds["label"][1] == "covid" else "covid",
        preds["label"][2],
        "normal",
    ]
    res = SC.same_hospital(features["unmasked"], manifest, {"run_a": preds}, seed=0, n_bootstrap=50)
    assert res["n"] == 2 * N_PER and res["counts"] == {"covid": N_PER, "normal": N_PER}
    assert res["runs_test"]["run_a"] == {
        "n": 3,
        "accuracy": pytest.approx(2 / 3),
        "labels": preds["label"][:3].value_counts().to_dict(),
    }
    trained = preds.assign(split=["train", "val", "holdout", "holdout"])  # films a run saw never count
    assert SC.same_hospital(features["unmasked"], manifest, {"r": trained}, seed=0, n_bootstrap=50)["runs_test"]["r"]["n"] == 1
    probe = res["probe"]  # trained on every other source's films, tested on Actualmed's
    assert probe["n_train"] == int((manifest["source_name"] != "actualmed").sum())
    assert 0 <= probe["accuracy"]["value"] <= 1 and probe["trained_on"].startswith("every task film")


def test_loso_names_the_training_composition(manifest, features):
    folds = [("nih", manifest[manifest["source_name"] != "nih"], manifest[manifest["source_name"] == "nih"])]
    (nih,) = SC.leave_one_source_out(features["unmasked"], manifest, folds, ["covid", "normal"], n_bootstrap=20)
    assert nih["train_counts"] == {"covid": 2 * N_PER, "normal": N_PER}
    assert nih["train_sources"]["normal"] == {"actualmed": N_PER}
    assert nih["train_sources"]["covid"] == {"actualmed": N_PER, "mhh": N_PER}


def test_label_only_baseline_and_within_label_probe(manifest, features):
    # covid: actualmed 10 / mhh 10; normal: actualmed 10 / nih 10 -> knowing the label gives 20 of 40
    assert SC.label_only_baseline(manifest) == pytest.approx(0.5)
    assert SC.label_only_baseline(manifest[manifest["source_name"] != "mhh"]) == pytest.approx(20 / 30)
    res = SC.source_identification(features["unmasked"], manifest, seed=0)
    assert res["label_only_baseline"] == pytest.approx(0.5)


def _films(tmp_path, n=3, shape=(40, 30)):
    rng = np.random.default_rng(0)
    root = tmp_path / "films"
    names = [f"images/s/f{i}.png" for i in range(n)]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(1, 255, shape, dtype=np.uint8), mode="L").save(root / name)
    return root, pd.DataFrame({"image": names})


def test_segmented_masks_render_hidden_and_only_views_with_rectangle_fallback(tmp_path):
    from cxrstudy.images import load_xray

    root, rows = _films(tmp_path)
    seg = np.zeros((40, 30), bool)
    seg[5:30, 3:12] = True
    masks = {rows["image"][0]: seg, rows["image"][1]: np.ones((40, 30), bool)}  # film 1: QC fallback; film 2: none
    views = LV.render_masked_views(rows, masks, root, "k", views_dir=tmp_path / "views")
    assert set(views) == set(LR.MASK_VARIANTS)
    for i, expected in enumerate((seg, LR.lung_mask(40, 30), LR.lung_mask(40, 30))):
        film = np.asarray(load_xray(root / rows["image"][i]))
        hidden = np.asarray(load_xray(views["masked_lungs"] / rows["image"][i]))
        only = np.asarray(load_xray(views["lungs_only"] / rows["image"][i]))
        assert (hidden[expected] == 0).all() and (hidden[~expected] == film[~expected]).all()
        assert (only[~expected] == 0).all() and (only[expected] == film[expected]).all()
    stamp = (views["lungs_only"] / rows["image"][0]).stat().st_mtime_ns
    LV.render_masked_views(rows, masks, root, "k", views_dir=tmp_path / "views")  # existing files are kept
    assert (views["lungs_only"] / rows["image"][0]).stat().st_mtime_ns == stamp
    info = LR.lung_region_info(masks, rows["image"].tolist())
    assert info["kind"] == "segmented" and info["n_segmented"] == 1 and info["n_rectangle_fallback"] == 2
    assert info["mean_area_share"] == pytest.approx(seg.mean())
    assert LR.lung_region_info(None)["kind"] == "fixed rectangle"
    assert LR.lung_region_info(None)["rectangle"]["area_share"] == pytest.approx(0.49)


def test_masking_features_switch_between_rectangle_and_segmented(tmp_path, monkeypatch):
    root, rows = _films(tmp_path, n=2)
    monkeypatch.setattr(LV, "LUNG_VIEWS_DIR", tmp_path / "views")
    calls = []

    def feats(where, transform=None, tag=""):
        calls.append((where, transform, tag))
        return pd.DataFrame()

    SC.masking_features(rows, feats, root, None)
    assert [(c[0], c[2]) for c in calls] == [(root, "mask_lungs"), (root, "lungs_only")]
    assert calls[0][1] is LR.mask_lungs
    calls.clear()
    seg = np.zeros((40, 30), bool)
    seg[10:20, 5:25] = True
    SC.masking_features(rows, feats, root, {rows["image"][0]: seg, rows["image"][1]: seg}, "lungkey")
    (hidden, _, tag_h), (only, _, tag_o) = calls
    assert hidden.name == "masked_lungs" and only.name == "lungs_only" and hidden.parent.parent == tmp_path / "views"
    assert tag_h.startswith("seg_masked_lungs_") and tag_o.startswith("seg_lungs_only_")  # never the rectangle's tags
    calls.clear()
    SC.masking_features(rows, feats, root, {rows["image"][0]: seg, rows["image"][1]: seg}, "other masks")
    assert calls[0][2] != tag_h  # other masks: other views and feature cache entries


def test_load_lung_masks_without_a_lung_stage(tmp_path, monkeypatch):
    from cxrstudy import config

    monkeypatch.setattr(config, "REPORTS_DIR", tmp_path)
    from cxrstudy.lungs.stage import load_lung_masks

    assert load_lung_masks(pd.DataFrame({"image": ["a.png"]}), "nolungs") == (None, "")
