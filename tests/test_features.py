"""Feature extraction on real mirror X-rays: the one preprocessing, batching, workers, the cache, embeddings."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageOps
from threadpoolctl import threadpool_limits

import cxrstudy.features as features_mod
from cxrstudy import tensorcache
from cxrstudy.features import embed_2d, extract_features, extraction_summary
from cxrstudy.models import create_backbone, get_spec, model_transform

torch.set_num_threads(1)  # shared CPU: one thread avoids OpenMP spin contention (5x faster here)

DARKCOVIDNET = ("muhammedtalo/COVID-19", "ee3e2cffc0824711bed675275506b26f19be7198", "X-Ray Image DataSet")
FOLDERS = {"covid": "Covid-19", "normal": "No_findings", "pneumonia": "Pneumonia"}
SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def tensor_cache(tmp_path_factory):
    """The shared uint8 tensor cache in a temporary folder, not data/cache/tensors."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tensorcache, "DEFAULT_CACHE_DIR", tmp_path_factory.mktemp("tensors"))
        yield


@pytest.fixture(scope="module")
def tiny(mirror_root: Path, tmp_path_factory) -> tuple[pd.DataFrame, Path]:
    """A 6-image manifest (2 per class) of real mirror X-rays decoded to 8-bit grey PNGs in a tmp folder."""
    repo, commit, folder = DARKCOVIDNET
    base = mirror_root / repo / commit / folder
    root = tmp_path_factory.mktemp("processed")
    rows = []
    for label, sub in FOLDERS.items():
        files = sorted((base / sub).iterdir())[:2]
        if len(files) < 2:
            pytest.skip(f"mirror folder {base / sub} has fewer than 2 images")
        for i, src in enumerate(files):
            rel = f"images/darkcovidnet/{label}_{i}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.open(src).convert("L").save(root / rel)
            rows.append(
                {
                    "image": rel,
                    "label": label,
                    "split": "train",
                    "source_name": "darkcovidnet",
                    "sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
                }
            )
    return pd.DataFrame(rows), root


def test_features_match_the_model_on_the_one_preprocessing_and_are_cached(tiny, tmp_path, monkeypatch):
    manifest, root = tiny
    feats = extract_features(
        manifest,
        root,
        "efficientnet_lite0",
        SIZE,
        batch_size=4,
        device="cpu",
        cache_dir=tmp_path,
        precision="fp32",
    )
    assert feats.shape == (6, 1280) and (feats.dtypes == np.float32).all()
    assert feats.attrs["precision"] == "fp32" and feats.attrs["bf16_check"] is None
    assert feats.index.tolist() == manifest["image"].tolist() and feats.columns[0] == "f0"
    assert feats.attrs["cache_hit"] is False and feats.attrs["images_per_s"] > 0
    # same numbers as the backbone applied to model_transform (what training and saliency use)
    tf = model_transform(get_spec("efficientnet_lite0"), SIZE)
    x = torch.stack([tf(Image.open(root / p)) for p in manifest["image"][:3]])
    with torch.inference_mode():
        direct = create_backbone("efficientnet_lite0").eval()(x).numpy()
    np.testing.assert_allclose(feats.to_numpy()[:3], direct, rtol=1e-4, atol=1e-4)
    # pretrained features separate images: not a constant vector
    assert feats.to_numpy().std(axis=0).mean() > 1e-3

    # a re-run reads the cache without building a model
    monkeypatch.setattr(features_mod, "create_backbone", lambda *a, **k: pytest.fail("cache was not used"))
    again = extract_features(
        manifest,
        root,
        "efficientnet_lite0",
        SIZE,
        batch_size=4,
        device="cpu",
        cache_dir=tmp_path,
        precision="fp32",
    )
    assert again.attrs["cache_hit"] is True
    pd.testing.assert_frame_equal(again, feats)
    assert len(list(tmp_path.glob("*.npz"))) == 1 and not list(tmp_path.glob(".*tmp"))


def test_cache_is_keyed_by_manifest_content_and_size(tiny, tmp_path):
    manifest, root = tiny
    a = features_mod.cache_path(manifest, "efficientnet_lite0", SIZE, tmp_path)
    changed = manifest.assign(sha256=manifest["sha256"].where(manifest.index != 0, "0" * 64))
    assert features_mod.cache_path(changed, "efficientnet_lite0", SIZE, tmp_path) != a
    assert features_mod.cache_path(manifest, "efficientnet_lite0", SIZE + 32, tmp_path) != a
    assert features_mod.cache_path(manifest, "scratch:efficientnet_lite0", SIZE, tmp_path) != a
    assert features_mod.cache_path(manifest, "efficientnet_lite0", SIZE, tmp_path, "masked") != a
    assert features_mod.cache_path(manifest.copy(), "efficientnet_lite0", SIZE, tmp_path) == a
    # fp32 files keep the key they had before bf16 existed; bf16 results are cached apart
    assert features_mod.cache_path(manifest, "efficientnet_lite0", SIZE, tmp_path, precision="fp32") == a
    bf16 = features_mod.cache_path(manifest, "efficientnet_lite0", SIZE, tmp_path, precision="bf16")
    assert bf16 != a and "_bf16_" in bf16.name


def test_workers_and_batch_size_do_not_change_features(tiny, tmp_path):
    manifest, root = tiny
    one = extract_features(
        manifest, root, "efficientnet_lite0", SIZE, batch_size=6, device="cpu", cache_dir=tmp_path / "a"
    )
    two = extract_features(
        manifest,
        root,
        "efficientnet_lite0",
        SIZE,
        batch_size=4,
        device="cpu",
        num_workers=1,
        cache_dir=tmp_path / "b",
    )
    np.testing.assert_allclose(one.to_numpy(), two.to_numpy(), rtol=1e-4, atol=1e-4)


def test_extra_transform_needs_a_cache_tag_and_changes_features(tiny, tmp_path):
    manifest, root = tiny
    sub = manifest.iloc[:2]
    with pytest.raises(ValueError, match="cache_tag"):
        extract_features(
            sub, root, "efficientnet_lite0", SIZE, device="cpu", cache_dir=tmp_path, transform=ImageOps.invert
        )
    plain = extract_features(sub, root, "efficientnet_lite0", SIZE, device="cpu", cache_dir=tmp_path)
    inverted = extract_features(
        sub,
        root,
        "efficientnet_lite0",
        SIZE,
        device="cpu",
        cache_dir=tmp_path,
        transform=ImageOps.invert,
        cache_tag="inverted",
    )
    assert not np.allclose(plain.to_numpy(), inverted.to_numpy(), atol=1e-2)
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_bad_manifests_are_clear_errors(tiny, tmp_path):
    manifest, root = tiny
    gone = manifest.assign(image=manifest["image"].str.replace("covid_0", "nothere"))
    with pytest.raises(FileNotFoundError, match="nothere"):
        extract_features(gone, root, "efficientnet_lite0", SIZE, device="cpu", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="sha256"):
        extract_features(
            manifest.drop(columns="sha256"), root, "efficientnet_lite0", SIZE, cache_dir=tmp_path
        )
    with pytest.raises(ValueError, match="more than once"):
        extract_features(
            pd.concat([manifest, manifest.iloc[:1]]), root, "efficientnet_lite0", SIZE, cache_dir=tmp_path
        )
    assert not list(tmp_path.glob("*.npz"))


def test_the_bf16_decision_is_measured_once_and_recorded(tiny, tmp_path, monkeypatch):
    manifest, root = tiny
    kw = dict(batch_size=4, device="cpu", cache_dir=tmp_path)
    # without native bf16: fp32, and the summary says why
    monkeypatch.setattr(features_mod, "bf16_supported", lambda dev="cpu": False)
    plain = extract_features(manifest, root, "efficientnet_lite0", SIZE, **kw)
    s = extraction_summary(plain, "efficientnet_lite0", SIZE, "cpu")
    assert s["precision"] == "fp32" and "no native bf16" in s["bf16_check"]["reason"]
    # with it: the check runs once per (backbone, size) and its numbers are recorded
    monkeypatch.setattr(features_mod, "bf16_supported", lambda dev="cpu": True)
    monkeypatch.setattr(features_mod, "BF16_MIN_COSINE", 0.9)  # loose thresholds: exercise the bf16 path
    monkeypatch.setattr(features_mod, "BF16_MAX_PROBE_GAP", 100.0)  # (3 test images: 33 points a mistake)
    kw["cache_dir"] = tmp_path / "b"  # (an fp32 result in the cache would be served without a check)
    feats = extract_features(manifest, root, "efficientnet_lite0", SIZE, **kw)
    check = feats.attrs["bf16_check"]
    assert feats.attrs["precision"] == "bf16" and check["use_bf16"] and "_bf16_" in feats.attrs["cache_file"]
    assert 0.9 <= check["cosine_min"] <= check["cosine_mean"] <= 1.0 + 1e-6 and check["n_images"] == 6
    assert (
        0 <= check["probe_gap_points"] <= 100 and check["n_probe_test"] == 3
    )  # 3 classes, stratified halves
    assert check["thresholds"] == {"cosine_min": 0.9, "probe_gap_points": 100.0}
    record = features_mod.precision_record_path(
        kw["cache_dir"], "efficientnet_lite0", SIZE, torch.device("cpu")
    )
    assert json.loads(record.read_text())["precision"] == "bf16"
    cos = (feats.to_numpy() * plain.to_numpy()).sum(1)
    cos /= np.linalg.norm(feats.to_numpy(), axis=1) * np.linalg.norm(plain.to_numpy(), axis=1)
    assert cos.min() > 0.9 and not np.array_equal(feats.to_numpy(), plain.to_numpy())
    s = extraction_summary(feats, "efficientnet_lite0", SIZE, "cpu")
    assert s["precision"] == "bf16" and s["bf16_check"]["cosine_min"] == check["cosine_min"]
    # another manifest: the recorded decision is used, no second check; the cache keeps the metadata
    monkeypatch.setattr(features_mod, "bf16_agreement", lambda *a, **k: pytest.fail("checked twice"))
    sub = extract_features(manifest.iloc[:3], root, "efficientnet_lite0", SIZE, **kw)
    assert sub.attrs["precision"] == "bf16"
    monkeypatch.setattr(features_mod, "create_backbone", lambda *a, **k: pytest.fail("cache was not used"))
    again = extract_features(manifest, root, "efficientnet_lite0", SIZE, **kw)
    assert again.attrs["cache_hit"] and again.attrs["bf16_check"]["cosine_min"] == check["cosine_min"]
    with pytest.raises(ValueError, match="precision must be"):
        extract_features(manifest, root, "efficientnet_lite0", SIZE, precision="half", **kw)


def test_bf16_agreement_rejects_features_that_disagree(tiny):
    manifest, root = tiny
    spec = features_mod.get_spec("efficientnet_lite0")
    x = tensorcache.load_uint8_batch(manifest, root, SIZE, spec.interpolation, persist=False)
    model, dev = features_mod.prepare_model("efficientnet_lite0", "cpu")
    labels = manifest["label"].to_numpy()
    check = features_mod.bf16_agreement(model, x, labels, spec, dev, batch_size=4)
    assert {"cosine_min", "cosine_mean", "probe_accuracy_fp32", "probe_accuracy_bf16", "use_bf16"} <= set(
        check
    )
    # at 64 px bf16 autocast drifts from fp32 by more than the 0.999 cosine floor: not used
    assert check["cosine_min"] < 0.999 and not check["use_bf16"] and check["reason"].startswith("cosine")
    no_labels = features_mod.bf16_agreement(model, x, None, spec, dev, batch_size=4)
    assert not no_labels["use_bf16"] and "probe_gap_points" not in no_labels


def test_embed_2d_methods():
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(0, 1, (15, 20)), rng.normal(8, 1, (15, 20))])
    pca = embed_2d(x, "pca", seed=0)
    assert pca.shape == (30, 2)
    # the two groups separate along the first component
    assert abs(pca[:15, 0].mean() - pca[15:, 0].mean()) > 3 * pca[:, 0].std() / 2
    with threadpool_limits(limits=1):
        tsne = embed_2d(x, "tsne", seed=0)
        assert tsne.shape == (30, 2)
        np.testing.assert_allclose(tsne, embed_2d(x, "tsne", seed=0))
    with pytest.raises(ValueError, match="unknown embedding"):
        embed_2d(x, "mds")


def test_profile_features_read_the_films_through_the_profiles_view(tiny, tmp_path):
    """Notebooks 02 and 03 share one call: the plain view reads the given folder; a lung view needs notebook 01."""
    from cxrstudy.features import profile_features

    manifest, root = tiny
    kw = {"device": "cpu", "cache_dir": tmp_path}
    feats, image_root = profile_features(manifest, "no_such_profile", "efficientnet_lite0", SIZE, image_root=root, **kw)
    assert image_root == root and list(feats.index) == list(manifest["image"])
    plain = extract_features(manifest, root, "efficientnet_lite0", SIZE, **kw)
    np.testing.assert_allclose(feats.to_numpy(), plain.to_numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="01_lungs"):
        profile_features(manifest, "no_such_profile", "efficientnet_lite0", SIZE, "lung_mask", True,
                         image_root=root, **kw)
