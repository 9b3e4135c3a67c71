"""Notebooks are committed clean and thin, and every profile's parameters match what notebooks declare."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

from cxrstudy import config, pipeline

NOTEBOOKS = sorted(config.NOTEBOOKS_DIR.glob("*.ipynb"))
PROFILES = pipeline.profile_names()


def test_the_study_has_its_numbered_notebooks():
    names = [p.stem for p in NOTEBOOKS]
    for prefix in ("00_", "01_", "02_", "03_", "04_", "05_"):
        assert any(n.startswith(prefix) for n in names), f"no notebook {prefix}* in {config.NOTEBOOKS_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs, f"{path.name} cell {i} has outputs"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_title_and_parameters(path: Path):
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.lstrip().startswith("# "), (
        f"{path.name}: first cell must be a markdown title saying what the step does"
    )
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
    declared = pipeline.declared_parameters(path)
    assert {"profile", "seed"} <= set(declared), f"{path.name}: declare profile and seed"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_thin(path: Path):
    """Logic lives in src/: no function or class definitions in notebooks."""
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            for line in cell.source.splitlines():
                assert not line.startswith(("def ", "class ")), (
                    f"{path.name} cell {i} defines {line!r}; move it to src/"
                )


@pytest.mark.parametrize("name", PROFILES)
def test_profile_resolves(name: str):
    steps = pipeline.step_parameters(pipeline.load_profile(name))
    assert steps[0][0].notebook.startswith("00_")
    assert all(params.get("profile") == name for _, params in steps)


def test_profiles_exist():
    assert {"smoke", "default", "full"} <= set(PROFILES)


def _cells(nb) -> list[tuple[str, str, tuple[str, ...]]]:
    """What a pair must agree on: each cell's type, source and tags."""
    return [(c.cell_type, c.source.strip(), tuple(c.get("metadata", {}).get("tags", []))) for c in nb.cells]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_and_its_paired_script_agree(path: Path):
    """Each notebook is its own source, paired by jupytext with a percent script (notebooks/jupytext.toml)."""
    script = path.with_suffix(".py")
    assert script.is_file(), f"{path.name} has no paired {script.name}; run `jupytext --sync {path}`"
    assert _cells(jupytext.read(path)) == _cells(jupytext.read(script)), (
        f"{path.name} and {script.name} disagree; save the notebook in JupyterLab or run "
        f"`.venv/bin/jupytext --sync {path.relative_to(config.ROOT)}`"
    )


def test_every_paired_script_has_its_notebook():
    scripts = {p.stem for p in config.NOTEBOOKS_DIR.glob("*.py")}
    assert scripts == {p.stem for p in NOTEBOOKS}


def test_notebooks_pass_ruff():
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.is_file():
        pytest.skip("ruff is not installed in this environment (make setup installs the dev extras)")
    done = subprocess.run([str(ruff), "check", "notebooks"], cwd=config.ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
