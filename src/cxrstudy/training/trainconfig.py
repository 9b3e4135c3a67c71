"""``TrainConfig``: everything one training run is asked to do, checked when it is built."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import NoReturn

from cxrstudy import config

#: Smallest allowed value of each integer parameter.
_INT_MINIMUM: dict[str, int] = {
    "image_size": 1,
    "epochs": 1,
    "batch_size": 2,  # batch norm needs two images per batch
    "seed": 0,
    "num_workers": 0,
    "patience": 0,
}


@dataclass(frozen=True)
class TrainConfig:
    """One run's task, scenario, decomposition, model and schedule; a bad value raises ValueError naming it.
    ``epochs`` is per stage for finetune; ``wd`` None is fastai's default (0.01, decoupled)."""

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

    def __post_init__(self) -> None:
        self._check_names()
        for name, low in _INT_MINIMUM.items():
            _check_int(name, getattr(self, name), low)
        for name in ("decomposition", "use_lr_find"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, "must be True or False", getattr(self, name))
        _check_real("lr", self.lr, low=0.0, low_open=True)
        _check_real("lr_mult", self.lr_mult, low=0.0, low_open=True)
        if self.wd is not None:
            _check_real("wd", self.wd, low=0.0)
        _check_real("dropout", self.dropout, low=0.0, high=1.0)
        if self.finetune_stages is not None:
            object.__setattr__(self, "finetune_stages", _check_stages(self.finetune_stages))

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
