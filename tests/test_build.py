"""The full data build from the offline mirror, once per session: first a CLI run killed half-way, then a
resumed build in-process, then a warm re-run. Checks counts against MIRROR.md, files, splits and caching."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from cxrstudy import config
from cxrstudy.data.build import BuildResult, build_dataset, default_base, main
from cxrstudy.data.download import LockFile
from cxrstudy.data.sources import SOURCES, holdout_sources
from cxrstudy.fileio import current_umask, sha256_file

# MIRROR.md, "Expected counts on this mirror": images / distinct patient groups (thumbnail-only de-duplication).
EXPECTED = {
    ("ieee8023", "covid"): (304, 190),
    ("ieee8023", "pneumonia"): (63, 32),
    ("mhh", "covid"): (194, 65),
    ("figure1", "covid"): (31, 27),
    ("figure1", "normal"): (3, 3),
    ("figure1", "pneumonia"): (2, 2),
    ("actualmed", "covid"): (26, 21),
    ("actualmed", "normal"): (14, 14),
    ("cxnet", "covid"): (565, 418),
    ("nih", "normal"): (443, 294),
    ("nih", "pneumonia"): (447, 330),
}
CXNET_RANGE = (405, 565)  # stronger de-duplication ~405, thumbnail-only 565


class Built:
    """Results of the session's builds."""

    def __init__(
        self, root: Path, killed_at: dict, resumed: BuildResult, warm: BuildResult, warm_s: float, files: dict
    ):
        self.root, self.killed_at, self.resumed, self.warm, self.warm_s, self.files = (
            root,
            killed_at,
            resumed,
            warm,
            warm_s,
            files,
        )


def _dirs(root: Path) -> dict[str, Path]:
    return {"out_dir": root / "processed", "raw_dir": root / "raw", "cache_dir": root / "cache" / "dedup"}


def _read_outputs(out_dir: Path) -> dict[str, bytes]:
    return {n: (out_dir / n).read_bytes() for n in ("manifest.csv", "excluded.csv", "duplicates.csv")}


@pytest.fixture(scope="session")
def built(mirror_root: Path, tmp_path_factory) -> Built:
    root = tmp_path_factory.mktemp("build")
    d = _dirs(root)
    # 1) `python -m cxrstudy.data.build` killed (SIGKILL) in the middle of the image downloads
    cmd = [sys.executable, "-m", "cxrstudy.data.build", "--mirror", str(mirror_root), "--no-progress",
           "--out-dir", str(d["out_dir"]), "--raw-dir", str(d["raw_dir"]), "--workers", "4"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = d["raw_dir"] / "lock.journal"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.stat().st_size > 300 * 100:  # a few hundred files recorded
            break
        time.sleep(0.02)
    assert proc.poll() is None, (
        f"the build ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    )
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    metadata = {f"{f.repo}/{f.commit}/{f.path}" for s in SOURCES.values() for f in s.metadata_files()}
    lock = LockFile(d["raw_dir"] / "lock.json")
    killed_at = {"images_recorded": len(set(lock.entries) - metadata)}
    # 2) resume in-process
    resumed = build_dataset(str(mirror_root), workers=8, progress=False, **d)
    files = _read_outputs(d["out_dir"])
    # 3) warm re-run
    t = time.perf_counter()
    warm = build_dataset(str(mirror_root), workers=8, progress=False, **d)
    return Built(root, killed_at, resumed, warm, time.perf_counter() - t, files)


def test_resume_after_kill_fetches_only_what_was_missing(built: Built):
    status = built.resumed.info["counts"]["fetch_status"]
    assert built.killed_at["images_recorded"] > 100
    assert status.get("cached", 0) == built.killed_at["images_recorded"]  # nothing finished was fetched again
    raw = built.root / "raw"
    assert not [p for p in raw.rglob("*") if p.name.endswith((".part", ".tmp"))]
    lock = json.loads((raw / "lock.json").read_text())["files"]
    for rel in list(lock)[::25]:  # every recorded file verifies
        assert sha256_file(raw / rel) == lock[rel]["sha256"]


def test_counts_match_mirror_table(built: Built):
    m = built.resumed.manifest
    got = m.groupby(["source_name", "label"]).agg(
        images=("image", "size"), patients=("patient_group", "nunique")
    )
    assert set(got.index) == set(EXPECTED)
    for key, (images, patients) in EXPECTED.items():
        n, p = got.loc[key]
        if key == ("cxnet", "covid"):
            assert CXNET_RANGE[0] * 0.97 <= n <= CXNET_RANGE[1] * 1.03, n
            continue
        assert abs(n - images) <= max(1, 0.03 * images), (key, n, images)
        assert abs(p - patients) <= max(1, 0.05 * patients), (key, p, patients)
    assert set(m["view"]) <= {"PA", "AP", "unknown"}
    ex = built.resumed.excluded
    assert set(ex.columns) >= {"source", "upstream_path", "reason"}
    absent = ex[ex["reason"].str.startswith("absent:")]
    assert len(absent) >= 300 and not absent.duplicated(["source", "upstream_path"]).any()
    assert {"lateral", "hannover copy", "label rule"} <= set(ex["reason"].str.split(":").str[0])


def test_manifest_images_exist_and_folds_are_patient_disjoint(built: Built):
    m = built.resumed.manifest
    out = built.root / "processed"
    for r in m.itertuples():
        with Image.open(out / r.image) as im:
            assert im.mode == "L" and im.size == (r.width, r.height) and min(im.size) <= 256
    assert not m["image"].duplicated().any() and not m[["source", "upstream_path"]].duplicated().any()
    assert set(m["split"]) == {"cv", "holdout"}
    assert set(m.loc[m["split"] == "holdout", "source_name"]) <= set(holdout_sources())
    assert (m.loc[m["split"] == "holdout", "fold"] == -1).all()
    assert set(m.loc[m["split"] == "cv", "fold"]) == set(range(config.CV_FOLDS))
    assert (m.groupby("patient_group")["fold"].nunique() == 1).all()
    assert m["sha256"].str.fullmatch(r"[0-9a-f]{64}").all()
    info = json.loads((out / "build_info.json").read_text())
    assert info["commits"]["cxnet"]["commit"] == SOURCES["cxnet"].commit
    assert pd.read_csv(out / "manifest.csv").shape[0] == len(m)


def test_warm_build_is_fast_and_changes_nothing(built: Built):
    assert built.warm_s < 30, f"warm build took {built.warm_s:.1f} s (target 15 s)"
    assert _read_outputs(built.root / "processed") == built.files
    c = built.warm.info["counts"]
    assert set(c["fetch_status"]) == {"cached", "absent"} and set(c["process_status"]) == {"cached"}


def test_every_file_the_build_writes_gets_the_umask_mode(built: Built):
    want = 0o666 & ~current_umask()
    files = [p for p in built.root.rglob("*") if p.is_file()]
    modes = {oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert len(files) > 1000 and modes == {oct(want)}, modes


def test_cli_bad_mirror_fails_at_once_naming_it(tmp_path, capsys):
    t = time.perf_counter()
    assert (
        main(
            [
                "--mirror",
                str(tmp_path / "no-such-mirror"),
                "--out-dir",
                str(tmp_path / "o"),
                "--raw-dir",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )
    assert "no-such-mirror" in capsys.readouterr().err
    assert (
        main(
            [
                "--mirror",
                "http://127.0.0.1:9",
                "--out-dir",
                str(tmp_path / "o"),
                "--raw-dir",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )
    assert "127.0.0.1:9" in capsys.readouterr().err
    assert time.perf_counter() - t < 15


def test_later_runs_reuse_the_recorded_base(built: Built, mirror_root: Path, monkeypatch):
    monkeypatch.delenv("CXR_MIRROR", raising=False)
    assert default_base(built.root / "processed") == str(mirror_root.resolve())
    monkeypatch.setenv("CXR_MIRROR", "http://example.invalid")
    assert default_base(built.root / "processed") == "http://example.invalid"
