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
# # 05 · Evaluation: metrics with patient-bootstrap intervals, shortcut checks, saliency, verdict
#
# Evaluates every saved run of the profile from its stored predictions (no retraining): accuracy, balanced accuracy, per-class sensitivity / specificity / precision / F1, ROC-AUC and PR-AUC (one-vs-rest), each with a 95% interval from a bootstrap that resamples **patient groups**; calibration (ECE, Brier, reliability diagrams); McNemar's test between scenarios and the effect of class decomposition (on minus off). Then the shortcut checks on frozen features (source identification, lungs masked / lungs only, leave-one-source-out, the one same-hospital source) and Grad-CAM saliency with the share that falls inside the central lung field. Writes `reports/<profile>/results.json` (schema in `docs/results_schema.md`), `model_card.md`, `claim_checklist.md` and figures under `reports/<profile>/evaluation/`; the headline and shortcut-check figures also appear on the profile's `index.html`.

# %% tags=["parameters"]
profile = "smoke"  # evaluates reports/<profile>/runs/*
seed = 0  # bootstrap, probes, saliency sample and the subsample
device = "auto"  # auto, cpu, cuda, cuda:N (features and Grad-CAM)
backbone = "efficientnet_lite0"  # frozen features for the shortcut checks (as notebook 02)
image_size = 160  # pixels, as notebook 02 (the feature cache is shared)
batch_size = 32
max_per_class = 0  # images kept per split and class, 0 keeps all; as in the other notebooks
n_bootstrap = 1000  # patient-group bootstrap resamples
saliency_per_class = 4  # Grad-CAM images per class and outcome (correct / wrong) per run
shortcut_checks = True  # run the feature-level shortcut checks

# %%
import pandas as pd
import torch
from IPython.display import Image, Markdown, display

from cxrstudy import config
from cxrstudy.data.splits import subsample
from cxrstudy.evaluation import figures, report, saliency, shortcuts, tables

config.seed_everything(seed)
torch.set_num_threads(min(torch.get_num_threads(), 4))
out = config.profile_dir(profile)
fig_dir = out / figures.FIGURE_DIR
manifest = subsample(pd.read_csv(config.MANIFEST_PATH), max_per_class, seed)
excluded = pd.read_csv(config.EXCLUDED_PATH) if config.EXCLUDED_PATH.is_file() else None
runs = report.load_runs(out)
if not runs:
    raise FileNotFoundError(f"no finished runs under {out / 'runs'}: run notebook 04 first")
display(pd.DataFrame([{k: r["info"].get(k) for k in ("run_id", "train_seconds", "epochs_run", "n_test")} for r in runs]))

# %% [markdown]
# ## Test metrics per run
#
# Percentages with 95% percentile intervals from resampling whole patient groups (an image enters a resample as often as its patient group was drawn). *hard-rule acc.* is DeTraC's rule (the parent of the most probable subclass) beside the composed probabilities' arg-max.

# %%
entries = report.evaluate_runs(runs, n_bootstrap, seed)
display(tables.runs_frame(entries))

# %% [markdown]
# ## Figures
#
# Every run's test accuracy with its interval against the paper's 94.17% and DeTraC's 93.1%; confusion matrices; reliability diagrams (accuracy against confidence; the diagonal is perfect calibration); learning curves; accuracy per source and label (a model that is right only on some sources has learnt sources); ROC and precision-recall curves per run.

# %%
figure_paths = figures.evaluation_figures(runs, entries, fig_dir)
for name, path in figure_paths.items():
    display(Markdown(f"**{name.replace('_', ' ')}**"), Image(filename=str(path)))

# %% [markdown]
# ## Shortcut checks (linear heads on frozen features)
#
# All checks use the shallow level, a logistic regression on frozen ImageNet features, so they are cheap on a CPU; they say what the images make easy, not what each trained network did. *Source identification*: how well the features name the repository (patient-group 5-fold CV). *Masking*: features of images with the central lung field (x and y 15-85%) blacked out, or with only that field kept. *Leave-one-source-out*: a head trained without a whole source, tested on it. *Same hospital*: Actualmed, the only source with COVID-19 and normal films from one site.

# %%
paper_runs = {r["info"]["run_id"]: r["predictions"] for r in runs if r["info"]["task"] == tables.PAPER_TASK}
checks_raw = {}
if shortcut_checks:
    checks_raw = shortcuts.run_shortcut_checks(
        manifest, paper_runs, config.PROCESSED_DIR, backbone, image_size, config.TASKS[tables.PAPER_TASK],
        batch_size=batch_size, device=device, seed=seed, n_bootstrap=n_bootstrap)
    sid = checks_raw["source_identification"]
    display(Markdown(f"Source identification: accuracy {sid.get('accuracy')}, balanced {sid.get('balanced_accuracy')}, "
                     f"majority baseline {sid.get('majority_baseline')} (n={sid['n']})"))
    display(pd.DataFrame({k: v for k, v in sid["within_label"].items()}).T)
    display(tables.masking_frame(checks_raw["masking"]))
    display(tables.loso_frame(checks_raw["leave_one_source_out"]))
    display(checks_raw["same_hospital"])

# %% [markdown]
# ## Saliency (Grad-CAM)
#
# Grad-CAM on the last convolutional stage, explaining the predicted class, for a seeded sample of correct and wrong test images per class and run. The dashed rectangle is the lung region used for masking; *in-lung* is the share of saliency inside it (a uniform map gives 0.49).

# %%
head_run = tables.headline(entries).get("run_id")
sal = saliency.saliency_for_runs(runs, config.PROCESSED_DIR, saliency_per_class, fig_dir, seed,
                                 config.resolve_device(device))
display(sal.groupby(["run_id", "outcome"])["lung_share"].agg(["mean", "count"]).unstack())
if head_run:
    display(Image(filename=str(fig_dir / f"saliency_{head_run}.png")))

# %% [markdown]
# ## results.json, headline, comparisons, model card and checklist

# %%
checks = tables.assemble_shortcut_checks(
    checks_raw.get("source_identification"), checks_raw.get("masking"), checks_raw.get("leave_one_source_out"),
    checks_raw.get("same_hospital"), sal, saliency_run=head_run)
results = report.build_results(
    out, manifest, shortcut_checks=checks, n_bootstrap=n_bootstrap, seed=seed, excluded=excluded, runs=runs,
    entries=entries, params={"max_per_class": max_per_class, "backbone": backbone, "image_size": image_size})
report.write_model_card(results, out / "model_card.md")
report.write_claim_checklist(results, out / "claim_checklist.md")
display(Markdown(results["headline"]["text"]))
display(tables.headline_frame(results))
display(tables.comparisons_frame(results["comparisons"]))

# %% [markdown]
# ## Shortcut checks at a glance (shown on index.html)
#
# Test accuracy of the linear heads with 95% intervals: whole image, lungs masked and lungs only; each source held out of training; and within the one hospital with both classes. Written only when the shortcut checks ran.

# %%
shortcut_png = figures.shortcut_figure(checks, fig_dir / figures.SHORTCUT_FIGURE)
if shortcut_png is not None:
    display(Image(filename=str(shortcut_png)))

# %% [markdown]
# ## Verdict (generated from the numbers above)

# %%
display(Markdown("\n".join(f"- {s}" for s in results["verdict"])))

# %% [markdown]
# ## What the accuracy can and cannot be trusted for
#
# The test accuracy is an honest estimate **for images like these**: patient-disjoint splits, near-duplicates removed across sources, decomposition fitted on training images only, and intervals that resample patients rather than images. It supports comparing transfer scenarios and the effect of class decomposition on this data. It does **not** measure diagnostic accuracy: in these public collections COVID-19, normal and pneumonia films largely come from different repositories, and the checks above show how much of the label can be read from the source, from the image borders and text, or with the lungs blacked out. A claim about patients needs an external test set from a hospital the model never saw (`make evaluate EXTERNAL=labels.csv`).
