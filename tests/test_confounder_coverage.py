"""Projection, age and sex in the manifest: the coverage table on a small manifest, and on the built manifest
the values, Actualmed's views and the coverage table docs/DATA.md states."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrstudy.data.build import MANIFEST_COLUMNS, confounder_coverage, coverage_markdown

DATA_MD = Path(__file__).resolve().parents[1] / "docs" / "DATA.md"


def test_confounder_coverage_counts_and_shares():
    m = pd.DataFrame({
        "source_name": ["nih"] * 4 + ["mhh"] * 2,
        "label": ["normal"] * 4 + ["covid"] * 2,
        "view": ["AP", "PA", "PA", "unknown", "AP", "AP"],
        "age": [20.0, 40.0, np.nan, 60.0, np.nan, np.nan],
        "sex": ["F", "M", "M", "", "F", ""],
    })  # fmt: skip
    c = confounder_coverage(m).set_index(["source_name", "label"])
    # registry order (mhh before nih), then the totals per label
    assert c.index.tolist() == [("mhh", "covid"), ("nih", "normal"), ("total", "covid"), ("total", "normal")]
    nih = c.loc[("nih", "normal")]
    assert (nih["films"], nih["AP"], nih["PA"]) == (4, 1, 2)
    assert nih["view_known"] == 0.75 and nih["age_known"] == 0.75 and nih["sex_known"] == 0.75
    assert (nih["age_median"], nih["age_q1"], nih["age_q3"]) == (40.0, 30.0, 50.0)
    assert nih["share_F"] == pytest.approx(1 / 3)
    mhh = c.loc[("mhh", "covid")]
    assert mhh["age_known"] == 0 and np.isnan(mhh["age_median"]) and mhh["share_F"] == 1.0
    assert c.loc[("total", "normal")].equals(nih)
    md = coverage_markdown(confounder_coverage(m)).splitlines()
    assert md[2] == "| mhh | covid | 2 | 100% (2 / 0) | 0% | – | 50% | 100% |"
    assert md[3] == "| nih | normal | 4 | 75% (1 / 2) | 75% | 40 (30–50) | 75% | 33% |"


@pytest.fixture(scope="module")
def manifest(study_manifest: Path) -> pd.DataFrame:
    return pd.read_csv(study_manifest, dtype={"age": float}, keep_default_na=False, na_values={"age": [""]})


def test_manifest_ages_and_sexes(manifest):
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    assert list(manifest.columns[8:11]) == ["view", "age", "sex"]
    assert manifest["age"].dropna().between(0, 120).all()
    assert set(manifest["sex"]) == {"M", "F", ""}
    by = manifest.groupby("source_name")
    assert by["age"].count()[["mhh", "actualmed"]].tolist() == [0, 0]
    assert (manifest.loc[manifest["source_name"] == "actualmed", "sex"] == "").all()
    # every NIH film with a view (a Data_Entry row) has an age and a sex, and only those
    nih = manifest[manifest["source_name"] == "nih"]
    assert ((nih["view"] != "unknown") == nih["age"].notna()).all()
    assert ((nih["view"] != "unknown") == (nih["sex"] != "")).all()
    # Actualmed's projection against its label (the within-hospital view confounder)
    am = manifest[manifest["source_name"] == "actualmed"]
    assert pd.crosstab(am["label"], am["view"]).to_dict("index") == {
        "covid": {"AP": 21, "PA": 5},
        "normal": {"AP": 3, "PA": 11},
    }


def test_data_md_states_the_built_manifests_coverage(manifest):
    table = coverage_markdown(confounder_coverage(manifest))
    assert table in DATA_MD.read_text(encoding="utf-8"), (
        "docs/DATA.md's coverage table is stale; paste:\n" + table
    )
