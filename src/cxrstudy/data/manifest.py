"""The study manifest (``data/processed/manifest.csv``): its columns and the one function that reads it."""

from __future__ import annotations

import hashlib
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
    "age",
    "sex",
    "license",
    "split",
    "fold",
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


#: Columns that identify a manifest row's film for cache keys (width/height too when present).
_KEY_COLUMNS = ("image", "sha256")
_OPTIONAL_KEY_COLUMNS = ("width", "height")


def manifest_key(manifest: pd.DataFrame) -> str:
    """SHA-256 of the rows' identifying columns (image, sha256, and width/height when present)."""
    missing = [c for c in _KEY_COLUMNS if c not in manifest.columns]
    if missing:
        raise ValueError(f"manifest lacks column(s) {missing} needed to key the feature cache")
    cols = [*_KEY_COLUMNS, *(c for c in _OPTIONAL_KEY_COLUMNS if c in manifest.columns)]
    payload = manifest[cols].astype(str).to_csv(index=False)
    return hashlib.sha256(payload.encode()).hexdigest()
