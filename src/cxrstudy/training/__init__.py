"""The four transfer scenarios (shallow, deep, finetune, scratch) with fastai, with and without decomposition.

One code path: the network always predicts *subclasses* and a fixed composition matrix sums their
probabilities into the task's classes. Decomposition off means one subclass per class (identity).
Training rows carry their subclass (from notebook 03's k-means on training features); validation
and test rows never get one: they carry subclass ``-1`` and only their class, so the loss is the
composed negative log-likelihood there and every validation number is about the real classes.

Scenarios:

* ``shallow``: backbone frozen (weights and batch-norm statistics); only the new linear head trains,
  on cached pooled features (``cxrstudy.features``), no augmentation.
* ``deep``: every layer trains from the pretrained start (one-cycle schedule).
* ``finetune``: layer groups are unfrozen in stages from the head downwards (``freeze_to``), with
  discriminative learning rates ``slice(lr / lr_mult, lr)`` and one one-cycle fit per stage, the run's
  ``epochs`` split over the stages (equal budgets, see ``TrainConfig``); frozen groups keep their
  batch-norm statistics (``BnFreeze``).
* ``scratch``: the no-transfer control, the same architecture from random weights, all layers training.

``train_run(manifest, TrainConfig(...), image_root, profile_dir=...)`` writes ``<out_root>/<run_id>/`` with
``model.pth``, ``history.csv``, ``learning_curve.png``, ``predictions.csv`` and, last, ``run.json``
(see docs/ARCHITECTURE.md). Modules: ``trainconfig`` (TrainConfig), ``labels`` (label spaces, targets,
composed loss), ``data`` (rows, batch augmentation on tensors, in-memory batches, datasets), ``learner`` (fastai learner, callbacks,
fit stages, prediction tables), ``scenarios`` (each scenario's fit), ``runs`` (train_run, run folders,
reloading, summaries), ``throughput`` (``make bench``).
"""

from cxrstudy.training.data import (
    AUGMENTATION_NOTE,
    SPLITS,
    AugmentRanges,
    BatchAugment,
    ImageList,
    TensorBatches,
    XrayDataset,
    make_loader,
    source_balance_weights,
    task_rows,
    train_augmentation,
)
from cxrstudy.training.dfr import train_dfr
from cxrstudy.training.groupdro import GroupCodes, GroupDROCallback, dro_step
from cxrstudy.training.labels import (
    ComposedLoss,
    LabelSpace,
    compose_predictions,
    composed_log_probs,
    decomposition_labels,
    identity_labels,
    make_targets,
)
from cxrstudy.training.learner import (
    HISTORY_COLUMNS,
    PREDICTION_ID_COLUMNS,
    StepCounter,
    choose_lr,
    count_trainable,
    finetune_schedule,
    fit_stage,
    group_splitter,
    make_learner,
    predict_loader,
    predictions_frame,
)
from cxrstudy.training.runs import (
    RunResult,
    describe_decomposition_effect,
    load_run_model,
    predict_images,
    summarize_runs,
    train_run,
)
from cxrstudy.training.throughput import BareStep, bare_train_rate, training_throughput
from cxrstudy.training.trainconfig import BUDGET_RULE, TrainConfig, stage_epochs

__all__ = [
    "AUGMENTATION_NOTE",
    "BUDGET_RULE",
    "HISTORY_COLUMNS",
    "PREDICTION_ID_COLUMNS",
    "SPLITS",
    "AugmentRanges",
    "BatchAugment",
    "ComposedLoss",
    "ImageList",
    "LabelSpace",
    "RunResult",
    "StepCounter",
    "TensorBatches",
    "TrainConfig",
    "XrayDataset",
    "choose_lr",
    "compose_predictions",
    "composed_log_probs",
    "count_trainable",
    "decomposition_labels",
    "describe_decomposition_effect",
    "finetune_schedule",
    "fit_stage",
    "group_splitter",
    "identity_labels",
    "load_run_model",
    "make_learner",
    "make_loader",
    "make_targets",
    "predict_images",
    "predict_loader",
    "predictions_frame",
    "source_balance_weights",
    "stage_epochs",
    "summarize_runs",
    "task_rows",
    "train_augmentation",
    "train_run",
    "train_dfr",
    "GroupCodes",
    "GroupDROCallback",
    "dro_step",
    "training_throughput",
    "BareStep",
    "bare_train_rate",
]
