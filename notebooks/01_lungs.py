# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     notebook_metadata_filter: kernelspec,-jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python (cxrstudy)
#     language: python
#     name: cxrstudy
# ---

# %% [markdown]
# # 01 · Lungs: an offline lung segmentation, its test Dice, and a QC'd mask and lung box for every film
#
# The V7 Labs lung masks (CC BY 4.0) shipped inside `torchxrayvision` are paired with the manifest's ieee8023 films by file name. A small U-Net (EfficientNet-Lite0 encoder with its offline ImageNet weights, a light decoder) is trained on the masks of **training-split** patient groups only, its epoch chosen on validation-split masks, and scored once on test-split masks (Dice and IoU at the processed images' resolution, 95% patient-group bootstrap intervals). It then segments every film; post-processing keeps the two largest components and fills holes; a QC with stated thresholds flags implausible masks, which fall back to the whole image. Outputs: `reports/<profile>/lungs/` (`summary.json`, `lungs.csv`, `model.pth`, figures) and the masks in the cache `data/cache/lungs/<key>/`. Later steps read them with `cxrstudy.lungs.masks_for` / `lung_table` and build input views with `apply_view`.

# %% tags=["parameters"]
profile = "smoke"  # reports go to reports/<profile>/
seed = 0  # seeds the mask subset, the initialisation, the batches and the augmentation
device = "auto"  # auto: CUDA if present, else cpu; or cpu, cuda, cuda:N
max_per_class = 0  # films segmented: the same per split and label subsample as the other steps; 0 keeps all
lung_image_size = 128  # U-Net input, squish-resized (a multiple of 32)
lung_epochs = 32
lung_batch_size = 8
lung_lr = 2e-3  # AdamW one-cycle peak learning rate
lung_hflip = 0.0  # probability of a horizontal flip in augmentation (0: anatomy kept as filmed)
max_masks = 0  # paired masks used for training/validation/test; 0 keeps all
threads = 1  # torch CPU threads; 1 is fast and deterministic on a shared CPU, 0 uses every core
n_bootstrap = 1000  # patient-group bootstrap replicates for the test Dice / IoU intervals
overlays_per_source = 8  # films per source in the overlay grid

# %%

import pandas as pd
from IPython.display import display

from cxrstudy import config
from cxrstudy.data.manifest import load_manifest
from cxrstudy.data.splits import subsample
from cxrstudy.lungs import QC_THRESHOLDS, LungTrainConfig, qc_by_source, run_lungs
from cxrstudy.lungs.plots import pick_examples, plot_overlays, plot_training_curve
from cxrstudy.plots import save_figure

out = config.profile_dir(profile) / "lungs"
out.mkdir(parents=True, exist_ok=True)
config.seed_everything(seed)
manifest = load_manifest()
films = subsample(manifest, max_per_class, seed)
cfg = LungTrainConfig(
    image_size=lung_image_size,
    epochs=lung_epochs,
    batch_size=lung_batch_size,
    lr=lung_lr,
    hflip=lung_hflip,
    seed=seed,
)
run = run_lungs(
    manifest,
    cfg,
    segment=films,
    max_masks=max_masks,
    device=device,
    threads=threads,
    n_bootstrap=n_bootstrap,
    profile=profile,
)
summary = run.summary
print(f"cache entry {run.folder} ({'read from the cache' if run.cache_hit else 'computed now'})")

# %% [markdown]
# ## Pairing: which films have a reference mask

# %%
pairing = summary["pairing"]
display(pd.Series({k: v for k, v in pairing.items() if not isinstance(v, dict)}, name="count").to_frame())
display(
    pd.crosstab(run.pairs["split"], "masks").assign(
        patient_groups=run.pairs.groupby("split")["patient_group"].nunique()
    )
)

# %% [markdown]
# ## Training curve and test Dice / IoU

# %%
fig_curve = plot_training_curve(run.history, summary["best_epoch"]).figure
save_figure(fig_curve, out / "training_curve.png")
scores = pd.DataFrame(
    {
        "dice (post-processed)": summary["dice"],
        "iou (post-processed)": summary["iou"],
        **{k: {c: v[c] for c in ("value", "ci_low", "ci_high")} for k, v in summary["test_other"].items()},
    }
).T.round(4)
display(scores)
print(
    f"{summary['n_test_masks']} test masks from {summary['n_test_groups']} patient groups; "
    f"trained on {summary['n_train_masks']} masks, epoch {summary['best_epoch']} of {summary['epochs_run']} "
    f"chosen on {summary['n_val_masks']} validation masks; training {summary['train_seconds']:.0f} s on "
    f"{summary['threads']} thread(s) ({summary['device']}); mean lung area true "
    f"{summary['test_mean_area']['true']:.3f}, predicted {summary['test_mean_area']['predicted']:.3f}"
)

# %% [markdown]
# ## Test films: predicted outline (red) against the V7 mask (cyan), worst first

# %%
test_rows = (
    run.table[run.table["image"].isin(run.test_scores["image"])]
    .merge(run.test_scores[["image", "dice"]], on="image")
    .sort_values("dice")
)
test_rows["source_name"] = "dice " + test_rows["dice"].round(3).astype(str)
shown = test_rows.head(12)
fig_test = plot_overlays(
    shown,
    run.masks(shown["image"].tolist()),
    config.PROCESSED_DIR,
    truth=run.reference_masks(shown["image"].tolist()),
)
save_figure(fig_test, out / "test_overlays.png")

# %% [markdown]
# ## QC of every film, per source
#
# Thresholds (a film fails when any rule fails; a failure falls back to the whole image):

# %%
display(pd.Series(QC_THRESHOLDS, name="threshold").to_frame())
qc = qc_by_source(run.table, films)
display(qc.round(3))
flags = run.table["qc_flags"].str.split(";").explode()
display(flags[flags != ""].value_counts().rename("films").to_frame())
display(
    run.table.merge(films[["image", "source_name"]], on="image")
    .groupby("source_name")[
        ["area_fraction", "lr_balance", "n_components", "confident_fraction", "shape_score"]
    ]
    .median()
    .round(3)
)

# %% [markdown]
# ## Overlays per source (mask outline red, lung box yellow; NIH films have no reference mask)

# %%
examples = pick_examples(run.table, films, overlays_per_source, seed)
fig_over = plot_overlays(
    examples, run.masks(examples["image"].tolist()), config.PROCESSED_DIR, ncols=overlays_per_source
)
save_figure(fig_over, out / "overlays.png")

# %% [markdown]
# ## Films that failed QC (dashed box: the fallback, the whole image)

# %%
failed = run.table[~run.table["qc_pass"]].merge(films[["image", "source_name"]], on="image")
failed = failed.assign(
    source_name=failed["source_name"]
    + "\n"
    + failed["qc_flags"].str.replace(";fallback", "").str.replace(";", "\n")
)
print(f"{len(failed)} of {len(run.table)} films failed QC")
if len(failed):
    fig_fail = plot_overlays(
        failed.head(18), run.masks(failed.head(18)["image"].tolist()), config.PROCESSED_DIR
    )
    save_figure(fig_fail, out / "qc_failures.png")

# %% [markdown]
# ## Conclusion
#
# The Dice and IoU above are measured on test-split films whose patient groups never entered training or checkpoint selection, at the processed images' own resolution, with intervals over patient groups; the reference masks exist only for ieee8023 films (mostly COVID-19 and other pneumonia cases, many cropped from papers), so the test score says how well the lungs are found on that kind of film. For the other sources, and NIH above all, the evidence is the overlay grid and the per-source QC rate: a film whose mask is implausible (area, balance between the lungs, box size, side-by-side lungs, confidence) is flagged and gets the whole image as its lung field, so downstream lung views never see an empty or wrong crop silently. The masks and boxes are cached under `data/cache/lungs/<key>/`; `masks_for`, `lung_table` and `apply_view` give them to the feature, training and evaluation steps.
