"""`cxrstudy predict`: real mirror images of several formats, a real saved run, bad files and bad names."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrstudy import cli, config
from cxrstudy.inference import choose_run

NIH = "X-Ray Image DataSet"


@pytest.fixture(scope="module")
def reports(tmp_path_factory, save_untrained_run) -> Path:
    """A reports folder with one profile, two saved runs and a results.json naming the headline run."""
    root = tmp_path_factory.mktemp("reports")
    pdir = root / "prof"
    head = save_untrained_run(pdir, "covid_vs_normal", ["covid", "normal"], ["covid_1", "covid_2", "normal_1", "normal_2"], 0)
    save_untrained_run(pdir, "covid_normal_pneumonia", ["covid", "normal", "pneumonia"], ["covid", "normal", "pneumonia"], 1)
    (pdir / "results.json").write_text(json.dumps({"headline": {"run_id": head}}))
    return root


@pytest.fixture()
def images(tmp_path, mirror_file) -> list[Path]:
    """A PNG and a JPEG from the mirror, a 16-bit TIFF, an RGBA PNG, a truncated file and a missing one."""
    png = mirror_file("nih", f"{NIH}/No_findings/00001299_000.png")
    jpg = tmp_path / "mhh_copy.jpg"
    Image.open(mirror_file("mhh", "png/006f3a8a.png")).convert("L").save(jpg, quality=90)
    tif = tmp_path / "sixteen.tif"
    arr = (np.asarray(Image.open(png).convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(arr).save(tif)
    rgba = tmp_path / "rgba.png"
    Image.open(png).convert("RGBA").save(rgba)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png.read_bytes()[:400])
    return [png, jpg, tif, rgba, truncated, tmp_path / "missing.png"]


def test_predict_writes_table_and_overlays(tmp_path, reports, images, monkeypatch, capsys):
    monkeypatch.setattr(config, "REPORTS_DIR", reports)
    out = tmp_path / "out"
    rc = cli.main(["predict", *map(str, images), "--profile", "prof", "--out", str(out)])  # device: auto
    assert rc == 0
    table = pd.read_csv(out / "predictions.csv")
    assert list(table.columns) == ["image", "run_id", "pred", "prob_covid", "prob_normal"]
    assert len(table) == 4 and set(table["run_id"]) == {"covid_vs_normal__efficientnet_lite0__shallow__decomp__seed0"}
    np.testing.assert_allclose(table[["prob_covid", "prob_normal"]].sum(axis=1), 1.0, atol=1e-5)
    assert (table["pred"] == np.where(table["prob_covid"] >= table["prob_normal"], "covid", "normal")).all()
    pngs = sorted(p.name for p in out.glob("*_gradcam.png"))
    assert len(pngs) == 4 and all((out / p).stat().st_size > 5000 for p in pngs)
    bad = pd.read_csv(out / "unreadable.csv")
    assert sorted(Path(p).name for p in bad["image"]) == ["missing.png", "truncated.png"]
    err = capsys.readouterr().err
    assert "truncated.png" in err and "missing.png" in err

    # the 16-bit TIFF and the RGBA copy are the same film as the PNG: same prediction, near-equal scores
    by_name = table.set_index(table["image"].map(lambda p: Path(p).name))
    ref = by_name.loc["00001299_000.png", "prob_covid"]
    assert abs(by_name.loc["rgba.png", "prob_covid"] - ref) < 1e-6
    assert abs(by_name.loc["sixteen.tif", "prob_covid"] - ref) < 0.02


def test_another_run_and_only_unreadable_files(tmp_path, reports, images, monkeypatch):
    monkeypatch.setattr(config, "REPORTS_DIR", reports)
    out = tmp_path / "three"
    run = "covid_normal_pneumonia__efficientnet_lite0__shallow__nodecomp__seed1"
    assert cli.main(["predict", str(images[0]), "--profile", "prof", "--run", run, "--out", str(out),
                     "--no-cam", "--device", "cpu"]) == 0
    table = pd.read_csv(out / "predictions.csv")
    assert list(table.columns)[-3:] == ["prob_covid", "prob_normal", "prob_pneumonia"]
    assert not list(out.glob("*.png"))
    assert cli.main(["predict", str(images[4]), str(images[5]), "--profile", "prof", "--out", str(tmp_path / "x")]) == 1


def test_missing_profile_or_run_names_what_exists(reports, monkeypatch, capsys):
    monkeypatch.setattr(config, "REPORTS_DIR", reports)
    with pytest.raises(FileNotFoundError, match=r"profile 'nope' has no saved runs .*profiles with runs: prof"):
        choose_run("nope")
    with pytest.raises(FileNotFoundError, match=r"no run 'bogus'; its runs: covid_normal_pneumonia__"):
        choose_run("prof", "bogus")
    assert cli.main(["predict", "x.png", "--profile", "nope"]) == 2
    assert "profiles with runs: prof" in capsys.readouterr().err


def test_console_script_is_installed(tmp_path):
    script = Path(sys.executable).with_name("cxrstudy")
    if not script.is_file():
        pytest.skip("the package is not installed with its console script (make setup installs it)")
    done = subprocess.run([str(script), "predict", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--profile" in done.stdout
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_lung_view_run_segments_new_films_with_the_profiles_lung_model(tmp_path, images, save_untrained_run, monkeypatch):
    """A run trained on lung-masked, equalised films: predict segments each new film with the saved lung
    model, applies the same view, and draws the lung outline; without a lung model it says what is missing."""
    import torch

    from cxrstudy.inference import decode_for_models, input_key
    from cxrstudy.lungs.model import DEFAULT_DECODER, LungUNet

    pdir = tmp_path / "reports" / "lungprof"
    run_id = save_untrained_run(pdir, "covid_vs_normal", ["covid", "normal"], ["covid", "normal"], 0)
    info_path = pdir / "runs" / run_id / "run.json"
    info = json.loads(info_path.read_text()) | {"input_view": "lung_mask", "equalize": True, "view_margin": 0.05}
    info_path.write_text(json.dumps(info))
    monkeypatch.setattr(config, "REPORTS_DIR", tmp_path / "reports")
    with pytest.raises(FileNotFoundError, match="no saved lung model"):
        choose_run("lungprof", run_id) and decode_for_models([images[0]], {input_key(info)}, pdir / "lungs")
    torch.manual_seed(0)
    lungs = pdir / "lungs"
    lungs.mkdir()
    torch.save(LungUNet(pretrained=False).state_dict(), lungs / "model.pth")
    (lungs / "model.json").write_text(json.dumps({"image_size": 64, "decoder": list(DEFAULT_DECODER), "threshold": 0.5}))
    dec = decode_for_models(images[:2], {input_key(info)}, lungs)
    assert dec.ok == [0, 1] and all(m.dtype == bool and min(m.shape) == 256 for m in dec.masks)
    out = tmp_path / "out"
    assert cli.main(["predict", str(images[0]), "--profile", "lungprof", "--run", run_id, "--out", str(out),
                     "--device", "cpu"]) == 0
    assert len(pd.read_csv(out / "predictions.csv")) == 1 and len(list(out.glob("*_gradcam.png"))) == 1
