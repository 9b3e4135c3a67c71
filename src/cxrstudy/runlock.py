"""One run per profile at a time: a lock file in ``reports/<profile>/`` naming the process that holds it.

A second ``make reproduce`` or ``make evaluate`` on a profile that is running fails at once and names the
running process. A lock left behind by a process that no longer exists (killed, machine rebooted) is
taken over.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

LOCK_NAME = ".lock"


class RunLocked(RuntimeError):
    """Another live process holds the profile's lock."""


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict | None:
    """The lock's record, or None when it is unreadable (half-written by a dead process)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _holder_is_live(record: dict | None) -> bool:
    """Whether the recorded holder is another process that still runs on this host.

    A lock written on another host (a reused work tree, a renamed container) cannot be checked and is
    taken over, like an unreadable one.
    """
    if not record or record.get("host") != socket.gethostname():
        return False
    pid = int(record.get("pid", -1))
    return pid > 0 and pid != os.getpid() and _alive(pid)


def _try_create(path: Path, record: dict) -> bool:
    """Create the lock file with its content in one step (hard link of a full temp file); False if it exists."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record) + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


@contextmanager
def profile_lock(out_dir: Path, what: str) -> Iterator[Path]:
    """Hold ``out_dir/.lock`` for the duration of the block; RunLocked names a live holder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "what": what,
        "command": " ".join(sys.argv),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    for _ in range(3):
        if _try_create(path, record):
            break
        holder = _read(path)
        if _holder_is_live(holder):
            raise RunLocked(
                f"{out_dir} is in use by process {holder.get('pid')} on {holder.get('host')} "
                f"({holder.get('what')}: `{holder.get('command')}`, since {holder.get('started')}); "
                f"wait for it to finish or stop it (a lock of a dead process is taken over: {path})"
            )
        path.unlink(missing_ok=True)  # stale: its process is gone
    else:
        raise RunLocked(f"could not take the lock {path} (another process keeps re-creating it)")
    try:
        yield path
    finally:
        if (_read(path) or {}).get("pid") == os.getpid():
            path.unlink(missing_ok=True)
