"""Shared pytest fixtures (others may append fixtures below, in their own clearly named section)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

#: The offline mirror of the upstream repositories (read-only; never copied into the repository).
MIRROR_ROOT = Path(__file__).resolve().parents[2] / "shared" / "cxr-mirror"


# ---------------------------------------------------------------------------------------------------------
# data build (images, sources, download, build)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mirror_root() -> Path:
    """Root of the offline data mirror; skips the test when this machine has none."""
    if not (MIRROR_ROOT / "MIRROR.md").is_file():
        pytest.skip(f"offline data mirror not found at {MIRROR_ROOT} (expected <repo>/../shared/cxr-mirror)")
    return MIRROR_ROOT


@pytest.fixture(scope="session")
def mirror_file(mirror_root: Path):
    """Function ``(source_name, path) -> Path`` of a file in the mirror, by short source name."""
    from cxrstudy.data.sources import SOURCES

    def _get(source_name: str, path: str) -> Path:
        src = SOURCES[source_name]
        p = mirror_root / src.repo / src.commit / path
        if not p.is_file():
            pytest.skip(f"mirror file {p} is missing")
        return p

    return _get


@pytest.fixture(scope="session")
def study_manifest(mirror_root: Path) -> Path:
    """``data/processed/manifest.csv``, built once from the mirror when absent (a fresh clone: ~30-60 s),
    so the tests on the real manifest run in CI instead of skipping."""
    from cxrstudy import config

    if not config.MANIFEST_PATH.is_file():
        from cxrstudy.data.build import build_dataset

        build_dataset(base=str(mirror_root), progress=False)
    return config.MANIFEST_PATH


# ---------------------------------------------------------------------------------------------------------
# saved runs (external evaluation, predict)
# ---------------------------------------------------------------------------------------------------------


def _save_untrained_run(
    profile_dir: Path, task: str, classes: list[str], subclasses: list[str], seed: int, fold: int = 0, folds: int = 1
) -> str:
    """A real (untrained, random-head) saved run in the contract's layout at 32 px; fold ``fold`` of ``folds``
    (its weights drawn with the run's training seed, so fold models differ)."""
    from cxrstudy.models import Classifier
    from cxrstudy.runspec import RunSpec

    decomposition = subclasses != classes
    spec = RunSpec(task, "efficientnet_lite0", "shallow", decomposition, seed, fold=fold)
    run_id = spec.run_id
    run_dir = profile_dir / "runs" / run_id
    run_dir.mkdir(parents=True)
    torch.manual_seed(spec.train_seed)
    model = Classifier("efficientnet_lite0", len(subclasses), pretrained=False)
    torch.save(model.state_dict(), run_dir / "model.pth")
    parent = {s: next(c for c in classes if s == c or s.startswith(c + "_")) for s in subclasses}
    info = {
        "run_id": run_id,
        "task": task,
        "backbone": "efficientnet_lite0",
        "scenario": "shallow",
        "decomposition": decomposition,
        "seed": seed,
        "fold": fold,
        "folds": folds,
        "config_id": spec.config_id,
        "classes": classes,
        "subclasses": subclasses,
        "parent_of": parent,
        "parent_of_subclass": parent,
        "image_size": 32,
        "train_seconds": 1.5,
        "params": {"dropout": 0.2},
    }
    (run_dir / "run.json").write_text(json.dumps(info))
    pd.DataFrame(columns=["image", "split", "label", "source", "patient_group"]).to_csv(
        run_dir / "predictions.csv", index=False
    )
    return run_id


@pytest.fixture(scope="session")
def save_untrained_run():
    """Function ``(profile_dir, task, classes, subclasses, seed, fold=0, folds=1) -> run_id`` writing a real
    untrained run."""
    return _save_untrained_run
