"""results.json ``shortcut_checks`` assembled from the separate checks (source identification, masking,
leave-one-source-out, same hospital) and the saliency sample's in-lung share with its intervals.
"""

from __future__ import annotations

import pandas as pd

from cxrstudy.lungs.region import rectangle_region
from cxrstudy.stats import stratified_mean_ci


def _saliency_stats(used: pd.DataFrame, n_bootstrap: int, seed: int) -> dict:
    """In-lung share, uniform reference and their difference over the sampled images, with intervals."""
    area = rectangle_region()["area_share"]
    uniform = (
        used["uniform_share"].fillna(area)
        if "uniform_share" in used.columns
        else used["lung_share"] * 0 + area
    )
    strata = (used["label"].astype(str) + "/" + used["outcome"].astype(str)).to_numpy()
    share, uni, excess = stratified_mean_ci(
        [used["lung_share"], uniform, used["lung_share"] - uniform], strata, n_bootstrap, seed
    )
    return {
        "in_lung_share": share,
        "uniform_reference": uni,
        "excess_over_uniform": excess,
        "per_stratum": pd.Series(strata).value_counts().sort_index().to_dict(),
        "bootstrap": {
            "unit": "image",
            "strata": "true class x outcome",
            "n_requested": n_bootstrap,
            "seed": seed,
        },
    }


def _saliency_summary(saliency: pd.DataFrame, saliency_run: str | None, n_bootstrap: int, seed: int) -> dict:
    """``saliency_in_lung_share``, ``saliency_uniform_reference`` and ``saliency`` of shortcut_checks."""
    all_rows = saliency
    if saliency_run is not None and "run_id" in saliency.columns:
        saliency = saliency[saliency["run_id"] == saliency_run]
    used = saliency.dropna(subset=["lung_share"])
    stats = _saliency_stats(used, n_bootstrap, seed)

    def first(col: str) -> int | None:
        """Smallest value of a per-image integer column (None when absent)."""
        return int(saliency[col].min()) if col in saliency.columns and len(saliency) else None

    return {
        "saliency_in_lung_share": stats["in_lung_share"]["value"],
        "saliency_uniform_reference": stats["uniform_reference"]["value"],
        "saliency": {
            "run_id": saliency_run,
            "n_images": int(len(saliency)),
            "n_used": int(len(used)),
            "cam_grid": first("cam_grid"),
            "image_size": first("image_size"),
            "sample": "seeded random sample of test images stratified by true class and outcome "
            "(correct / wrong); the mean is over the sample, not weighted to the test split",
            "regions": saliency["region"].value_counts().to_dict() if "region" in saliency.columns else {},
            **stats,
            "by_run": (
                all_rows.groupby("run_id")["lung_share"].mean().to_dict()
                if "run_id" in all_rows.columns
                else {}
            ),
            "by_outcome": used.groupby("outcome")["lung_share"].mean().to_dict(),
            "by_label": used.groupby("label")["lung_share"].mean().to_dict(),
        },
    }


def assemble_shortcut_checks(
    source_identification: dict | None = None,
    masking: dict | None = None,
    leave_one_source_out: list | None = None,
    same_hospital: dict | None = None,
    saliency: pd.DataFrame | None = None,
    saliency_run: str | None = None,
    *,
    lung_region: dict | None = None,
    source_id_within_label: list | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    input_view: str = "full",
    equalize: bool = False,
    mask_shape: dict | None = None,
) -> dict:
    """results.json ``shortcut_checks`` from the separate checks (any of them may be missing).
    ``saliency``: ``saliency_for_runs`` table; the in-lung share is over ``saliency_run``'s images when given.
    ``lung_region``: ``shortcuts.lung_region_info`` of the masks used (None: the fixed rectangle);
    ``input_view`` / ``equalize``: the films of the checks other than masking (notebook 05's parameters);
    ``mask_shape``: ``confounders.mask_shape_check``."""
    detail = lung_region or {"kind": "fixed rectangle", "rectangle": rectangle_region()}
    out: dict = {
        "lung_region": detail["kind"],
        "lung_region_detail": detail,
        "level": "linear heads on frozen features (shallow)",
        "input_view": input_view,
        "equalize": bool(equalize),
    }
    if mask_shape is not None:
        out["mask_shape"] = mask_shape
    if source_identification is not None:
        out["source_identification_accuracy"] = source_identification.get("accuracy")
        out["source_identification"] = source_identification
    if source_id_within_label is not None:
        out["source_id_within_label"] = source_id_within_label
    if masking is not None:
        out["unmasked"] = masking.get("unmasked")
        out["masked_lungs"] = masking.get("masked_lungs")
        out["lungs_only"] = masking.get("lungs_only")
    if leave_one_source_out is not None:
        out["leave_one_source_out"] = leave_one_source_out
    if same_hospital is not None:
        out["same_hospital"] = same_hospital
    if saliency is not None and len(saliency):
        out.update(_saliency_summary(saliency, saliency_run, n_bootstrap, seed))
    return out
