"""Input views rendered for later steps: geometry on a real film, errors for bad views and missing lungs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrstudy import config
from cxrstudy.images import load_xray
from cxrstudy.lungs import render

NIH = "X-Ray Image DataSet"


@pytest.fixture()
def film_and_mask(mirror_file) -> tuple[Image.Image, np.ndarray]:
    img = load_xray(mirror_file("nih", f"{NIH}/No_findings/00001299_000.png"))
    mask = np.zeros((img.height, img.width), dtype=bool)
    mask[img.height // 4 : 3 * img.height // 4, img.width // 5 : 4 * img.width // 5] = True
    return img, mask


def test_views_on_a_real_film(film_and_mask):
    img, mask = film_and_mask
    assert np.array_equal(np.asarray(render.render_one(img, mask, "full", False, 0.05)), np.asarray(img))
    crop = render.render_one(img, mask, "lung_crop", False, 0.05)
    assert 0 < crop.width < img.width and 0 < crop.height < img.height
    masked = np.asarray(render.render_one(img, mask, "lung_mask", True, 0.0))
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    side = max(rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0])
    assert masked.shape == (side, side)  # the lung box on a square canvas, not stretched
    assert masked.max() == 255  # equalised inside the lungs


def test_bad_views_and_missing_lung_stage(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="input_view must be one of"):
        render.check_view("lungs")
    with pytest.raises(ValueError, match="input_view must be one of"):  # shortcut-check films are not input views
        render.check_view("lungs_hidden")
    with pytest.raises(ValueError, match="equalize must be true or false"):
        render.check_view("full", "yes")
    manifest = pd.DataFrame({"image": ["a.png"], "sha256": ["x"], "width": [1], "height": [1]})
    assert render.view_root(manifest, "p", "full", False, image_root=tmp_path) == tmp_path
    monkeypatch.setattr(config, "REPORTS_DIR", tmp_path / "reports")
    with pytest.raises(FileNotFoundError, match="run notebook 01_lungs"):
        render.view_root(manifest, "p", "lung_mask", False, image_root=tmp_path, cache_dir=tmp_path / "v")
    assert render.view_cache_tag(config.PROCESSED_DIR) == "" and render.view_cache_tag(tmp_path / "v" / "x_1") == "x_1"
    assert render.view_tag("lung_mask", True) == "lung_mask_eq" and Path(tmp_path).is_dir()
