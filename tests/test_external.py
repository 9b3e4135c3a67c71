"""`make evaluate`: every saved run of a profile on a CSV of real mirror images, through the study's preprocessing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrstudy.data.manifest import MANIFEST_COLUMNS
from cxrstudy.evaluation import external as E

NIH = "X-Ray Image DataSet"


@pytest.fixture(scope="module")
def profile(tmp_path_factory, save_untrained_run) -> Path:
    pdir = tmp_path_factory.mktemp("reports") / "testprofile"
    save_untrained_run(pdir, "covid_vs_normal", ["covid", "normal"], ["covid_1", "covid_2", "normal_1", "normal_2"], 0)
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
    by_task = {r["task"]: r for r in res["runs"]}
    two = by_task["covid_vs_normal"]
    assert two["n_evaluated"] == 4 and two["left_out_labels"] == {"pneumonia": 1}
    assert two["test"]["n"] == 4 and two["test"]["bootstrap"]["unit"] == "image"
    assert 0 <= two["test"]["accuracy"]["value"] <= 1 and "hard_rule" in two["test"]
    three = by_task["covid_normal_pneumonia"]
    assert three["n_evaluated"] == 5 and three["left_out_labels"] == {}
    for r in res["runs"]:
        for fig in ("confusion.png", "roc_pr.png", "reliability.png"):
            assert (out / r["run_id"] / fig).stat().st_size > 1000

    # the stored probabilities are those of the study's preprocessing applied directly to the file
    preds = pd.read_csv(out / two["run_id"] / "predictions.csv")
    assert {"prob_covid", "prob_normal", "prob_sub_covid_1", "pred_hard"} <= set(preds.columns)
    assert preds["image"].map(lambda p: Path(p).is_absolute()).all()
    model, info = load_run_model(profile / "runs" / two["run_id"])
    imgs = [resize_short_side(load_xray(p), TARGET_SHORT_SIDE) for p in preds["image"]]
    probs, _ = predict_images(model, imgs, info, device="cpu")
    np.testing.assert_allclose(preds[["prob_covid", "prob_normal"]].to_numpy(), probs, atol=1e-5)


def test_unknown_label_names_the_row(tmp_path, profile):
    csv = tmp_path / "bad.csv"
    csv.write_text("path,label\na.png,covid\nb.png,Normal\n")
    with pytest.raises(ValueError, match=r"row 2 \(line 3\) has unknown label 'Normal'"):
        E.evaluate_external(csv, profile_dir=profile)
    assert E.main(["--csv", str(csv), "--profile", "no-such-profile"]) == 2
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
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 2


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
