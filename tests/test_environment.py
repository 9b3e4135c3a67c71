"""pyproject.toml pins every dependency, and environment.yml carries the same pins."""

from __future__ import annotations

import importlib.util
import tomllib
from importlib import metadata
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def environment_requirements() -> tuple[list[str], list[Requirement]]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    return conda, [Requirement(r) for r in pip]


def test_every_dependency_is_pinned_exactly():
    for req in pyproject_requirements():
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{req} is not pinned with =="


def test_environment_yml_matches_pyproject():
    conda, pip = environment_requirements()
    assert "python=3.11" in conda and "pip" in conda
    assert sorted(map(str, pip)) == sorted(map(str, pyproject_requirements())), (
        "environment.yml and pyproject.toml disagree; run `python scripts/sync_environment.py`"
    )


def test_installed_versions_match_the_pins():
    for req in pyproject_requirements():
        if req.marker is not None and not req.marker.evaluate():
            continue
        installed = metadata.version(req.name)
        assert req.specifier.contains(installed, prereleases=True), (
            f"{req.name} {installed} installed, pinned {req}"
        )


def test_environment_yml_is_what_the_sync_script_writes():
    spec = importlib.util.spec_from_file_location(
        "sync_environment", ROOT / "scripts" / "sync_environment.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "environment.yml").read_text() == module.render(), (
        "run `python scripts/sync_environment.py`"
    )
