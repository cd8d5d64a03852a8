"""taskmode beside a Celery + Redis reference: the same N no-op tasks through each, in one run.

Celery first (bench/celery_reference.py), then taskmode (bench/cpu_per_task.py, on the
bench/full_stack.py helpers), one after the other on the same machine, so neither competes with
the other for the cores. Prints completion and submission rates, CPU per task and the ratios
taskmode/Celery, then each system's CPU per process. Asserts nothing about speed.

Needs the `bench` extra and redis-server (`make bench` installs both). Run:
`python -m bench.compare --tasks 5000`.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from bench.celery_reference import WORKER_PROCESSES, run_celery, versions
from bench.cpu_per_task import run_taskmode
from bench.figures import RunFigures, print_cpu_per_task


def print_row(label: str, taskmode: float, celery: float, fmt: str) -> None:
    print(f"{label:34s} {taskmode:{fmt}} {celery:{fmt}} {taskmode / celery:16.2f}")


def print_comparison(taskmode: RunFigures, celery: RunFigures) -> None:
    print(f"\n== taskmode vs Celery + Redis, {taskmode.tasks} no-op tasks each, "
          f"one after the other on {os.cpu_count()} cores ==")
    print(", ".join(f"{name} {version}" for name, version in versions().items()))
    print(f"\n{'':34s} {'taskmode':>10s} {'Celery':>10s} {'taskmode/Celery':>16s}")
    print_row("completion (tasks/s)", taskmode.completion_rate, celery.completion_rate, "10.0f")
    print_row("submission (tasks/s)", taskmode.submit_rate, celery.submit_rate, "10.0f")
    print_row("CPU per task, all processes (ms)", taskmode.total_cpu_ms, celery.total_cpu_ms, "10.2f")
    print("(rates: above 1 = taskmode faster; CPU: above 1 = taskmode costlier)")
    print("\ncompletion: first submission -> taskmode: all Succeeded in the read model; Celery: all results SUCCESS")
    print("submission: taskmode: signed HTTP, 32 connections; Celery: apply_async in a loop, one thread")
    print(f"Celery worker: prefork, {WORKER_PROCESSES} processes; broker and result backend: one redis-server, "
          f"no persistence")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=5000)
    args = parser.parse_args()
    celery = run_celery(args.tasks)
    taskmode = asyncio.run(run_taskmode(args.tasks))
    print_comparison(taskmode, celery)
    print_cpu_per_task(taskmode)
    print_cpu_per_task(celery)


if __name__ == "__main__":
    main()
