"""Grad-CAM on a real (pretrained, tiny-input) Classifier and the in-lung share of saliency."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cxrstudy.evaluation import saliency as S
from cxrstudy.lungs.region import LUNG_REGION, cam_region, lung_mask

NIH = "X-Ray Image DataSet"


def test_lung_share_centre_border_uniform():
    centre = np.zeros((100, 100))
    centre[40:60, 40:60] = 1.0
    assert S.lung_share(centre) == pytest.approx(1.0)
    border = np.zeros((100, 100))
    border[:5, :] = 1.0
    border[:, -5:] = 0.5
    assert S.lung_share(border) == pytest.approx(0.0)
    x0, y0, x1, y1 = LUNG_REGION
    assert S.lung_share(np.ones((100, 100))) == pytest.approx((x1 - x0) * (y1 - y0), abs=0.02)
    assert np.isnan(S.lung_share(np.zeros((8, 8))))
    with pytest.raises(ValueError, match="negative"):
        S.lung_share(-centre)
    assert lung_mask(100, 100).sum() == 70 * 70


def test_class_output_indices_with_and_without_decomposition():
    plain = {"classes": ["covid", "normal"], "decomposition": False}
    assert S.class_output_indices(plain) == {"covid": [0], "normal": [1]}
    decomp = {
        "classes": ["covid", "normal"],
        "decomposition": True,
        "subclasses": ["covid_0", "covid_1", "normal_0", "normal_1"],
        "parent_of_subclass": {
            "covid_0": "covid",
            "covid_1": "covid",
            "normal_0": "normal",
            "normal_1": "normal",
        },
    }
    assert S.class_output_indices(decomp) == {"covid": [0, 1], "normal": [2, 3]}
    logits = torch.tensor([1.0, 2.0, 3.0, 0.5])
    assert S.ClassScoreTarget([2])(logits) == pytest.approx(3.0)
    assert S.ClassScoreTarget([0, 1])(logits) == pytest.approx(float(np.log(np.e + np.e**2)))


def test_gradcam_on_real_model_and_images(mirror_file):
    from cxrstudy.images import load_xray
    from cxrstudy.models import Classifier

    torch.manual_seed(0)
    model = Classifier("efficientnet_lite0", n_outputs=4, pretrained=True).eval()
    run_info = {
        "classes": ["covid", "normal"],
        "decomposition": True,
        "subclasses": ["covid_0", "covid_1", "normal_0", "normal_1"],
        "parent_of_subclass": ["covid", "covid", "normal", "normal"],
        "image_size": 96,
    }
    paths = [
        mirror_file("nih", f"{NIH}/No_findings/00001280_004.png"),
        mirror_file("nih", f"{NIH}/Pneumonia/00000061_012.png"),
        mirror_file("mhh", "png/006f3a8a.png"),
    ]
    images = [load_xray(p) for p in paths]
    for p in model.backbone.parameters():  # a frozen backbone (shallow scenario) must still work
        p.requires_grad_(False)
    cams = S.gradcam_maps(model, images, run_info, ["covid", "normal", "covid"], batch_size=2)
    assert cams.shape == (3, 96, 96)
    assert np.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1 + 1e-6
    # Grad-CAM is min-max scaled per image: 1 where the evidence peaks (all 0 if it is negative everywhere)
    assert any(c.max() == pytest.approx(1.0, abs=1e-4) for c in cams)
    assert not any(p.requires_grad for p in model.backbone.parameters())  # restored
    for c in cams:
        share = S.lung_share(c)
        assert np.isnan(share) if c.max() == 0 else 0 <= share <= 1
    assert (
        S.cam_grid(model, 96) == 3 and S.cam_grid(model, 160) == 5
    )  # stride-32 maps: what Grad-CAM resolves
    with pytest.raises(ValueError, match="not among"):
        S.gradcam_maps(model, images[:1], run_info, ["pneumonia"])


def test_sample_for_saliency_takes_correct_and_wrong_per_class():
    preds = pd.DataFrame(
        {
            "image": [f"i{i}" for i in range(8)],
            "split": ["test"] * 7 + ["val"],
            "label": ["covid"] * 4 + ["normal"] * 4,
            "pred": ["covid", "covid", "covid", "normal", "normal", "normal", "covid", "covid"],
        }
    )
    s = S.sample_for_saliency(preds, ["covid", "normal"], per_class=2, seed=0)
    counts = s.groupby(["label", "outcome"]).size().to_dict()
    assert counts == {
        ("covid", "correct"): 2,
        ("covid", "wrong"): 1,
        ("normal", "correct"): 2,
        ("normal", "wrong"): 1,
    }
    assert "i7" not in set(s["image"])  # validation rows are not sampled
    assert s.equals(S.sample_for_saliency(preds, ["covid", "normal"], per_class=2, seed=0))


def test_cam_region_uses_segmented_lungs_else_the_rectangle():
    # a film 200 high x 100 wide whose "lungs" are the left half, rows 50-150
    mask = np.zeros((200, 100), dtype=bool)
    mask[50:150, :50] = True
    region, kind = cam_region(mask, (100, 200), (20, 20))
    assert kind == "segmented" and region.shape == (20, 20)
    assert region[5:15, :10].all() and not region[:5].any() and not region[:, 10:].any()
    assert region.mean() == pytest.approx(0.25)  # the uniform map's share: the mask's area fraction
    cam = np.zeros((20, 20))
    cam[5:15, :10] = 1.0
    assert S.region_share(cam, region) == pytest.approx(1.0)
    cam[0, 19] = 1.0
    assert S.region_share(cam, region) == pytest.approx(100 / 101)
    with pytest.raises(ValueError, match="shape"):
        S.region_share(cam, region[:10])
    # no mask, the QC fallback (all True) or a mask of another film size: the rectangle
    for m in (None, np.ones((200, 100), bool), mask[:100]):
        rect, kind = cam_region(m, (100, 200), (20, 20))
        assert kind == "rectangle" and np.array_equal(rect, lung_mask(20, 20))


def test_saliency_summary_has_n_interval_and_uniform_reference():
    from cxrstudy.evaluation.shortcut_summary import assemble_shortcut_checks

    rng = np.random.default_rng(0)
    n = 16
    table = pd.DataFrame({
        "run_id": ["r"] * n + ["other"] * 2,
        "image": [f"i{i}" for i in range(n + 2)],
        "label": (["covid"] * 8 + ["normal"] * 8) + ["covid"] * 2,
        "outcome": (["correct"] * 4 + ["wrong"] * 4) * 2 + ["correct"] * 2,
        "lung_share": np.r_[rng.uniform(0.6, 0.8, n), [0.1, np.nan]],
        "uniform_share": np.r_[np.full(n, 0.3), [0.3, 0.3]],
        "region": ["segmented"] * (n - 1) + ["rectangle"] + ["segmented"] * 2,
        "cam_grid": 5,
        "image_size": 160,
    })
    checks = assemble_shortcut_checks(saliency=table, saliency_run="r", n_bootstrap=200, seed=0,
                                      lung_region={"kind": "segmented", "n_images": 18})
    sal = checks["saliency"]
    assert checks["lung_region"] == "segmented" and checks["lung_region_detail"]["n_images"] == 18
    assert sal["n_images"] == sal["n_used"] == n and sal["cam_grid"] == 5 and sal["image_size"] == 160
    share = sal["in_lung_share"]
    assert share["value"] == pytest.approx(table["lung_share"][:n].mean()) and share["n"] == n
    assert share["ci_low"] < share["value"] < share["ci_high"] and share["ci_high"] - share["ci_low"] < 0.1
    assert sal["uniform_reference"]["value"] == pytest.approx(0.3)
    assert sal["excess_over_uniform"]["ci_low"] > 0
    assert sal["per_stratum"] == {"covid/correct": 4, "covid/wrong": 4, "normal/correct": 4, "normal/wrong": 4}
    assert sal["regions"] == {"segmented": 15, "rectangle": 1}
    assert checks["saliency_in_lung_share"] == share["value"] and checks["saliency_uniform_reference"] == pytest.approx(0.3)
    assert "stratified by true class and outcome" in sal["sample"]
    assert set(sal["by_run"]) == {"r", "other"}


def test_resize_mask_nearest_or_by_area():
    from cxrstudy.lungs.region import resize_mask

    m = np.zeros((4, 4), bool)
    m[0, 0] = m[0, 1] = m[1, 0] = True  # top-left 2x2 block three-quarters lung
    m[3, 3] = True  # bottom-right block one quarter
    assert resize_mask(m, (2, 2), "area").tolist() == [[True, False], [False, False]]
    assert resize_mask(m, (2, 2)).tolist() == [[False, False], [False, True]]  # pixel centres (1, 1), (3, 3)
    assert resize_mask(m, (4, 4), "area").tolist() == m.tolist()
    assert resize_mask(m, (8, 2)).shape == (2, 8)  # PIL size is (width, height)
