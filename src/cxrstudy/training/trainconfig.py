"""``TrainConfig``: everything one training run is asked to do, checked when it is built."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import NoReturn

from cxrstudy import config
from cxrstudy.data.splits import INNER_VAL_FRACTION
from cxrstudy.runspec import RunSpec

#: Smallest allowed value of each integer parameter.
_INT_MINIMUM: dict[str, int] = {
    "image_size": 1,
    "epochs": 1,
    "batch_size": 2,  # batch norm needs two images per batch
    "seed": 0,
    "fold": 0,
    "folds": 2,
    "num_workers": 0,
    "patience": 0,
    "lr_find_iters": 5,
    "adversary_hidden": 1,
}

BASELINE, VARIANT_NAME = config.BASELINE_VARIANT, config.VARIANT_NAME
#: Adversary weight schedules (``adversary.adversary_weight``).
ADVERSARY_SCHEDULES: tuple[str, ...] = ("ganin", "constant")
#: How training batches draw their films (``training.data.source_balance_weights``).
SAMPLINGS: tuple[str, ...] = ("uniform", "source_balanced")
#: Training objectives: plain empirical risk, or online group DRO (``training.groupdro``).
OBJECTIVES: tuple[str, ...] = ("erm", "group_dro")

#: Stages of finetune's default schedule (``learner.finetune_schedule`` on a Classifier's 4 layer groups:
#: head; + last backbone group; everything).
DEFAULT_FINETUNE_STAGE_COUNT = 3

#: What the budget and learning-rate rules are, as run.json and the notebook state them.
BUDGET_RULE = (
    "deep, finetune and scratch train for the same number of epochs in total, hence the same number of "
    "optimizer steps (epochs x batches per epoch); finetune splits its epochs over its stages, later stages "
    "taking any remainder; shallow trains only the head on cached features for its own epochs"
)


@dataclass(frozen=True)
class TrainConfig:
    """One run's task, scenario, decomposition, model and schedule; a bad value raises ValueError naming it.

    Budget (equal for the image scenarios): ``epochs`` is the *total* number of epochs of the run. deep and
    scratch run one one-cycle fit of ``epochs``; finetune splits the same ``epochs`` over its stages
    (:func:`stage_epochs`: as evenly as possible, later stages taking the remainder, so it needs at least
    one epoch per stage), so deep, finetune and scratch get the same number of optimizer steps (epochs x
    batches per epoch; early stopping, ``patience``, may end a fit sooner). shallow trains only the head on
    cached features, ``epochs`` epochs of the same batch size (each step costs microseconds, so its budget is
    set on its own). run.json records the planned and the counted optimizer steps.

    Learning rate (one rule for every scenario): with ``use_lr_find``, the peak one-cycle rate is fastai's
    ``lr_find`` suggestion (``suggest_funcs=valley``, ``lr_find_iters`` steps from 1e-7 to 10, weights
    restored afterwards) on the run's own training data in its first-stage state (deep/scratch: all layers;
    finetune and shallow: the head), clamped to ``lr_range``; once per run, i.e. per (task, scenario,
    decomposition, seed), and recorded in run.json (``lr``, ``params.lr_found``). Without it, ``lr``. For
    finetune the rate is the head's and open backbone groups get ``slice(lr / lr_mult, lr)``.
    ``wd`` None is fastai's default (0.01, decoupled).

    Cross-validation: the run is fold ``fold`` of ``folds`` patient-grouped folds seeded by ``seed``
    (``data.splits.cv_roles``): it trains on the other folds less an inner validation part (``inner_val`` of
    their patient groups), which serves early stopping, the kept checkpoint and ``lr_find``; it predicts its fold
    (``test``) and the held-out hospital; its weights, shuffling and augmentation are seeded by ``seed + fold``.

    Variant: ``variant`` names the parameter set; ``input_view`` / ``equalize`` / ``view_margin``
    say how the films were rendered (``lungs.render.view_root``; the caller passes that folder as
    ``image_root``); ``adversary_weight`` > 0 adds the class-conditional source adversary
    (``training.adversary``) with that peak weight, ramped by ``adversary_schedule`` (image scenarios only);
    ``sampling="source_balanced"`` draws training films with weights that make the label as independent of the
    source hospital as the training split allows (``training.data.source_balance_weights``; image scenarios);
    ``objective="group_dro"`` trains on online group DRO's loss over the label x source groups of the training rows,
    group weights stepped by ``dro_eta`` (``training.groupdro``; image scenarios, no adversary)."""

    task: str = "covid_vs_normal"
    scenario: str = "shallow"
    decomposition: bool = False
    backbone: str = "efficientnet_lite0"
    image_size: int = 160
    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 32
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    patience: int = 2
    use_lr_find: bool = False
    finetune_stages: tuple[int, ...] | None = None
    lr_mult: float = 100.0
    wd: float | None = None
    dropout: float = 0.2
    lr_range: tuple[float, float] = (1e-5, 1e-2)
    lr_find_iters: int = 50
    variant: str = BASELINE
    input_view: str = "full"
    equalize: bool = False
    view_margin: float = 0.05
    adversary_weight: float = 0.0
    adversary_schedule: str = "ganin"
    adversary_lr: float = 1e-3
    adversary_hidden: int = 256
    sampling: str = "uniform"
    objective: str = "erm"
    dro_eta: float = 0.01
    fold: int = 0
    folds: int = 2
    inner_val: float = INNER_VAL_FRACTION

    def __post_init__(self) -> None:
        self._check_names()
        for name, low in _INT_MINIMUM.items():
            _check_int(name, getattr(self, name), low)
        for name in ("decomposition", "use_lr_find", "equalize"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, "must be True or False", getattr(self, name))
        _check_real("lr", self.lr, low=0.0, low_open=True)
        _check_real("lr_mult", self.lr_mult, low=0.0, low_open=True)
        if self.wd is not None:
            _check_real("wd", self.wd, low=0.0)
        _check_real("dropout", self.dropout, low=0.0, high=1.0)
        _check_real("inner_val", self.inner_val, low=0.0, low_open=True, high=0.5)
        if self.fold >= self.folds:
            _fail("fold", f"must be below folds ({self.folds})", self.fold)
        if self.finetune_stages is not None:
            object.__setattr__(self, "finetune_stages", _check_stages(self.finetune_stages))
        object.__setattr__(self, "lr_range", _check_range(self.lr_range))
        self._check_variant()
        if self.scenario == "finetune" and self.epochs < self.n_stages:
            _fail(
                "epochs",
                f"is the total over finetune's {self.n_stages} stages and must be at least {self.n_stages} "
                f"(one epoch per stage at least; epochs per stage x {self.n_stages} gives that many per stage)",
                self.epochs,
            )

    @classmethod
    def from_params(cls, params: Mapping[str, object]) -> list[TrainConfig]:
        """The runs a transfer step's parameters ask for (:meth:`RunSpec.from_params`: seeds outer, decomposition
        values inner); every other field comes from the parameter of its name, or keeps its default."""
        names = {f.name for f in fields(cls)} - {"decomposition", "seed", "fold"}
        settings = {k: params[k] for k in names if k in params}
        return [
            cls(**settings, decomposition=s.decomposition, seed=s.seed, fold=s.fold)  # type: ignore[arg-type]
            for s in RunSpec.from_params(params, derived=False)
        ]

    @property
    def spec(self) -> RunSpec:
        """The run's identity and view (:class:`cxrstudy.runspec.RunSpec`)."""
        return RunSpec(
            self.task, self.backbone, self.scenario, self.decomposition, self.seed, self.variant,
            self.image_size, self.input_view, self.equalize, self.view_margin, self.fold,
        )

    @property
    def train_seed(self) -> int:
        """The seed of the run's weights, shuffling and augmentation (:attr:`RunSpec.train_seed`)."""
        return self.spec.train_seed

    @property
    def run_id(self) -> str:
        """The run's id (:attr:`RunSpec.run_id`)."""
        return self.spec.run_id

    @property
    def n_stages(self) -> int:
        """Number of fit stages: finetune's schedule length, 1 for the other scenarios."""
        if self.scenario != "finetune":
            return 1
        return len(self.finetune_stages) if self.finetune_stages else DEFAULT_FINETUNE_STAGE_COUNT

    def stage_epochs(self) -> list[int]:
        """Epochs of each fit stage (they sum to ``epochs``)."""
        return stage_epochs(self.epochs, self.n_stages)

    def _check_variant(self) -> None:
        """Variant name, input view, margin and adversary settings."""
        from cxrstudy.lungs.views import VIEWS

        if not isinstance(self.variant, str) or not VARIANT_NAME.match(self.variant):
            _fail(
                "variant",
                "must be lower-case letters, digits and underscores, starting with a letter",
                self.variant,
            )
        if self.input_view not in VIEWS:
            _fail("input_view", f"unknown view; expected one of {sorted(VIEWS)}", self.input_view)
        _check_real("view_margin", self.view_margin, low=0.0, high=0.5)
        _check_real("adversary_weight", self.adversary_weight, low=0.0)
        _check_real("adversary_lr", self.adversary_lr, low=0.0, low_open=True)
        if self.adversary_schedule not in ADVERSARY_SCHEDULES:
            _fail("adversary_schedule", f"must be one of {ADVERSARY_SCHEDULES}", self.adversary_schedule)
        if self.adversary_weight > 0 and self.scenario == "shallow":
            _fail(
                "adversary_weight",
                "must be 0 for shallow (the frozen backbone has nothing to unlearn)",
                self.adversary_weight,
            )
        if self.sampling not in SAMPLINGS:
            _fail("sampling", f"must be one of {SAMPLINGS}", self.sampling)
        if self.sampling != "uniform" and self.scenario == "shallow":
            _fail("sampling", "must be 'uniform' for shallow (its head trains on cached features)", self.sampling)
        self._check_objective()
        plain = (
            self.input_view == "full"
            and not self.equalize
            and self.adversary_weight == 0
            and self.sampling == "uniform"
            and self.objective == "erm"
        )
        if self.variant == BASELINE and not plain:
            _fail(
                "variant",
                "is 'baseline' but the input view, adversary, sampling or objective differs from the baseline's: "
                "name the variant",
                self.variant,
            )

    def _check_objective(self) -> None:
        """The objective and group DRO's step size (image scenarios, without the source adversary)."""
        if self.objective not in OBJECTIVES:
            _fail("objective", f"must be one of {OBJECTIVES}", self.objective)
        _check_real("dro_eta", self.dro_eta, low=0.0, low_open=True)
        if self.objective == "group_dro" and self.scenario == "shallow":
            _fail("objective", "must be 'erm' for shallow (group DRO is an image-scenario variant)", self.objective)
        if self.objective == "group_dro" and self.adversary_weight > 0:
            _fail("objective", "group_dro cannot be combined with the source adversary (adversary_weight > 0)",
                  self.objective)

    @property
    def adversary(self) -> dict[str, float | int | str] | None:
        """The adversary's settings for run.json, None without one."""
        if self.adversary_weight == 0:
            return None
        return {
            "weight": float(self.adversary_weight),
            "schedule": self.adversary_schedule,
            "lr": float(self.adversary_lr),
            "hidden": int(self.adversary_hidden),
        }

    def _check_names(self) -> None:
        """Task, scenario, backbone and device must be ones the study knows."""
        import torch

        from cxrstudy.models import get_spec

        if self.task not in config.TASKS:
            _fail("task", f"unknown task; expected one of {sorted(config.TASKS)}", self.task)
        if self.scenario not in config.SCENARIOS:
            _fail("scenario", f"unknown scenario; expected one of {config.SCENARIOS}", self.scenario)
        try:
            get_spec(self.backbone)
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"TrainConfig.backbone: {exc}") from None
        if not isinstance(self.device, str):
            _fail("device", "must be a string: auto, cpu, cuda or cuda:N", self.device)
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                _fail("device", "is not a device: use auto, cpu, cuda or cuda:N", self.device)


def stage_epochs(total: int, n_stages: int) -> list[int]:
    """``total`` epochs split over ``n_stages`` stages as evenly as possible, later stages taking the remainder
    (8 over 3: [2, 3, 3]); every stage gets at least one."""
    if n_stages < 1 or total < n_stages:
        raise ValueError(f"cannot split {total} epoch(s) over {n_stages} stage(s): need at least one each")
    base, extra = divmod(total, n_stages)
    return [base + (1 if i >= n_stages - extra else 0) for i in range(n_stages)]


def _fail(name: str, what: str, value: object) -> NoReturn:
    """Raise the one error shape: ``TrainConfig.<name> <what> (got <value>)``."""
    raise ValueError(f"TrainConfig.{name} {what} (got {value!r})")


def _check_int(name: str, value: object, low: int) -> None:
    """An integer (not a bool) of at least ``low``."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        _fail(name, f"must be an integer >= {low}", value)


def _check_real(
    name: str, value: object, *, low: float, low_open: bool = False, high: float | None = None
) -> None:
    """A finite number above ``low`` (strictly when ``low_open``) and below ``high`` (strictly)."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = (v > low if low_open else v >= low) and (high is None or v < high)
    if not ok:
        bounds = f"{'>' if low_open else '>='} {low:g}" + (f" and < {high:g}" if high is not None else "")
        _fail(name, f"must be a finite number {bounds}", value)


def _check_stages(stages: object) -> tuple[int, ...]:
    """Finetune stages: strictly increasing integers >= 1 (groups unfrozen per stage), as a tuple."""
    if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence):
        _fail("finetune_stages", "must be a sequence of integers or None", stages)
    sched = tuple(stages)  # type: ignore[arg-type]
    ints = all(isinstance(s, Integral) and not isinstance(s, bool) for s in sched)
    if not sched or not ints or sched[0] < 1 or any(b <= a for a, b in zip(sched, sched[1:], strict=False)):
        _fail("finetune_stages", "must be strictly increasing integers >= 1", stages)
    return tuple(int(s) for s in sched)


def _check_range(value: object) -> tuple[float, float]:
    """``lr_range``: two finite numbers 0 < low <= high, as a tuple of floats."""
    ok = isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) == 2
    ok = ok and all(isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not ok or not 0 < float(value[0]) <= float(value[1]):  # type: ignore[index]
        _fail("lr_range", "must be two finite numbers 0 < low <= high", value)
    return float(value[0]), float(value[1])  # type: ignore[index]
