"""Where the CPU goes: CPU milliseconds per task spent by each process of the stack.

Submits N no-op tasks (signed HTTP, 32 connections), waits until all are Succeeded in the read
model, and divides each process's CPU time by N. Run: `python -m bench.cpu_per_task --tasks 3000`.
`run_taskmode` is the same run for other benches (bench/compare.py).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import psutil

import bench.full_stack as full
from bench.figures import RunFigures, cpu_seconds, ms_per_task, print_cpu_per_task

# The executor's instances are its children; they get a row of their own.
DESCENDANTS_AS = {"executor": "executor instances"}


async def run_taskmode(tasks: int) -> RunFigures:
    """A fresh stack, N no-op tasks through it, then the stack is stopped again."""
    with tempfile.TemporaryDirectory() as tmp:
        stack, fc, base = full.start_stack(Path(tmp))
        try:
            await fc.create_function("cpu", code={"index.py": full.NOOP})
            await full.submit_many(base, "cpu", ["warm-up"], concurrency=1)
            processes = {c.name: psutil.Process(c.process.pid) for c in [*stack.infra, *stack.services.values()]}
            processes["load generator"] = psutil.Process()
            before = cpu_seconds(processes, DESCENDANTS_AS)
            started = time.perf_counter()
            ids = [f"c{i:06d}" for i in range(tasks)]
            submit_s = await full.submit_many(base, "cpu", ids, concurrency=32)
            await full.wait_all_succeeded(base, "cpu", ["warm-up", *ids])
            complete_s = time.perf_counter() - started
            after = cpu_seconds(processes, DESCENDANTS_AS)
        finally:
            await fc.close()
            stack.stop()
    return RunFigures("taskmode", tasks, submit_s, complete_s, ms_per_task(before, after, tasks))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=3000)
    args = parser.parse_args()
    print_cpu_per_task(await run_taskmode(args.tasks))


if __name__ == "__main__":
    asyncio.run(main())
