"""Overlap of "external" files with the study: real upstream files, altered copies, new images, bad files."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from cxrstudy import config
from cxrstudy.data.manifest import load_manifest
from cxrstudy.evaluation import overlap as OV


@pytest.fixture(scope="module")
def study(study_manifest) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    """The real manifest, excluded table and processed folder (built from the mirror when absent)."""
    processed = config.PROCESSED_DIR
    excluded = pd.read_csv(processed / "excluded.csv", dtype=str, keep_default_na=False)
    return load_manifest(processed / "manifest.csv"), excluded, processed


@pytest.fixture(scope="module")
def bank(study) -> OV.Bank:
    manifest, _, processed = study
    return OV.manifest_bank(manifest, processed, config.CACHE_DIR / "dedup")


def test_real_upstream_files_are_exact_overlaps(study, mirror_file):
    manifest, _, processed = study
    rows = manifest.groupby("source_name").head(1).head(5)
    paths = [mirror_file(r.source_name, r.upstream_path) for r in rows.itertuples()]
    t0 = time.perf_counter()
    res = OV.find_overlaps(paths, manifest, processed)
    seconds = time.perf_counter() - t0
    assert res["exact"] == 5 and res["near"] == 0 and res["new"] == 0 and not res["unreadable"]
    assert [i["match"] for i in res["images"]] == [
        f"{r.source_name}:{r.upstream_path}" for r in rows.itertuples()
    ]
    assert all(i["kind"] == "exact" and i["score"] == 1.0 for i in res["images"])
    assert seconds < 10


def test_dropped_duplicate_is_an_exact_overlap(study, mirror_file):
    """A file the data step dropped as a copy (byte-different from every kept file) is still not new."""
    manifest, excluded, processed = study
    raw = config.RAW_DIR
    locked = OV._raw_shas(raw)
    if not locked:
        pytest.skip("no data/raw/lock.json")
    from cxrstudy.data.sources import SOURCES

    dups = excluded[excluded["reason"].str.startswith("duplicate of ")]
    kept = set(manifest["sha256"])
    for r in dups.itertuples():
        sha = locked.get(f"{SOURCES[r.source_name].repo}/{SOURCES[r.source_name].commit}/{r.upstream_path}")
        if sha and sha not in kept:
            break
    else:
        pytest.skip("no dropped copy differs byte-wise from its kept copy")
    res = OV.find_overlaps([mirror_file(r.source_name, r.upstream_path)], manifest, processed, raw, excluded)
    [hit] = res["images"]
    assert hit["kind"] == "exact" and hit["match"] == f"{r.source_name}:{r.upstream_path}"
    assert hit["copy_of"].startswith("duplicate of ")


def test_altered_copies_are_near_and_new_images_are_not(study, bank, tmp_path):
    manifest, _, processed = study
    # a processed ieee8023 film re-encoded as JPEG at 3/4 size: thumbnail test
    row = manifest[manifest["source_name"] == "ieee8023"].iloc[5]
    im = Image.open(processed / row["image"])
    im.resize((im.width * 3 // 4, im.height * 3 // 4)).save(tmp_path / "resized.jpg", quality=70)
    # an MHH film cropped and enlarged: the thumbnail test misses it, ORB + RANSAC finds it
    mhh = manifest[manifest["upstream_path"] == "png/006f3a8a.png"].iloc[0]
    im2 = Image.open(processed / mhh["image"])
    w, h = im2.size
    crop = im2.crop((int(0.12 * w), int(0.1 * h), int(0.95 * w), int(0.92 * h)))
    crop.resize((crop.width * 3 // 2, crop.height * 3 // 2)).save(tmp_path / "crop.jpg", quality=80)
    # new images: noise and a drawing
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (300, 280), dtype=np.uint8)).save(tmp_path / "noise.png")
    drawn = Image.new("L", (320, 300), 20)
    ImageDraw.Draw(drawn).ellipse((40, 30, 150, 270), fill=160)
    ImageDraw.Draw(drawn).ellipse((170, 30, 280, 270), fill=150)
    drawn.save(tmp_path / "drawn.png")
    # unreadable: a truncated PNG and a text file
    (tmp_path / "corrupt.png").write_bytes((processed / row["image"]).read_bytes()[:300])
    (tmp_path / "notes.jpg").write_text("not an image")
    names = ["resized.jpg", "crop.jpg", "noise.png", "drawn.png", "corrupt.png", "notes.jpg"]
    res = OV.find_overlaps([tmp_path / n for n in names], manifest, processed, bank=bank)
    by_path = {Path(i["path"]).name: i for i in res["images"]}
    assert res["exact"] == 0 and res["near"] == 2 and res["new"] == 2
    assert by_path["resized.jpg"]["match"] == f"ieee8023:{row['upstream_path']}"
    assert by_path["resized.jpg"]["method"] == "thumbnail" and by_path["resized.jpg"]["score"] >= 0.975
    assert by_path["crop.jpg"]["match"] == "mhh:png/006f3a8a.png"
    assert by_path["crop.jpg"]["method"] == "orb" and by_path["crop.jpg"]["inliers"] >= 80
    bad = {Path(u["path"]).name: u["reason"] for u in res["unreadable"]}
    assert set(bad) == {"corrupt.png", "notes.jpg"} and "not an image" in bad["notes.jpg"]
    assert not any(Path(s["path"]).name in ("noise.png", "drawn.png") for s in res["same_patient"])


def test_empty_and_missing(study, bank, tmp_path):
    manifest, _, processed = study
    res = OV.find_overlaps([], manifest, processed, bank=bank)
    assert res["exact"] == res["near"] == res["new"] == 0 and res["images"] == []
    res = OV.find_overlaps([tmp_path / "absent.png"], manifest, processed, bank=bank)
    assert res["new"] == 0 and res["unreadable"][0]["reason"].startswith("cannot read file")
