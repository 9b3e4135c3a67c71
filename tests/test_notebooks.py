"""Notebooks are committed clean and thin, and every profile's parameters match what notebooks declare."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import pytest

from cxrstudy import config, nbtools, pipeline

NOTEBOOKS = sorted(config.NOTEBOOKS_DIR.glob("*.ipynb"))
PROFILES = sorted(p.stem for p in config.PARAMS_DIR.glob("*.yaml"))


def test_the_study_has_its_numbered_notebooks():
    names = [p.stem for p in NOTEBOOKS]
    for prefix in ("00_", "01_", "02_", "03_", "04_"):
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
    steps = pipeline.resolve_parameters(pipeline.load_profile(name))
    assert steps[0][0].notebook.startswith("00_")
    assert all(params.get("profile") == name for _, params in steps)


def test_profiles_exist():
    assert {"smoke", "default", "full"} <= set(PROFILES)


GENERATORS = sorted((config.ROOT / "scripts").glob("make_notebook*.py"))


@pytest.mark.parametrize("script", GENERATORS, ids=lambda p: p.name)
def test_committed_notebooks_are_what_their_generator_writes(script: Path, tmp_path: Path, monkeypatch):
    """Each notebook has one source: its generator script; the committed file must match its output."""
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written: list[Path] = []

    def redirect(cells, path):
        written.append(path)
        return nbtools.write_notebook(cells, tmp_path / path.name)

    monkeypatch.setattr(module, "write_notebook", redirect)
    module.main()
    assert written, f"{script.name} wrote no notebook"
    for path in written:
        assert (tmp_path / path.name).read_text() == path.read_text(), (
            f"{path.name} differs from what {script.name} writes; run `python {script.relative_to(config.ROOT)}`"
        )
