"""Shortcut checks on real frozen features of real mirror images (small, 64 px)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxrstudy.evaluation import shortcuts as SC

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
    for name, (fn, tag) in SC.MASK_VARIANTS.items():
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
    masked, kept = np.asarray(SC.mask_lungs(img)), np.asarray(SC.keep_lungs_only(img))
    orig = np.asarray(img)
    inside = SC.lung_mask(*orig.shape)
    assert masked.shape == orig.shape and SC.mask_lungs(img).mode == "L"
    assert (masked[inside] == 0).all() and (masked[~inside] == orig[~inside]).all()
    assert (kept[~inside] == 0).all() and (kept[inside] == orig[inside]).all()
    np.testing.assert_array_equal(masked.astype(int) + kept, orig)
    h, w = orig.shape
    assert inside[h // 2, w // 2] and not inside[0, 0] and not inside[h - 1, w // 2]
    with pytest.raises(ValueError, match="mode 'L'"):
        SC.mask_lungs(img.convert("RGB"))


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
    res = SC.masking_experiment(features, manifest, ["covid", "normal"], seed=0, n_bootstrap=50)
    assert set(res) == {"unmasked", "masked_lungs", "lungs_only"}
    n_test = int((manifest["split"] == "test").sum())
    for v in res.values():
        assert v["n_test"] == n_test and 0 <= v["accuracy"]["value"] <= 1
        assert v["accuracy"]["ci_low"] <= v["accuracy"]["value"] <= v["accuracy"]["ci_high"]


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
            "split": ["test"] * 4,
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
    probe = res["probe"]
    assert probe["n_splits"] == 5 and 0 <= probe["accuracy"]["value"] <= 1
