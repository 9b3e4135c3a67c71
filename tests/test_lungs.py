"""Lung stage: mask pairing on the real archive and manifest, post-processing and QC, input views,
odd inputs, the cache key, and a one-epoch run end to end (tiny: a dozen masks at 64 px)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrstudy import config
from cxrstudy.data.manifest import load_manifest
from cxrstudy.lungs import (
    VIEWS,
    LungSegmenter,
    LungTrainConfig,
    apply_view,
    assess,
    cache_key,
    clean_mask,
    lung_box,
    lung_table,
    masks_for,
    pair_masks,
    postprocess,
    run_lungs,
)
from cxrstudy.lungs.masks import load_pair, lung_split, mask_members

pytest.importorskip("torchxrayvision", reason="the lung masks ship in torchxrayvision")


@pytest.fixture(scope="module")
def manifest(study_manifest) -> pd.DataFrame:
    return load_manifest()


def _stem(name: str) -> str:
    return name.rsplit("/", 1)[-1].rsplit(".", 1)[0].lower()


def _lungs(h: int, w: int) -> np.ndarray:
    """Two lung-like ellipses side by side."""
    yy, xx = np.mgrid[:h, :w]
    left = ((xx - 0.3 * w) / (0.14 * w)) ** 2 + ((yy - 0.5 * h) / (0.3 * h)) ** 2 <= 1
    right = ((xx - 0.7 * w) / (0.14 * w)) ** 2 + ((yy - 0.5 * h) / (0.3 * h)) ** 2 <= 1
    return left | right


# --------------------------------------------------------------------------- pairing


def test_archive_holds_the_v7_masks():
    assert 500 <= len(mask_members()) <= 530


def test_pairing_on_the_real_manifest(manifest):
    pairs, counts = pair_masks(manifest)
    assert 250 <= len(pairs) <= 400, counts
    assert counts["pairs"] == len(pairs)
    assert set(counts["by_split"]) == {"train", "val", "test"} and all(counts["by_split"].values())
    rows = manifest.assign(lung_split=lung_split(manifest)).set_index("image")
    for p in pairs:
        assert rows.loc[p.image, "source_name"] == "ieee8023"
        assert _stem(p.member) == _stem(rows.loc[p.image, "upstream_path"])
        assert p.split == rows.loc[p.image, "lung_split"]  # the lung stage's own patient-disjoint split
    # patient groups never straddle splits, so training masks are patient-disjoint from test masks
    split_of = {}
    for p in pairs:
        assert split_of.setdefault(p.patient_group, p.split) == p.split
    for p in pairs[:: max(1, len(pairs) // 15)]:
        img, mask = load_pair(p, config.PROCESSED_DIR)
        assert mask.shape == (img.height, img.width) and mask.dtype == bool
        assert 0.05 < mask.mean() < 0.8


def test_pairing_matches_across_extension_case(manifest):
    members = mask_members()
    name = next(n for n in members if n.lower().endswith(".jpg"))
    row = {
        "image": "images/ieee8023/images/x.png",
        "source_name": "ieee8023",
        "upstream_path": "images/" + name.rsplit(".", 1)[0] + ".JPEG",
        "label": "covid",
        "patient_id_is_image_level": False,
        "patient_group": "g",
        "width": 256,
        "height": 256,
    }
    pairs, counts = pair_masks(pd.DataFrame([row]), min_area=0.0)
    assert [p.member for p in pairs] == [members[name]] and counts["matched_by_stem"] == 1


# --------------------------------------------------------------------------- post-processing and QC


def test_clean_mask_keeps_two_largest_and_fills_holes():
    m = np.zeros((100, 100), dtype=bool)
    m[10:90, 10:40] = True  # big
    m[10:80, 60:90] = True  # second
    m[92:97, 92:97] = True  # third, small: dropped
    m[40:50, 20:30] = False  # a hole in the big one
    out, n = clean_mask(m)
    assert n == 2
    assert out[45, 25] and not out[94, 94]
    assert out.sum() == 80 * 30 + 70 * 30


def test_clean_mask_drops_tiny_components():
    m = np.zeros((100, 100), dtype=bool)
    m[10:90, 10:45] = True
    m[0:3, 97:100] = True  # 9 px < 0.5% of the image
    out, n = clean_mask(m)
    assert n == 1 and not out[1, 98]


def test_plausible_lungs_pass_qc():
    m = _lungs(200, 240)
    image = (np.add.outer(np.arange(200), np.arange(240)) % 256).astype(np.uint8)
    q = assess(m, m.astype(np.float32), image)
    assert q.qc_pass and q.qc_flags == [] and q.n_components == 2
    assert 0.9 < q.lr_balance <= 1.0
    assert (q.x0, q.y0, q.x1, q.y1) == (
        int(np.flatnonzero(m.any(0))[0]),
        int(np.flatnonzero(m.any(1))[0]),
        int(np.flatnonzero(m.any(0))[-1]) + 1,
        int(np.flatnonzero(m.any(1))[-1]) + 1,
    )


def test_empty_prediction_gets_the_fallback():
    mask, q = postprocess(np.zeros((64, 80), dtype=np.float32))
    assert not q.qc_pass and "no_lungs" in q.qc_flags and "fallback" in q.qc_flags
    assert mask.all() and mask.shape == (64, 80)
    assert (q.x0, q.y0, q.x1, q.y1) == (0, 0, 80, 64)


def test_one_lung_missing_fails_qc():
    m = _lungs(100, 100)
    m[:, 50:] = False
    q = assess(m, m.astype(np.float32))
    assert not q.qc_pass and "lr_imbalance" in q.qc_flags


def test_implausible_shape_fails_qc():
    from cxrstudy.lungs.qc import shape_prior, shape_score

    prior = shape_prior([_lungs(120, 100), _lungs(100, 130)])
    assert shape_score(_lungs(90, 90), prior) > 0.95
    m = np.zeros((100, 100), bool)
    m[15:85, 10:90] = True  # a frame: one component, balanced, a lung-sized box, but no lung shape
    m[27:73, 22:78] = False
    q = assess(m, m.astype(np.float32), None, prior)
    assert not q.qc_pass and q.qc_flags == ["implausible_shape", "fallback"]
    assert assess(_lungs(100, 100), None, None, prior).qc_pass
    assert assess(m, None, None, np.zeros_like(prior)).qc_pass  # no prior (untrained model): rule skipped


def test_uncertain_map_fails_qc():
    rng = np.random.default_rng(0)
    prob = np.where(_lungs(100, 100), 0.55, 0.45) + rng.uniform(-0.02, 0.02, (100, 100))
    _, q = postprocess(prob.astype(np.float32))
    assert not q.qc_pass and "uncertain" in q.qc_flags


# --------------------------------------------------------------------------- views


def _films(manifest: pd.DataFrame, per_source: int = 2) -> pd.DataFrame:
    return manifest.groupby("source_name", group_keys=False).head(per_source)


def test_views_on_real_films_of_every_source(manifest):
    """The crop views centre the lung box on a black square: no stretch, the box's pixels unchanged."""
    from cxrstudy.images import load_xray

    films = _films(manifest)
    assert set(films["source_name"]) == set(manifest["source_name"])
    for image in films["image"]:
        img = load_xray(config.PROCESSED_DIR / image)
        for mask in (_lungs(img.height, img.width), np.zeros((img.height, img.width), bool)):
            box = lung_box(mask if mask.any() else np.ones_like(mask))
            bw, bh = box[2] - box[0], box[3] - box[1]
            for view in VIEWS:
                for eq in (False, True):
                    out = apply_view(img, mask, view, equalize=eq)
                    assert out.mode == "L" and out.width > 0 and out.height > 0
                    if view == "full":
                        assert out.size == img.size
                    else:
                        assert out.size == (max(bw, bh), max(bw, bh))  # square, the longer side kept
            if mask.any():
                x0, y0, x1, y1 = lung_box(mask)
                side = max(x1 - x0, y1 - y0)
                top, left = (side - (y1 - y0)) // 2, (side - (x1 - x0)) // 2
                inner = (slice(top, top + y1 - y0), slice(left, left + x1 - x0))
                crop = np.asarray(apply_view(img, mask, "lung_mask"))
                assert (crop[inner][~mask[y0:y1, x0:x1]] == 0).all()
                inside = np.asarray(img)[y0:y1, x0:x1][mask[y0:y1, x0:x1]]
                assert np.array_equal(crop[inner][mask[y0:y1, x0:x1]], inside)
                framed = np.asarray(apply_view(img, mask, "lung_crop"))
                assert np.array_equal(framed[inner], np.asarray(img)[y0:y1, x0:x1])
                padding = np.ones_like(framed, bool)
                padding[inner] = False
                assert (framed[padding] == 0).all()


def test_the_view_frame_keeps_the_aspect_and_frames_film_and_mask_alike():
    from cxrstudy.inference import view_mask
    from cxrstudy.lungs.views import to_view_frame

    mask = np.zeros((100, 80), bool)
    mask[20:80, 10:40] = True  # a tall box: 60 x 30
    film = np.arange(100 * 80, dtype=np.int64).reshape(100, 80)
    framed = to_view_frame(film, mask, "lung_crop", margin=0.0)
    assert framed.shape == (60, 60) and (framed[:, :15] == 0).all() and (framed[:, 45:] == 0).all()
    assert np.array_equal(framed[:, 15:45], film[20:80, 10:40])
    assert np.array_equal(view_mask(mask, "lung_mask", 0.0), to_view_frame(mask, mask, "lung_mask", 0.0))
    assert view_mask(mask, "lung_mask", 0.0).sum() == mask.sum()
    assert to_view_frame(film, mask, "full") is film


def test_lung_box_margin_is_clipped_to_the_image():
    m = np.zeros((100, 200), bool)
    m[2:50, 150:199] = True
    assert lung_box(m, 0.05) == (140, 0, 200, 55)
    assert lung_box(m, 0.0) == (150, 2, 199, 50)


def test_equalize_uses_mask_pixels_only():
    arr = np.full((50, 50), 200, np.uint8)
    arr[10:40, 10:40] = np.linspace(50, 100, 30).astype(np.uint8)[None, :]
    mask = np.zeros_like(arr, bool)
    mask[10:40, 10:40] = True
    out = np.asarray(apply_view(Image.fromarray(arr), mask, "lung_mask", equalize=True, margin=0))
    assert out.min() == 0 and out.max() == 255  # the mask's range is stretched to the full scale


def test_view_errors_name_the_problem():
    img = Image.fromarray(np.zeros((40, 30), np.uint8))
    with pytest.raises(ValueError, match="unknown view"):
        apply_view(img, np.ones((40, 30), bool), "lungs")
    with pytest.raises(ValueError, match="does not match"):
        apply_view(img, np.ones((30, 40), bool), "lung_crop")
    with pytest.raises(ValueError, match="2-D"):
        apply_view(img, np.ones((40, 30, 1), bool), "full")
    with pytest.raises(ValueError, match="mode"):
        apply_view(img.convert("RGB"), np.ones((40, 30), bool), "full")
    with pytest.raises(ValueError, match="margin"):
        apply_view(img, np.ones((40, 30), bool), "lung_crop", margin=2)


# --------------------------------------------------------------------------- cache key


def test_cache_key_changes_with_training_settings(manifest):
    pairs, _ = pair_masks(manifest, max_masks=12, seed=0)
    cfg = LungTrainConfig(image_size=64, epochs=1, batch_size=4)
    films = manifest.head(20)
    key = cache_key(pairs, cfg, films, 100)
    assert key == cache_key(pairs, LungTrainConfig(image_size=64, epochs=1, batch_size=4), films, 100)
    for changed in (
        dataclasses.replace(cfg, epochs=2),
        dataclasses.replace(cfg, lr=1e-3),
        dataclasses.replace(cfg, image_size=96),
        dataclasses.replace(cfg, hflip=0.5),
    ):
        assert cache_key(pairs, changed, films, 100) != key
    assert cache_key(pairs[:-1], cfg, films, 100) != key  # training masks
    assert cache_key(pairs, cfg, manifest.head(21), 100) != key  # manifest content


# --------------------------------------------------------------------------- one tiny run end to end


@pytest.fixture(scope="module")
def tiny_run(manifest, tmp_path_factory):
    root = tmp_path_factory.mktemp("lungs")
    mp = pytest.MonkeyPatch()
    mp.setattr(config, "REPORTS_DIR", root / "reports")
    films = _films(manifest, 2)
    cfg = LungTrainConfig(image_size=64, epochs=1, batch_size=4)
    kw = dict(
        segment=films,
        max_masks=12,
        device="cpu",
        threads=1,
        n_bootstrap=50,
        cache_dir=root / "cache",
        log=lambda *_: None,
    )
    run = run_lungs(manifest, cfg, profile="tiny", **kw)
    again = run_lungs(manifest, cfg, profile="tiny", **kw)
    yield run, again, films, root
    mp.undo()


def test_tiny_run_writes_the_contract(tiny_run):
    run, again, films, root = tiny_run
    assert not run.cache_hit and again.cache_hit and again.folder == run.folder
    out = root / "reports" / "tiny" / "lungs"
    summary = json.loads((out / "summary.json").read_text())
    for metric in ("dice", "iou"):
        assert set(summary[metric]) == {"value", "ci_low", "ci_high"}
        assert all(isinstance(summary[metric][k], float) for k in ("value", "ci_low", "ci_high"))
    assert isinstance(summary["n_test_masks"], int) and summary["n_test_masks"] >= 2
    assert set(summary["qc_pass_rate"]) == set(films["source_name"])
    assert all(0.0 <= r <= 1.0 for r in summary["qc_pass_rate"].values())
    assert isinstance(summary["train_seconds"], float) and summary["train_seconds"] > 0
    assert run.folder.parent == root / "cache" and run.folder.name.endswith(run.key)
    table = pd.read_csv(out / "lungs.csv", keep_default_na=False)
    assert list(table.columns[:10]) == [
        "image", "x0", "y0", "x1", "y1", "area_fraction", "n_components", "lr_balance", "qc_pass", "qc_flags",
    ]  # fmt: skip
    assert table["image"].tolist() == films["image"].tolist()
    assert ((table["x1"] > table["x0"]) & (table["y1"] > table["y0"])).all()
    for name in ("model.pth", "model.json", "history.csv"):
        assert (out / name).is_file()


def test_tiny_run_loaders_and_segmenter(tiny_run):
    from cxrstudy.images import load_xray

    run, _, films, _ = tiny_run
    masks = masks_for(films, "tiny")
    table = lung_table("tiny").set_index("image")
    for image, mask in masks.items():
        img = load_xray(config.PROCESSED_DIR / image)
        assert mask.shape == (img.height, img.width) and mask.any()
        if not table.loc[image, "qc_pass"]:
            assert mask.all()
    with pytest.raises(KeyError, match="no cached lung mask"):
        masks_for(pd.DataFrame({"image": ["images/none.png"]}), "tiny")
    seg = LungSegmenter.for_profile("tiny")
    img = load_xray(config.PROCESSED_DIR / films["image"].iloc[0])
    assert seg.predict(img).shape == (img.height, img.width)


@pytest.mark.parametrize("kind", ["blank", "noise", "tiny", "wide"])
def test_odd_inputs_get_the_fallback_not_a_crash(tiny_run, kind):
    rng = np.random.default_rng(1)
    arr = {
        "blank": np.full((256, 256), 128, np.uint8),
        "noise": rng.integers(0, 256, (240, 320), dtype=np.uint8),
        "tiny": rng.integers(0, 256, (7, 5), dtype=np.uint8),
        "wide": np.tile(np.linspace(0, 255, 900).astype(np.uint8), (40, 1)),
    }[kind]
    img = Image.fromarray(arr)
    seg = tiny_run[0].segmenter()
    mask, qc = seg.analyse(img)
    assert mask.shape == (img.height, img.width)
    if kind in ("blank", "noise"):
        assert not qc.qc_pass and mask.all() and "fallback" in qc.qc_flags
        assert qc.qc_flags[0] == ("blank_image" if kind == "blank" else "not_a_film")
    if not qc.qc_pass:
        assert mask.all() and (qc.x0, qc.y0, qc.x1, qc.y1) == (0, 0, img.width, img.height)
    for view in VIEWS:
        out = apply_view(img, mask, view)
        assert out.width > 0 and out.height > 0


def test_segmenter_rejects_colour_images(tiny_run):
    seg = tiny_run[0].segmenter()
    with pytest.raises(ValueError, match="mode"):
        seg.predict(Image.new("RGB", (64, 64)))
