"""What one throughput run of a task system measured, and how CPU time per process is read.

Shared by bench/cpu_per_task.py (taskmode), bench/celery_reference.py (Celery + Redis) and
bench/compare.py, so both systems are measured and printed the same way.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class RunFigures:
    """N no-op tasks through one system: how long submitting and completing took, CPU per task."""

    system: str
    tasks: int
    submit_s: float  # the submission loop alone
    complete_s: float  # first submission -> every task seen done
    cpu_ms: dict[str, float]  # CPU milliseconds per task, by process

    @property
    def submit_rate(self) -> float:
        return self.tasks / self.submit_s

    @property
    def completion_rate(self) -> float:
        return self.tasks / self.complete_s

    @property
    def total_cpu_ms(self) -> float:
        return sum(self.cpu_ms.values())


def descendants_cpu_seconds(process: psutil.Process) -> float:
    """CPU of every descendant, living or already reaped.

    Reaped ones count through the parent's children_* times, so a pool process replaced during
    the run is not lost.
    """
    own = process.cpu_times()
    total: float = own.children_user + own.children_system
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # it may exit between listing and reading
            times = child.cpu_times()
            total += times.user + times.system
    return total


def cpu_seconds(processes: dict[str, psutil.Process], descendants_as: dict[str, str]) -> dict[str, float]:
    """CPU seconds so far of each named process (its threads included, its children not).

    For a process named in `descendants_as`, its descendants are added as a row of their own
    under the given name (an executor's instances, a Celery worker's pool processes).
    """
    out = {}
    for name, process in processes.items():
        times = process.cpu_times()
        out[name] = times.user + times.system
        if name in descendants_as:
            out[descendants_as[name]] = descendants_cpu_seconds(process)
    return out


def ms_per_task(before: dict[str, float], after: dict[str, float], tasks: int) -> dict[str, float]:
    return {name: (spent - before.get(name, 0.0)) / tasks * 1000 for name, spent in after.items()}


def print_cpu_per_task(figures: RunFigures) -> None:
    print(f"\n== {figures.system}: CPU per task, {figures.tasks} no-op tasks, "
          f"{figures.completion_rate:.0f} tasks/s end to end ==")
    for name, per_task_ms in figures.cpu_ms.items():
        print(f"{name:24s} {per_task_ms:6.2f} ms")
    cores = os.cpu_count() or 1
    print(f"{'all processes':24s} {figures.total_cpu_ms:6.2f} ms  "
          f"({cores} cores: at most {cores * 1000 / figures.total_cpu_ms:.0f} tasks/s)")
