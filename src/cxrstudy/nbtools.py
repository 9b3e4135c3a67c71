"""Writing the study's notebooks from their generator scripts (``scripts/make_notebook*.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nbformat
from nbformat.notebooknode import NotebookNode

from cxrstudy.fileio import atomic_write_text
from cxrstudy.pipeline import KERNEL_NAME


def write_notebook(cells: Sequence[NotebookNode], path: Path) -> Path:
    """Write a clean notebook atomically: project kernel, no outputs, stable cell ids (small diffs)."""
    nb = nbformat.v4.new_notebook(cells=list(cells))
    nb.metadata["kernelspec"] = {
        "name": KERNEL_NAME,
        "display_name": f"Python ({KERNEL_NAME})",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{path.stem[:40]}-{i:02d}"
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nbformat.validate(nb)
    atomic_write_text(path, nbformat.writes(nb) + "\n")
    print(f"wrote {path}")
    return path
