"""The analysis plan (``params/plan.yaml``), fixed before the numbers: the default profile's variants, the
recommended variant's selection rule and the scorecard goals; and its record in results.json (path, SHA-256, the
commit that last changed it, whether it matches the committed file)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

import yaml

from cxrstudy import config

PLAN_PATH: Path = config.PARAMS_DIR / "plan.yaml"
#: The plan's sections and the selection rule's keys (notebook 05's ``selection_<key>`` parameters).
SECTIONS: tuple[str, ...] = ("variants", "selection", "goals")
SELECTION_KEYS: tuple[str, ...] = ("task", "scenario", "max_drop", "contrast")


def load_plan(path: Path | str = PLAN_PATH) -> dict[str, Any]:
    """The plan's mapping; ValueError naming the file when a section or a selection key is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the analysis plan is missing")
    plan = yaml.safe_load(path.read_text()) or {}
    if not isinstance(plan, dict) or (missing := [s for s in SECTIONS if s not in plan]):
        raise ValueError(f"{path}: the plan needs the sections {list(SECTIONS)}")
    if missing := [k for k in SELECTION_KEYS if k not in (plan["selection"] or {})]:
        raise ValueError(f"{path}: selection lacks {missing}")
    return plan


def selection(plan: dict[str, Any] | None = None, **given: Any) -> dict[str, Any]:
    """The selection rule's parameters from the plan; a ``given`` value that is not None must equal the plan's
    (ValueError naming the key: the rule is fixed in the plan, not per run)."""
    plan = load_plan() if plan is None else plan
    rule = {k: plan["selection"][k] for k in SELECTION_KEYS}
    for key, value in given.items():
        if key not in rule:
            raise ValueError(f"plan selection: unknown key {key!r}; expected {list(SELECTION_KEYS)}")
        if value is not None and value != rule[key]:
            raise ValueError(f"selection_{key}={value!r} differs from {PLAN_PATH.name}'s {rule[key]!r}: edit the plan")
    return rule


def goals(plan: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The goals as ``scorecard.goals_table()`` spells them (goal, metric, op, target, relative_to, margin)."""
    plan = load_plan() if plan is None else plan
    return [
        {"goal": g, "metric": v["metric"], "op": v["op"], "target": v.get("target"),
         "relative_to": v.get("relative_to"), "margin": float(v.get("margin", 0.0))}
        for g, v in plan["goals"].items()
    ]


def _git(root: Path, *args: str) -> bytes | None:
    """Output of a git command in ``root``; None when git or the object is unavailable."""
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def plan_record(path: Path | str = PLAN_PATH, root: Path | str = config.ROOT) -> dict[str, Any]:
    """results.json ``plan``: ``path`` (relative to the repository), ``sha256``, ``commit`` (the last commit that
    changed the file, None outside git or when never committed) and ``matches_head`` (the file equals HEAD's
    version; None when that cannot be told)."""
    path, root = Path(path).resolve(), Path(root).resolve()
    rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    data = path.read_bytes() if path.is_file() else None
    commit = _git(root, "log", "-1", "--format=%H", "--", rel)
    head = _git(root, "show", f"HEAD:{rel}") if commit else None
    return {
        "path": rel,
        "sha256": hashlib.sha256(data).hexdigest() if data is not None else None,
        "commit": (commit.decode().strip() or None) if commit is not None else None,
        "matches_head": None if head is None or data is None else head == data,
    }
