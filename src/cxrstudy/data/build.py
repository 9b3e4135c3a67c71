"""The whole data step: fetch metadata and listings, run the source adapters, fetch and decode the images,
de-duplicate, link patients, split, and write ``manifest.csv`` / ``excluded.csv`` / ``duplicates.csv`` /
``build_info.json`` under ``data/processed/``.

Command line (what ``make data`` runs)::

    python -m cxrstudy.data.build [--mirror BASE] [--workers N] [--split-seed S]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cxrstudy import config
from cxrstudy.data.download import (
    Base,
    Downloader,
    FetchItem,
    FetchResult,
    MirrorError,
    resolve_base,
)
from cxrstudy.data.manifest import MANIFEST_COLUMNS
from cxrstudy.data.preprocess import (
    TARGET_SHORT_SIDE,
    ProcessJob,
    ProcessResult,
    preprocess_images,
    processed_names,
)
from cxrstudy.data.sources import (
    EXCLUDED_COLUMNS,
    SEXES,
    SOURCES,
    Source,
    SourceInputs,
    all_candidates,
    holdout_sources,
)
from cxrstudy.fileio import atomic_write_text, write_json

if TYPE_CHECKING:  # the module itself is imported lazily in build_dataset (heavier imports)
    from cxrstudy.data.dedup import DedupResult

DUPLICATES_COLUMNS: tuple[str, ...] = ("a", "b", "kind", "method", "score")


@dataclass
class BuildResult:
    """What a build produced (also on disk under ``out_dir``)."""

    manifest: pd.DataFrame
    excluded: pd.DataFrame
    duplicates: pd.DataFrame
    info: dict = field(default_factory=dict)
    out_dir: Path = config.PROCESSED_DIR

    def counts(self) -> pd.DataFrame:
        """Images and distinct patient groups per source x label."""
        return summary_counts(self.manifest)

    def absent(self) -> pd.DataFrame:
        """Exclusions whose reason starts with ``absent:``."""
        return self.excluded[self.excluded["reason"].str.startswith("absent:")]


def summary_counts(manifest: pd.DataFrame) -> pd.DataFrame:
    """Table of images / patient groups per source_name (rows) and label (columns), with totals."""
    g = manifest.groupby(["source_name", "label"])
    table = pd.DataFrame({"images": g.size(), "patients": g["patient_group"].nunique()}).reset_index()
    tot = (
        manifest.groupby("label")
        .agg(images=("image", "size"), patients=("patient_group", "nunique"))
        .reset_index()
    )
    tot.insert(0, "source_name", "total")
    return pd.concat([table, tot], ignore_index=True)


def write_csv_atomic(df: pd.DataFrame, path: Path) -> None:
    """Write a CSV to a temporary name in the same folder, then rename it into place."""
    atomic_write_text(path, df.to_csv(index=False, lineterminator="\n"))


def _remove_stale_temp(root: Path) -> int:
    """Delete half-written files a killed run may have left (``*.part``, ``.*.tmp``); returns how many."""
    n = 0
    if root.is_dir():
        for dirpath, _, files in os.walk(root):
            for f in files:
                if f.endswith(".part") or (f.startswith(".") and f.endswith(".tmp")):
                    Path(dirpath, f).unlink(missing_ok=True)
                    n += 1
    return n


def _fetch_reason(r: FetchResult) -> str:
    if r.status == "absent":
        return f"absent: {r.reason}"
    if r.status == "failed":
        return f"absent: download failed {r.reason}"
    return f"refused: {r.reason}"


def _exclusions(rows: pd.DataFrame, reasons: Iterable[str]) -> pd.DataFrame:
    out = rows[["source", "source_name", "upstream_path", "label"]].copy()
    out["reason"] = list(reasons)
    return out[list(EXCLUDED_COLUMNS)]


def fetch_source_inputs(dl: Downloader, sources: Iterable[Source]) -> dict[str, SourceInputs]:
    """Fetch every source's metadata files and folder listings; a missing one is fatal (named)."""
    sources = list(sources)
    items = [
        FetchItem(f.repo, f.commit, f.path, kind="metadata") for s in sources for f in s.metadata_files()
    ]
    results = {(r.item.repo, r.item.path): r for r in dl.fetch_many(items, desc="metadata")}
    bad = [f"{r.item.rel} ({r.status}: {r.reason})" for r in results.values() if not r.ok]
    if bad:
        raise MirrorError(
            f"CXR_MIRROR={dl.base.value!r}: required metadata files unavailable: " + "; ".join(bad)
        )
    inputs = {}
    for s in sources:
        files = {(f.repo, f.path): results[(f.repo, f.path)].local for f in s.metadata_files()}
        listings = {d: dl.list_folder(s.repo, s.commit, d) for d in s.folders}
        inputs[s.name] = SourceInputs(files, listings)  # type: ignore[arg-type]
    return inputs


def default_base(out_dir: Path = config.PROCESSED_DIR) -> str:
    """``$CXR_MIRROR`` if set, else the base recorded in ``out_dir/build_info.json``, else GitHub's raw host."""
    if os.environ.get("CXR_MIRROR", "").strip():
        return config.mirror_base()
    info = Path(out_dir) / "build_info.json"
    if info.is_file():
        try:
            return str(json.loads(info.read_text(encoding="utf-8"))["base"])
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    return config.mirror_base()


class _Stopwatch:
    """Lap timer: :meth:`lap` records the seconds since the previous lap (rounded to ms) under a name."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.timings: dict[str, float] = {}

    def lap(self, name: str) -> None:
        """Record the time since the previous lap (or the start) as ``timings[name]``."""
        now = time.perf_counter()
        self.timings[name] = round(now - self.last, 3)
        self.last = now

    def total(self) -> None:
        """Record the time since the start as ``timings["total"]``."""
        self.timings["total"] = round(time.perf_counter() - self.start, 3)


def _source_order_key(col: pd.Series) -> pd.Series:
    """Sort key: ``source_name`` in the order of :data:`SOURCES`, any other column as it is."""
    order = {name: i for i, name in enumerate(SOURCES)}
    return col.map(order) if col.name == "source_name" else col


def _fetch_images(dl: Downloader, rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, list[FetchResult]]:
    """Fetch every candidate's raw image: the rows fetched (plus ``sha256``, ``raw_path``), the
    exclusions of the others, and every fetch result."""
    fetched = dl.fetch_many(
        [FetchItem(r.source, SOURCES[r.source_name].commit, r.upstream_path) for r in rows.itertuples()],
        desc="images",
    )
    ok = pd.Series([f.ok for f in fetched], index=rows.index)
    excl_fetch = _exclusions(rows[~ok], [_fetch_reason(f) for f in fetched if not f.ok])
    rows = rows[ok].copy()
    fetched_ok = [f for f in fetched if f.ok]
    rows["sha256"] = [f.sha256 for f in fetched_ok]
    rows["raw_path"] = [str(f.local) for f in fetched_ok]
    return rows, excl_fetch, fetched


def _preprocess_rows(
    rows: pd.DataFrame, out_dir: Path, short_side: int, process_workers: int, progress: bool
) -> tuple[pd.DataFrame, pd.DataFrame, list[ProcessResult]]:
    """Decode and write the processed PNGs: the rows decoded (plus ``image``, ``width``, ``height``;
    ``raw_path`` dropped, index reset), the exclusions of undecodable ones, and every process result."""
    rows["image"] = processed_names(rows["source_name"].tolist(), rows["upstream_path"].tolist())
    jobs = [
        ProcessJob(Path(p), s, i)
        for p, s, i in zip(rows["raw_path"], rows["sha256"], rows["image"], strict=True)
    ]
    processed = preprocess_images(
        jobs, out_dir, short_side=short_side, workers=process_workers, progress=progress
    )
    decoded = pd.Series([p.status != "undecodable" for p in processed], index=rows.index)
    excl_decode = _exclusions(
        rows[~decoded], [f"undecodable: {p.reason}" for p in processed if p.status == "undecodable"]
    )
    rows["width"] = [p.width for p in processed]
    rows["height"] = [p.height for p in processed]
    rows = rows[decoded].drop(columns=["raw_path"]).reset_index(drop=True)
    return rows, excl_decode, processed


def _output_tables(
    kept: pd.DataFrame, rows: pd.DataFrame, dd: DedupResult, earlier_exclusions: list[pd.DataFrame]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The manifest, excluded and duplicates tables, in their columns and sort orders; ``earlier_exclusions``
    (adapters, fetch, decode) come before the rows that de-duplication dropped."""
    kept = kept.sort_values(["source_name", "upstream_path"], key=_source_order_key)
    manifest = kept[list(MANIFEST_COLUMNS)].reset_index(drop=True)
    labels = rows.set_index(["source", "upstream_path"])[["source_name", "label"]]
    dropped = dd.dropped.join(labels, on=["source", "upstream_path"])
    excluded = pd.concat([*earlier_exclusions, dropped[list(EXCLUDED_COLUMNS)]], ignore_index=True)
    excluded = excluded.sort_values(["source_name", "upstream_path", "reason"], key=_source_order_key)
    excluded = excluded.reset_index(drop=True)
    duplicates = (
        dd.pairs[list(DUPLICATES_COLUMNS)].sort_values(["a", "b", "kind", "method"]).reset_index(drop=True)
    )
    return manifest, excluded, duplicates


def _write_tables(
    out_dir: Path, manifest: pd.DataFrame, excluded: pd.DataFrame, duplicates: pd.DataFrame
) -> None:
    """Write ``manifest.csv``, ``excluded.csv`` and ``duplicates.csv`` (atomically) under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(manifest, out_dir / "manifest.csv")
    write_csv_atomic(excluded, out_dir / "excluded.csv")
    write_csv_atomic(duplicates, out_dir / "duplicates.csv")


def _build_counts(
    n_candidates: int,
    manifest: pd.DataFrame,
    excluded: pd.DataFrame,
    fetched: list[FetchResult],
    processed: list[ProcessResult],
    http_requests: int,
    stale: int,
) -> dict:
    """The ``counts`` section of ``build_info.json``."""
    fetch_status = pd.Series([f.status for f in fetched]).value_counts().to_dict()
    proc_status = pd.Series([p.status for p in processed], dtype=str).value_counts().to_dict()
    return {
        "candidates": n_candidates,
        "manifest": int(len(manifest)),
        "by_source_label": {
            f"{r.source_name}/{r.label}": {"images": int(r.images), "patients": int(r.patients)}
            for r in summary_counts(manifest).itertuples()
        },
        "split": manifest["split"].value_counts().sort_index().to_dict(),
        "excluded_by_reason": reason_category(excluded["reason"]).value_counts().sort_index().to_dict(),
        "fetch_status": fetch_status,
        "process_status": proc_status,
        "http_requests": http_requests,
        "stale_temp_removed": stale,
    }


def _build_info(
    base_obj: Base,
    sources: list[Source],
    settings: dict[str, int],
    counts: dict,
    timings: dict[str, float],
) -> dict:
    """Everything ``build_info.json`` records: base, commits, auxiliary files, ``settings`` (short_side,
    split_seed, workers), ``counts``, timings and the machine."""
    return {
        "base": str(base_obj.local) if base_obj.local is not None else base_obj.value,
        "commits": {s.name: {"repo": s.repo, "commit": s.commit} for s in sources},
        "auxiliary": sorted({f"{f.repo}@{f.commit}:{f.path}" for s in sources for f in s.auxiliary}),
        **settings,
        "counts": counts,
        "timings_s": timings,
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
    }


def _select_sources(names: Sequence[str] | None) -> list[Source]:
    """The registered sources named (all when ``names`` is None), in registry order; unknown names raise."""
    if names is None:
        return list(SOURCES.values())
    unknown = sorted(set(names) - set(SOURCES))
    if unknown or not names:
        raise ValueError(
            f"build_dataset: sources {unknown or names} not among the registered {list(SOURCES)}"
        )
    return [s for name, s in SOURCES.items() if name in set(names)]


def build_dataset(
    base: str | None = None,
    out_dir: Path = config.PROCESSED_DIR,
    raw_dir: Path = config.RAW_DIR,
    workers: int = 8,
    split_seed: int = 0,
    *,
    cache_dir: Path | None = None,
    short_side: int = TARGET_SHORT_SIDE,
    process_workers: int = 2,
    progress: bool = True,
    sources: Sequence[str] | None = None,
) -> BuildResult:
    """Build the dataset from ``base`` into ``out_dir`` (see the module docstring); ``base=None`` means
    ``$CXR_MIRROR``, else the base the previous build into ``out_dir`` used, else raw.githubusercontent.com.
    ``sources`` restricts the build to those registered sources (default: all, in registry order)."""
    watch = _Stopwatch()
    out_dir, raw_dir = Path(out_dir), Path(raw_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else out_dir.parent / "cache" / "dedup"
    selected = _select_sources(sources)
    base_obj = resolve_base(base if base is not None else default_base(out_dir))
    dl = Downloader(base_obj, raw_dir, workers=workers, progress=progress)
    first = selected[0].metadata_files()[0]
    dl.probe(f"{first.repo}/{first.commit}/{first.path}")
    stale = _remove_stale_temp(raw_dir) + _remove_stale_temp(out_dir)
    from cxrstudy.data.dedup import deduplicate  # imported after the fail-fast probe (heavier imports)
    from cxrstudy.data.splits import CV, HOLDOUT, HOLDOUT_FOLD, assign_folds

    watch.lap("probe")

    inputs = fetch_source_inputs(dl, selected)
    cands = all_candidates(inputs, selected)
    watch.lap("metadata_and_adapters")

    rows, excl_fetch, fetched = _fetch_images(dl, cands.rows)
    watch.lap("download")

    rows, excl_decode, processed = _preprocess_rows(rows, out_dir, short_side, process_workers, progress)
    watch.lap("preprocess")

    dd = deduplicate(rows, image_root=out_dir, cache_dir=cache_dir)
    kept = dd.kept.copy()
    watch.lap("dedup")
    kept["fold"] = assign_folds(kept, config.CV_FOLDS, seed=split_seed, holdout_sources=holdout_sources())
    kept["split"] = np.where(kept["fold"] == HOLDOUT_FOLD, HOLDOUT, CV)
    watch.lap("split")

    manifest, excluded, duplicates = _output_tables(kept, rows, dd, [cands.excluded, excl_fetch, excl_decode])
    _write_tables(out_dir, manifest, excluded, duplicates)
    watch.lap("write")
    watch.total()

    counts = _build_counts(
        int(len(cands.rows)), manifest, excluded, fetched, processed, dl.requests_made, stale
    )
    settings = {"short_side": short_side, "split_seed": split_seed, "workers": workers}
    info = _build_info(base_obj, selected, settings, counts, watch.timings)
    write_json(out_dir / "build_info.json", info)
    return BuildResult(manifest, excluded, duplicates, info, out_dir)


def counts_by_fold(manifest: pd.DataFrame) -> pd.DataFrame:
    """Images and patient groups per label x source x fold (long table; -1: held out)."""
    g = manifest.groupby(["label", "source_name", "fold"])
    return pd.DataFrame({"images": g.size(), "patients": g["patient_group"].nunique()}).reset_index()


def reason_category(reasons: pd.Series) -> pd.Series:
    """Short category of exclusion reasons: absent, lateral, label rule, duplicate, label conflict, ..."""
    cat = reasons.str.split(":").str[0]
    return cat.str.replace(r"^(duplicate|label conflict)\b.*", r"\1", regex=True)


def exclusion_summary(excluded: pd.DataFrame) -> pd.DataFrame:
    """Excluded rows per source and reason category (the text before the first colon)."""
    return pd.crosstab(excluded["source_name"], reason_category(excluded["reason"])).rename_axis(
        columns="reason"
    )


def dropped_copies(excluded: pd.DataFrame) -> pd.DataFrame:
    """Duplicates dropped: counts per (dropped copy's source, kept copy's source) from ``duplicate of`` reasons."""
    dup = excluded[excluded["reason"].str.startswith("duplicate of ")]
    names = {s.repo: s.name for s in SOURCES.values()} | {s.name: s.name for s in SOURCES.values()}
    kept = (
        dup["reason"].str.removeprefix("duplicate of ").str.split(":").str[0].map(lambda k: names.get(k, k))
    )
    out = pd.DataFrame({"dropped_from": dup["source_name"], "kept_from": kept})
    return out.value_counts().rename("images").reset_index()


def confounder_coverage(manifest: pd.DataFrame) -> pd.DataFrame:
    """Per source x label (registry order, then ``total`` per label): films, AP and PA counts, the shares of
    films with a known view, age and sex, the age median and quartiles, and the share F among known sexes."""
    age = pd.to_numeric(manifest["age"], errors="coerce")
    sex = manifest["sex"].fillna("").astype(str)
    m = pd.DataFrame({
        "source_name": manifest["source_name"].astype(str), "label": manifest["label"].astype(str),
        "AP": manifest["view"] == "AP", "PA": manifest["view"] == "PA", "age": age,
        "age_known": age.notna(), "sex_known": sex.isin(SEXES), "F": sex.eq("F").astype(float).where(sex.isin(SEXES)),
    })  # fmt: skip
    g = pd.concat([m, m.assign(source_name="total")], ignore_index=True).groupby(["source_name", "label"])
    table = g.agg(
        films=("label", "size"),
        AP=("AP", "sum"),
        PA=("PA", "sum"),
        age_known=("age_known", "mean"),
        age_median=("age", "median"),
        age_q1=("age", lambda a: a.quantile(0.25)),
        age_q3=("age", lambda a: a.quantile(0.75)),
        sex_known=("sex_known", "mean"),
        share_F=("F", "mean"),
    ).reset_index()
    table.insert(5, "view_known", (table["AP"] + table["PA"]) / table["films"])
    order = {name: i for i, name in enumerate([*SOURCES, "total"])}
    table = table.sort_values(
        ["source_name", "label"], key=lambda c: c.map(order) if c.name == "source_name" else c
    )
    return table.reset_index(drop=True)


def coverage_markdown(coverage: pd.DataFrame) -> str:
    """The :func:`confounder_coverage` table as the Markdown table of docs/DATA.md (shares in whole percent)."""

    def pct(x: float) -> str:
        return "–" if pd.isna(x) else f"{x:.0%}"

    def age(r: pd.Series) -> str:
        q = [round(float(x), 1) for x in (r.age_median, r.age_q1, r.age_q3)]
        return "–" if pd.isna(r.age_median) else f"{q[0]:g} ({q[1]:g}–{q[2]:g})"

    lines = [
        "| source | label | films | known view (AP / PA) | known age | age median (IQR) | known sex | F of known |",
        "|---|---|---:|---|---:|---|---:|---:|",
    ]
    for r in coverage.itertuples():
        lines.append(
            f"| {r.source_name} | {r.label} | {r.films} | {pct(r.view_known)} ({r.AP} / {r.PA}) "
            f"| {pct(r.age_known)} | {age(r)} | {pct(r.sex_known)} | {pct(r.share_F)} |"
        )
    return "\n".join(lines)


def label_shares(manifest: pd.DataFrame) -> pd.DataFrame:
    """Share of each label's images coming from each source (rows: label; columns: source_name)."""
    return pd.crosstab(manifest["label"], manifest["source_name"], normalize="index").round(3)


def duplicate_examples(
    duplicates: pd.DataFrame, image_root: Path, n: int = 6, seed: int = 0
) -> list[tuple[Path, Path, str]]:
    """Up to ``n`` random cross-source same-image pairs as (png a, png b, caption) for a figure."""

    def png(key: str) -> Path:
        src, path = key.split(":", 1)
        return Path(image_root) / processed_names([src], [path])[0]

    def short(key: str) -> str:
        return key.split(":", 1)[0] + ":" + key.rsplit("/", 1)[-1][:24]

    d = duplicates[duplicates["kind"] == "same_image"]
    d = d[d["a"].str.split(":").str[0] != d["b"].str.split(":").str[0]]
    d = d.sample(n=min(n, len(d)), random_state=seed)
    return [
        (png(r.a), png(r.b), f"{short(r.a)} ~ {short(r.b)}\n{r.method} {r.score:.2f}")
        for r in d.itertuples()
        if png(r.a).is_file() and png(r.b).is_file()
    ]


def format_summary(result: BuildResult) -> str:
    """Plain-text summary: images/patients per source x label, absent counts, split sizes and timings."""
    c = result.counts()
    cell = c.assign(cell=c["images"].astype(str) + " / " + c["patients"].astype(str))
    table = cell.pivot(index="source_name", columns="label", values="cell").fillna("0")
    table = table.reindex([*[n for n in SOURCES if n in table.index], "total"])
    absent = result.absent()
    lines = ["images / patient groups per source and label:", table.to_string(), ""]
    if len(absent):
        a = absent.assign(label=absent["label"].replace("", "?")).groupby(["source_name", "label"]).size()
        lines += ["absent upstream entries (rows of excluded.csv) per source and label:", a.to_string(), ""]
    reasons = result.info["counts"]["excluded_by_reason"]
    lines += [
        "excluded by reason: " + ", ".join(f"{k}={v}" for k, v in reasons.items()),
        "split sizes: " + ", ".join(f"{k}={v}" for k, v in result.info["counts"]["split"].items()),
        f"written to {result.out_dir} in {result.info['timings_s']['total']:.1f} s "
        + "("
        + ", ".join(f"{k} {v:.1f}" for k, v in result.info["timings_s"].items() if k != "total")
        + ")",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: build the dataset and print the summary."""
    p = argparse.ArgumentParser(prog="python -m cxrstudy.data.build", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--mirror",
        default=None,
        help="base path or URL (default: $CXR_MIRROR, else the previous build's base, else raw.githubusercontent.com)",
    )
    p.add_argument("--workers", type=int, default=8, help="parallel downloads (default 8)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=config.PROCESSED_DIR)
    p.add_argument("--raw-dir", type=Path, default=config.RAW_DIR)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    try:
        result = build_dataset(
            args.mirror,
            out_dir=args.out_dir,
            raw_dir=args.raw_dir,
            workers=args.workers,
            split_seed=args.split_seed,
            progress=not args.no_progress,
        )
    except MirrorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
