"""Feature extraction on real mirror X-rays: the one preprocessing, batching, workers, the cache, embeddings."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageOps
from threadpoolctl import threadpool_limits

import cxrstudy.features as features_mod
from cxrstudy.features import embed_2d, extract_features
from cxrstudy.models import create_backbone, get_spec, model_transform

torch.set_num_threads(1)  # shared CPU: one thread avoids OpenMP spin contention (5x faster here)

DARKCOVIDNET = ("muhammedtalo/COVID-19", "ee3e2cffc0824711bed675275506b26f19be7198", "X-Ray Image DataSet")
FOLDERS = {"covid": "Covid-19", "normal": "No_findings", "pneumonia": "Pneumonia"}
SIZE = 64


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
        manifest, root, "efficientnet_lite0", SIZE, batch_size=4, device="cpu", cache_dir=tmp_path
    )
    assert feats.shape == (6, 1280) and (feats.dtypes == np.float32).all()
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
        manifest, root, "efficientnet_lite0", SIZE, batch_size=4, device="cpu", cache_dir=tmp_path
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
