"""Shared pytest fixtures (others may append fixtures below, in their own clearly named section)."""

from __future__ import annotations

from pathlib import Path

import pytest

#: The offline mirror of the upstream repositories (read-only; never copied into the repository).
MIRROR_ROOT = Path(__file__).resolve().parents[2] / "shared" / "cxr-mirror"


# ---------------------------------------------------------------------------------------------------------
# data build (images, sources, download, build)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mirror_root() -> Path:
    """Root of the offline data mirror; skips the test when this machine has none."""
    if not (MIRROR_ROOT / "MIRROR.md").is_file():
        pytest.skip(f"offline data mirror not found at {MIRROR_ROOT} (expected <repo>/../shared/cxr-mirror)")
    return MIRROR_ROOT


@pytest.fixture(scope="session")
def mirror_file(mirror_root: Path):
    """Function ``(source_name, path) -> Path`` of a file in the mirror, by short source name."""
    from cxrstudy.data.sources import SOURCES

    def _get(source_name: str, path: str) -> Path:
        src = SOURCES[source_name]
        p = mirror_root / src.repo / src.commit / path
        if not p.is_file():
            pytest.skip(f"mirror file {p} is missing")
        return p

    return _get
