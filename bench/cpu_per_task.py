"""Where the CPU goes: CPU milliseconds per task spent by each process of the stack.

Submits N no-op tasks (signed HTTP, 32 connections), waits until all are Succeeded in the read
model, and divides each process's CPU time by N. Run: `python -m bench.cpu_per_task --tasks 3000`.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import psutil

import bench.full_stack as full


def cpu_seconds(processes: dict[str, psutil.Process]) -> dict[str, float]:
    out = {}
    for name, proc in processes.items():
        times = proc.cpu_times()
        out[name] = times.user + times.system
        if name == "executor":
            out["executor instances"] = sum(
                c.cpu_times().user + c.cpu_times().system for c in proc.children(recursive=True)
            )
    return out


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stack, fc, base = full.start_stack(Path(tmp))
        try:
            await fc.create_function("cpu", code={"index.py": full.NOOP})
            await full.submit_many(base, "cpu", ["warm-up"], concurrency=1)
            processes = {c.name: psutil.Process(c.process.pid) for c in [*stack.infra, *stack.services.values()]}
            processes["load generator"] = psutil.Process()
            before = cpu_seconds(processes)
            started = time.perf_counter()
            ids = [f"c{i:06d}" for i in range(args.tasks)]
            await full.submit_many(base, "cpu", ids, concurrency=32)
            await full.wait_all_succeeded(fc, "cpu", ["warm-up", *ids])
            elapsed = time.perf_counter() - started
            after = cpu_seconds(processes)
        finally:
            await fc.close()
            stack.stop()
    print(f"\n== CPU per task, {args.tasks} no-op tasks, {args.tasks / elapsed:.0f} tasks/s end to end ==")
    total = 0.0
    for name, spent in after.items():
        per_task_ms = (spent - before.get(name, 0.0)) / args.tasks * 1000
        total += per_task_ms
        print(f"{name:20s} {per_task_ms:6.2f} ms")
    print(f"{'all processes':20s} {total:6.2f} ms  (2 cores: at most {2000 / total:.0f} tasks/s)")


if __name__ == "__main__":
    asyncio.run(main())
