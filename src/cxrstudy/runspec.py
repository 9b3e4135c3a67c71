"""``RunSpec``: the one place that knows what identifies a training run and how its id is spelled.

A run is identified by its task, backbone, scenario, decomposition setting, seed, variant and cross-validation
fold; it sees its films through an input view at an image size. A configuration's runs differ in the fold (and,
with repeated cross-validation, in the seed); a spec with ``fold=None`` names the configuration's out-of-fold
whole (its id is the configuration id). Everything else that names, groups, labels or re-reads a
run (run folders, results.json entries, seed summaries, figure labels, the pipeline's expected runs,
inference) goes through this class; nothing parses a run id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from cxrstudy.config import BASELINE_VARIANT

#: How a run id is spelled (the run's folder name): the configuration's part, then the fold suffix; the variant
#: suffix follows for any variant but the baseline. A configuration id is the run id without the fold suffix.
CONFIG_ID_FORMAT = "{task}__{backbone}__{scenario}__{decomposition}__seed{seed}"
FOLD_SUFFIX = "__fold{fold}"
VARIANT_SUFFIX = "__{variant}"
#: How a deep-feature-reweighting run's variant is spelled from its base run's: ``dfr`` for the baseline's,
#: ``<variant>_dfr`` for any other (``lung`` -> ``lung_dfr``).
DFR_VARIANT, DFR_SUFFIX = "dfr", "_dfr"
#: Fields that identify a run, in the order of run.json and results.json.
IDENTITY: tuple[str, ...] = ("task", "backbone", "scenario", "decomposition", "seed", "variant", "fold")
#: What a configuration is: the identity without the seed and the fold (its runs differ only in those).
CONFIG_KEYS: tuple[str, ...] = tuple(k for k in IDENTITY if k not in ("seed", "fold"))
#: Fields that say how the run sees a film, with the value a run.json without them means.
VIEW_DEFAULTS: dict[str, Any] = {"input_view": "full", "equalize": False, "view_margin": 0.05}


@dataclass(frozen=True)
class RunSpec:
    """What identifies one run (task, backbone, scenario, decomposition, seed, variant, fold) and how it sees films."""

    task: str
    backbone: str
    scenario: str
    decomposition: bool
    seed: int
    variant: str = BASELINE_VARIANT
    image_size: int | None = None
    input_view: str = "full"
    equalize: bool = False
    view_margin: float = 0.05
    fold: int | None = 0

    @property
    def run_id(self) -> str:
        """The run's folder name: :data:`CONFIG_ID_FORMAT` (decomposition spelled ``decomp`` or ``nodecomp``), then
        :data:`FOLD_SUFFIX` (none with ``fold=None``: the :attr:`config_id`) and :data:`VARIANT_SUFFIX` for any variant
        but the baseline."""
        fields = {**self.to_record(), "decomposition": self.decomposition_name}
        base = CONFIG_ID_FORMAT.format(**fields) + ("" if self.fold is None else FOLD_SUFFIX.format(**fields))
        return base if self.variant == BASELINE_VARIANT else base + VARIANT_SUFFIX.format(**fields)

    @property
    def config_id(self) -> str:
        """The run id without its fold suffix: names the configuration's cross-validation (one per seed when it is
        repeated)."""
        return RunSpec(**{**self.__dict__, "fold": None}).run_id

    @property
    def train_seed(self) -> int:
        """The seed the run trains with: ``seed + fold`` (the seed itself for the out-of-fold whole)."""
        return self.seed + (self.fold or 0)

    @property
    def decomposition_name(self) -> str:
        """``decomp`` or ``nodecomp``."""
        return "decomp" if self.decomposition else "nodecomp"

    @property
    def config_key(self) -> tuple:
        """(task, backbone, scenario, decomposition, variant): the configuration, i.e. the run without its seed."""
        return tuple(getattr(self, k) for k in CONFIG_KEYS)

    @property
    def key(self) -> tuple:
        """:attr:`config_key` plus the seed: what identifies one run."""
        return (*self.config_key, self.seed)

    @property
    def view(self) -> tuple[str, bool, float]:
        """(input_view, equalize, view_margin): how the run sees a film."""
        return self.input_view, self.equalize, self.view_margin

    @property
    def dfr(self) -> RunSpec:
        """The deep-feature-reweighting run built on this run (its last layer retrained, ``training.dfr``): the same
        identity and view, variant :data:`DFR_VARIANT` (from the baseline) or ``<variant>`` + :data:`DFR_SUFFIX`;
        ValueError for a decomposition-on run (DFR retrains a class head) or a DFR run itself."""
        if self.decomposition:
            raise ValueError(f"{self.run_id}: DFR applies to decomposition-off runs only")
        if self.variant == DFR_VARIANT or self.variant.endswith(DFR_SUFFIX):
            raise ValueError(f"{self.run_id}: already a DFR run")
        name = DFR_VARIANT if self.variant == BASELINE_VARIANT else self.variant + DFR_SUFFIX
        return RunSpec(**{**self.__dict__, "variant": name})

    def label(self, sep: str = "\n", task: bool = True) -> str:
        """A short label for figures: ``task<sep>backbone scenario decomp seedN [foldN] [variant]``."""
        parts = [self.backbone, self.scenario, self.decomposition_name, f"seed{self.seed}"]
        if self.fold is not None:
            parts.append(f"fold{self.fold}")
        if self.variant != BASELINE_VARIANT:
            parts.append(self.variant)
        rest = " ".join(parts)
        return f"{self.task}{sep}{rest}" if task else rest

    def to_record(self) -> dict[str, Any]:
        """Identity fields (IDENTITY order), for run.json and results.json entries."""
        return {k: getattr(self, k) for k in IDENTITY}

    @classmethod
    def from_record(cls, info: Mapping[str, Any], where: str = "run record") -> RunSpec:
        """The spec of a run.json or results.json run entry; a missing identity field raises ValueError naming it.

        A record without ``variant`` is the baseline's; one without view fields saw the full film; ``fold`` None (or
        absent) is a configuration's out-of-fold whole."""
        missing = [k for k in IDENTITY if k not in ("variant", "fold") and k not in info]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing}")
        size = info.get("image_size")
        return cls(
            task=str(info["task"]),
            backbone=str(info["backbone"]),
            scenario=str(info["scenario"]),
            decomposition=bool(info["decomposition"]),
            seed=int(info["seed"]),
            variant=str(info.get("variant") or BASELINE_VARIANT),
            image_size=int(size) if size is not None else None,
            **{k: type(v)(info.get(k, v)) for k, v in VIEW_DEFAULTS.items()},
            fold=None if info.get("fold") is None else int(info["fold"]),
        )

    @classmethod
    def from_params(cls, params: Mapping[str, Any], derived: bool = True) -> list[RunSpec]:
        """Every run a transfer step's parameters ask for: ``repeats`` cross-validations (outer; repeat r has seed
        ``seed + r * folds``), each fold ``0 .. folds - 1`` (middle), times the ``decomposition`` values (one
        value or a list; inner), in that order; with ``dfr`` true (and ``derived``), each decomposition-off run
        followed by its :attr:`dfr` run (the step writes it after training its base). ``only_fold`` (not None):
        only that fold's runs, of every repeat."""
        decomps = params["decomposition"]
        decomps = list(decomps) if isinstance(decomps, (list, tuple)) else [decomps]
        own = {f.name for f in fields(cls)} - {"decomposition", "seed", "fold"}
        base = {k: params[k] for k in own if k in params}
        first, k, n = int(params["seed"]), int(params.get("folds", 1)), int(params.get("repeats", 1))
        specs = [
            cls(decomposition=bool(d), seed=first + r * k, fold=f, **base)
            for r in range(n)
            for f in range(k)
            if params.get("only_fold") is None or f == int(params["only_fold"])
            for d in decomps
        ]
        with_dfr = derived and bool(params.get("dfr", False))
        return [x for s in specs for x in ([s, s.dfr] if with_dfr and not s.decomposition else [s])]
