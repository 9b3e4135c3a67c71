"""External evaluation: every saved model of a profile on images listed in a CSV (``make evaluate``).

The CSV has columns ``path,label`` (optional ``patient_group``); paths are absolute or relative to the
CSV's folder; labels are the study's class names. Images go through the study's preprocessing: the
one decoder (``load_xray``), the data step's shrink to a shorter side of 256 px, then each run's
``model_transform``. Unreadable images are listed in ``unreadable.csv`` and skipped; an unknown label
is an error naming the row; rows whose label is not among a model's classes (pneumonia for a
COVID-vs-normal model) are left out of that model's metrics and counted. Without a
``patient_group`` column every image is its own group (image-level bootstrap).

Writes ``reports/<profile>/external/<csv stem>/``: ``results.json`` (same ``runs`` shape as the
study's, metrics under ``test``), ``unreadable.csv``, and per run ``<run_id>/predictions.csv`` and
figures (confusion matrix, ROC/PR curves, reliability diagram).
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from PIL import Image

from cxrstudy import config
from cxrstudy.evaluation.metrics import evaluate_predictions, reliability_curve
from cxrstudy.evaluation.report import load_runs, run_entry
from cxrstudy.fileio import write_json


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


def decode_images(rows: pd.DataFrame, keys: set[tuple[int, str]]) -> tuple[pd.DataFrame, dict, pd.DataFrame]:
    """Decode each row once (study preprocessing) and keep, per (image_size, interpolation), the model-size image.

    Returns (readable rows, {key: [PIL L images aligned with readable rows]}, unreadable rows with reason).
    Pre-resizing with the model's own ``resize_to_uint8`` makes ``model_transform`` a no-op resize later,
    so the input is identical to resizing inside it.
    """
    from cxrstudy.data.preprocess import TARGET_SHORT_SIDE
    from cxrstudy.images import ImageDecodeError, load_xray, resize_short_side
    from cxrstudy.models import resize_to_uint8

    ok, bad = [], []
    resized: dict[tuple[int, str], list[Image.Image]] = {k: [] for k in keys}
    for i, r in rows.iterrows():
        try:
            img = resize_short_side(load_xray(r["path"]), TARGET_SHORT_SIDE)
        except ImageDecodeError as exc:
            bad.append({"row": r["row"], "path": r["path"], "label": r["label"], "reason": exc.reason})
            continue
        ok.append(i)
        for size, interp in keys:
            arr = resize_to_uint8(img, size, interp)[0].numpy()
            resized[(size, interp)].append(Image.fromarray(arr, mode="L"))
    unreadable = pd.DataFrame(bad, columns=["row", "path", "label", "reason"])
    return rows.loc[ok].reset_index(drop=True), resized, unreadable


def _figures(out: Path, preds: pd.DataFrame, classes: list[str], metrics: dict, title: str) -> None:
    """Confusion matrix, ROC/PR curves and reliability diagram of one run."""
    from cxrstudy import plots
    from cxrstudy.evaluation.metrics import probs_from_frame

    plots.save_figure(
        plots.plot_confusion(metrics["confusion_matrix"], classes, title), out / "confusion.png", close=True
    )
    probs = probs_from_frame(preds, classes)
    plots.save_figure(
        plots.plot_roc_pr(preds["label"].to_numpy(), probs, classes, title), out / "roc_pr.png", close=True
    )
    curve = reliability_curve(preds["label"], probs, classes)
    plots.save_figure(
        plots.plot_reliability(curve, metrics["ece"], title), out / "reliability.png", close=True
    )


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
) -> dict:
    """Evaluate every saved run of ``profile`` on the CSV's images; write and return the results dict."""
    from cxrstudy.models import get_spec
    from cxrstudy.training import load_run_model, predict_images

    csv_path = Path(csv_path)
    rows = read_labels_csv(csv_path)
    pdir = Path(profile_dir) if profile_dir is not None else config.profile_dir(profile)
    runs = load_runs(pdir)
    if not runs:
        raise FileNotFoundError(
            f"no saved runs under {pdir / 'runs'}: run `make reproduce PROFILE={pdir.name}` first"
        )
    out = Path(out_dir) if out_dir is not None else pdir / "external" / csv_path.stem
    keys = {(int(r["info"]["image_size"]), get_spec(r["info"]["backbone"]).interpolation) for r in runs}
    readable, resized, unreadable = decode_images(rows, keys)
    unreadable_path = out / "unreadable.csv"
    out.mkdir(parents=True, exist_ok=True)
    from cxrstudy.fileio import atomic_write_text

    atomic_write_text(unreadable_path, unreadable.to_csv(index=False))
    entries = []
    for run in runs:
        info = run["info"]
        classes = list(info["classes"])
        key = (int(info["image_size"]), get_spec(info["backbone"]).interpolation)
        keep = readable["label"].isin(classes).to_numpy()
        left_out = readable.loc[~keep, "label"].value_counts().to_dict()
        run_id = info.get("run_id") or run["dir"].name
        sel = readable[keep].reset_index(drop=True)
        entry_extra = {"n_evaluated": int(keep.sum()), "left_out_labels": left_out}
        if len(sel) == 0:
            entries.append(
                run_entry(info, {}, **entry_extra, note="no image with a label of this model's classes")
            )
            continue
        model, _ = load_run_model(run["dir"])
        images = [im for im, k in zip(resized[key], keep, strict=True) if k]
        probs, sub = predict_images(model, images, info, device=device, batch_size=batch_size)
        preds = pd.DataFrame(
            {
                "image": sel["path"],
                "row": sel["row"],
                "split": "test",
                "label": sel["label"],
                "source": csv_path.name,
                "patient_group": sel["patient_group"],
            }
        )
        for j, c in enumerate(classes):
            preds[f"prob_{c}"] = probs[:, j]
        preds["pred"] = [classes[j] for j in probs.argmax(axis=1)]
        subclasses = list(info.get("subclasses") or classes)
        if info.get("decomposition") and subclasses != classes:
            from cxrstudy.decomposition import compose_hard

            for j, s in enumerate(subclasses):
                preds[f"prob_sub_{s}"] = sub[:, j]
            preds["pred_hard"] = [classes[j] for j in compose_hard(sub, subclasses, classes)]
        metrics = evaluate_predictions(preds, classes, n_bootstrap, seed, where=str(csv_path))
        atomic_write_text(out / run_id / "predictions.csv", preds.to_csv(index=False))
        if figures:
            _figures(out / run_id, preds, classes, metrics, f"{run_id} on {csv_path.name}")
        entries.append(run_entry(info, metrics, **entry_extra))
    results = {
        "schema_version": 1,
        "profile": pdir.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017 (py3.10)
        "evaluated_on": str(csv_path.resolve()),
        "params": {"n_bootstrap": n_bootstrap, "seed": seed},
        "dataset": {
            "n_rows": int(len(rows)),
            "n_readable": int(len(readable)),
            "n_unreadable": int(len(unreadable)),
            "by_label": rows["label"].value_counts().to_dict(),
            "bootstrap_unit": "patient_group"
            if not rows["patient_group"].str.startswith("image:").all()
            else "image",
        },
        "unreadable": unreadable.to_dict(orient="records"),
        "runs": entries,
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
    args = ap.parse_args(argv)
    try:
        res = evaluate_external(
            args.csv, args.profile, args.out, args.n_bootstrap, args.seed, args.device, args.batch_size
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else config.profile_dir(args.profile) / "external" / args.csv.stem
    ds = res["dataset"]
    print(
        f"{ds['n_readable']} of {ds['n_rows']} images readable ({ds['n_unreadable']} listed in {out / 'unreadable.csv'})"
    )
    for r in res["runs"]:
        acc = (r["test"].get("accuracy") or {}).get("value")
        shown = "n/a" if acc is None else f"{100 * acc:.1f}%"
        print(
            f"{r['run_id']}: accuracy {shown} on {r['n_evaluated']} images; left out {r['left_out_labels']}"
        )
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
