"""The one home for checksums, atomic writes (temporary file in the same folder, then rename) and JSON.

Atomic writes give the final file the mode a plain ``open`` would: ``0o666`` less the process umask.

JSON policy: every JSON file the study writes is strict JSON. NaN and infinities become ``null``, NumPy
scalars and arrays become Python numbers and lists, tuples become lists, paths become strings; any
other value JSON cannot hold is an error, not a silent ``str()``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np


def sha256_bytes(data: bytes) -> str:
    """SHA-256 hex digest of bytes."""
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    """SHA-256 hex digest of UTF-8 text."""
    return sha256_bytes(text.encode("utf-8"))


def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where ``/proc`` tells it, else set and restored under a lock."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        old = os.umask(0o022)
        os.umask(old)
    return old


def _publish(tmp: str | Path, path: Path) -> None:
    """Give ``tmp`` the mode the umask gives a new file and rename it over ``path``."""
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, path)


@contextmanager
def atomic_writer(path: Path | str, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit rename it over ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
        _publish(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A temporary path beside ``path`` for writers that want a file name (PIL, matplotlib, torch.save)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix + ".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        _publish(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write bytes atomically."""
    with atomic_writer(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write UTF-8 text atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def replace_section(path: Path | str, start: str, end: str, body: str) -> None:
    """Rewrite ``path`` with the text between its markers ``start`` and ``end`` replaced by ``body`` (markers kept);
    ValueError naming the file when a marker is missing."""
    text = Path(path).read_text()
    if start not in text or end not in text.split(start, 1)[1]:
        raise ValueError(f"{path} has no {start} ... {end} section")
    head, rest = text.split(start, 1)
    atomic_write_text(path, f"{head}{start}\n{body}\n{end}{rest.split(end, 1)[1]}")


def to_jsonable(obj: Any) -> Any:
    """A plain-JSON copy of ``obj`` under the module's policy (NaN/inf to None, NumPy to Python)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dumps_json(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON text of ``obj`` under the module's policy; a TypeError names a value JSON cannot hold."""
    return json.dumps(to_jsonable(obj), indent=indent, allow_nan=False) + "\n"


def write_json(path: Path | str, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON, atomically; returns the path."""
    atomic_write_text(path, dumps_json(obj, indent))
    return Path(path)

