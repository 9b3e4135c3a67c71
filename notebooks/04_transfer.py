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
# # 04 · Transfer learning: one scenario, with and without class decomposition
#
# Trains the ImageNet-pretrained backbone with fastai by patient-grouped cross-validation, in one of four scenarios (papermill runs this notebook once per scenario). Every film outside the held-out hospital belongs to one of `folds` folds (`StratifiedGroupKFold` by source × label, seeded); fold *i*'s run trains on the other folds less an inner validation part (15% of their patient groups, for early stopping, the kept checkpoint and `lr_find`), with seed `seed + i`, and predicts its fold and the held-out hospital once. Notebook 05 pools the folds' predictions into one out-of-fold prediction per film. This notebook shows inner-validation numbers only.
#
# * **shallow**: backbone frozen (weights and batch-norm statistics), only the new linear layer trains, on cached features;
# * **deep**: every layer trains from the pretrained start (one-cycle schedule);
# * **finetune**: layer groups unfrozen in stages from the head down, discriminative learning rates, one-cycle per stage;
# * **scratch** (control): the same architecture from random weights, all layers training.
#
# **Equal budgets.** `epochs` is the total number of epochs of a run: deep and scratch run one one-cycle fit of `epochs`, finetune splits the same `epochs` over its stages (as evenly as possible, later stages taking the remainder, at least one each: 3 epochs over the default 3 stages is 1+1+1, 8 is 2+3+3). So deep, finetune and scratch get the same number of optimizer steps (epochs × batches per epoch); early stopping may end a fit sooner, and `run.json` records the planned (`params.budget_steps`) and counted (`params.optimizer_steps`) steps. Shallow trains only the linear head on cached features for its own `epochs` (a step costs microseconds there), stated beside the others in `run.json`.
#
# **One learning-rate rule.** With `use_lr_find`, every scenario takes its peak one-cycle learning rate from fastai's `lr_find` on its own training data (`suggest_funcs=valley`, `lr_find_iters` steps, weights restored afterwards), in the state of its first fit (deep and scratch: all layers; finetune and shallow: the head), clamped to `lr_range` (default 1e-5 to 1e-2): once per (task, scenario, decomposition, seed), recorded in `run.json` (`lr`, `params.lr_found`, `params.lr_rule`). Without it, every scenario uses `lr`. Finetune gives open backbone groups `slice(lr / lr_mult, lr)`.
#
# Each scenario runs with decomposition **on** (the network learns notebook 03's subclasses, predictions are composed back into classes) and **off** (the original classes), so the effect of decomposition is measured. Validation and test images never get a subclass; every number below is about the real classes. Augmentation (training images only, drawn per image and applied to whole batches of tensors): rotation ±10°, scale ±5 %, shift ±4 %, brightness and contrast ±15 %; no flips (anatomy and burned-in laterality markers are not symmetric). Each image is decoded and resized once into the shared uint8 tensor cache (`data/cache/tensors/`, keyed by image folder, file content and size). Best checkpoint and early stopping on the validation loss. Outputs: `reports/<profile>/runs/<run_id>/`.

# %% tags=["parameters"]
profile = "smoke"  # reports go to reports/<profile>/runs/
seed = 0  # seeds the subsample, and the first run's weights, shuffling and augmentation
folds = 2  # cross-validation folds: one run per fold (seed + fold)
repeats = 1  # cross-validations, repeat r seeded by seed + r * folds
only_fold = None  # None: every fold; k: only fold k of every repeat (a profile step with per_fold: true)
device = "auto"  # auto, cpu, cuda, cuda:N
task = "covid_vs_normal"  # covid_vs_normal or covid_normal_pneumonia
scenario = "shallow"  # shallow, deep, finetune or scratch
decomposition = [False, True]  # one training run per value
backbone = "efficientnet_lite0"
image_size = 160  # pixels (square)
batch_size = 32
epochs = 3  # total epochs of the run (finetune: split over its stages, at least one each)
finetune_stages = None  # finetune: trailing layer groups open per stage, e.g. [1, 4] (head, then all 4); None: [1, 2, 4]
lr = 1e-3  # peak one-cycle learning rate without use_lr_find (head's; finetune: slice(lr/100, lr))
max_per_class = 0  # images kept per split and class; 0 means all
num_workers = 0  # threads decoding images into the tensor cache (0: one per core)
use_lr_find = False  # every scenario: peak lr from fastai's lr_find (valley), clamped to lr_range
lr_range = [1e-5, 1e-2]  # the range lr_find's suggestion is clamped to
lr_find_iters = 50  # lr_find steps (1e-7 to 10; stops early when the loss diverges)
patience = 2  # early stopping: epochs without a better validation loss
variant = "baseline"  # name of the parameter set below (the profile's variants); run ids end with it
input_view = "full"  # full, lung_crop or lung_mask (lung views need notebook 01's masks)
equalize = False  # histogram equalisation inside the lung mask
view_margin = 0.05  # margin around the lung box, as a fraction of its size
adversary_weight = 0.0  # > 0: class-conditional source adversary (gradient reversal), peak weight
adversary_schedule = "ganin"  # ganin (ramped 0 -> weight) or constant
adversary_lr = 1e-3  # the adversary heads' own AdamW learning rate
sampling = "uniform"  # uniform, or source_balanced: films drawn with weights P(label)/P(label|source)
wd = None  # AdamW weight decay (decoupled); None is fastai's 0.01
objective = "erm"  # erm, or group_dro: online group DRO over the training rows' label x source groups
dro_eta = 0.01  # group DRO's step size for the group weights
dfr = False  # also write each decomposition-off run's deep-feature-reweighting run (its last layer retrained)

# %%
import pandas as pd
from IPython.display import Image, display
from matplotlib.figure import Figure
from sklearn.metrics import confusion_matrix

from cxrstudy import config, training
from cxrstudy.data.manifest import load_manifest
from cxrstudy.data.splits import subsample
from cxrstudy.lungs.render import view_root
from cxrstudy.plots import plot_confusion, save_figure

out = config.profile_dir(profile)
manifest = subsample(load_manifest(), max_per_class, seed)
image_root = view_root(manifest, profile, input_view, equalize, view_margin)  # the films as this variant sees them

# %% [markdown]
# ## Training
#
# One run per decomposition setting and seed; the table gives composed accuracies. A variant other than `baseline` sees its films through `input_view` (rendered once from notebook 01's lung masks, cached) and, with `adversary_weight` > 0, trains against a class-conditional source adversary: a small head per class behind a gradient-reversal layer predicts the training film's source hospital *within its class* from the backbone's pooled features, its weight ramped over the whole budget (Ganin & Lempitsky 2015), its per-epoch accuracy against the majority source written to `adversary.csv`. Its codes come from training rows only. With `sampling = "source_balanced"` each epoch draws as many films as the training split holds, with replacement, each with weight P(label) / P(label | source) estimated on the training split (Kamiran & Calders 2012, clipped to [0.25, 4], mean 1): within a source that holds several labels (ieee8023: COVID-19 and other pneumonia; NIH: normal and pneumonia) the label then carries no information about the source, and the films that hold the within-source contrast (ieee8023's other pneumonia) weigh more; `run.json` lists the weight of every (label, source) cell. With `objective = "group_dro"` (Sagawa et al. 2020, Algorithm 1) each training batch's loss is the weighted sum of its label × source groups' mean losses, the group weights stepped by `q ← q·exp(dro_eta · loss_g)` and normalised, so the worst group weighs most; the groups come from the training rows only, `groups.csv` logs each group's loss and weight per epoch; early stopping reads the plain validation loss.

# %%
configs = training.TrainConfig.from_params(globals())  # the parameters cell: every fold x decomposition value
results = [training.train_run(manifest, cfg, image_root, profile_dir=out) for cfg in configs]
dfr_runs = [training.train_dfr(r.run_dir, manifest, image_root) for r in results if dfr and not r.info["decomposition"]]
summary = training.summarize_runs(results)
display(summary.drop(columns=["test_accuracy"]))

# %% [markdown]
# ## Deep feature reweighting (with `dfr`)
#
# For each decomposition-off run, its last layer retrained on its fold's inner-validation films (which it never trained on), group-balanced by label × source × view, L1 logistic regression with C chosen by patient-grouped cross-validation on those films (`training.dfr`); the run folder `<run id>` with variant `dfr` (from the baseline) or `<variant>_dfr`. The validation accuracy shown is cross-fitted.

# %%
if dfr_runs:
    display(pd.DataFrame([{"run_id": d["run_id"], "C": d["dfr"]["c"], "per group": d["dfr"]["per_group"],
                           "groups left out": len(d["dfr"]["left_out_groups"]), "val_accuracy": d["val_accuracy"]}
                          for d in dfr_runs]))

# %% [markdown]
# ## Learning curves
#
# Training and (composed) validation loss, validation accuracy; the dotted line is the epoch whose weights were kept. For finetune the shaded bands are the unfreezing stages.

# %%
for r in results:
    display(Image(filename=str(r.run_dir / 'learning_curve.png')))

# %% [markdown]
# ## Confusion matrices (inner validation, composed predictions)
#
# Held-out numbers (each fold's own films, the held-out hospital) appear only in notebook 05, pooled out of fold.

# %%
fig = Figure(figsize=(3.8 * len(results), 3.4))  # no pyplot: shown once, from the saved file
axes = fig.subplots(1, len(results), squeeze=False)
for ax, r, cfg in zip(axes[0], results, configs, strict=True):
    val = r.predictions[r.predictions["split"] == "val"]
    cm = confusion_matrix(val["label"], val["pred"], labels=r.info["classes"])
    plot_confusion(cm, r.info["classes"], title=cfg.spec.label(task=False), ax=ax)
fig.tight_layout()
fold_tag = "" if only_fold is None else f"_fold{only_fold}"  # steps of one configuration, one per fold
confusion_png = out / "runs" / f"confusion_{task}_{scenario}_{variant}{fold_tag}.png"
save_figure(fig, confusion_png)
display(Image(filename=str(confusion_png)))

# %% [markdown]
# ## Effect of decomposition

# %%
print(training.describe_decomposition_effect(summary))

# %% [markdown]
# ## Conclusion
#
# The table and the sentence above compare decomposition on and off for this scenario on the same inner-validation films of each fold. They are point estimates on a few hundred films at most: differences of a few points are within noise. Notebook 05 pools every fold's held-out predictions and puts patient-bootstrap confidence intervals, a McNemar test, calibration and the confounder checks on them. In the smoke profile these numbers mean nothing; it only proves the chain runs.
