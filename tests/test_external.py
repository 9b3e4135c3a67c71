"""`make evaluate`: every configuration of a profile (its fold models' ensemble) or every saved run on a CSV of real
mirror images, through the study's preprocessing, with the lung QC."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrstudy.data.manifest import MANIFEST_COLUMNS
from cxrstudy.evaluation import external as E
from cxrstudy.inference import UNCHECKED

NIH = "X-Ray Image DataSet"
#: The two-fold configuration of the ``profile`` fixture (its fold models found different subclasses).
TWO = "covid_vs_normal__efficientnet_lite0__shallow__decomp__seed0"


@pytest.fixture(scope="module")
def profile(tmp_path_factory, save_untrained_run) -> Path:
    pdir = tmp_path_factory.mktemp("reports") / "testprofile"
    two = ["covid", "normal"]
    save_untrained_run(pdir, "covid_vs_normal", two, ["covid_1", "covid_2", "normal_1", "normal_2"], 0, 0, 2)
    save_untrained_run(pdir, "covid_vs_normal", two, ["covid_1", "normal_1", "normal_2"], 0, 1, 2)
    save_untrained_run(
        pdir, "covid_normal_pneumonia", ["covid", "normal", "pneumonia"], ["covid", "normal", "pneumonia"], 0
    )
    return pdir


def _write_csv(tmp_path: Path, mirror_file) -> Path:
    folder = tmp_path / "ext"
    (folder / "imgs").mkdir(parents=True)
    local = folder / "imgs" / "normal_a.png"
    shutil.copy(mirror_file("nih", f"{NIH}/No_findings/00001299_000.png"), local)
    (folder / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    rows = [
        ("imgs/normal_a.png", "normal"),  # relative to the CSV
        (str(mirror_file("nih", f"{NIH}/No_findings/00001280_004.png")), "normal"),
        (str(mirror_file("mhh", "png/006f3a8a.png")), "covid"),
        (str(mirror_file("mhh", "png/00870a9c.png")), "covid"),
        (str(mirror_file("nih", f"{NIH}/Pneumonia/00000061_012.png")), "pneumonia"),
        ("imgs/broken.png", "covid"),
        ("imgs/does_not_exist.png", "normal"),
    ]
    csv = folder / "holdout.csv"
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(csv, index=False)
    return csv


def test_evaluate_external_end_to_end(tmp_path, mirror_file, profile):
    from cxrstudy.data.preprocess import TARGET_SHORT_SIDE
    from cxrstudy.images import load_xray, resize_short_side
    from cxrstudy.training import load_run_model, predict_images

    csv = _write_csv(tmp_path, mirror_file)
    res = E.evaluate_external(csv, profile_dir=profile, n_bootstrap=50, device="cpu", figures=True)
    out = profile / "external" / "holdout"
    assert json.loads((out / "results.json").read_text()) == res
    ds = res["dataset"]
    assert (ds["n_rows"], ds["n_readable"], ds["n_unreadable"]) == (7, 5, 2)
    unreadable = pd.read_csv(out / "unreadable.csv")
    assert sorted(Path(p).name for p in unreadable["path"]) == ["broken.png", "does_not_exist.png"]
    assert set(unreadable["row"]) == {6, 7}
    assert res["unit"] == "configuration" and len(res["runs"]) == 2
    assert res["qc"] == {"lung_model": False, "n_flagged": 0, "flagged": []}
    by_task = {r["task"]: r for r in res["runs"]}
    two = by_task["covid_vs_normal"]
    assert (two["run_id"], two["config_id"], two["fold"], two["n_models"]) == (TWO, TWO, None, 2)
    assert two["run_ids"] == [f"{TWO}__fold0", f"{TWO}__fold1"]
    assert two["n_evaluated"] == 4 and two["left_out_labels"] == {"pneumonia": 1}
    assert two["test"]["n"] == 4 and two["test"]["bootstrap"]["unit"] == "image"
    assert 0 <= two["test"]["accuracy"]["value"] <= 1 and "hard_rule" in two["test"]
    three = by_task["covid_normal_pneumonia"]
    assert three["n_evaluated"] == 5 and three["left_out_labels"] == {}
    for r in res["runs"]:
        for fig in ("confusion.png", "roc_pr.png", "reliability.png"):
            assert (out / r["run_id"] / fig).stat().st_size > 1000

    # the stored probabilities are the mean over the fold models of the study's preprocessing applied directly to
    # the file
    preds = pd.read_csv(out / TWO / "predictions.csv", keep_default_na=False)
    assert {"prob_covid", "prob_normal", "pred_hard", "n_models", "qc"} <= set(preds.columns)
    assert set(preds["n_models"]) == {2} and set(preds["qc"]) == {UNCHECKED}
    assert preds["image"].map(lambda p: Path(p).is_absolute()).all()
    imgs = [resize_short_side(load_xray(p), TARGET_SHORT_SIDE) for p in preds["image"]]
    folds = []
    for rid in two["run_ids"]:
        model, info = load_run_model(profile / "runs" / rid)
        folds.append(predict_images(model, imgs, info, device="cpu")[0])
    assert np.abs(folds[0] - folds[1]).max() > 1e-4
    np.testing.assert_allclose(preds[["prob_covid", "prob_normal"]].to_numpy(), np.mean(folds, axis=0), atol=1e-5)


def test_single_runs_and_the_lung_qc_of_noise(tmp_path, mirror_file, profile):
    """``single``: one block per fold model, each its own model's probabilities; a noise PNG among the films is
    evaluated but listed under ``qc`` (image-level rules: the profile has no lung model)."""
    from PIL import Image

    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 400), dtype=np.uint8)).save(noise)
    csv = tmp_path / "qc.csv"
    pd.DataFrame({"path": [str(mirror_file("mhh", "png/006f3a8a.png")), str(noise)], "label": ["covid", "normal"]}).to_csv(
        csv, index=False
    )
    kw = dict(profile_dir=profile, n_bootstrap=20, device="cpu", figures=False)
    E.evaluate_external(csv, out_dir=tmp_path / "ens", **kw)
    res = E.evaluate_external(csv, out_dir=tmp_path / "single", single=True, **kw)
    assert res["unit"] == "run" and len(res["runs"]) == 3 and all(r["n_models"] == 1 for r in res["runs"])
    assert res["qc"]["flagged"] == [{"row": 2, "path": str(noise), "qc": f"not_a_film;{UNCHECKED}"}]
    cols = ["prob_covid", "prob_normal"]
    fold_preds = [pd.read_csv(tmp_path / "single" / f"{TWO}__fold{i}" / "predictions.csv") for i in (0, 1)]
    assert all(r["run_id"] == f"{TWO}__fold{r['fold']}" for r in res["runs"] if r["config_id"] == TWO)
    mean = (fold_preds[0][cols].to_numpy() + fold_preds[1][cols].to_numpy()) / 2
    np.testing.assert_allclose(pd.read_csv(tmp_path / "ens" / TWO / "predictions.csv")[cols].to_numpy(), mean, atol=1e-6)


def test_unknown_label_names_the_row(tmp_path, profile):
    csv = tmp_path / "bad.csv"
    csv.write_text("path,label\na.png,covid\nb.png,Normal\n")
    with pytest.raises(ValueError, match=r"row 2 \(line 3\) has unknown label 'Normal'"):
        E.evaluate_external(csv, profile_dir=profile)
    from cxrstudy import config

    assert E.main(["--csv", str(csv), "--profile", "no-such-profile"]) == 2
    assert not config.profile_dir("no-such-profile").exists()  # a failed call leaves no folder behind
    missing_col = tmp_path / "nolabel.csv"
    missing_col.write_text("file,label\na.png,covid\n")
    with pytest.raises(ValueError, match="missing column"):
        E.read_labels_csv(missing_col)


def test_cli_and_missing_profile(tmp_path, mirror_file, profile, capsys, monkeypatch):
    from cxrstudy import config

    csv = _write_csv(tmp_path, mirror_file)
    with pytest.raises(FileNotFoundError, match="no saved runs"):
        E.evaluate_external(csv, profile_dir=tmp_path / "empty_profile")
    monkeypatch.setattr(config, "REPORTS_DIR", profile.parent)
    out = tmp_path / "cli"
    rc = E.main(
        [
            "--csv",
            str(csv),
            "--profile",
            profile.name,
            "--out",
            str(out),
            "--n-bootstrap",
            "20",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "5 of 7 images readable" in printed and "left out {'pneumonia': 1}" in printed
    assert f"{TWO} (2 models): accuracy" in printed and "only the image-level checks ran" in printed
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 2
    assert E.main(["--csv", str(csv), "--profile", profile.name, "--out", str(tmp_path / "single"), "--n-bootstrap",
                   "20", "--device", "cpu", "--single-runs"]) == 0
    assert len(json.loads((tmp_path / "single" / "results.json").read_text())["runs"]) == 3


def test_overlap_with_the_study_is_reported_and_can_be_dropped(tmp_path, mirror_file, profile, capsys, monkeypatch):
    """Five original upstream files that the study holds are all reported as overlaps, then left out on request."""
    from cxrstudy import config
    from cxrstudy.fileio import sha256_file

    files = [
        ("nih", f"{NIH}/No_findings/00001299_000.png", "normal"),
        ("nih", f"{NIH}/Pneumonia/00000061_012.png", "pneumonia"),
        ("mhh", "png/006f3a8a.png", "covid"),
        ("mhh", "png/00870a9c.png", "covid"),
        ("nih", f"{NIH}/No_findings/00001280_004.png", "normal"),
    ]
    processed = tmp_path / "processed"
    processed.mkdir()
    manifest = pd.DataFrame(
        [dict.fromkeys(MANIFEST_COLUMNS, "") | {"image": f"images/{s}/{Path(p).name}", "label": lab, "source_name": s,
         "upstream_path": p, "sha256": sha256_file(mirror_file(s, p))} for s, p, lab in files]
    )
    manifest.to_csv(processed / "manifest.csv", index=False)
    csv = tmp_path / "five.csv"
    pd.DataFrame({"path": [str(mirror_file(s, p)) for s, p, _ in files], "label": [x[2] for x in files]}).to_csv(
        csv, index=False
    )
    res = E.evaluate_external(csv, profile_dir=profile, out_dir=tmp_path / "o1", n_bootstrap=20, device="cpu",
                              figures=False, processed_dir=processed)
    assert res["overlap"]["exact"] == 5 and len(res["overlap"]["images"]) == 5
    assert {i["kind"] for i in res["overlap"]["images"]} == {"exact"}
    assert res["dataset"]["n_readable"] == 5
    dropped = E.evaluate_external(csv, profile_dir=profile, out_dir=tmp_path / "o2", n_bootstrap=20, device="cpu",
                                  figures=False, processed_dir=processed, drop_overlap=True)
    assert dropped["overlap"]["dropped"] and dropped["dataset"]["n_rows"] == 0
    assert all(r["n_evaluated"] == 0 for r in dropped["runs"])

    monkeypatch.setattr(config, "REPORTS_DIR", profile.parent)
    monkeypatch.setattr(config, "PROCESSED_DIR", processed)
    assert E.main(["--csv", str(csv), "--profile", profile.name, "--out", str(tmp_path / "o3"), "--n-bootstrap", "20",
                   "--device", "cpu"]) == 0
    assert "overlap with the study's images: 5 exact, 0 near copies" in capsys.readouterr().out
