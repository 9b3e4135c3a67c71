"""The study manifest (``data/processed/manifest.csv``): its columns and the one function that reads it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cxrstudy import config

#: Manifest columns in order (docs/ARCHITECTURE.md, data contract), followed by the adapters' extra columns.
MANIFEST_COLUMNS: tuple[str, ...] = (
    "image",
    "label",
    "source",
    "source_name",
    "upstream_path",
    "patient_id",
    "patient_id_is_image_level",
    "patient_group",
    "view",
    "license",
    "split",
    "sha256",
    "width",
    "height",
    "flags",
    "case_url",
)


class ManifestError(FileNotFoundError):
    """The manifest is missing or lacks columns of the data contract."""


def load_manifest(path: Path | str = config.MANIFEST_PATH) -> pd.DataFrame:
    """The manifest with empty cells kept as ``""`` (never NaN) and pandas' inferred dtypes otherwise.

    Raises ManifestError naming the file when it does not exist or lacks a contract column."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"no manifest at {path}: build the dataset first (notebook 00_data or `make data`)")
    manifest = pd.read_csv(path, keep_default_na=False)
    if missing := [c for c in MANIFEST_COLUMNS if c not in manifest.columns]:
        raise ManifestError(
            f"{path} lacks the manifest column(s) {missing} (docs/ARCHITECTURE.md): rebuild it with `make data`"
        )
    return manifest
