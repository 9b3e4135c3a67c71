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
# # 00 · Data: sources, download, decoding, de-duplication, folds
#
# Builds (or, when warm, re-verifies) the dataset with `cxrstudy.data.build.build_dataset`: fetches the six pinned upstream repositories (plus the NIH table) from `CXR_MIRROR`, applies each source's label / view / patient rules, decodes every image to 8-bit grayscale PNG, removes duplicates, links patients across sources and assigns every film outside the held-out hospital (Actualmed, `split` = `holdout`, `fold` = -1) to one of five patient-grouped cross-validation folds, stratified by source × label (`StratifiedGroupKFold`; profiles may ask for another number of folds, computed the same way). Outputs: `data/processed/manifest.csv`, `excluded.csv`, `duplicates.csv`, `build_info.json`. This notebook then tells the data story: what we have, what is missing and why, and what can go wrong.

# %% tags=["parameters"]
profile = "smoke"  # reports go to reports/<profile>/data/
seed = 0  # seeds the sample-image draw
split_seed = 0  # seed of the patient-grouped cross-validation folds the manifest records
workers = 8  # parallel downloads
mirror = ""  # base path or URL of the upstream files; empty: $CXR_MIRROR, else raw.githubusercontent.com

# %%
import pandas as pd
from IPython.display import display

from cxrstudy import config
from cxrstudy.data.build import (
    build_dataset,
    counts_by_fold,
    dropped_copies,
    duplicate_examples,
    exclusion_summary,
    format_summary,
    label_shares,
)
from cxrstudy.data.plots import plot_counts_by_source, plot_image_pairs, plot_sample_grid
from cxrstudy.plots import save_figure

config.seed_everything(seed)
out = config.profile_dir(profile) / "data"
out.mkdir(parents=True, exist_ok=True)
result = build_dataset(mirror or None, workers=workers, split_seed=split_seed, progress=False)
manifest, excluded, duplicates = result.manifest, result.excluded, result.duplicates
print(format_summary(result))

# %% [markdown]
# ## What we have: images and patients per label × source × fold
#
# Cells are images / distinct patient groups; fold -1 is the held-out hospital. A patient group merges IDs that belong to one person (same image in two sources, follow-up films, shared case URLs); folds never share a group.

# %%
c = counts_by_fold(manifest)
c["cell"] = c["images"].astype(str) + " / " + c["patients"].astype(str)
table = c.pivot(index=["label", "source_name"], columns="fold", values="cell").fillna("0")
c.to_csv(out / "counts_by_fold.csv", index=False)
display(table)
display(result.counts().pivot(index='source_name', columns='label', values='images').fillna(0).astype(int))
fig = plot_counts_by_source(manifest, title='images per source and label')
save_figure(fig, out / "counts_by_source.png")

# %% [markdown]
# ## Views
#
# Laterals are excluded by the adapters; `unknown` means the source does not say.

# %%
display(pd.crosstab(manifest["label"], manifest["view"], margins=True))
display(pd.crosstab([manifest["label"], manifest["source_name"]], manifest["view"]))

# %% [markdown]
# ## Confounders: projection, age and sex
#
# Per source × label: films with a known view (and the AP / PA counts), with a known age (median and quartiles), and with a known sex (the share F among them), from each source's own metadata (NIH: the `Data_Entry_2017` table). If the classes differ in these, a model can learn them instead of the disease; docs/DATA.md states the same table for the mirror.

# %%
from cxrstudy.data.build import confounder_coverage

coverage = confounder_coverage(manifest)
coverage.to_csv(out / "confounders.csv", index=False)
display(coverage.round(2))

# %% [markdown]
# ## Sample images per class and source
#
# Processed 8-bit PNGs (shorter side 256). Note how differently the sources look: that difference is exactly what a classifier can learn instead of the disease.

# %%
fig = plot_sample_grid(manifest, result.out_dir, per_cell=5, seed=seed)
save_figure(fig, out / "samples.png")

# %% [markdown]
# ## Duplicates
#
# The sources copy one another. `duplicates.csv` lists every pair found: `same_image` pairs drop the copy from the lower-priority source (MHH > ieee8023 > Figure1 > Actualmed > CXNet > NIH); `same_patient` pairs only merge patient groups; a pair with two different labels drops both.
#
# **CXNet's count.** MIRROR.md's expected table (565 CXNet covid images) uses the 32×32 thumbnail-correlation test only. That test misses re-cropped, re-scaled and re-photographed copies: 160 CXNet files in this mirror are verified copies of ieee8023 / MHH / Figure1 films that it does not catch (every CXNet file numbered 510–673 and 686–706 copies a Hannover film). A stronger test (local-feature matching with a geometric check) removes them and brings CXNet down toward ~405. Our build keeps whatever `cxrstudy.data.dedup` verifies; the number below says where it landed between the two.

# %%
display(duplicates.groupby(["kind", "method"]).size().rename("pairs").to_frame())
display(dropped_copies(excluded))
cx = manifest[manifest["source_name"] == "cxnet"]
print(f"CXNet covid images kept: {len(cx)} (thumbnail test only: 565; stronger test: ~405); "
      f"{int(cx['patient_id_is_image_level'].sum())} of them have image-level patient IDs")
conflicts = excluded[excluded["reason"].str.startswith("label conflict")]
display(conflicts[["source_name", "upstream_path", "reason"]])
pairs = duplicate_examples(duplicates, result.out_dir, n=6, seed=seed)
if pairs:
    fig = plot_image_pairs(pairs, ncols=2)
    save_figure(fig, out / "duplicate_pairs.png")

# %% [markdown]
# ## What is absent or excluded, and why
#
# `absent:` files are listed by the metadata (or expected by the folder's numbering / the README's count) but are not available from this base: in the offline mirror, files of 4 MiB or more and a withheld set. Online, the same code finds more of them. Other reasons: `lateral`, `label rule` (unused findings, CT rows, `No Finding` films of COVID-19 patients, the DarkCovidNet `Covid-19` folder), `hannover copy` (ieee8023 rows re-cropped from MHH, taken from MHH instead), `duplicate`, `label conflict`, `undecodable`.

# %%
display(exclusion_summary(excluded))
absent = excluded[excluded["reason"].str.startswith("absent:")]
display(absent.groupby(["source_name", "label"]).size().rename("absent").to_frame())
absent.to_csv(out / "absent.csv", index=False)
print(f"{len(absent)} absent entries; full list in {out / 'absent.csv'}")
display(absent[["source_name", "label", "upstream_path", "reason"]].head(15))

# %% [markdown]
# ## Licences
#
# Per-image licence text as the sources state it. NC (non-commercial) and ND terms occur, and Figure1, Actualmed and DarkCovidNet have no licence file: keep source and licence with any derived data.

# %%
lic = manifest.groupby(["source_name", "license"]).size().rename("images").reset_index()
lic.to_csv(out / "licenses.csv", index=False)
with pd.option_context("display.max_colwidth", 120):
    display(lic)

# %% [markdown]
# ## Source confounding: the main risk of this dataset
#
# Almost all normal films, and most pneumonia films, come from **one archive**: NIH ChestX-ray8 (a US hospital, 1024² PNG originals), while **every COVID-19 film comes from somewhere else** (Hannover ICU films, paper figures, websites and social media, photographs of monitors, a Spanish hospital). Acquisition (supine AP versus PA), burned-in text and markers, compression history and resolution all differ by source. A classifier can therefore separate the classes by *where an image comes from* and still score very high. Any accuracy on this data must be read next to per-source results and the shortcut checks of the later notebooks. Actualmed is the only source with COVID-19 and normal films from the same hospital, and it is tiny.

# %%
shares = label_shares(manifest)
display(shares)
nih = shares["nih"] if "nih" in shares.columns else pd.Series(0.0, index=shares.index)
for label in shares.index:
    print(f"{label}: {nih.get(label, 0):.0%} of images from NIH ChestX-ray8")

# %% [markdown]
# ## Conclusion
#
# - The build is reproducible: pinned commits, SHA-256 of every fetched file in `data/raw/lock.json`, deterministic decoding, de-duplication and seeded patient-grouped folds; a warm re-run changes nothing.
# - Counts follow MIRROR.md's expected table; CXNet is lower than the thumbnail-only 565 to the extent the stronger duplicate test finds re-cropped copies, and CXNet's image-level patient IDs stay a weak point.
# - Absent files are reported, not fatal; online runs fetch more of them.
# - The dataset is heavily source-confounded (normals ≈ NIH): headline accuracies must be checked per source and against the shortcut tests before they are believed.
