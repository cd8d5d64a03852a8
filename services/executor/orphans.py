"""Instance process groups an executor left behind when it died.

An instance's own process dies with its executor (PR_SET_PDEATHSIG), but processes it started
itself (a shell's children, a forking server) would not, and would go on running a task that is
being retried elsewhere. Each instance's process group is therefore registered in a file under
the pool's directory; a starting executor kills the groups whose registering executor is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Final

import psutil

log = logging.getLogger(__name__)
REGISTRY: Final = ".groups"


def _me() -> str:
    return f"{os.getpid()} {psutil.Process().create_time()}"


def register(work_dir: Path, *, pgid: int, instance_id: str) -> Path:
    """Record that this executor owns process group `pgid` (running `instance_id`)."""
    registry = work_dir / REGISTRY
    registry.mkdir(parents=True, exist_ok=True)
    path = registry / str(pgid)
    path.write_text(f"{_me()} {instance_id}\n")
    return path


def unregister(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _owner_alive(pid: int, created: float) -> bool:
    try:
        started: float = psutil.Process(pid).create_time()
        return abs(started - created) < 0.01
    except psutil.Error:
        return False


def reap(work_dir: Path) -> int:
    """Kill the registered groups of executors that no longer run; returns how many were found."""
    registry = work_dir / REGISTRY
    if not registry.is_dir():
        return 0
    reaped = 0
    for path in registry.iterdir():
        try:
            owner_pid, owner_created, instance_id = path.read_text().split()
            pgid = int(path.name)
        except (OSError, ValueError):
            unregister(path)
            continue
        if _owner_alive(int(owner_pid), float(owner_created)):
            continue
        for proc in psutil.process_iter():
            # Only members of that group that still carry the instance's id: a recycled group
            # id belongs to someone else.
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(proc.pid) == pgid and proc.environ().get("FC_INSTANCE_ID") == instance_id:
                    proc.send_signal(signal.SIGKILL)
                    reaped += 1
        unregister(path)
    if reaped:
        log.warning("killed processes left behind by a dead executor", extra={"count": reaped})
    return reaped
