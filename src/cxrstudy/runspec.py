"""``RunSpec``: the one place that knows what identifies a training run and how its id is spelled.

A run is identified by its task, backbone, scenario, decomposition setting, seed and variant; it sees its
films through an input view at an image size. Everything else that names, groups, labels or re-reads a
run (run folders, results.json entries, seed summaries, figure labels, the pipeline's expected runs,
inference) goes through this class; nothing parses a run id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from cxrstudy.config import BASELINE_VARIANT

#: How a run id is spelled (the run's folder name); the variant suffix follows for any variant but the baseline.
RUN_ID_FORMAT = "{task}__{backbone}__{scenario}__{decomposition}__seed{seed}"
VARIANT_SUFFIX = "__{variant}"
#: Fields that identify a run, in the order of run.json and results.json.
IDENTITY: tuple[str, ...] = ("task", "backbone", "scenario", "decomposition", "seed", "variant")
#: What a configuration is: the identity without the seed (its runs differ only in the seed).
CONFIG_KEYS: tuple[str, ...] = tuple(k for k in IDENTITY if k != "seed")
#: Fields that say how the run sees a film, with the value a run.json without them means.
VIEW_DEFAULTS: dict[str, Any] = {"input_view": "full", "equalize": False, "view_margin": 0.05}


@dataclass(frozen=True)
class RunSpec:
    """What identifies one run (task, backbone, scenario, decomposition, seed, variant) and how it sees films."""

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

    @property
    def run_id(self) -> str:
        """The run's folder name, :data:`RUN_ID_FORMAT` (decomposition spelled ``decomp`` or ``nodecomp``) plus
        :data:`VARIANT_SUFFIX` for any variant but the baseline."""
        fields = {**self.to_record(), "decomposition": self.decomposition_name}
        base = RUN_ID_FORMAT.format(**fields)
        return base if self.variant == BASELINE_VARIANT else base + VARIANT_SUFFIX.format(**fields)

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

    def label(self, sep: str = "\n", task: bool = True) -> str:
        """A short label for figures: ``task<sep>backbone scenario decomp seedN [variant]``."""
        parts = [self.backbone, self.scenario, self.decomposition_name, f"seed{self.seed}"]
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

        A record without ``variant`` is the baseline's; one without view fields saw the full film."""
        missing = [k for k in IDENTITY if k != "variant" and k not in info]
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
        )

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> list[RunSpec]:
        """Every run a transfer step's parameters ask for: seeds ``seed .. seed + n_seeds - 1`` (outer) times the
        ``decomposition`` values (one value or a list; inner), in that order."""
        decomps = params["decomposition"]
        decomps = list(decomps) if isinstance(decomps, (list, tuple)) else [decomps]
        own = {f.name for f in fields(cls)} - {"decomposition", "seed"}
        base = {k: params[k] for k in own if k in params}
        first, n = int(params["seed"]), int(params.get("n_seeds", 1))
        return [cls(decomposition=bool(d), seed=first + i, **base) for i in range(n) for d in decomps]
