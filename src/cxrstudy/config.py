"""One place for paths, class names, tasks, remote locations, seeds and devices."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np

ROOT: Path = Path(os.environ.get("CXR_ROOT", Path(__file__).resolve().parents[2]))
DATA_DIR: Path = Path(os.environ.get("CXR_DATA_DIR", ROOT / "data"))
RAW_DIR: Path = DATA_DIR / "raw"
PROCESSED_DIR: Path = DATA_DIR / "processed"
CACHE_DIR: Path = Path(os.environ.get("CXR_CACHE_DIR", DATA_DIR / "cache"))  # derived data only: safe to delete
MANIFEST_PATH: Path = PROCESSED_DIR / "manifest.csv"
EXCLUDED_PATH: Path = PROCESSED_DIR / "excluded.csv"
REPORTS_DIR: Path = Path(os.environ.get("CXR_REPORTS_DIR", ROOT / "reports"))
NOTEBOOKS_DIR: Path = ROOT / "notebooks"
PARAMS_DIR: Path = ROOT / "params"

#: The study's class names, in the order used for every probability column and confusion matrix.
CLASSES: tuple[str, ...] = ("covid", "normal", "pneumonia")

#: Tasks: the paper's two-class task and the clinically harder three-class task.
TASKS: dict[str, tuple[str, ...]] = {
    "covid_vs_normal": ("covid", "normal"),
    "covid_normal_pneumonia": ("covid", "normal", "pneumonia"),
}

#: Transfer scenarios (``scratch`` is the no-transfer control).
SCENARIOS: tuple[str, ...] = ("shallow", "deep", "finetune", "scratch")
#: The variant of the unmodified pipeline (full film, no adversary); its run ids carry no suffix.
BASELINE_VARIANT = "baseline"
#: Folds of the cross-validation the manifest's ``fold`` column records (profiles set their own ``folds``).
CV_FOLDS = 5
#: A variant's name (profiles' ``variants``): lower-case words joined by underscores; it ends the run id.
VARIANT_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

#: Where the upstream repositories are read from; ``CXR_MIRROR`` overrides it (path, file:// or http(s)://).
DEFAULT_BASE_URL = "https://raw.githubusercontent.com"
#: GitHub's API, used only to list folder-labelled sources online; ``CXR_GITHUB_API`` overrides it.
DEFAULT_GITHUB_API = "https://api.github.com"

#: Paper figures the study is compared against (accuracy, as fractions), and where they were published.
PAPER_ACCURACY = 0.9417
PAPER_CITATION = "Miroshnichenko & Mikhelev 2021, J. Phys.: Conf. Ser. 1801 012010"
DETRAC_ACCURACY = 0.9310
DETRAC_CITATION = "Abbas, Abdelsamea & Gaber 2021, Applied Intelligence 51:854-864 (DeTraC, VGG19)"


#: Environment for every process that runs the models: glibc then keeps freed activation memory instead of
#: returning it to the OS and faulting it in again (about 2x CPU inference on 2 cores; both are needed).
#: It acts only when set before the Python process starts: the Jupyter kernel
#: spec carries it (scripts/setup.sh), the pipeline passes it to papermill's kernels and command-line
#: entry points re-execute themselves with it. A value the user set wins.
RUNTIME_ENV: dict[str, str] = {"MALLOC_MMAP_THRESHOLD_": "2147483647", "MALLOC_TRIM_THRESHOLD_": "2147483647"}


def runtime_env() -> dict[str, str | None]:
    """The runtime variables as this process sees them (recorded in run.json)."""
    return {k: os.environ.get(k) for k in RUNTIME_ENV}


def apply_runtime_env() -> None:
    """Set the runtime variables for child processes (kernels), keeping any value the user set."""
    for k, v in RUNTIME_ENV.items():
        os.environ.setdefault(k, v)


def reexec_with_runtime_env() -> None:
    """Re-execute this process with the runtime variables when they are missing (allocator settings need it)."""
    import sys

    if all(k in os.environ for k in RUNTIME_ENV) or os.environ.get("CXR_NO_REEXEC"):
        return
    apply_runtime_env()
    os.execv(sys.executable, list(sys.orig_argv))


def mirror_base() -> str:
    """Base URL or path for raw upstream files: ``$CXR_MIRROR`` if set, else GitHub's raw host."""
    return os.environ.get("CXR_MIRROR", "").strip() or DEFAULT_BASE_URL


def github_api() -> str:
    """Base URL of the GitHub API used to list folders online: ``$CXR_GITHUB_API`` if set."""
    return os.environ.get("CXR_GITHUB_API", "").strip() or DEFAULT_GITHUB_API


def task_classes(task: str) -> tuple[str, ...]:
    """Class names of a task; a clear error for an unknown task."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    return TASKS[task]


def profile_dir(profile: str) -> Path:
    """Folder holding everything a profile's run writes: ``reports/<profile>/``."""
    return REPORTS_DIR / profile


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency, but config stays importable
        return
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def resolve_device(device: str = "auto") -> torch.device:  # noqa: F821
    """``auto`` gives CUDA when present, else CPU; ``cpu``/``cuda``/``cuda:N`` force one."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} was asked for but CUDA is not available on this machine")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"bad device {device!r}: use auto, cpu, cuda or cuda:N") from exc
