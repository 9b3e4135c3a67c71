"""External evaluation: every configuration of a profile (its fold models' ensemble) on images listed in a CSV
(``make evaluate``).

The CSV has columns ``path,label`` (optional ``patient_group``); paths are absolute or relative to the
CSV's folder; labels are the study's class names. Images go through the study's preprocessing: the
one decoder (``load_xray``), the data step's shrink to a shorter side of 256 px, then each run's
``model_transform``. Unreadable images are listed in ``unreadable.csv`` and skipped; an unknown label
is an error naming the row; rows whose label is not among a model's classes (pneumonia for a
COVID-vs-normal model) are left out of that model's metrics and counted. Without a
``patient_group`` column every image is its own group (image-level bootstrap).

By default each configuration's fold models predict as one ensemble (mean class probability,
``inference.ensemble_frame``), one block per configuration; ``single_runs`` (``--single-runs``) evaluates
every fold model on its own instead. Every film gets the lung QC of ``inference.decode_for_models`` (the
profile's lung model when it has one; else only the image-level rules).

Writes ``reports/<profile>/external/<csv stem>/``: ``results.json`` (``runs``: one entry per block, in the
shape of the study's entries, metrics under ``test``, ``run_id`` the configuration id for an ensemble, plus
``config_id``, ``n_models`` and the member ``run_ids``; ``unit``: ``configuration`` or ``run``; ``qc``: the
films that failed the lung QC), ``unreadable.csv``, and per block ``<id>/predictions.csv`` (with ``n_models``
and ``qc`` columns) and figures (confusion matrix, ROC/PR curves, reliability diagram).
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from cxrstudy import config
from cxrstudy.data.manifest import load_manifest
from cxrstudy.evaluation.metrics import evaluate_predictions, reliability_curve
from cxrstudy.fileio import atomic_write_text, write_json
from cxrstudy.inference import (
    InputKey,
    Models,
    configurations,
    decode_for_models,
    ensemble_frame,
    needs_lungs,
    qc_problems,
    run_dirs,
    single_runs,
)
from cxrstudy.reporting.results import run_entry
from cxrstudy.runspec import RunSpec


def read_labels_csv(csv_path: Path | str) -> pd.DataFrame:
    """The CSV's rows with absolute ``path``, ``label``, ``patient_group`` and ``row`` (1-based data row).

    Raises ValueError for missing columns, an empty file, a blank path or a label outside ``CLASSES``.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"labels CSV {csv_path} does not exist")
    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True)
    df.columns = [c.strip().lower() for c in df.columns]
    missing = [c for c in ("path", "label") if c not in df.columns]
    if missing:
        raise ValueError(f"{csv_path}: missing column(s) {missing}; expected a header 'path,label'")
    if len(df) == 0:
        raise ValueError(f"{csv_path}: no rows")
    df["row"] = range(1, len(df) + 1)
    for col in ("path", "label"):
        df[col] = df[col].str.strip()
    for _, r in df.iterrows():
        if not r["path"]:
            raise ValueError(f"{csv_path}: row {r['row']} (line {r['row'] + 1}) has an empty path")
        if r["label"] not in config.CLASSES:
            raise ValueError(
                f"{csv_path}: row {r['row']} (line {r['row'] + 1}) has unknown label {r['label']!r}; "
                f"expected one of {list(config.CLASSES)}"
            )
    base = csv_path.resolve().parent
    df["path"] = [str(p if Path(p).is_absolute() else (base / p)) for p in df["path"]]
    if "patient_group" not in df.columns or (df["patient_group"] == "").any():
        given = df["patient_group"] if "patient_group" in df.columns else pd.Series([""] * len(df))
        df["patient_group"] = [g if g else f"image:{p}" for g, p in zip(given, df["path"], strict=True)]
    return df[["row", "path", "label", "patient_group"]]


def decode_images(
    rows: pd.DataFrame, keys: set[InputKey], lungs_dir: Path | None = None, device: str = "cpu"
) -> tuple[pd.DataFrame, dict, pd.DataFrame, bool]:
    """Decode each row once (study preprocessing, input views, lung QC); returns (readable rows with their ``qc``,
    {key: model-size L images aligned with readable rows}, unreadable rows with reason, whether a lung model
    checked the films)."""
    dec = decode_for_models(list(rows["path"]), keys, lungs_dir, device)
    unreadable = pd.DataFrame(
        [{**rows.iloc[i][["row", "path", "label"]].to_dict(), "reason": reason} for i, reason in dec.bad],
        columns=["row", "path", "label", "reason"],
    )
    return rows.iloc[dec.ok].reset_index(drop=True).assign(qc=dec.qc), dec.inputs, unreadable, dec.lungs_checked


def _figures(out: Path, preds: pd.DataFrame, classes: list[str], metrics: dict, title: str) -> None:
    """Confusion matrix, ROC/PR curves and reliability diagram of one run."""
    from cxrstudy import plots
    from cxrstudy.evaluation import figures
    from cxrstudy.evaluation.metrics import probs_from_frame

    plots.save_figure(
        plots.plot_confusion(metrics["confusion_matrix"], classes, title).figure, out / "confusion.png", close=True
    )
    probs = probs_from_frame(preds, classes)
    plots.save_figure(
        figures.plot_roc_pr(preds["label"].to_numpy(), probs, classes, title), out / "roc_pr.png", close=True
    )
    curve = reliability_curve(preds["label"], probs, classes)
    plots.save_figure(
        figures.plot_reliability(curve, metrics["ece"], title).figure, out / "reliability.png", close=True
    )


def _evaluate_block(
    block: Models, ensemble: bool, readable: pd.DataFrame, resized: dict, csv_path: Path, out: Path,
    opts: dict[str, Any],
) -> dict:
    """One configuration's ensemble (or one run) on the readable rows of its classes: predictions, metrics,
    figures; its results entry (``run_id``: the block's id)."""
    first = block.infos[0]
    info = {**first, "run_id": block.id, "fold": None} if ensemble else {**first, "run_id": block.id}
    classes = list(info["classes"])
    keep = readable["label"].isin(classes).to_numpy()
    extra = {"config_id": RunSpec.from_record(first).config_id, "n_models": block.n_models, "run_ids": block.run_ids,
             "n_evaluated": int(keep.sum()), "left_out_labels": readable.loc[~keep, "label"].value_counts().to_dict()}
    if not keep.any():
        return run_entry(info, {}, **extra, note="no image with a label of this model's classes")
    sel = readable[keep].reset_index(drop=True)
    meta = pd.DataFrame({"image": sel["path"], "row": sel["row"], "split": "test", "label": sel["label"],
                         "source": csv_path.name, "patient_group": sel["patient_group"], "qc": sel["qc"]})
    images = [im for im, k in zip(resized[block.key], keep, strict=True) if k]
    preds = ensemble_frame(block.load(), block.infos, images, meta, opts["device"], opts["batch_size"])
    metrics = evaluate_predictions(preds, classes, opts["n_bootstrap"], opts["seed"], where=str(csv_path))
    atomic_write_text(out / block.id / "predictions.csv", preds.to_csv(index=False))
    if opts["figures"]:
        _figures(out / block.id, preds, classes, metrics, f"{block.id} on {csv_path.name}")
    return run_entry(info, metrics, **extra)


def _dataset_block(rows: pd.DataFrame, readable: pd.DataFrame, unreadable: pd.DataFrame) -> dict:
    """Counts of the CSV's rows for results.json."""
    image_level = rows["patient_group"].str.startswith("image:").all()
    return {
        "n_rows": int(len(rows)),
        "n_readable": int(len(readable)),
        "n_unreadable": int(len(unreadable)),
        "by_label": rows["label"].value_counts().to_dict(),
        "bootstrap_unit": "image" if image_level else "patient_group",
    }


def check_overlap(rows: pd.DataFrame, processed_dir: Path) -> dict:
    """Exact and near copies of the study's own images among the CSV's files (``overlap`` block)."""
    from cxrstudy.evaluation.overlap import find_overlaps

    manifest_path = Path(processed_dir) / "manifest.csv"
    if not manifest_path.is_file():
        return {"exact": None, "near": None, "images": [], "note": f"no study manifest at {manifest_path}"}
    manifest = load_manifest(manifest_path)
    found = find_overlaps(list(rows["path"]), manifest, Path(processed_dir))
    return {"exact": int(found["exact"]), "near": int(found["near"]), "images": found["images"],
            "same_patient": found.get("same_patient", [])}


def evaluate_external(
    csv_path: Path | str,
    profile: str = "default",
    out_dir: Path | str | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 32,
    profile_dir: Path | str | None = None,
    figures: bool = True,
    drop_overlap: bool = False,
    processed_dir: Path | str | None = None,
    single: bool = False,
) -> dict:
    """Evaluate every configuration of ``profile`` (its fold models' ensemble; ``single``: every saved run on its
    own) on the CSV's images; write and return the results dict.

    The CSV's files are first compared with the study's images (``overlap``); ``drop_overlap`` leaves the
    exact and near copies out of the evaluation."""
    csv_path = Path(csv_path)
    rows = read_labels_csv(csv_path)
    pdir = Path(profile_dir) if profile_dir is not None else config.profile_dir(profile)
    runs = run_dirs(pdir)
    if not runs:
        raise FileNotFoundError(
            f"no saved runs under {pdir / 'runs'}: run `make reproduce PROFILE={pdir.name}` first"
        )
    out = Path(out_dir) if out_dir is not None else pdir / "external" / csv_path.stem
    overlap = check_overlap(rows, Path(processed_dir or config.PROCESSED_DIR))
    if drop_overlap and overlap["images"]:
        rows = rows[~rows["path"].isin({i["path"] for i in overlap["images"]})].reset_index(drop=True)
        overlap["dropped"] = True
    blocks = single_runs(runs) if single else configurations(runs)
    keys = {b.key for b in blocks.values()}
    lungs = pdir / "lungs" if needs_lungs(keys) or (pdir / "lungs" / "model.json").is_file() else None
    readable, resized, unreadable, checked = decode_images(rows, keys, lungs, device)
    atomic_write_text(out / "unreadable.csv", unreadable.to_csv(index=False))
    flagged = readable.loc[readable["qc"].map(lambda q: bool(qc_problems(q))).astype(bool)]
    opts = {"device": device, "batch_size": batch_size, "n_bootstrap": n_bootstrap, "seed": seed, "figures": figures}
    results = {
        "schema_version": 1,
        "profile": pdir.name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "evaluated_on": str(csv_path.resolve()),
        "params": {"n_bootstrap": n_bootstrap, "seed": seed},
        "dataset": _dataset_block(rows, readable, unreadable),
        "unreadable": unreadable.to_dict(orient="records"),
        "overlap": overlap,
        "qc": {"lung_model": checked, "n_flagged": int(len(flagged)),
               "flagged": flagged[["row", "path", "qc"]].to_dict(orient="records")},
        "unit": "run" if single else "configuration",
        "runs": [_evaluate_block(b, not single, readable, resized, csv_path, out, opts) for b in blocks.values()],
    }
    write_json(out / "results.json", results)
    return results


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m cxrstudy.evaluation.external --csv labels.csv [--profile default]``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", required=True, type=Path, help="CSV with columns path,label[,patient_group]")
    ap.add_argument("--profile", default="default", help="profile whose saved runs are evaluated")
    ap.add_argument(
        "--out", type=Path, default=None, help="output folder (default reports/<profile>/external/<csv stem>)"
    )
    ap.add_argument("--n-bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--drop-overlap", action="store_true", help="leave out files that copy the study's images")
    ap.add_argument(
        "--single-runs", action="store_true", help="evaluate every fold model on its own, not each configuration's ensemble"
    )
    args = ap.parse_args(argv)
    from cxrstudy.runlock import RunLocked, profile_lock

    try:
        if not config.profile_dir(args.profile).is_dir():  # the lock would create it: say what is missing instead
            raise FileNotFoundError(f"no saved runs of profile {args.profile!r}: {config.profile_dir(args.profile)} "
                                    "does not exist (run `make reproduce PROFILE=...` first)")
        with profile_lock(config.profile_dir(args.profile), f"evaluate --csv {args.csv}"):
            res = evaluate_external(
                args.csv, args.profile, args.out, args.n_bootstrap, args.seed, args.device, args.batch_size,
                drop_overlap=args.drop_overlap, single=args.single_runs,
            )
    except (ValueError, FileNotFoundError, RunLocked) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else config.profile_dir(args.profile) / "external" / args.csv.stem
    ds, ov = res["dataset"], res["overlap"]
    if ov.get("exact") is not None:
        action = "left out (--drop-overlap)" if ov.get("dropped") else "kept; --drop-overlap leaves them out"
        print(f"overlap with the study's images: {ov['exact']} exact, {ov['near']} near copies ({action})")
    print(
        f"{ds['n_readable']} of {ds['n_rows']} images readable ({ds['n_unreadable']} listed in {out / 'unreadable.csv'})"
    )
    qc = res["qc"]
    for f in qc["flagged"]:
        print(f"warning: row {f['row']}: {f['path']} is not a film the models can judge (lung QC: {f['qc']})")
    if not qc["lung_model"]:
        print("warning: the profile has no lung model: only the image-level checks ran")
    for r in res["runs"]:
        acc = (r["test"].get("accuracy") or {}).get("value")
        shown = "n/a" if acc is None else f"{100 * acc:.1f}%"
        models = f" ({r['n_models']} models)" if r["n_models"] > 1 else ""
        print(
            f"{r['run_id']}{models}: accuracy {shown} on {r['n_evaluated']} images; left out {r['left_out_labels']}"
        )
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    config.reexec_with_runtime_env()
    raise SystemExit(main())
