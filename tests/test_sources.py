"""Source adapters on the mirror's real metadata and folder listings (MIRROR.md's candidate table and rules)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from cxrstudy.data.sources import (
    CANDIDATE_COLUMNS,
    NIH_TABLE,
    SOURCES,
    Candidates,
    RepoFile,
    Source,
    SourceInputs,
    all_candidates,
    normalize_age,
    normalize_case_url,
    normalize_sex,
    read_csv_text,
)


def _inputs(mirror_root: Path) -> dict[str, SourceInputs]:
    out = {}
    for s in SOURCES.values():
        files = {(f.repo, f.path): mirror_root / f.repo / f.commit / f.path for f in s.metadata_files()}
        folder = mirror_root / s.repo / s.commit
        listings = {
            d: sorted(f"{d}/{p.name}" for p in (folder / d).iterdir() if p.is_file()) for d in s.folders
        }
        out[s.name] = SourceInputs(files, listings)
    return out


@pytest.fixture(scope="module")
def cands(mirror_root: Path) -> Candidates:
    return all_candidates(_inputs(mirror_root))


@pytest.fixture(scope="module")
def rows(cands: Candidates, mirror_root: Path) -> pd.DataFrame:
    r = cands.rows.copy()
    r["present"] = [
        (mirror_root / SOURCES[n].repo / SOURCES[n].commit / p).is_file()
        for n, p in zip(r["source_name"], r["upstream_path"], strict=True)
    ]
    return r


def test_candidate_counts_match_mirror_table(rows, cands):
    # MIRROR.md, "Candidate images per the rules below": listed and present, for metadata-driven sources;
    # ieee8023 listed counts include the Hannover rows the adapter skips (84 covid, 8 normal).
    got = rows.groupby(["source_name", "label"]).agg(listed=("present", "size"), present=("present", "sum"))
    expected = {
        ("ieee8023", "covid"): (434 - 84, 382 - 73),
        ("ieee8023", "pneumonia"): (78, 63),
        ("mhh", "covid"): (243, 194),
        ("figure1", "covid"): (33, 33),  # + 2 absent, reported by the adapter (no file to match the stem)
        ("figure1", "normal"): (3, 3),
        ("figure1", "pneumonia"): (2, 2),
        ("actualmed", "covid"): (58, 26),
        ("actualmed", "normal"): (127, 14),
        ("cxnet", "covid"): (785, 785),  # folder-labelled: listing holds the present files
        ("nih", "normal"): (444, 444),
        ("nih", "pneumonia"): (447, 447),
    }
    for key, (listed, present) in expected.items():
        assert tuple(got.loc[key]) == (listed, present), key
    assert set(rows.columns) >= set(CANDIDATE_COLUMNS)
    assert all(p.startswith(n + ":") for n, p in zip(rows["source_name"], rows["patient_id"], strict=True))
    assert set(rows["view"]) <= {"PA", "AP", "unknown"}
    ex = cands.excluded
    absent = ex[ex["reason"].str.startswith("absent:")]
    assert (absent["source_name"] == "cxnet").sum() == 900 - 785
    assert (absent["source_name"] == "figure1").sum() == 2
    assert sorted(
        absent.loc[absent["source_name"] == "nih", "reason"].str.extract(r"(\d+) of")[0].astype(int)
    ) == [53, 56]


def test_ieee8023_rules(rows, cands):
    ex = cands.excluded
    ieee = ex[ex["source_name"] == "ieee8023"]
    assert (ieee["reason"] == "lateral").sum() == 57  # 58 L rows, one file listed twice
    assert ieee["reason"].str.startswith("hannover copy").sum() == 92
    assert (ieee["reason"] == "label rule: 'No Finding' film of a COVID-19 patient").sum() == 7
    r = rows[rows["source_name"] == "ieee8023"].set_index("upstream_path")
    # repeated rows: one row per file, the two patient IDs merged into one
    assert (
        r.loc["images/000001-24.jpg", "patient_id"]
        == r.loc["images/000006-17.jpg", "patient_id"]
        == "ieee8023:285"
    )
    assert not rows["upstream_path"].duplicated().any()
    # letter suffixes are different people
    assert {"ieee8023:311a", "ieee8023:311b"} <= set(r["patient_id"])
    assert set(r["view"]) == {"PA", "AP"} | ({"unknown"} & set(r["view"]))
    assert (r["license"] == "CC BY 3.0").sum() == 0  # all CC BY 3.0 rows are Hannover rows
    assert (
        r.loc[r["case_url"] != "", "case_url"].str.match(r"^(radiopaedia\.org|eurorad\.org|sirm\.org)/").all()
    )


def test_figure1_actualmed_mhh_rules(rows):
    f1 = rows[rows["source_name"] == "figure1"].set_index("upstream_path")
    assert (
        f1.loc["images/COVID-00015a.png", "patient_id"]
        == f1.loc["images/COVID-00015b.png", "patient_id"]
        == "figure1:COVID-00015"
    )
    assert set(f1["view"]) <= {"AP", "PA", "unknown"} and (f1["view"] == "unknown").any()
    am = rows[rows["source_name"] == "actualmed"]
    both = am.groupby("patient_id")["label"].nunique()
    assert set(both[both == 2].index) == {f"actualmed:ANON{n}" for n in (58, 60, 96, 191)}
    mhh = rows[rows["source_name"] == "mhh"]
    assert mhh["patient_id"].nunique() == 71 and set(mhh["view"]) == {"AP", "PA"}
    assert mhh["license"].str.startswith("CC BY 3.0").all()


def test_cxnet_rules(rows):
    cx = rows[rows["source_name"] == "cxnet"].set_index("upstream_path")
    folder = "chest_xray_images/covid19/"
    flags = cx["flags"].str.split(";").explode()
    assert (flags == "radiologically_normal").sum() == 36
    assert (flags == "pediatric").sum() == 13
    # leading-number matching despite extension/case differences; 83.jpeg is number 083
    assert not cx.loc[folder + "374.PNG", "patient_id_is_image_level"]
    assert cx.loc[folder + "83.jpeg", "patient_id"] == "cxnet:img083"
    assert cx.loc[folder + "83.jpeg", "patient_id_is_image_level"]
    assert "pcr_negative" in cx.loc[folder + "483.png", "flags"]
    # every file numbered 001-259 has no metadata row
    low = cx[cx.index.str.extract(r"/(\d+)", expand=False).astype(int).to_numpy() <= 259]
    assert low["patient_id_is_image_level"].all()
    assert (cx["label"] == "covid").all()


def test_nih_rules(rows, cands):
    nih = rows[rows["source_name"] == "nih"].set_index("upstream_path")
    assert nih.loc["X-Ray Image DataSet/No_findings/00002658_001.png", "patient_id"] == "nih:2658"
    views = nih.groupby(["label", "view"]).size()
    assert views.get(("pneumonia", "unknown"), 0) == 76 and ("normal", "unknown") not in views
    both = nih.groupby("patient_id")["label"].nunique()
    assert (both == 2).sum() == 20  # 21 upstream; MIRROR.md: 20 such groups in the mirror
    dark = cands.excluded["reason"].str.startswith("label rule: DarkCovidNet Covid-19 folder")
    assert dark.sum() == 113


def _age_sex(rows: pd.DataFrame, source: str, path: str) -> tuple[float | None, str]:
    r = rows[(rows["source_name"] == source) & (rows["upstream_path"] == path)]
    assert len(r) == 1, (source, path)
    age = r["age"].iloc[0]
    return (None if math.isnan(age) else age, r["sex"].iloc[0])


def test_age_and_sex_from_each_sources_metadata(rows, mirror_file, mirror_root):
    """Real rows of each source's own metadata file, and the candidate rows they become."""
    ieee = read_csv_text(mirror_file("ieee8023", "metadata.csv")).iloc[0]
    assert (ieee["patientid"], ieee["age"], ieee["sex"]) == ("2", "65", "M")
    assert _age_sex(rows, "ieee8023", "images/" + ieee["filename"]) == (65.0, "M")
    # MHH: lower-case sex, age redacted in every row
    mhh = read_csv_text(mirror_file("mhh", "data.csv"))
    assert mhh.iloc[0][["image_id", "sex", "age"]].tolist() == ["fff13f3a", "f", ""]
    assert (mhh["age"] == "").all()
    assert _age_sex(rows, "mhh", "png/fff13f3a.png") == (None, "F")
    # Figure1 (latin-1): an age, and the approximate ages '67+' and 'early 40s' read as unknown
    f1 = read_csv_text(mirror_file("figure1", "metadata.csv"), encoding="latin-1").set_index("patientid")
    assert f1.loc["COVID-00004", ["age", "sex"]].tolist() == ["42", "M"]
    assert f1.loc["COVID-00015a", "age"] == "67+" and f1.loc["COVID-00040a", "age"] == "early 40s"
    assert _age_sex(rows, "figure1", "images/COVID-00004.jpg") == (42.0, "M")
    assert _age_sex(rows, "figure1", "images/COVID-00015a.png") == (None, "")
    assert _age_sex(rows, "figure1", "images/COVID-00040a.jpg") == (None, "")
    # Actualmed: the columns exist and are empty in every row
    am = read_csv_text(mirror_file("actualmed", "metadata.csv"))
    assert len(am) == 238 and (am["age"] == "").all() and (am["sex"] == "").all()
    act = rows[rows["source_name"] == "actualmed"]
    assert act["age"].isna().all() and (act["sex"] == "").all()
    # CXNet (UTF-8 with BOM): male / female, fractional years for infants; no metadata row, no age or sex
    cx = read_csv_text(mirror_file("cxnet", "metadata.csv"), encoding="utf-8-sig").set_index("filename")
    assert cx.loc["260.jpg", ["age", "sex"]].tolist() == ["68", "female"]
    assert cx.loc["757p.jpg", ["age", "sex"]].tolist() == ["0.03", "male"]
    folder = "chest_xray_images/covid19/"
    assert _age_sex(rows, "cxnet", folder + "260.jpg") == (68.0, "F")
    assert _age_sex(rows, "cxnet", folder + "757p.jpg") == (0.03, "M")
    assert _age_sex(rows, "cxnet", folder + "83.jpeg") == (None, "")
    # NIH: from the auxiliary Data_Entry_2017 table; a film without a row has neither
    nih = read_csv_text(mirror_root / NIH_TABLE.repo / NIH_TABLE.commit / NIH_TABLE.path)
    entry = nih.set_index("Image Index").loc["00001280_004.png"]
    assert entry[["Patient Age", "Patient Gender", "View Position"]].tolist() == ["36", "F", "PA"]
    assert _age_sex(rows, "nih", "X-Ray Image DataSet/No_findings/00001280_004.png") == (36.0, "F")
    assert "00010471_001.png" not in set(nih["Image Index"])
    assert _age_sex(rows, "nih", "X-Ray Image DataSet/Pneumonia/00010471_001.png") == (None, "")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("65", 65.0), (" 45 ", 45.0), ("0.03", 0.03), ("0", 0.0), ("120", 120.0), ("058Y", 58.0), ("45 yrs", 45.0),
     ("70 years", 70.0), ("", None), ("121", None), ("411", None), ("-3", None), ("50+", None), ("67+", None),
     ("early 40s", None), ("mid 50s", None), ("40-50", None), ("?", None), (None, None), (float("nan"), None),
     (65, None)],
)  # fmt: skip
def test_normalize_age(value, expected):
    got = normalize_age(value)
    assert (None if math.isnan(got) else got) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("M", "M"), ("m", "M"), ("Male", "M"), (" male ", "M"), ("F", "F"), ("f", "F"), ("FEMALE", "F"),
     ("female", "F"), ("", ""), ("O", ""), ("unknown", ""), ("mf", ""), (None, ""), (float("nan"), "")],
)  # fmt: skip
def test_normalize_sex(value, expected):
    assert normalize_sex(value) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "https://radiopaedia.org/cases/covid-19-pneumonia-93?lang=gb",
            "radiopaedia.org/cases/covid-19-pneumonia-93",
        ),
        (
            "http://www.radiopaedia.org/cases/covid-19-pneumonia-93/",
            "radiopaedia.org/cases/covid-19-pneumonia-93",
        ),
        ("https://eurorad.org/case/16744", "eurorad.org/case/16744"),
        ("https://www.eurorad.org/case/16744#fig", "eurorad.org/case/16744"),
        ("https://www.sirm.org/2020/03/10/covid-19-caso-32/", "sirm.org/2020/03/10/covid-19-caso-32"),
        ("https://www.nejm.org/doi/full/10.1056/NEJMc2001272", ""),
        ("https://twitter.com/ChestImaging/status/1243928581983670272", ""),
        ("", ""),
    ],
)
def test_normalize_case_url(url, expected):
    assert normalize_case_url(url) == expected


def test_a_seventh_source_is_one_adapter(tmp_path):
    meta = tmp_path / "labels.csv"
    meta.write_text("file,dx,proj\na.png,covid,PA\nb.png,normal,LL\nc.png,weird,AP\n")

    def rules(src: Source, inputs: SourceInputs) -> Candidates:
        df = pd.read_csv(inputs.file(src.repo, "labels.csv"), dtype=str)
        rows, excl = [], []
        for r in df.itertuples():
            base = {"source": src.repo, "source_name": src.name, "upstream_path": r.file, "label": r.dx}
            if r.proj.startswith("L"):
                excl.append({**base, "reason": "lateral"})
            elif r.dx not in ("covid", "normal", "pneumonia"):
                excl.append({**base, "label": "", "reason": f"label rule: {r.dx!r}"})
            else:
                rows.append({**base, "view": r.proj, "age": math.nan, "sex": "", "patient_id": f"{src.name}:{r.file}",
                             "patient_id_is_image_level": True, "case_url": "", "license": src.license, "flags": ""})  # fmt: skip
        return Candidates(pd.DataFrame(rows), pd.DataFrame(excl))

    extra = Source("toy", "me/toy", "0" * 40, "toy", "CC0", rules, priority=6, metadata=("labels.csv",))
    out = all_candidates({"toy": SourceInputs({("me/toy", "labels.csv"): meta})}, [extra])
    assert out.rows["upstream_path"].tolist() == ["a.png"]
    assert sorted(out.excluded["reason"]) == ["label rule: 'weird'", "lateral"]
    assert extra.metadata_files() == [RepoFile("me/toy", "0" * 40, "labels.csv")]
