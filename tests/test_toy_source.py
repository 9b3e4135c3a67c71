"""A new source is one registry entry: a toy source registered for one test, its files laid out like the
mirror in ``tmp_path``, built into a manifest by the real data step (``build_dataset(sources=...)``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrstudy.data import sources as S
from cxrstudy.data.build import build_dataset
from cxrstudy.data.sources import (
    Candidates,
    Source,
    SourceInputs,
    normalize_age,
    normalize_sex,
    read_csv_text,
)

REPO, COMMIT = "lab/toy-cxr", "0123456789abcdef0123456789abcdef01234567"
#: file, finding, view, patient, age, sex: two films of p01, a lateral, and zz_copy.png (p11) a byte copy of
#: p03's film; age and sex as a source might spell them.
LABELS = [
    ("p01a.png", "covid", "PA", "p01", "61", "male"),
    ("p01b.png", "covid", "AP", "p01", "61", "male"),
    *[(f"p{i:02d}.png", "covid", "PA", f"p{i:02d}", f"{40 + i}Y", "f") for i in range(2, 9)],
    *[(f"p{i:02d}.png", "normal", "PA", f"p{i:02d}", "", "") for i in range(9, 11)],
    *[(f"n{i:02d}.png", "normal", "AP", f"n{i:02d}", "50+", "?") for i in range(1, 8)],
    ("n01_lat.png", "normal", "L", "n01", "", ""),
    ("zz_copy.png", "covid", "PA", "p11", "", ""),
]


def _toy_rules(src: Source, inputs: SourceInputs) -> Candidates:
    """labels.csv -> candidates (``images/<file>``); lateral films excluded."""
    df = read_csv_text(inputs.file(src.repo, "labels.csv"))
    lateral = df["view"] == "L"
    rows = pd.DataFrame({
        "source": src.repo, "source_name": src.name, "upstream_path": "images/" + df["file"], "label": df["finding"],
        "view": df["view"], "age": df["age"].map(normalize_age), "sex": df["sex"].map(normalize_sex),
        "patient_id": src.name + ":" + df["patient"], "patient_id_is_image_level": False,
        "case_url": "", "license": src.license, "flags": "",
    })  # fmt: skip
    excluded = rows.loc[lateral, ["source", "source_name", "upstream_path", "label"]].assign(reason="lateral")
    return Candidates(rows[~lateral].reset_index(drop=True), excluded.reset_index(drop=True))


def _film(seed: int) -> Image.Image:
    """A distinct smooth 8-bit grey film (random 12x12 field, bicubic to 320x288)."""
    field = np.random.default_rng(seed).integers(0, 256, (12, 12), dtype=np.uint8)
    return Image.fromarray(field, mode="L").resize((320, 288), Image.Resampling.BICUBIC)


@pytest.fixture
def toy_mirror(tmp_path: Path) -> Path:
    """A mirror ``{owner}/{repo}/{commit}/{path}`` holding the toy source's metadata and films."""
    root = tmp_path / "mirror" / REPO / COMMIT
    (root / "images").mkdir(parents=True)
    pd.DataFrame(LABELS, columns=["file", "finding", "view", "patient", "age", "sex"]).to_csv(root / "labels.csv", index=False)
    for seed, (name, *_rest) in enumerate(LABELS[:-1]):
        _film(seed).save(root / "images" / name)
    shutil.copyfile(root / "images" / "p03.png", root / "images" / "zz_copy.png")
    return tmp_path / "mirror"


@pytest.fixture
def toy_source(monkeypatch):
    """The toy source, registered in ``SOURCES`` for the duration of one test."""
    src = Source(name="toy", repo=REPO, commit=COMMIT, title="toy films", license="CC0-1.0", rules=_toy_rules,
                 priority=99, metadata=("labels.csv",), contrasts=(("covid", "normal"),))  # fmt: skip
    monkeypatch.setitem(S.SOURCES, "toy", src)
    return src


def test_a_registered_source_builds_into_a_manifest(toy_mirror, toy_source, tmp_path):
    assert S.priority_order()[-1] == "toy" and ("toy", "covid", "normal") in S.contrasts()
    out = tmp_path / "processed"
    res = build_dataset(base=str(toy_mirror), out_dir=out, raw_dir=tmp_path / "raw", workers=2,
                        cache_dir=tmp_path / "cache", process_workers=1, progress=False, sources=["toy"])  # fmt: skip
    m = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert m.equals(res.manifest.fillna("").astype(str)) and set(m["source_name"]) == {"toy"} and set(m["source"]) == {REPO}
    kept = [f for f, _, view, *_ in LABELS if view != "L" and f != "zz_copy.png"]
    assert sorted(m["upstream_path"]) == sorted(f"images/{f}" for f in kept)
    label = {f"images/{f}": lab for f, lab, *_ in LABELS}
    assert (m["label"] == m["upstream_path"].map(label)).all()
    ages = m.set_index("upstream_path")["age"]
    assert (ages["images/p01a.png"], ages["images/p03.png"], ages["images/p09.png"], ages["images/n02.png"]) == (
        "61.0", "43.0", "", ""
    )
    assert m.groupby(m["upstream_path"].str[7])["sex"].agg(set).to_dict() == {"p": {"M", "F", ""}, "n": {""}}
    assert (m["patient_id"] == "toy:" + m["upstream_path"].str.extract(r"images/(\w\d\d)", expand=False)).all()
    assert all((out / p).is_file() for p in m["image"])
    # the folds: patient-disjoint, the two films of p01 together
    assert set(m["split"]) == {"cv"}
    assert m.groupby("patient_group")["fold"].nunique().max() == 1
    p01 = m[m["patient_id"] == "toy:p01"]
    assert len(p01) == 2 and p01["patient_group"].nunique() == 1
    # de-duplication: of the byte copy and p03's film the later upstream path is dropped; the only other
    # link is p01's shared patient ID (the generated films are unalike)
    ex = pd.read_csv(out / "excluded.csv", dtype=str, keep_default_na=False).set_index("upstream_path")
    assert ex.loc["images/n01_lat.png", "reason"] == "lateral"
    assert ex.loc["images/zz_copy.png", "reason"] == f"duplicate of {REPO}:images/p03.png"
    assert res.duplicates[["a", "b", "kind", "method"]].values.tolist() == [
        ["toy:images/p01a.png", "toy:images/p01b.png", "same_patient", "patient_id"],
        ["toy:images/p03.png", "toy:images/zz_copy.png", "same_image", "thumbnail"],
    ]
    assert res.info["commits"] == {"toy": {"repo": REPO, "commit": COMMIT}}
    with pytest.raises(ValueError, match="not among the registered"):
        build_dataset(base=str(toy_mirror), out_dir=out, sources=["toy", "nope"])


def test_a_holdout_source_is_never_in_training(toy_mirror, toy_source, tmp_path, monkeypatch):
    from dataclasses import replace

    monkeypatch.setitem(S.SOURCES, "toy", replace(toy_source, holdout=True))
    assert "toy" in S.holdout_sources()
    res = build_dataset(base=str(toy_mirror), out_dir=tmp_path / "p", raw_dir=tmp_path / "raw", workers=2,
                        cache_dir=tmp_path / "cache", process_workers=1, progress=False, sources=["toy"])  # fmt: skip
    assert set(res.manifest["split"]) == {"holdout"}
