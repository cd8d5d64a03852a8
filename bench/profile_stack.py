"""Where each service spends its CPU on the hot path: py-spy samples of every process under load.

Starts a stack, submits N no-op tasks over signed HTTP, and samples the gateway, scheduler,
executor, projection and the embedded MongoDB-wire server with py-spy while they work. Prints, per service, the share of samples
by the innermost frame of our code, library or the interpreter (a flat profile), and writes
the raw collapsed stacks to --out for flame graphs. Run: `python -m bench.profile_stack`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import tempfile
from pathlib import Path

import bench.full_stack as full

# The embedded MongoDB-wire server (nx-27017) is a Python process too, and among the costliest.
SAMPLED = ("gateway", "scheduler", "executor", "projection", "mongo")


def flat_profile(collapsed: Path, *, top: int) -> list[tuple[str, float]]:
    """Share of samples per leaf frame, from py-spy's collapsed ("raw") output."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        leaf = stack.split(";")[-1]
        counts[_short(leaf)] += int(count)
        total += int(count)
    return [(frame, n / total) for frame, n in counts.most_common(top)] if total else []


def by_package(collapsed: Path) -> list[tuple[str, float]]:
    """Share of samples per package of the deepest frame: where the time goes, coarsely."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        counts[_package(stack.split(";")[-1])] += int(count)
        total += int(count)
    return [(pkg, n / total) for pkg, n in counts.most_common(12)] if total else []


def _short(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py)"
    name, _, where = frame.partition(" (")
    return f"{name} ({Path(where.split(':')[0]).name})" if where else name


def _package(frame: str) -> str:
    where = frame.partition(" (")[2].split(":")[0]
    if "site-packages/" in where:
        return where.split("site-packages/")[1].split("/")[0]
    for ours in ("services/", "shared/"):
        if ours in where:
            return ours + where.split(ours)[1].split("/")[0]
    return "python stdlib/interpreter" if where else "native/idle"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("profiles"))
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(__file__).resolve().parents[1] / ".venv/bin/py-spy")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        stack, fc, base = full.start_stack(Path(tmp))
        try:
            await fc.create_function("prof", code={"index.py": full.NOOP})
            await full.submit_many(base, "prof", ["warm-up"], concurrency=1)
            children = {**{child.name: child for child in stack.infra}, **stack.services}
            samplers = {
                name: subprocess.Popen(
                    [py_spy, "record", "--pid", str(children[name].process.pid), "--rate", "200",
                     "--format", "raw", "--output", str(args.out / f"{name}.txt"), "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for name in SAMPLED
            }
            ids = [f"p{i:06d}" for i in range(args.tasks)]
            await full.submit_many(base, "prof", ids, concurrency=32)
            await full.wait_all_succeeded(base, "prof", ["warm-up", *ids])
            for sampler in samplers.values():
                sampler.send_signal(2)  # SIGINT: py-spy writes its output and exits
            for sampler in samplers.values():
                sampler.wait(timeout=60)
        finally:
            await fc.close()
            stack.stop()
    for name in SAMPLED:
        collapsed = args.out / f"{name}.txt"
        if not collapsed.exists():
            print(f"\n== {name}: no samples (py-spy needs ptrace permission)")
            continue
        print(f"\n== {name}: samples by package")
        for package, share in by_package(collapsed):
            print(f"  {share:6.1%}  {package}")
        print(f"== {name}: top leaf frames")
        for frame, share in flat_profile(collapsed, top=args.top):
            print(f"  {share:6.1%}  {frame}")


if __name__ == "__main__":
    asyncio.run(main())
