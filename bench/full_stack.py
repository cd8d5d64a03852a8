"""Full-stack benchmark: no-op tasks through HTTP, every transition projected, vs raw JetStream.

Prints figures; asserts nothing about speed. Run: `make bench` (or `python -m bench.full_stack
--tasks 2000 --rate 50 --paced 300`).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
import psutil
from nats.js.api import StreamConfig

from bench.load_client import LoadClient
from shared.devstack import Stack, free_port
from tests.fc_client import FcClient

KEY_ID, SECRET = "benchkey", "benchsecret"
NOOP = "def handler(event, context):\n    return event\n"


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def fmt_ms(values: list[float]) -> str:
    return f"p50 {pct(values, 50):7.1f} ms   p90 {pct(values, 90):7.1f} ms   p99 {pct(values, 99):7.1f} ms"


def load_client(base_url: str, *, connections: int = 32) -> LoadClient:
    """The benchmarks' signed aiohttp client for the stack at `base_url`."""
    return LoadClient(base_url, access_key_id=KEY_ID, access_key_secret=SECRET, connections=connections)


async def submit_many(base_url: str, name: str, ids: list[str], *, concurrency: int) -> float:
    """Submit signed async invocations from `concurrency` connections; returns the seconds taken."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for task_id in ids:
        queue.put_nowait(task_id)

    async def worker(load: LoadClient) -> None:
        while not queue.empty():
            await load.submit(name, queue.get_nowait())

    started = time.perf_counter()
    async with load_client(base_url, connections=concurrency) as load:
        await asyncio.gather(*(worker(load) for _ in range(concurrency)))
    return time.perf_counter() - started


async def count_succeeded(load: LoadClient, name: str) -> int:
    total, token = 0, ""
    while True:
        query = {"limit": "100", "status": "Succeeded"}
        if token:
            query["nextToken"] = token
        page = await load.list_page(name, **query)
        total += len(page["tasks"])
        token = page["nextToken"]
        if not token:
            return total


async def wait_succeeded(load: LoadClient, name: str, task_id: str, *, deadline_s: float = 60,
                         interval_s: float = 0.05) -> dict[str, Any]:
    """Poll GetAsyncTask until the task is Succeeded; its task record."""
    end = time.perf_counter() + deadline_s
    while True:
        status, task = await load.get_task(name, task_id)
        if status == 200 and task["status"] == "Succeeded":
            return task
        if time.perf_counter() > end:
            raise TimeoutError(f"task {task_id} did not succeed in {deadline_s} s (last: {status} {task})")
        await asyncio.sleep(interval_s)  # polling the API, not synchronization


async def wait_all_succeeded(base_url: str, name: str, ids: list[str], *, deadline_s: float = 600) -> None:
    """Until every task is Succeeded in the read model (ListAsyncTasks), polling cheaply first:
    the last task through GetAsyncTask, so the benchmark's own reads do not load the store."""
    async with load_client(base_url, connections=1) as load:
        await wait_succeeded(load, name, ids[-1], deadline_s=deadline_s, interval_s=0.1)
        end = time.perf_counter() + deadline_s
        while await count_succeeded(load, name) < len(ids):
            if time.perf_counter() > end:
                raise TimeoutError("tasks did not all succeed")
            await asyncio.sleep(0.1)


async def throughput_phase(fc: FcClient, base_url: str, n: int) -> dict[str, float]:
    name = "bench_throughput"
    await fc.create_function(name, code={"index.py": NOOP})
    ids = [f"tp{i:06d}" for i in range(n)]
    started = time.perf_counter()
    submit_s = await submit_many(base_url, name, ids, concurrency=32)
    await wait_all_succeeded(base_url, name, ids)
    done_s = time.perf_counter() - started
    return {"submit_per_s": n / submit_s, "complete_per_s": n / done_s, "total_s": done_s}


async def submit_paced(load: LoadClient, name: str, ids: list[str], rate: float) -> dict[str, float]:
    """Submit `ids` at `rate` per second, each at its own moment (not waiting for earlier
    answers); when each request was sent, in epoch milliseconds (the events' clock)."""
    sent_at: dict[str, float] = {}

    async def submit(task_id: str) -> None:
        sent_at[task_id] = time.time() * 1000
        await load.submit(name, task_id)

    pending = []
    t0 = time.perf_counter()
    for i, task_id in enumerate(ids):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing the load generator, not synchronization
        pending.append(asyncio.create_task(submit(task_id)))
    await asyncio.gather(*pending)
    return sent_at


async def paced_phase(fc: FcClient, base_url: str, n: int, rate: float, *, name: str = "bench_latency",
                      warm_s: float = 0.0) -> dict[str, list[float]]:
    """Submit `n` tasks at `rate` per second, then read each task's timeline: submit -> Running
    and submit -> Succeeded. Instances are warm first, as the goals state: one task, or with
    `warm_s`, that many seconds of tasks at `rate` (as many instances as the rate keeps busy)."""
    await fc.create_function(name, code={"index.py": NOOP})
    async with load_client(base_url) as load:
        warm = [f"warm{i:05d}" for i in range(max(1, int(warm_s * rate)))]
        await submit_paced(load, name, warm, rate)
        for task_id in warm:
            await wait_succeeded(load, name, task_id)
        sent_at = await submit_paced(load, name, [f"lat{i:05d}" for i in range(n)], rate)
        to_running, to_succeeded = [], []
        for task_id, at_ms in sent_at.items():
            task = await wait_succeeded(load, name, task_id)
            events = {e["status"]: e["timestamp"] for e in task["events"]}
            to_running.append(events["Running"] - at_ms)
            to_succeeded.append(events["Succeeded"] - at_ms)
        get_ms = []
        for task_id in list(sent_at)[:500]:
            started = time.perf_counter()
            await load.get_task(name, task_id)
            get_ms.append((time.perf_counter() - started) * 1000)
    return {"to_running": to_running, "to_succeeded": to_succeeded, "get": get_ms}


async def projection_lag_phase(fc: FcClient, base_url: str, n: int, *, name: str = "bench_lag") -> list[float]:
    """On an idle system: once GetAsyncTask shows a task Succeeded, how long until
    ListAsyncTasks (the read model) does too. One task at a time."""
    await fc.create_function(name, code={"index.py": NOOP})
    lags = []
    async with load_client(base_url, connections=1) as load:
        for i in range(n):
            task_id = f"lag{i:04d}"
            await load.submit(name, task_id)
            await wait_succeeded(load, name, task_id, interval_s=0.001)
            seen_by_get = time.perf_counter()
            while not (await load.list_page(name, prefix=task_id, status="Succeeded"))["tasks"]:
                await asyncio.sleep(0.001)  # polling the read model, not synchronization
            lags.append((time.perf_counter() - seen_by_get) * 1000)
    return lags


async def jetstream_baseline(url: str, n: int, *, credentials: tuple[str, str] | None = None) -> dict[str, float]:
    user, password = credentials or (None, None)
    nc = await nats.connect(url, user=user, password=password)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="BENCH_BASELINE", subjects=["bench.baseline.>"]))
    payload = b'{"payload":"{}"}'
    started = time.perf_counter()
    acks = [js.publish(f"bench.baseline.{i}", payload) for i in range(n)]
    for chunk in range(0, n, 500):
        await asyncio.gather(*acks[chunk:chunk + 500])
    published = time.perf_counter() - started
    sub = await js.pull_subscribe("bench.baseline.>", durable="bench")
    got = 0
    consume_started = time.perf_counter()
    while got < n:
        msgs = await sub.fetch(min(500, n - got), timeout=5)
        for msg in msgs:
            await msg.ack()
        got += len(msgs)
    consumed = time.perf_counter() - consume_started
    await js.delete_stream("BENCH_BASELINE")
    await nc.close()
    return {"publish_per_s": n / published, "consume_per_s": n / consumed, "roundtrip_per_s": n / (published + consumed)}


def rss_mb(stack: Stack) -> dict[str, float]:
    out = {}
    for name, child in {**{c.name: c for c in stack.infra}, **stack.services}.items():
        proc = psutil.Process(child.process.pid)
        out[name] = proc.memory_info().rss / 2**20
        if name == "executor":
            out["executor instances"] = sum(c.memory_info().rss for c in proc.children(recursive=True)) / 2**20
    return out


def start_stack(data_dir: Path) -> tuple[Stack, FcClient, str]:
    """The whole system on `data_dir`, a signed client for it, and its base URL."""
    stack = Stack(data_dir=data_dir, access_keys=f"{KEY_ID}:{SECRET}", gateway_port=free_port())
    stack.start_infra()
    stack.start_services()
    base = f"http://127.0.0.1:{stack.gateway_port}"
    return stack, FcClient(base, access_key_id=KEY_ID, access_key_secret=SECRET), base


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--paced", type=int, default=300)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--fast-rate", type=float, default=500.0)
    parser.add_argument("--lag-samples", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stack, fc, base = start_stack(Path(tmp))
        try:
            baseline = await jetstream_baseline(stack.nats_url, args.tasks, credentials=stack.nats_credentials("admin"))
            tp = await throughput_phase(fc, base, args.tasks)
            lat = await paced_phase(fc, base, args.paced, args.rate)
            fast = await paced_phase(fc, base, args.paced * 5, args.fast_rate, name="bench_latency_fast", warm_s=2.0)
            lag = await projection_lag_phase(fc, base, args.lag_samples)
            memory = rss_mb(stack)
        finally:
            await fc.close()
            stack.stop()
    print(f"\n== taskmode full stack, {args.tasks} no-op tasks (HTTP, signed, 32 concurrent clients) ==")
    print(f"submission rate            {tp['submit_per_s']:8.0f} tasks/s")
    print(f"completion throughput      {tp['complete_per_s']:8.0f} tasks/s  (all {args.tasks} Succeeded in the read model after {tp['total_s']:.1f} s)")
    print(f"\n== latency at {args.rate:.0f} tasks/s, {args.paced} tasks ==")
    print(f"submit -> Running          {fmt_ms(lat['to_running'])}")
    print(f"submit -> Succeeded        {fmt_ms(lat['to_succeeded'])}")
    print(f"GetAsyncTask               {fmt_ms(lat['get'])}   mean {statistics.mean(lat['get']):.1f} ms")
    print(f"\n== latency at {args.fast_rate:.0f} tasks/s, {args.paced * 5} tasks, warm instances ==")
    print(f"submit -> Running          {fmt_ms(fast['to_running'])}")
    print(f"submit -> Succeeded        {fmt_ms(fast['to_succeeded'])}")
    print(f"\n== projection lag when idle, {args.lag_samples} tasks one at a time ==")
    print(f"GetAsyncTask Succeeded -> in ListAsyncTasks  {fmt_ms(lag)}")
    print("\n== resident memory after the run ==")
    for name, mb in memory.items():
        print(f"{name:26s} {mb:8.1f} MiB")
    print(f"\n== baseline: raw JetStream, same N={args.tasks}, same server ==")
    print(f"publish (acked)            {baseline['publish_per_s']:8.0f} msg/s")
    print(f"consume (pull + ack)       {baseline['consume_per_s']:8.0f} msg/s")
    print(f"publish+consume            {baseline['roundtrip_per_s']:8.0f} msg/s")
    print(f"\nratio completion / raw publish+consume: {tp['complete_per_s'] / baseline['roundtrip_per_s']:.3f}")
    print(f"(each task appends 4 events and is projected; raw JetStream moves 1 message per task)")


if __name__ == "__main__":
    asyncio.run(main())
