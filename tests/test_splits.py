"""Patient-disjoint stratified splits, leave-one-source-out folds and subsampling on real patient structure."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from cxrstudy.data.manifest import load_manifest
from cxrstudy.data.splits import assign_groups, linked_rows, loso_folds, make_splits, subsample

MHH = "ml-workgroup/covid-19-image-repository/ad7ab099b425f16e06bba22322336b7d6a732965"
NIH = "muhammedtalo/COVID-19/ee3e2cffc0824711bed675275506b26f19be7198/X-Ray Image DataSet"


@pytest.fixture(scope="module")
def table(mirror_root) -> pd.DataFrame:
    """Real patient structure from the mirror: NIH films (patients from file names, labels from folders,
    20 patients with both labels), MHH films (patients from data.csv, up to 22 films each), plus CXNet
    files numbered 001-259 with image-level IDs, one of them linked to an MHH patient (a copy)."""
    rows = []
    for folder, label in (("No_findings", "normal"), ("Pneumonia", "pneumonia")):
        for f in sorted((mirror_root / NIH / folder).glob("*.png")):
            rows.append(("nih", f"{folder}/{f.name}", label, f"nih:{int(f.name[:8])}", False))
    mhh = pd.read_csv(mirror_root / MHH / "data.csv", dtype=str)
    for r in mhh.itertuples():
        if (mirror_root / MHH / "png" / f"{r.image_id}.png").is_file():
            rows.append(("mhh", f"png/{r.image_id}.png", "covid", f"mhh:{r.patient_id}", False))
    rows += [("cxnet", f"covid19/{n:03d}.jpg", "covid", f"cxnet:img{n:03d}", True) for n in range(1, 260)]
    df = pd.DataFrame(rows, columns=["source_name", "upstream_path", "label", "patient_id", "image_level"])
    df = df.rename(columns={"image_level": "patient_id_is_image_level"})
    df["image"] = df["source_name"] + "/" + df["upstream_path"]
    df["patient_group"] = "pg_" + df["patient_id"]
    df.loc[df["upstream_path"] == "covid19/007.jpg", "patient_group"] = df["patient_group"].iloc[-300]
    return df


def _check_disjoint(df: pd.DataFrame, split: pd.Series) -> None:
    assert set(split) <= {"train", "val", "test"}
    assert (df.assign(split=split).groupby("patient_group")["split"].nunique() == 1).all()


def test_split_is_patient_disjoint_and_deterministic(table):
    a = make_splits(table, seed=0)
    _check_disjoint(table, a)
    assert (table.groupby("patient_group")["label"].nunique() > 1).sum() >= 20  # groups spanning two labels
    pd.testing.assert_series_equal(a, make_splits(table, seed=0))
    shuffled = table.sample(frac=1, random_state=7)
    shuffled.index = shuffled.index + 10_000
    b = make_splits(shuffled, seed=0)
    assert (b.to_numpy() == a.loc[shuffled.index - 10_000].to_numpy()).all()  # same row, same split
    c = make_splits(table, seed=1)
    _check_disjoint(table, c)
    assert (c != a).sum() > 100  # the seed matters


def test_split_is_stratified_and_keeps_image_level_ids_in_training(table):
    split = make_splits(table, seed=3)
    image_level_groups = set(table.loc[table["patient_id_is_image_level"], "patient_group"])
    assert (split[table["patient_group"].isin(image_level_groups)] == "train").all()
    free = ~table["patient_group"].isin(image_level_groups)
    share = pd.crosstab(table.loc[free, "label"], split[free], normalize="index")
    assert np.allclose(share["val"], 0.15, atol=0.03) and np.allclose(share["test"], 0.15, atol=0.03), share
    everywhere = make_splits(table, seed=3, val_fraction=0.1, test_fraction=0.2, image_level_to_train=False)
    _check_disjoint(table, everywhere)
    share = pd.crosstab([table["source_name"], table["label"]], everywhere, normalize="index")
    assert np.allclose(share["val"], 0.1, atol=0.03) and np.allclose(share["test"], 0.2, atol=0.03), share
    assert (everywhere[table["patient_id_is_image_level"]] == "test").any()


def test_split_rejects_bad_arguments(table):
    with pytest.raises(ValueError, match="val_fraction"):
        make_splits(table, val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match=re.escape("lacks columns ['patient_group']")):
        make_splits(table.drop(columns="patient_group"))
    assert (make_splits(table, val_fraction=0, test_fraction=0) == "train").all()


def test_assign_groups_meets_targets():
    counts = np.random.default_rng(0).integers(1, 4, size=(300, 2)) * np.eye(2, dtype=int)[np.arange(300) % 2]
    bins = assign_groups(counts, (0.5, 0.3, 0.2), seed=0)
    got = np.array([counts[bins == b].sum(axis=0) for b in range(3)]) / counts.sum(axis=0)
    assert np.allclose(got, [[0.5, 0.5], [0.3, 0.3], [0.2, 0.2]], atol=0.02)


def test_loso_folds_hold_out_one_source_and_keep_every_class(table):
    folds = loso_folds(table)
    # holding out NIH leaves no normal or pneumonia film in training
    assert [s for s, _ in folds] == ["cxnet", "mhh"]
    for source, mask in folds:
        assert mask.index.equals(table.index) and mask.dtype == bool
        assert (table.loc[mask, "source_name"] == source).all() and mask.sum() == (
            table.source_name == source
        ).sum()
    # CXNet 007 shares a patient group with an MHH film: holding out MHH keeps that CXNet row out of training
    mhh_mask = dict(folds)["mhh"]
    assert linked_rows(table, mhh_mask).sum() == 1
    # training without the held-out source's linked rows must still hold every class: here the only
    # normal film is CXNet 007, linked to MHH, so holding out MHH is not a fold (and CXNet never is)
    two = table[table["source_name"].isin(["mhh", "cxnet"])].copy()
    two.loc[two["upstream_path"] == "covid19/007.jpg", "label"] = "normal"
    assert loso_folds(two) == []
    assert [s for s, _ in loso_folds(two.drop(columns="patient_group"))] == ["mhh"]


def test_subsample_is_deterministic_and_bounded(table):
    manifest = table.assign(split=make_splits(table, seed=0))
    a = subsample(manifest, 7, seed=0)
    assert (a.groupby(["split", "label"]).size() == 7).all() and len(a) == 7 * 9
    assert list(a.index) == sorted(a.index)  # manifest order
    shuffled = manifest.sample(frac=1, random_state=2).reset_index(drop=True)
    assert set(subsample(shuffled, 7, seed=0)["image"]) == set(a["image"])
    assert set(subsample(manifest, 7, seed=1)["image"]) != set(a["image"])
    assert len(subsample(manifest, 0, seed=0)) == len(manifest)
    big = subsample(manifest, 10_000, seed=0)
    assert len(big) == len(manifest)
    with pytest.raises(ValueError, match="max_per_class"):
        subsample(manifest, -1, seed=0)


def test_holdout_sources_are_never_trained_or_validated_on(study_manifest):
    """On the real manifest: Actualmed (and any patient group it shares) goes to 'holdout' only."""
    manifest = load_manifest(study_manifest)
    split = make_splits(manifest, seed=0, holdout_sources=("actualmed",))
    held = manifest[split == "holdout"]
    assert set(held["source_name"]) == {"actualmed"} and len(held) == (manifest["source_name"] == "actualmed").sum()
    assert set(held["label"]) == {"covid", "normal"}
    rest = manifest[split != "holdout"]
    assert set(split[split != "holdout"]) == {"train", "val", "test"}
    assert not set(held["patient_group"]) & set(rest["patient_group"])
    assert (manifest.assign(split=split).groupby("patient_group")["split"].nunique() == 1).all()
    pd.testing.assert_series_equal(make_splits(manifest, seed=0), make_splits(manifest, seed=0, holdout_sources=()))
