"""Write environment.yml from pyproject.toml's pins (conda users get the same environment).

Run after changing a pin: `python scripts/sync_environment.py`. tests/test_environment.py fails
when the two files disagree.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pins() -> list[str]:
    """Runtime plus dev requirement strings from pyproject.toml, in file order."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"]) + list(project["optional-dependencies"]["dev"])


def render() -> str:
    """environment.yml text: python 3.11 and pip, then every pin in a pip section."""
    lines = [
        "# Generated from pyproject.toml by scripts/sync_environment.py; do not edit by hand.",
        "# conda env create -f environment.yml && conda activate cxrstudy && pip install -e . --no-deps",
        "name: cxrstudy",
        "channels:",
        "  - conda-forge",
        "dependencies:",
        "  - python=3.11",
        "  - pip",
        "  - pip:",
    ]
    lines += [f'      - "{p}"' for p in pins()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    target = ROOT / "environment.yml"
    target.write_text(render())
    print(f"wrote {target} ({len(pins())} pins)", file=sys.stderr)
