"""`cxrstudy predict`: real mirror images of several formats, real saved fold runs (a configuration's ensemble and
single runs), the lung QC on noise and on a real film, bad files and bad names."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrstudy import cli, config
from cxrstudy.inference import UNCHECKED, choose_models, decode_study
from cxrstudy.runspec import RunSpec

NIH = "X-Ray Image DataSet"
#: The headline configuration of the ``reports`` fixture: two fold runs, each with its own decomposition.
HEAD = "covid_vs_normal__efficientnet_lite0__shallow__decomp__seed0"
FOLDS = [f"{HEAD}__fold0", f"{HEAD}__fold1"]
OTHER = "covid_normal_pneumonia__efficientnet_lite0__shallow__nodecomp__seed1"
#: A trained lung model for the QC test (default: this checkout's default profile, when it has run; the smoke
#: profile's model is too weak: it passes no film).
LUNG_MODEL = Path(os.environ.get("CXR_TEST_LUNG_MODEL") or config.REPORTS_DIR / "default" / "lungs")


@pytest.fixture(scope="module")
def reports(tmp_path_factory, save_untrained_run) -> Path:
    """A reports folder with one profile: a two-fold configuration (the headline of its results.json, whose fold
    models found different subclasses) and a one-fold configuration of another task."""
    root = tmp_path_factory.mktemp("reports")
    pdir = root / "prof"
    two = ["covid", "normal"]
    assert save_untrained_run(pdir, "covid_vs_normal", two, ["covid_1", "covid_2", "normal_1", "normal_2"], 0, 0, 2) == FOLDS[0]
    assert save_untrained_run(pdir, "covid_vs_normal", two, ["covid_1", "covid_2", "covid_3", "normal_1"], 0, 1, 2) == FOLDS[1]
    three = ["covid", "normal", "pneumonia"]
    assert save_untrained_run(pdir, "covid_normal_pneumonia", three, three, 1) == f"{OTHER}__fold0"
    (pdir / "results.json").write_text(json.dumps({"headline": {"run_id": HEAD}}))
    return root


@pytest.fixture()
def noise(tmp_path) -> Path:
    """A 400x400 PNG of uniform random noise: readable, but no chest film."""
    path = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 400), dtype=np.uint8)).save(path)
    return path


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
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert list(table.columns) == ["image", "run_id", "n_models", "pred", "prob_covid", "prob_normal", "qc"]
    assert len(table) == 4 and set(table["run_id"]) == {HEAD} and set(table["n_models"]) == {2}
    assert set(table["qc"]) == {UNCHECKED}  # real films, no lung model in this profile
    np.testing.assert_allclose(table[["prob_covid", "prob_normal"]].sum(axis=1), 1.0, atol=1e-5)
    assert (table["pred"] == np.where(table["prob_covid"] >= table["prob_normal"], "covid", "normal")).all()
    pngs = sorted(p.name for p in out.glob("*_gradcam.png"))
    assert len(pngs) == 4 and all((out / p).stat().st_size > 5000 for p in pngs)
    bad = pd.read_csv(out / "unreadable.csv")
    assert sorted(Path(p).name for p in bad["image"]) == ["missing.png", "truncated.png"]
    captured = capsys.readouterr()
    err = captured.err
    assert "truncated.png" in err and "missing.png" in err
    assert "has no lung model: only the image-level checks ran" in err and "not a film" not in err
    assert f"configuration {HEAD} (2 fold models): 4 prediction(s)" in captured.out

    # the 16-bit TIFF and the RGBA copy are the same film as the PNG: same prediction, near-equal scores
    by_name = table.set_index(table["image"].map(lambda p: Path(p).name))
    ref = by_name.loc["00001299_000.png", "prob_covid"]
    assert abs(by_name.loc["rgba.png", "prob_covid"] - ref) < 1e-6
    assert abs(by_name.loc["sixteen.tif", "prob_covid"] - ref) < 0.02


def test_the_ensemble_is_the_mean_of_its_fold_models(tmp_path, reports, images, monkeypatch):
    """``--run <run id>`` gives that fold model's own probabilities (as computed directly from the file), ``--run
    <config id>`` and the default give the mean of the fold models' probabilities."""
    from cxrstudy.training import load_run_model, predict_images

    monkeypatch.setattr(config, "REPORTS_DIR", reports)
    films = [str(p) for p in images[:3]]
    args = ["--profile", "prof", "--no-cam", "--device", "cpu"]

    def run(name: str, *extra: str) -> pd.DataFrame:
        assert cli.main(["predict", *films, *args, "--out", str(tmp_path / name), *extra]) == 0
        return pd.read_csv(tmp_path / name / "predictions.csv", keep_default_na=False)

    cols = ["prob_covid", "prob_normal"]
    single = [run(f"fold{i}", "--run", rid) for i, rid in enumerate(FOLDS)]
    for rid, table in zip(FOLDS, single, strict=True):
        assert set(table["run_id"]) == {rid} and set(table["n_models"]) == {1}
        model, info = load_run_model(reports / "prof" / "runs" / rid)
        direct, _ = predict_images(model, [decode_study(f) for f in films], info, device="cpu")
        np.testing.assert_allclose(table[cols].to_numpy(), direct, atol=1e-5)
    assert np.abs(single[0][cols].to_numpy() - single[1][cols].to_numpy()).max() > 1e-4  # two different models
    mean = (single[0][cols].to_numpy() + single[1][cols].to_numpy()) / 2
    for table in (run("default"), run("config", "--run", HEAD)):
        assert set(table["run_id"]) == {HEAD} and set(table["n_models"]) == {2}
        np.testing.assert_allclose(table[cols].to_numpy(), mean, atol=1e-6)
        assert (table["pred"] == np.where(mean[:, 0] >= mean[:, 1], "covid", "normal")).all()


def test_the_headline_may_name_a_configuration_or_one_of_its_fold_runs(tmp_path, reports):
    pdir = tmp_path / "prof"
    shutil.copytree(reports / "prof" / "runs", pdir / "runs")
    for head in ({"config_id": HEAD}, {"run_id": FOLDS[1]}, {"config_id": HEAD, "run_id": "ignored"}):
        (pdir / "results.json").write_text(json.dumps({"headline": head}))
        chosen = choose_models("prof", reports_dir=tmp_path)
        assert (chosen.id, chosen.run_ids, chosen.n_models) == (HEAD, FOLDS, 2)
    (pdir / "results.json").write_text(json.dumps({"headline": {"config_id": "gone__seed9"}}))
    with pytest.raises(FileNotFoundError, match=r"the headline 'gone__seed9' of results.json has no saved runs"):
        choose_models("prof", reports_dir=tmp_path)
    (pdir / "results.json").unlink()
    with pytest.raises(FileNotFoundError, match=rf"no results.json naming a headline; pick one with --run: .*{HEAD}"):
        choose_models("prof", reports_dir=tmp_path)


def test_noise_is_flagged_and_warned_about_without_a_lung_model(tmp_path, reports, images, noise, monkeypatch, capsys):
    """The image-level QC rules run without a lung model: a noise PNG gets ``not_a_film`` and a warning line
    naming it; the real film gets only the note that no lung model checked it."""
    monkeypatch.setattr(config, "REPORTS_DIR", reports)
    out = tmp_path / "qc"
    assert cli.main(["predict", str(images[0]), str(noise), "--profile", "prof", "--out", str(out), "--device", "cpu"]) == 0
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False).set_index("image")
    assert table.loc[str(noise), "qc"] == f"not_a_film;{UNCHECKED}"
    assert table.loc[str(images[0]), "qc"] == UNCHECKED
    err = capsys.readouterr().err
    assert f"warning: {noise} is not a film the models can judge (lung QC: not_a_film;{UNCHECKED})" in err
    assert str(images[0]) not in err
    assert len(list(out.glob("*_gradcam.png"))) == 2


def test_with_a_trained_lung_model_a_real_film_passes_and_noise_fails(tmp_path, images, noise, save_untrained_run,
                                                                     monkeypatch, capsys):
    """The profile's trained lung model checks every film: the real NIH film passes (empty qc), the noise fails
    with the segmentation's flags too. Needs a trained lung model (``CXR_TEST_LUNG_MODEL``, default
    ``reports/default/lungs`` of this checkout); training one takes minutes, too slow for a unit test."""
    if not (LUNG_MODEL / "model.json").is_file():
        pytest.skip(f"no trained lung model at {LUNG_MODEL} (run `make reproduce` or set CXR_TEST_LUNG_MODEL)")
    pdir = tmp_path / "reports" / "checked"
    save_untrained_run(pdir, "covid_vs_normal", ["covid", "normal"], ["covid", "normal"], 0)
    (pdir / "lungs").mkdir()
    for name in ("model.json", "model.pth"):
        shutil.copy(LUNG_MODEL / name, pdir / "lungs" / name)
    monkeypatch.setattr(config, "REPORTS_DIR", tmp_path / "reports")
    out = tmp_path / "out"
    rid = RunSpec("covid_vs_normal", "efficientnet_lite0", "shallow", False, 0).run_id
    assert cli.main(["predict", str(images[0]), str(noise), "--profile", "checked", "--run", rid, "--out", str(out),
                     "--no-cam", "--device", "cpu"]) == 0
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False).set_index("image")
    assert table.loc[str(images[0]), "qc"] == ""
    flags = table.loc[str(noise), "qc"].split(";")
    assert flags[0] == "not_a_film" and "fallback" in flags and UNCHECKED not in flags
    err = capsys.readouterr().err
    assert f"warning: {noise} is not a film" in err and str(images[0]) not in err and "no lung model" not in err


def test_another_run_and_only_unreadable_files(tmp_path, reports, images, monkeypatch):
    monkeypatch.setattr(config, "REPORTS_DIR", reports)
    out = tmp_path / "three"
    assert cli.main(["predict", str(images[0]), "--profile", "prof", "--run", OTHER, "--out", str(out),
                     "--no-cam", "--device", "cpu"]) == 0
    table = pd.read_csv(out / "predictions.csv")
    assert list(table.columns)[-4:] == ["prob_covid", "prob_normal", "prob_pneumonia", "qc"]
    assert set(table["run_id"]) == {OTHER} and set(table["n_models"]) == {1}  # a one-fold configuration
    assert not list(out.glob("*.png"))
    assert cli.main(["predict", str(images[4]), str(images[5]), "--profile", "prof", "--out", str(tmp_path / "x")]) == 1


def test_missing_profile_or_run_names_what_exists(reports, monkeypatch, capsys):
    monkeypatch.setattr(config, "REPORTS_DIR", reports)
    with pytest.raises(FileNotFoundError, match=r"profile 'nope' has no saved runs .*profiles with runs: prof"):
        choose_models("nope")
    with pytest.raises(FileNotFoundError, match=rf"no run or configuration 'bogus'; its configurations: .*{HEAD}.*"
                                                rf"its runs: .*{FOLDS[1]}"):
        choose_models("prof", "bogus")
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
    model, applies the same view, and draws the lung outline; without a lung model it says what is missing. The
    untrained lung model finds no lungs in the real film: its QC flags say so."""
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
        choose_models("lungprof", run_id) and decode_for_models([images[0]], {input_key(info)}, pdir / "lungs")
    torch.manual_seed(0)
    lungs = pdir / "lungs"
    lungs.mkdir()
    torch.save(LungUNet(pretrained=False).state_dict(), lungs / "model.pth")
    (lungs / "model.json").write_text(json.dumps({"image_size": 64, "decoder": list(DEFAULT_DECODER), "threshold": 0.5}))
    dec = decode_for_models(images[:2], {input_key(info)}, lungs)
    assert dec.ok == [0, 1] and all(m.dtype == bool and min(m.shape) == 256 for m in dec.masks)
    assert dec.lungs_checked and all(q.endswith("fallback") and UNCHECKED not in q for q in dec.qc)
    out = tmp_path / "out"
    assert cli.main(["predict", str(images[0]), "--profile", "lungprof", "--run", run_id, "--out", str(out),
                     "--device", "cpu"]) == 0
    assert len(pd.read_csv(out / "predictions.csv")) == 1 and len(list(out.glob("*_gradcam.png"))) == 1
    assert pd.read_csv(out / "predictions.csv")["qc"].iloc[0] == dec.qc[0]
