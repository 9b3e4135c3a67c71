"""The one manifest loader: empty cells stay empty strings, a missing file or column is a clear error."""

from __future__ import annotations

import pandas as pd
import pytest

from cxrstudy.data.manifest import MANIFEST_COLUMNS, ManifestError, load_manifest


def test_the_real_manifest_keeps_empty_cells_as_empty_strings(study_manifest):
    manifest = load_manifest()
    assert list(manifest.columns[: len(MANIFEST_COLUMNS)]) == list(MANIFEST_COLUMNS)
    for column in ("flags", "case_url"):
        assert (manifest[column] == "").any(), f"no empty {column} on the real manifest"
        assert manifest[column].map(type).eq(str).all()
    assert not manifest.isna().any().any()
    assert pd.read_csv(study_manifest)["case_url"].isna().any()  # what a plain read_csv would have made of them


def test_a_missing_manifest_or_column_is_named(tmp_path):
    path = tmp_path / "manifest.csv"
    with pytest.raises(ManifestError, match=rf"no manifest at {path}"):
        load_manifest(path)
    pd.DataFrame([dict.fromkeys(MANIFEST_COLUMNS, "x")]).drop(columns=["split", "flags"]).to_csv(path, index=False)
    with pytest.raises(ManifestError, match=rf"{path} lacks the manifest column\(s\) \['split', 'flags'\]"):
        load_manifest(path)
