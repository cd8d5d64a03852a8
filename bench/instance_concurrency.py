"""instanceConcurrency benchmark: one instance, a 50 ms handler, one invocation at a time vs C at once.

Prints figures; asserts nothing about speed. Run: `.venv/bin/python -m bench.instance_concurrency`
(options: `--tasks 400 --concurrency 1 8 --sleep-ms 50`). InstancePool alone (no services), in the
instance sandbox as the executor runs it, at most one instance: every invocation goes through
`pool.lease` and `instance.invoke` as the task runner's do, with as many callers as the
instance can take. The ideal is C / sleep.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from services.executor.instance import FunctionSpec, InvokeContext
from services.executor.pool import InstancePool, new_sandbox
from services.executor.sandbox import SandboxSettings

HANDLERS = """import asyncio, time

def handler(event, context):
    time.sleep(float(event))
    return 'ok'

async def ahandler(event, context):
    await asyncio.sleep(float(event))
    return 'ok'
"""


async def throughput(work: Path, *, concurrency: int, tasks: int, sleep_s: float, handler: str) -> float:
    """Invocations per second through one instance of the given concurrency."""
    code = work / "code"
    code.mkdir(parents=True, exist_ok=True)
    (code / "index.py").write_text(HANDLERS)
    pool = InstancePool(work_dir=work / "instances", max_instances_per_function=1,
                        sandbox=new_sandbox(SandboxSettings(), work_dir=work / "instances"))
    spec = FunctionSpec(name="conc", runtime="python3.10", handler=handler, timeout_s=30, code_dir=code,
                        code_checksum=f"{handler}-{concurrency}", instance_concurrency=concurrency)
    payload = str(sleep_s).encode()

    async def one(i: int) -> None:
        async with pool.lease(spec) as instance:
            result = await instance.invoke(payload, InvokeContext(request_id=f"r{i}", task_id=f"t{i}"))
            assert result.ok, result

    try:
        await one(-1)  # warm: the cold start is not what is measured
        began = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(tasks)))
        return tasks / (time.perf_counter() - began)
    finally:
        await pool.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=400)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--sleep-ms", type=float, default=50.0)
    args = parser.parse_args()
    sleep_s = args.sleep_ms / 1000
    print(f"one instance, {args.tasks} invocations of a {args.sleep_ms:g} ms handler")
    for handler in ("index.handler", "index.ahandler"):
        kind = "sync handler" if handler == "index.handler" else "async handler"
        for concurrency in args.concurrency:
            with tempfile.TemporaryDirectory(prefix="taskmode-conc-") as tmp:
                rate = await throughput(Path(tmp), concurrency=concurrency, tasks=args.tasks, sleep_s=sleep_s,
                                        handler=handler)
            ideal = concurrency / sleep_s
            print(f"  {kind:15} instanceConcurrency {concurrency:3}: {rate:7.1f}/s  (ideal {ideal:.0f}/s, "
                  f"{rate / ideal:.0%})")


if __name__ == "__main__":
    asyncio.run(main())
