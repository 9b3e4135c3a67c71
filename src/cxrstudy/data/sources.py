"""Source adapters: one small declarative `Source` per upstream repository plus the rules that turn that
repository's own metadata (and, for folder-labelled sources, a file listing) into candidate rows.

Every rule of docs/DATA.md lives here: label strings, views (laterals excluded), age and sex (each source's
own metadata, through the shared `normalize_age` / `normalize_sex`), source-prefixed patient IDs, licences,
case URLs, and the adapter-level exclusions with their reasons (``lateral``, ``label rule: ...``,
``hannover copy: ...``, ``absent: ...``). A `Source` also carries every trait the rest of the study reads
(de-duplication priority and links, hold-out, within-source contrasts, the same-hospital source); the
functions after `SOURCES` derive them from the registry, so adding a source is one more `Source` with its
own `rules` function, registered in `SOURCES`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from cxrstudy.config import CLASSES

#: Columns of a candidate row, as produced by every adapter (the manifest adds image, sha256, split, ...).
CANDIDATE_COLUMNS: tuple[str, ...] = (
    "source",
    "source_name",
    "upstream_path",
    "label",
    "view",
    "age",
    "sex",
    "patient_id",
    "patient_id_is_image_level",
    "case_url",
    "license",
    "flags",
)

#: Columns of an exclusion row (excluded.csv); ``label`` is '' when the row never got one.
EXCLUDED_COLUMNS: tuple[str, ...] = ("source", "source_name", "upstream_path", "label", "reason")

VIEWS: tuple[str, ...] = ("PA", "AP", "unknown")
SEXES: tuple[str, ...] = ("M", "F")
#: Oldest age in years taken as real; larger values (and negative ones) are read as unknown.
AGE_MAX = 120


@dataclass(frozen=True)
class RepoFile:
    """One file of a pinned upstream repository."""

    repo: str
    commit: str
    path: str


@dataclass
class SourceInputs:
    """What a source's rules read: local copies of its metadata files and listings of its folders."""

    files: dict[tuple[str, str], Path]
    listings: dict[str, list[str]] = field(default_factory=dict)

    def file(self, repo: str, path: str) -> Path:
        """Local path of a fetched metadata file; a clear error when the build did not fetch it."""
        try:
            return self.files[(repo, path)]
        except KeyError:
            raise KeyError(
                f"metadata file {repo}:{path} was not fetched (declare it in the Source)"
            ) from None

    def listing(self, folder: str) -> list[str]:
        """Repository paths of the files directly inside ``folder``."""
        try:
            return self.listings[folder]
        except KeyError:
            raise KeyError(f"folder {folder!r} was not listed (declare it in Source.folders)") from None


@dataclass
class Candidates:
    """An adapter's output: candidate image rows and adapter-level exclusions."""

    rows: pd.DataFrame
    excluded: pd.DataFrame


@dataclass(frozen=True)
class Source:
    """Declarative description of one upstream repository, the rules that read it and its traits."""

    name: str
    repo: str
    commit: str
    title: str
    license: str
    rules: Callable[[Source, SourceInputs], Candidates]
    #: De-duplication: of two copies of one image, the one from the source with the lower priority is kept.
    priority: int
    metadata: tuple[str, ...] = ()
    folders: tuple[str, ...] = ()
    auxiliary: tuple[RepoFile, ...] = ()
    citation: str = ""
    #: False for a one-hospital source whose unrelated films look alike: image similarity never links
    #: its films to a patient (only patient IDs and case URLs do).
    image_patient_link: bool = True
    #: False for a source left out of de-duplication's local-feature test (nothing in the study copies it).
    local_feature_test: bool = True
    #: Held out: never trained or validated on (``holdout`` split), scored in the scorecard only.
    holdout: bool = False
    #: The source with films of two classes from one hospital (the within-source shortcut probe).
    same_hospital: bool = False
    #: Within-source contrasts ``(positive, negative)`` scored on validation rows by the variant selection.
    contrasts: tuple[tuple[str, str], ...] = ()

    def metadata_files(self) -> list[RepoFile]:
        """Every metadata file the rules need, from this repository and auxiliary ones."""
        return [RepoFile(self.repo, self.commit, p) for p in self.metadata] + list(self.auxiliary)

    def candidates(self, inputs: SourceInputs) -> Candidates:
        """Run this source's rules; checks the output columns and labels."""
        out = self.rules(self, inputs)
        missing = set(CANDIDATE_COLUMNS) - set(out.rows.columns)
        if missing:
            raise ValueError(f"adapter {self.name} produced rows without columns {sorted(missing)}")
        bad = set(out.rows["label"]) - set(CLASSES)
        if bad:
            raise ValueError(f"adapter {self.name} produced labels outside {CLASSES}: {sorted(bad)}")
        if out.rows["upstream_path"].duplicated().any():
            dup = out.rows.loc[out.rows["upstream_path"].duplicated(), "upstream_path"].iloc[0]
            raise ValueError(f"adapter {self.name} produced {dup!r} twice")
        return out


# --------------------------------------------------------------------------------------------------------
# helpers shared by the adapters
# --------------------------------------------------------------------------------------------------------

_CASE_URL_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"^radiopaedia\.org/cases/[^/?#]+"),
    re.compile(r"^eurorad\.org/case/\d+"),
    re.compile(r"^sirm\.org/20\d\d/\d\d/\d\d/[^/?#]+"),
)


def normalize_case_url(url: str) -> str:
    """Canonical form of a radiopaedia / eurorad / sirm case-page URL (so two rows of one case compare
    equal), or '' for anything else (papers, tweets and collections hold many patients)."""
    url = (url or "").strip()
    if not url:
        return ""
    parts = urlsplit(url if "://" in url else "https://" + url)
    host = parts.netloc.lower().removeprefix("www.").split(":")[0]
    text = host + parts.path.rstrip("/")
    for pattern in _CASE_URL_PATTERNS:
        m = pattern.match(text)
        if m:
            return m.group(0).lower()
    return ""


def read_csv_text(path: Path, encoding: str = "utf-8") -> pd.DataFrame:
    """Read a metadata CSV as strings ('' for empty cells), with a clear error naming the file."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding=encoding)
    except (UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise ValueError(f"{path}: cannot read as {encoding} CSV: {exc}") from exc
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _require(df: pd.DataFrame, columns: Iterable[str], path: Path) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing expected columns {missing}; found {list(df.columns)}")


def _view(value: str) -> str:
    """Map a metadata view string to PA / AP / unknown (laterals are handled before)."""
    v = (value or "").strip().upper()
    if v.startswith("PA"):
        return "PA"
    if v.startswith("AP"):
        return "AP"
    return "unknown"


#: A single age in years, optionally with a years unit: '65', '0.25', '058Y', '45 yrs', '70 years'.
_AGE_YEARS = re.compile(r"^(?P<years>\d+(?:\.\d+)?)\s*(?:y|yr|yrs|year|years)?$", re.IGNORECASE)
_SEX = {"m": "M", "male": "M", "f": "F", "female": "F"}


def normalize_age(value: object) -> float:
    """Age in years from a metadata cell holding one number (optionally suffixed Y / yr(s) / year(s)); NaN
    for anything else (empty, open bounds '50+', decades 'early 40s', ranges '40-50') or outside 0-AGE_MAX."""
    m = _AGE_YEARS.match(value.strip()) if isinstance(value, str) else None
    if m is None:
        return math.nan
    years = float(m.group("years"))
    return years if 0 <= years <= AGE_MAX else math.nan


def normalize_sex(value: object) -> str:
    """``M`` or ``F`` from M / F / male / female in any case; '' for anything else."""
    return _SEX.get(value.strip().lower(), "") if isinstance(value, str) else ""


def _age_sex(row: pd.Series | dict[str, str], age: str = "age", sex: str = "sex") -> dict[str, object]:
    """The ``age`` and ``sex`` of a candidate row from a metadata row's columns ``age`` and ``sex``."""
    return {"age": normalize_age(row[age]), "sex": normalize_sex(row[sex])}


def _row(src: Source, path: str, label: str, view: str, patient: str, **extra: object) -> dict[str, object]:
    """A candidate row; ``extra`` may carry age, sex, image_level, case_url, license and flags."""
    return {
        "source": src.repo,
        "source_name": src.name,
        "upstream_path": path,
        "label": label,
        "view": view,
        "age": extra.get("age", math.nan),
        "sex": extra.get("sex", ""),
        "patient_id": f"{src.name}:{patient}",
        "patient_id_is_image_level": bool(extra.get("image_level", False)),
        "case_url": extra.get("case_url", ""),
        "license": extra.get("license") or src.license,
        "flags": ";".join(extra.get("flags", ())),  # type: ignore[arg-type]
    }


def _excl(src: Source, path: str, reason: str, label: str = "") -> dict[str, str]:
    return {
        "source": src.repo,
        "source_name": src.name,
        "upstream_path": path,
        "label": label,
        "reason": reason,
    }


def _result(rows: list[dict], excluded: list[dict]) -> Candidates:
    r = pd.DataFrame(rows, columns=list(CANDIDATE_COLUMNS))
    r["patient_id_is_image_level"] = r["patient_id_is_image_level"].astype(bool)
    e = pd.DataFrame(excluded, columns=list(EXCLUDED_COLUMNS)).drop_duplicates(["upstream_path", "reason"])
    return Candidates(r.reset_index(drop=True), e.reset_index(drop=True))


def _union_find(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Map every ID in ``pairs`` to one representative of its connected component (the smallest)."""
    pairs = list(pairs)
    ids = sorted({x for pair in pairs for x in pair}, key=_natural_key)
    if not ids:
        return {}
    index = {x: i for i, x in enumerate(ids)}
    rows = [index[a] for a, _ in pairs]
    cols = [index[b] for _, b in pairs]
    graph = sp.coo_matrix((np.ones(len(pairs)), (rows, cols)), shape=(len(ids), len(ids)))
    _, component = connected_components(graph, directed=False)
    first: dict[int, str] = {}
    for x, c in zip(ids, component, strict=True):  # ids are in natural order: the first seen is the smallest
        first.setdefault(int(c), x)
    return {x: first[int(c)] for x, c in zip(ids, component, strict=True)}


def _natural_key(s: str) -> tuple[int, str]:
    m = re.match(r"\d+", s)
    return (int(m.group(0)) if m else 1 << 62, s)


# --------------------------------------------------------------------------------------------------------
# 1. ieee8023/covid-chestxray-dataset
# --------------------------------------------------------------------------------------------------------

IEEE_COVID = {"COVID-19", "COVID-19, ARDS"}
IEEE_PNEUMONIA = {
    "SARS",
    "Streptococcus",
    "Pneumocystis",
    "Pneumonia",
    "Klebsiella",
    "Mycoplasma Bacterial Pneumonia",
    "Legionella",
    "Varicella",
    "Bacterial",
    "E.Coli",
    "Influenza",
    "Chlamydophila",
    "MERS",
}
IEEE_NORMAL = {"No Finding"}
IEEE_FRONTAL = {"PA", "AP", "AP Supine"}
HANNOVER = "Hannover Medical School, Hannover, Germany"


def _ieee8023_rules(src: Source, inputs: SourceInputs) -> Candidates:
    path = inputs.file(src.repo, "metadata.csv")
    df = read_csv_text(path)
    _require(
        df,
        [
            "patientid",
            "finding",
            "view",
            "modality",
            "location",
            "folder",
            "filename",
            "url",
            "license",
            "age",
            "sex",
        ],
        path,
    )
    df = df.assign(upstream_path=df["folder"].str.strip() + "/" + df["filename"].str.strip())
    excluded: list[dict] = []
    for p in df.loc[df["modality"] != "X-ray", "upstream_path"]:
        excluded.append(_excl(src, p, "label rule: not an X-ray (modality CT)"))
    xr = df[df["modality"] == "X-ray"].copy()
    xr["patientid"] = xr["patientid"].str.strip()
    # Repeated rows: one file listed under two patient IDs means the two IDs are one person.
    links = [
        (a, b)
        for ids in xr.groupby("upstream_path")["patientid"].unique()
        for a in ids
        for b in ids
        if a != b
    ]
    canon = _union_find(links)
    xr["patient"] = xr["patientid"].map(lambda p: canon.get(p, p))
    covid_patients = set(xr.loc[xr["finding"].str.contains("COVID", regex=False), "patient"])
    rows: list[dict] = []
    for _, r in xr.drop_duplicates("upstream_path").iterrows():
        finding, view, p = r["finding"].strip(), r["view"].strip(), r["upstream_path"]
        label = (
            "covid"
            if finding in IEEE_COVID
            else "pneumonia"
            if finding in IEEE_PNEUMONIA
            else "normal"
            if finding in IEEE_NORMAL
            else ""
        )
        if view == "L":
            excluded.append(_excl(src, p, "lateral", label))
        elif r["location"].strip() == HANNOVER:
            excluded.append(
                _excl(
                    src,
                    p,
                    "hannover copy: a re-crop of an MHH film; taken from ml-workgroup/covid-19-image-repository",
                    label,
                )
            )
        elif not label:
            excluded.append(_excl(src, p, f"label rule: finding {finding!r} is not used"))
        elif label == "normal" and r["patient"] in covid_patients:
            excluded.append(_excl(src, p, "label rule: 'No Finding' film of a COVID-19 patient", label))
        else:
            lic = r["license"].strip()
            rows.append(
                _row(
                    src,
                    p,
                    label,
                    _view(view) if view in IEEE_FRONTAL else "unknown",
                    r["patient"],
                    case_url=normalize_case_url(r["url"]),
                    **_age_sex(r),
                    license=lic
                    or "unspecified in metadata.csv (collection README: per-image licences; metadata CC BY-NC-SA 4.0)",
                )
            )
    return _result(rows, excluded)


# --------------------------------------------------------------------------------------------------------
# 2. ml-workgroup/covid-19-image-repository (Hannover Medical School)
# --------------------------------------------------------------------------------------------------------


def _mhh_rules(src: Source, inputs: SourceInputs) -> Candidates:
    path = inputs.file(src.repo, "data.csv")
    df = read_csv_text(path)
    _require(df, ["patient_id", "image_id", "projection", "age", "sex"], path)
    rows, excluded = [], []
    for _, r in df.iterrows():
        p = f"png/{r['image_id'].strip()}.png"
        proj = r["projection"].strip().lower()
        if proj in ("ap", "pa"):
            rows.append(_row(src, p, "covid", proj.upper(), r["patient_id"].strip(), **_age_sex(r)))
        else:
            excluded.append(
                _excl(
                    src,
                    p,
                    "lateral" if proj in ("l", "lat", "lateral") else f"label rule: projection {proj!r}",
                )
            )
    return _result(rows, excluded)


# --------------------------------------------------------------------------------------------------------
# 3./4. agchung Figure1 and Actualmed (COVID-Net team)
# --------------------------------------------------------------------------------------------------------

AGCHUNG_LABELS = {"COVID-19": "covid", "No finding": "normal", "Pneumonia": "pneumonia"}


def _agchung_label(finding: str) -> str:
    return AGCHUNG_LABELS.get(finding.strip(), "")


def _figure1_rules(src: Source, inputs: SourceInputs) -> Candidates:
    path = inputs.file(src.repo, "metadata.csv")
    df = read_csv_text(path, encoding="latin-1")
    _require(df, ["patientid", "finding", "view", "modality", "age", "sex"], path)
    by_stem: dict[str, str] = {}
    for f in inputs.listing("images"):
        by_stem.setdefault(PurePosixPath(f).stem, f)
    rows, excluded = [], []
    for _, r in df.iterrows():
        pid, finding = r["patientid"].strip(), r["finding"].strip()
        p = by_stem.get(pid, f"images/{pid}.(jpg|png)")
        label = _agchung_label(finding)
        if r["view"].strip().upper().startswith("L"):
            excluded.append(_excl(src, p, "lateral", label))
        elif not label:
            excluded.append(_excl(src, p, f"label rule: finding {finding!r} is not used (unlabelled)"))
        elif pid not in by_stem:
            excluded.append(_excl(src, p, "absent: no file with this stem in the images/ listing", label))
        else:
            patient = re.sub(r"[a-z]$", "", pid)  # COVID-00003a / b: two films of one person
            rows.append(_row(src, p, label, _view(r["view"]), patient, **_age_sex(r)))
    return _result(rows, excluded)


def _actualmed_rules(src: Source, inputs: SourceInputs) -> Candidates:
    path = inputs.file(src.repo, "metadata.csv")
    df = read_csv_text(path)
    _require(df, ["patientid", "finding", "view", "imagename", "age", "sex"], path)
    rows, excluded = [], []
    for _, r in df.iterrows():
        p = f"images/{r['imagename'].strip()}"
        finding = r["finding"].strip()
        label = _agchung_label(finding)
        if r["view"].strip().upper().startswith("L"):
            excluded.append(_excl(src, p, "lateral", label))
        elif not label:
            excluded.append(
                _excl(src, p, f"label rule: finding {finding!r} is not used (notes: inconclusive)")
            )
        else:
            rows.append(_row(src, p, label, _view(r["view"]), r["patientid"].strip(), **_age_sex(r)))
    return _result(rows, excluded)


# --------------------------------------------------------------------------------------------------------
# 5. armiro/COVID-CXNet
# --------------------------------------------------------------------------------------------------------

CXNET_FOLDER = "chest_xray_images/covid19"
CXNET_NUMBERS = range(1, 901)  # the README badge and folder: 900 files numbered 001-900
_CXNET_NAME = re.compile(r"^(?P<num>\d+)(?P<ped>p?)(?P<neg>-?)\.(?P<ext>[A-Za-z0-9]+)$")


def _cxnet_rules(src: Source, inputs: SourceInputs) -> Candidates:
    path = inputs.file(src.repo, "metadata.csv")
    df = read_csv_text(path, encoding="utf-8-sig")  # UTF-8 with BOM, CRLF
    _require(df, ["filename", "patient_id", "view", "pcr_test", "url", "age", "sex"], path)
    meta: dict[int, pd.Series] = {}
    for _, r in df.iterrows():
        m = re.match(r"\s*(\d+)", r["filename"])
        if not m:
            raise ValueError(f"{path}: filename {r['filename']!r} does not start with the image number")
        num = int(m.group(1))
        if num in meta:
            raise ValueError(f"{path}: two rows for image number {num}")
        meta[num] = r
    rows, excluded, seen = [], [], set()
    for p in inputs.listing(CXNET_FOLDER):
        m = _CXNET_NAME.match(PurePosixPath(p).name)
        if not m:
            excluded.append(_excl(src, p, "label rule: file name does not follow NNN[p][-].ext", "covid"))
            continue
        num = int(m.group("num"))
        seen.add(num)
        flags = []
        if m.group("neg"):
            flags.append("radiologically_normal")
        if m.group("ped"):
            flags.append("pediatric")
        r = meta.get(num)
        if r is None:
            rows.append(_row(src, p, "covid", "unknown", f"img{num:03d}", image_level=True, flags=flags))
            continue
        if r["pcr_test"].strip().lower() == "negative":
            flags.append("pcr_negative")
        rows.append(
            _row(
                src,
                p,
                "covid",
                _view(r["view"]),
                r["patient_id"].strip(),
                case_url=normalize_case_url(r["url"]),
                flags=flags,
                **_age_sex(r),
            )
        )
    for num in CXNET_NUMBERS:
        if num not in seen:
            name = meta[num]["filename"].strip() if num in meta else f"{num:03d}.*"
            excluded.append(
                _excl(
                    src,
                    f"{CXNET_FOLDER}/{name}",
                    f"absent: no file numbered {num:03d} in the folder listing",
                    "covid",
                )
            )
    return _result(rows, excluded)


# --------------------------------------------------------------------------------------------------------
# 6. muhammedtalo/COVID-19 (DarkCovidNet; NIH ChestX-ray8 subset) with the NIH table from qqto2008/capstone
# --------------------------------------------------------------------------------------------------------

DARK_ROOT = "X-Ray Image DataSet"
#: folder -> (label or None for "skip", number of files the README describes)
DARK_FOLDERS: dict[str, tuple[str | None, int]] = {
    f"{DARK_ROOT}/No_findings": ("normal", 500),
    f"{DARK_ROOT}/Pneumonia": ("pneumonia", 500),
    f"{DARK_ROOT}/Covid-19": (None, 125),
}
NIH_TABLE = RepoFile("qqto2008/capstone", "cfe6522a181f745cbf708d72a186c28e19a8982f", "Data_Entry_2017.csv")
_NIH_NAME = re.compile(r"^(?P<pid>\d{8})_(?P<fu>\d{3})\.png$", re.IGNORECASE)


def _nih_rules(src: Source, inputs: SourceInputs) -> Candidates:
    table_path = inputs.file(NIH_TABLE.repo, NIH_TABLE.path)
    table = read_csv_text(table_path)
    _require(
        table, ["Image Index", "View Position", "Finding Labels", "Patient Age", "Patient Gender"], table_path
    )
    entries = dict(zip(table["Image Index"].str.strip(), table.to_dict("records"), strict=True))
    rows, excluded = [], []
    for folder, (label, expected) in DARK_FOLDERS.items():
        listing = inputs.listing(folder)
        for p in listing:
            name = PurePosixPath(p).name
            if label is None:
                excluded.append(
                    _excl(
                        src,
                        p,
                        "label rule: DarkCovidNet Covid-19 folder holds copies of ieee8023; taken from ieee8023",
                        "covid",
                    )
                )
                continue
            m = _NIH_NAME.match(name)
            if not m:
                excluded.append(
                    _excl(src, p, "label rule: file name is not an NIH image index PPPPPPPP_FFF.png", label)
                )
                continue
            entry = entries.get(name)
            view = entry["View Position"].strip() if entry is not None else ""
            if view.upper().startswith("L"):
                excluded.append(_excl(src, p, "lateral", label))
                continue
            age_sex = _age_sex(entry, "Patient Age", "Patient Gender") if entry is not None else {}
            rows.append(_row(src, p, label, _view(view), str(int(m.group("pid"))), **age_sex))
        if label is not None and len(listing) < expected:
            excluded.append(
                _excl(
                    src,
                    folder + "/",
                    f"absent: {expected - len(listing)} of the {expected} files the README describes are not in the folder listing",
                    label,
                )
            )
    return _result(rows, excluded)


# --------------------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------------------

_RESEARCH_ONLY = "research use only (README note; no LICENSE file)"

SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source(
            name="ieee8023",
            repo="ieee8023/covid-chestxray-dataset",
            commit="584034aa7fbf06496741f11008d72fd791c8e443",
            title="COVID-19 image data collection (Cohen et al.)",
            license="per image (metadata.csv license column)",
            rules=_ieee8023_rules,
            priority=1,
            contrasts=(("covid", "pneumonia"),),
            metadata=("metadata.csv", "README.md"),
            citation="Cohen JP et al., COVID-19 Image Data Collection, arXiv:2006.11988 (2020)",
        ),
        Source(
            name="mhh",
            repo="ml-workgroup/covid-19-image-repository",
            commit="ad7ab099b425f16e06bba22322336b7d6a732965",
            title="COVID-19 image repository, Hannover Medical School",
            license="CC BY 3.0 (attribute DOI 10.6084/m9.figshare.12275009)",
            rules=_mhh_rules,
            priority=0,
            metadata=("data.csv", "readme.md"),
            citation="Winther HB et al., doi:10.6084/m9.figshare.12275009",
        ),
        Source(
            name="figure1",
            repo="agchung/Figure1-COVID-chestxray-dataset",
            commit="95bb569e55f4110d3b734c0f355340e04e16989a",
            title="Figure1 COVID-19 chest X-ray dataset (COVID-Net team)",
            license=_RESEARCH_ONLY,
            rules=_figure1_rules,
            priority=2,
            metadata=("metadata.csv", "README.md"),
            folders=("images",),
            citation="Wang L, Lin ZQ, Wong A, COVID-Net, Sci Rep 10, 19549 (2020)",
        ),
        Source(
            name="actualmed",
            repo="agchung/Actualmed-COVID-chestxray-dataset",
            commit="27240dd8dec9454bc97f9f3c0c432ef434de2517",
            title="Actualmed COVID-19 chest X-ray dataset (Actualmed / Universitat Jaume I)",
            license=_RESEARCH_ONLY,
            rules=_actualmed_rules,
            priority=3,
            image_patient_link=False,
            holdout=True,  # one hospital with COVID-19 and normal films: every model is scored on it unseen
            same_hospital=True,
            metadata=("metadata.csv", "README.md"),
            citation="Wang L, Lin ZQ, Wong A, COVID-Net, Sci Rep 10, 19549 (2020)",
        ),
        Source(
            name="cxnet",
            repo="armiro/COVID-CXNet",
            commit="3ade488b3828705706fc5f58c0667421d8b04a01",
            title="COVID-CXNet chest X-ray images (Haghanifar et al.)",
            license="CC BY 4.0 per README badge (attribute DOI 10.6084/m9.figshare.12580328); images collected from third parties with their own terms",
            rules=_cxnet_rules,
            priority=4,
            metadata=("metadata.csv", "README.md"),
            folders=(CXNET_FOLDER,),
            citation="Haghanifar A et al., COVID-CXNet, doi:10.6084/m9.figshare.12580328",
        ),
        Source(
            name="nih",
            repo="muhammedtalo/COVID-19",
            commit="ee3e2cffc0824711bed675275506b26f19be7198",
            title="DarkCovidNet subset of NIH ChestX-ray8",
            license="NIH Clinical Center ChestX-ray8: no restriction on use; cite Wang et al. CVPR 2017 and acknowledge the NIH Clinical Center",
            rules=_nih_rules,
            priority=5,
            image_patient_link=False,
            local_feature_test=False,
            contrasts=(("pneumonia", "normal"),),
            metadata=("README.md",),
            folders=tuple(DARK_FOLDERS),
            auxiliary=(NIH_TABLE,),
            citation="Wang X et al., ChestX-ray8, CVPR 2017; Ozturk T et al., Comput Biol Med 121:103792 (2020)",
        ),
    )
}


def priority_order() -> tuple[str, ...]:
    """Source names in de-duplication priority order (first = kept; ties in registry order)."""
    return tuple(sorted(SOURCES, key=lambda name: SOURCES[name].priority))


def no_image_patient_link() -> frozenset[str]:
    """Sources whose films image similarity never links to a patient."""
    return frozenset(name for name, s in SOURCES.items() if not s.image_patient_link)


def no_local_feature_test() -> frozenset[str]:
    """Sources left out of de-duplication's local-feature test."""
    return frozenset(name for name, s in SOURCES.items() if not s.local_feature_test)


def holdout_sources() -> tuple[str, ...]:
    """Sources never trained or validated on (the ``holdout`` split), in registry order."""
    return tuple(name for name, s in SOURCES.items() if s.holdout)


def same_hospital_source() -> str:
    """The one source marked ``same_hospital``."""
    names = [name for name, s in SOURCES.items() if s.same_hospital]
    if len(names) != 1:
        raise ValueError(f"exactly one source must be marked same_hospital, found {names}")
    return names[0]


def contrasts() -> tuple[tuple[str, str, str], ...]:
    """Within-source contrasts ``(source, positive, negative)``, in registry order."""
    return tuple((name, pos, neg) for name, s in SOURCES.items() for pos, neg in s.contrasts)


def all_candidates(inputs: dict[str, SourceInputs], sources: Iterable[Source] | None = None) -> Candidates:
    """Run every adapter and concatenate their candidates and exclusions."""
    outs = [s.candidates(inputs[s.name]) for s in (sources or SOURCES.values())]
    rows = pd.concat([o.rows for o in outs], ignore_index=True)
    excluded = pd.concat([o.excluded for o in outs], ignore_index=True)
    return Candidates(rows, excluded)
