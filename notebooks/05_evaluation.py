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
# # 05 · Evaluation: out-of-fold metrics with patient-bootstrap intervals, shortcut checks, saliency, scorecard, recommended variant, verdict
#
# Evaluates every saved run of the profile from its stored predictions (no retraining). Runs come in configurations (task, backbone, scenario, decomposition, variant), each cross-validated: one run per fold. A configuration's **out-of-fold whole** pools its folds: every film outside the held-out hospital is predicted once, by the fold model that never trained or validated on it; the held-out hospital (Actualmed) is predicted by every fold model and read as their ensemble (mean probability). Every reported number comes from the out-of-fold wholes; per-fold values and their spread stand beside them. First, before any held-out number is read, the recommended variant is chosen on the folds' pooled inner-validation rows by a rule fixed in the parameters. Then: accuracy, balanced accuracy, per-class sensitivity / specificity / precision / F1, ROC-AUC and PR-AUC (one-vs-rest), each with a 95% interval from a bootstrap that resamples **patient groups within each class** (so every replicate holds every class; with fewer than 10 patients in a class the interval is *not estimable*), on the out-of-fold films (the held-out hospital never enters these); calibration (ECE, Brier, reliability diagrams); McNemar's test clustered on patient groups between scenarios and for class decomposition (on minus off), per variant and seed, Holm-adjusted, and pooled over seeds. Then the shortcut checks on frozen features (source identification across and within labels, lungs hidden / lungs only, leave-one-source-out, the one same-hospital source), Grad-CAM saliency with the share inside the lungs (the profile's segmented lungs from notebook 01_lungs when it ran, else a fixed central rectangle), and the confound-free scorecard of every run on its own penultimate features of films it never saw. Writes `reports/<profile>/results.json` (schema in `docs/results_schema.md`), `model_card.md`, `claim_checklist.md` and figures under `reports/<profile>/evaluation/`; the headline, scorecard and shortcut-check figures also appear on the profile's `index.html`.

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
input_view = "full"  # full, lung_crop or lung_mask: the films of the frozen-feature shortcut checks (as notebook 02)
equalize = False  # histogram equalisation inside the lung mask (with a lung view)
# The recommended variant's rule comes from params/plan.yaml (fixed before the numbers); None reads the plan's value,
# any other value must equal it.
selection_task = None  # the recommended variant is chosen among this task's variants ...
selection_scenario = None  # ... of this scenario (decomposition off), on validation rows only
selection_max_drop = None  # a variant may lose at most this much of the baseline's validation COVID-19-vs-normal accuracy (seed means)
selection_contrast = None  # within-source contrast over same-view pairs only (view_matched) or every pair (all_pairs)
n_permutations = 19  # label permutations of the within-label source probes' null (p-value resolution 1/(n+1))
run_ids: list[str] = []  # the runs to evaluate (the pipeline passes those its transfer steps produce); empty: every run folder

# %%
import pandas as pd
import torch
from IPython.display import Image, Markdown, display

from cxrstudy import config, plan
from cxrstudy.data.manifest import load_manifest
from cxrstudy.data.splits import subsample
from cxrstudy.evaluation import (
    confounders,
    cv,
    figures,
    frames,
    headline,
    runfeatures,
    saliency,
    scorecard,
    seeds,
    selection,
    shortcut_summary,
    shortcuts,
)
from cxrstudy.lungs.region import lung_region_info
from cxrstudy.lungs.render import view_root
from cxrstudy.lungs.stage import load_lung_masks, with_mask_shape
from cxrstudy.reporting import pages
from cxrstudy.reporting.results import build_results, evaluate_runs, load_runs

config.seed_everything(seed)
torch.set_num_threads(min(torch.get_num_threads(), 4))
out = config.profile_dir(profile)
fig_dir = out / figures.FIGURE_DIR
image_root = config.PROCESSED_DIR  # the films every check reads
manifest = with_mask_shape(subsample(load_manifest(), max_per_class, seed), profile)  # + lung-mask shape numbers
lung_masks, lung_key = load_lung_masks(manifest, profile, image_root, str(config.resolve_device(device)))
lung_info = lung_region_info(lung_masks, manifest["image"].tolist())
display(Markdown(f"Lung region of the masking experiment and Grad-CAM: **{lung_info['kind']}**"))
excluded = pd.read_csv(config.EXCLUDED_PATH) if config.EXCLUDED_PATH.is_file() else None
fold_runs = load_runs(out, only=run_ids or None)  # a run folder outside run_ids is skipped and named
if not fold_runs:
    raise FileNotFoundError(f"no finished runs under {out / 'runs'}: run notebook 04 first")
runs = cv.oof_runs(fold_runs)  # one out-of-fold whole per configuration
display(pd.DataFrame([{k: r["info"].get(k) for k in ("run_id", "variant", "n_folds", "train_seconds", "n_test")}
                      for r in runs]))

# %% [markdown]
# ## Recommended variant (inner-validation rows only, rule fixed in the parameters)
#
# Before any held-out number is read: among the variants (baseline included) of `selection_task` / `selection_scenario` without decomposition, on the folds' pooled inner-validation predictions, keep those whose mean validation COVID-19-vs-normal accuracy is at most `selection_max_drop` below the baseline's; among them pick the highest mean validation within-source contrast (the mean of the ieee8023 COVID-19-vs-pneumonia and NIH pneumonia-vs-normal ROC-AUCs on validation rows, with `selection_contrast: view_matched` over pairs of films of the same view only, so that projection cannot win the place); if none reaches the floor, the highest validation accuracy. `cxrstudy.evaluation.selection` reads only rows whose split is `val`.

# %%
selection_rule = plan.selection(task=selection_task, scenario=selection_scenario, max_drop=selection_max_drop,
                                contrast=selection_contrast)  # params/plan.yaml
recommended = selection.select_variant(runs, selection_rule["task"], selection_rule["scenario"],
                                       max_drop=selection_rule["max_drop"], contrast=selection_rule["contrast"],
                                       manifest=manifest)
display(Markdown(f"**Recommended variant: {recommended['name']}**. {recommended['rule']}"))
display(pd.DataFrame(recommended["candidates"]))

# %% [markdown]
# ## Out-of-fold metrics per configuration, and the spread over folds
#
# Percentages with 95% percentile intervals from resampling whole patient groups within each class (an image enters a resample as often as its patient group was drawn). *val. accuracy* (pooled inner validation) is what the headline configuration is chosen on; *accuracy* is the arg-max of the summed subclass probabilities and *hard-rule acc.* DeTraC's rule (the parent of the most probable subclass). The second table gives each configuration's folds, each on its own films: mean, (sd) and [the lowest to the highest bound of the per-fold intervals].

# %%
entries = evaluate_runs(runs, n_bootstrap, seed)
fold_entries = evaluate_runs(fold_runs, n_bootstrap, seed)
display(frames.runs_frame(entries))
display(seeds.seed_frame(seeds.seed_summary(fold_entries)))

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
# All checks use the shallow level, a logistic regression on frozen ImageNet features, so they are cheap on a CPU; they say what the images make easy, not what each trained network did. Source identification, leave-one-source-out and the same-hospital probe read the films through the `input_view` / `equalize` parameters (as notebook 02; the feature cache is shared); the masking experiment always reads the plain films, whose size the lung masks have. *Source identification*: how well the features name the repository (patient-group 5-fold CV); across labels against the rule that knows only the label, and within each label against always naming its largest source. *Masking*: features of films with the lungs hidden, or with only the lungs kept (segmented lungs when the profile ran notebook 01_lungs, films failing its QC and profiles without it: the central rectangle, x and y 15-85%). *Leave-one-source-out*: a head trained without a whole source, tested on it, with the training composition. *Same hospital*: Actualmed, the only source with COVID-19 and normal films from one site.

# %%
paper_runs = {r["info"]["run_id"]: r["predictions"] for r in runs if r["info"]["task"] == headline.PAPER_TASK}
checks_raw = {}
if shortcut_checks:
    checks_raw = shortcuts.run_shortcut_checks(
        manifest, paper_runs, image_root, backbone, image_size, config.TASKS[headline.PAPER_TASK],
        batch_size=batch_size, device=device, seed=seed, n_bootstrap=n_bootstrap, lung_masks=lung_masks,
        lung_key=lung_key, view_root=view_root(manifest, profile, input_view, equalize), n_permutations=n_permutations)
    sid = checks_raw["source_identification"]
    display(Markdown(f"Source identification across labels: accuracy {sid.get('accuracy')}, balanced "
                     f"{sid.get('balanced_accuracy')}, majority baseline {sid.get('majority_baseline')}, label-only "
                     f"rule {sid.get('label_only_baseline')} (n={sid['n']})"))
    display(pd.DataFrame(checks_raw["source_id_within_label"]).set_index("label"))
    display(frames.masking_frame(checks_raw["masking"]))
    display(frames.loso_frame(checks_raw["leave_one_source_out"]))
    display(checks_raw["same_hospital"])

# %% [markdown]
# ## Saliency (Grad-CAM)
#
# Grad-CAM on the last convolutional stage, explaining the predicted class, on each run's films as it saw them (its input view), for a seeded random sample of its own held-out fold's films stratified by true class and outcome (up to `saliency_per_class` correct and as many wrong per class), for the first fold of every configuration (to keep the step fast). The dashed outline is the film's lung region (segmented lungs resized to the map's grid, or the central rectangle); *in-lung* is the share of saliency inside it and *uniform* the region's area (what a uniform map would give). The maps come from `image_size / 32` cells per side (5x5 at 160 px), which limits what the share can say.

# %%
head_run = headline.headline(entries).get("run_id")
head_runs = [headline.headline(entries, t).get("run_id") for t in config.TASKS]
sal_runs = [r["fold_runs"][0] for r in seeds.first_seed_runs(runs, head_runs)]  # first fold, on its own films
sal = saliency.saliency_for_runs(sal_runs, image_root, saliency_per_class, fig_dir, seed, config.resolve_device(device),
                                 masks=lung_masks, manifest=manifest, profile=profile)
display(sal.groupby(["run_id", "outcome"])[["lung_share", "uniform_share"]].mean().unstack())
head_fold = next((r["info"]["run_id"] for r in sal_runs if r["info"]["config_id"] == head_run), None)
if head_fold:
    display(Image(filename=str(fig_dir / f"saliency_{head_fold}.png")))

# %% [markdown]
# ## Confound-free scorecard
#
# Per run, only on films the run never trained or validated on: a film is *seen* by a run when its manifest split is train or val AND its label is one of the run's classes (run.json `classes`); everything else is unseen (test, holdout, and films of labels outside the task, e.g. pneumonia films for a binary covid_vs_normal run). With patient-group bootstrap intervals: S1 ieee8023 COVID-19 vs other pneumonia ROC-AUC (>= 0.80), S2 Actualmed balanced accuracy (>= 0.85, evaluation-only hospital), S3 source identification within COVID-19 films (<= its majority share + 5 points), S4 NIH pneumonia vs normal ROC-AUC (>= 0.85, three-class runs), S5 the paper's task accuracy (>= 94.17%). The probes (source identification within COVID-19, and the fallback where too few unseen predicted films exist, `method` = probe) are patient-grouped linear probes on the run's **own** penultimate features of unseen films only; those features are computed on the films through the run's input view (runs sharing input view and task one after the other, so their films are decoded once) and cached in `data/cache/run_features/`.

# %%
card = runfeatures.scorecard_entries(runs, manifest, image_root, device, batch_size, n_bootstrap, seed, profile,
                                     n_permutations)
display(scorecard.scorecard_frame(card).set_index(["run_id", "variant", "metric"]))
display(pd.DataFrame(scorecard.check_goals(card)).pivot_table(index=["run_id", "variant"], columns="goal",
                                                              values="met", aggfunc="first"))

# %% [markdown]
# ## results.json, headline, comparisons, model card and checklist

# %%
checks = shortcut_summary.assemble_shortcut_checks(
    checks_raw.get("source_identification"), checks_raw.get("masking"), checks_raw.get("leave_one_source_out"),
    checks_raw.get("same_hospital"), sal, saliency_run=head_fold, lung_region=lung_info,
    source_id_within_label=checks_raw.get("source_id_within_label"), n_bootstrap=n_bootstrap, seed=seed,
    mask_shape=confounders.mask_shape_check(manifest, n_bootstrap=n_bootstrap, seed=seed))
results = build_results(
    out, manifest, shortcut_checks=checks, n_bootstrap=n_bootstrap, seed=seed, excluded=excluded, runs=runs,
    entries=entries, params={"max_per_class": max_per_class, "backbone": backbone, "image_size": image_size,
                             "n_permutations": n_permutations},
    scorecard=card, recommended_variant=recommended, fold_entries=fold_entries)
pages.write_model_card(results, out / "model_card.md")
pages.write_claim_checklist(results, out / "claim_checklist.md")
display(Markdown(results["headline"]["text"]))
display(frames.headline_frame(results))
display(frames.comparisons_frame(results["comparisons"]))
display(seeds.pooled_frame(results["comparisons"]))

# %% [markdown]
# ## Scorecard at a glance (shown on index.html)
#
# Every scorecard metric per configuration over its seeds: the seed mean, the bar from the lowest to the highest bound of the seeds' 95% intervals; dashed lines are the goals (S3: the share of the largest source among COVID-19 films plus 5 points). The table: each goal per configuration, met when the seed mean meets it, and whether every seed's interval clears it.

# %%
scorecard_png = figures.scorecard_figure(results["scorecard_summary"], fig_dir / figures.SCORECARD_FIGURE)
if scorecard_png is not None:
    display(Image(filename=str(scorecard_png)))
display(seeds.scorecard_frame(results["scorecard_summary"], results["recommended_variant"]))

# %% [markdown]
# ## Shortcut checks at a glance (shown on index.html)
#
# Test accuracy of the linear heads with 95% intervals: whole film, lungs hidden and lungs only; each source held out of training; and within the one hospital with both classes. Written only when the shortcut checks ran.

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
# The test accuracy is an honest estimate **for these runs on images like these**: patient-disjoint splits, near-duplicates removed across sources, decomposition fitted on training images only, the headline run chosen on validation, and intervals that resample patients rather than images. The intervals cover only the sampling of test patients: with a few seeds per configuration (their spread is in `seed_summary`) and unequal training budgets per scenario (both stated in `results.json`, `comparisons.design`), a difference between scenarios or between decomposition on and off mixes the method with seed-to-seed variation and budget, so the numbers do not rank them. They do **not** measure diagnostic accuracy: in these public collections COVID-19, normal and pneumonia films largely come from different repositories, and the checks above show how much of the label can be read from the source, from every part of the film, or with the lungs hidden. The scorecard asks the questions a source shortcut cannot answer (within one source, within one label, on a held-out hospital). A claim about patients needs an external test set from a hospital the model never saw (`make evaluate EXTERNAL=labels.csv`).
