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
# # 03 · Class decomposition (DeTraC): k-means subclasses of each class, on training features only
#
# Once per cross-validation fold (the folds of notebook 04, `data.splits.cv_roles`): each class's **training** images of that fold (the other folds less their inner validation part) are clustered with k-means on their pooled features (optionally standardised and PCA-reduced); each training image gets a subclass label such as `covid_1`. Validation and test images are never clustered and never get a subclass. The network of notebook 04 learns the subclasses; its output is composed back to the classes by summing subclass probabilities (DeTraC's hard rule, the parent of the most probable subclass, is reported beside it). Outputs: `reports/<profile>/decomposition/seed<S>_fold<F>/subclasses.csv` and `decomposition.json` per fold; the figures show the first fold.

# %% tags=["parameters"]
profile = "smoke"  # reports go to reports/<profile>/
seed = 0  # seeds the subsample, the folds, the embeddings and k-means
folds = 2  # cross-validation folds (as notebook 04)
repeats = 1  # cross-validations, repeat r seeded by seed + r * folds (as notebook 04)
device = "auto"  # auto: CUDA if present, else cpu; or cpu, cuda, cuda:N
backbone = "efficientnet_lite0"  # cxrstudy.models.list_backbones(), or scratch:<name>
image_size = 160  # squish-resize to image_size x image_size
batch_size = 32
num_workers = 0  # DataLoader decode workers (use several on a GPU machine)
max_per_class = 0  # images kept per split and label; 0 keeps all
input_view = "full"  # full, lung_crop or lung_mask (lung views need notebook 01's masks)
equalize = False  # histogram equalisation inside the lung mask
embedding = "pca"  # 2-D embedding for the figures: pca, tsne or umap
k = 2  # subclasses per class: an int (DeTraC: 2, 1: no decomposition) or "auto" (best silhouette)
k_min = 2  # range searched by auto (silhouettes are reported over it in any case)
k_max = 5
pca_components = 50  # PCA before k-means (0: none), fitted per class on training rows
standardize = True  # z-score features per class before PCA


# %%

import pandas as pd
from IPython.display import display

from cxrstudy import config
from cxrstudy.data.manifest import load_manifest
from cxrstudy.data.splits import cv_roles, subsample
from cxrstudy.decomposition import fit_decomposition, part_name, save_decomposition
from cxrstudy.features import embed_2d, extraction_summary, profile_features
from cxrstudy.plots import (
    plot_embedding,
    plot_silhouettes,
    plot_subclass_examples,
    plot_subclass_sizes,
    save_figure,
)

out = config.profile_dir(profile) / "decomposition"
out.mkdir(parents=True, exist_ok=True)
config.seed_everything(seed)
manifest = subsample(load_manifest(), max_per_class, seed)
feats, image_root = profile_features(manifest, profile, backbone, image_size, input_view, equalize,
                                     batch_size=batch_size, device=device, num_workers=num_workers)
print(extraction_summary(feats, backbone, image_size, device))

# %%
fits = {}
for cv_seed in [seed + r * folds for r in range(repeats)]:
    for fold in range(folds):
        roles = cv_roles(manifest, folds, fold, cv_seed)
        train = roles[roles["split"] == "train"]
        decomp, subclass_of = fit_decomposition(feats.loc[train["image"]], train["label"], train["split"],
                                                k=k, k_range=(k_min, k_max), standardize=standardize,
                                                pca_components=pca_components, seed=cv_seed + fold)
        decomp.params.update(backbone=backbone, image_size=image_size, max_per_class=max_per_class,
                             input_view=input_view, equalize=equalize, fold=fold, folds=folds, cv_seed=cv_seed)
        save_decomposition(config.profile_dir(profile), decomp, subclass_of, part_name(cv_seed, fold))
        fits[part_name(cv_seed, fold)] = (decomp, subclass_of, train)
display(pd.DataFrame({p: {**d.k, 'training films': len(t)} for p, (d, _, t) in fits.items()}).T)
decomp, subclass_of, train = fits[part_name(seed, 0)]  # the figures show the first fold
display(pd.DataFrame(decomp.silhouettes).T.round(3))

# %% [markdown]
# ## Subclasses: embedding, sizes, silhouettes, examples

# %%
coords = embed_2d(feats.loc[train['image']].to_numpy(), embedding, seed=seed)
figs = {
    'embedding_by_subclass': plot_embedding(coords, subclass_of.to_numpy(), legend_title='subclass',
                                            title=f'training features ({embedding}) by subclass'),
    'subclass_sizes': plot_subclass_sizes(decomp.sizes, decomp.parent_of),
    'silhouettes': plot_silhouettes(decomp.silhouettes, decomp.k),
    'subclass_examples': plot_subclass_examples(subclass_of, image_root, per_subclass=5,
                                                seed=seed),
}
for name, fig in figs.items():
    save_figure(fig, out / f'{name}.png')  # shown at the end of the cell
display(pd.crosstab(subclass_of, train.set_index('image').loc[subclass_of.index, 'source_name']))

# %% [markdown]
# ## Conclusion
#
# The subclass labels above are what notebook 04 trains on when decomposition is on. The crosstab of subclass against source says whether k-means found visual modes of the disease or simply the sources: a subclass that is one hospital is a shortcut the decomposition makes explicit. Low silhouettes mean the classes have no clear internal structure at this resolution, and DeTraC's split is then arbitrary.
