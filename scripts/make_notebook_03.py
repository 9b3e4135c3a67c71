"""Generate notebooks/03_transfer.ipynb (no outputs, no execution counts): one transfer scenario, decomposition on/off."""

from __future__ import annotations

from pathlib import Path

from nbformat.v4 import new_code_cell, new_markdown_cell

from cxrstudy.nbtools import write_notebook

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "notebooks" / "03_transfer.ipynb"

CELLS = [
    new_markdown_cell(
        "# 03 · Transfer learning: one scenario, with and without class decomposition\n\n"
        "Trains the ImageNet-pretrained backbone on the manifest's patient-disjoint splits with fastai, in one "
        "of four scenarios (papermill runs this notebook once per scenario):\n\n"
        "* **shallow**: backbone frozen (weights and batch-norm statistics), only the new linear layer trains, "
        "on cached features;\n"
        "* **deep**: every layer trains from the pretrained start (one-cycle schedule);\n"
        "* **finetune**: layer groups unfrozen in stages from the head down, discriminative learning rates, "
        "one-cycle per stage;\n"
        "* **scratch** (control): the same architecture from random weights, all layers training.\n\n"
        "Each scenario runs with decomposition **on** (the network learns notebook 02's subclasses, predictions "
        "are composed back into classes) and **off** (the original classes), so the effect of decomposition is "
        "measured. Validation and test images never get a subclass; every number below is about the real "
        "classes. Augmentation (training images only): rotation ±10°, scale ±5 %, shift ±4 %, brightness and "
        "contrast ±15 %; no flips (anatomy and burned-in laterality markers are not symmetric). Best checkpoint "
        "and early stopping on the validation loss. Outputs: `reports/<profile>/runs/<run_id>/`."
    ),
    new_code_cell(
        'profile = "smoke"  # reports go to reports/<profile>/runs/\n'
        "seed = 0  # seeds weights, shuffling, augmentation and the subsample\n"
        'device = "auto"  # auto, cpu, cuda, cuda:N\n'
        'task = "covid_vs_normal"  # covid_vs_normal or covid_normal_pneumonia\n'
        'scenario = "shallow"  # shallow, deep, finetune or scratch\n'
        "decomposition = [False, True]  # one training run per value\n"
        'backbone = "efficientnet_lite0"\n'
        "image_size = 160  # pixels (square)\n"
        "batch_size = 32\n"
        "epochs = 3  # maximum epochs (per stage for finetune)\n"
        "lr = 1e-3  # peak one-cycle learning rate (head's; finetune: slice(lr/100, lr))\n"
        "max_per_class = 0  # images kept per split and class; 0 means all\n"
        "num_workers = 0  # DataLoader workers\n"
        "use_lr_find = False  # finetune: start from fastai's lr_find suggestion\n"
        "patience = 2  # early stopping: epochs without a better validation loss",
        metadata={"tags": ["parameters"]},
    ),
    new_code_cell(
        "import pandas as pd\n"
        "from IPython.display import Image, display\n"
        "from matplotlib.figure import Figure\n"
        "from sklearn.metrics import confusion_matrix\n\n"
        "from cxrstudy import config, training\n"
        "from cxrstudy.data.splits import subsample\n"
        "from cxrstudy.plots import plot_confusion, save_figure\n\n"
        "out = config.profile_dir(profile)\n"
        "manifest = subsample(pd.read_csv(config.MANIFEST_PATH, keep_default_na=False), max_per_class, seed)\n"
        'display(training.task_rows(manifest, task).groupby(["split", "label"]).size().unstack(fill_value=0))'
    ),
    new_markdown_cell(
        "## Training\n\nOne run per decomposition setting; the table gives composed accuracies."
    ),
    new_code_cell(
        "results = [\n"
        "    training.train_run(manifest, config.PROCESSED_DIR, task=task, scenario=scenario, decomposition=d,\n"
        "                       backbone=backbone, image_size=image_size, epochs=epochs, lr=lr,\n"
        "                       batch_size=batch_size, seed=seed, device=device, profile_dir=out,\n"
        "                       num_workers=num_workers, use_lr_find=use_lr_find, patience=patience)\n"
        "    for d in decomposition\n"
        "]\n"
        "summary = training.summarize_runs(results)\n"
        "display(summary)"
    ),
    new_markdown_cell(
        "## Learning curves\n\nTraining and (composed) validation loss, validation accuracy; the dotted line is "
        "the epoch whose weights were kept. For finetune the shaded bands are the unfreezing stages."
    ),
    new_code_cell("for r in results:\n    display(Image(filename=str(r.run_dir / 'learning_curve.png')))"),
    new_markdown_cell("## Confusion matrices (test split, composed predictions)"),
    new_code_cell(
        "fig = Figure(figsize=(3.8 * len(results), 3.4))  # no pyplot: shown once, from the saved file\n"
        "axes = fig.subplots(1, len(results), squeeze=False)\n"
        "for ax, r in zip(axes[0], results):\n"
        '    test = r.predictions[r.predictions["split"] == "test"]\n'
        '    cm = confusion_matrix(test["label"], test["pred"], labels=r.info["classes"])\n'
        '    plot_confusion(cm, r.info["classes"], title=r.run_id.split("__", 2)[2], ax=ax)\n'
        "fig.tight_layout()\n"
        'save_figure(fig, out / "runs" / f"confusion_{task}_{scenario}.png")\n'
        'display(Image(filename=str(out / "runs" / f"confusion_{task}_{scenario}.png")))'
    ),
    new_markdown_cell("## Effect of decomposition"),
    new_code_cell("print(training.describe_decomposition_effect(summary))"),
    new_markdown_cell(
        "## Conclusion\n\n"
        "The table and the sentence above compare decomposition on and off for this scenario on the same "
        "patient-disjoint validation and test images. They are point estimates on a few hundred test images at "
        "most: differences of a few points are within noise. Notebook 04 puts patient-bootstrap confidence "
        "intervals, a McNemar test, calibration and the source-shortcut checks on every run saved here. In the "
        "smoke profile these numbers mean nothing; it only proves the chain runs."
    ),
]


def main() -> None:
    """Write the notebook with no outputs and no execution counts."""
    write_notebook(CELLS, OUT)


if __name__ == "__main__":
    main()
