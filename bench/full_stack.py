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

import aiohttp
import nats
import psutil
from nats.js.api import StreamConfig

from shared.acs3 import sign_request
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


async def submit_many(base_url: str, name: str, ids: list[str], *, concurrency: int) -> float:
    """Submit signed async invocations from `concurrency` connections; returns the seconds taken.

    aiohttp rather than the tests' httpx client: the load generator shares the machine's two
    cores with the system under test, so it should cost as little as it can.
    """
    queue: asyncio.Queue[str] = asyncio.Queue()
    for task_id in ids:
        queue.put_nowait(task_id)
    path = f"/2023-03-30/functions/{name}/invocations"
    host = base_url.removeprefix("http://")

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            task_id = queue.get_nowait()
            headers = {"host": host, "x-fc-invocation-type": "Async", "x-fc-async-task-id": task_id,
                       "content-type": "application/octet-stream"}
            headers.update(sign_request(method="POST", path=path, query={}, headers=headers, body=b"{}",
                                        access_key_id=KEY_ID, access_key_secret=SECRET))
            async with session.post(base_url + path, data=b"{}", headers=headers) as response:
                if response.status != 202:
                    raise RuntimeError(f"submit failed: {response.status} {await response.text()}")

    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, skip_auto_headers=("User-Agent",)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return time.perf_counter() - started


async def count_succeeded(fc: FcClient, name: str) -> int:
    total, token = 0, ""
    while True:
        query = {"limit": "100", "status": "Succeeded"}
        if token:
            query["nextToken"] = token
        page = (await fc.list_tasks(name, **query)).json()
        total += len(page["tasks"])
        token = page["nextToken"]
        if not token:
            return total


async def wait_all_succeeded(fc: FcClient, name: str, ids: list[str], *, deadline_s: float = 600) -> None:
    """Until every task is Succeeded in the read model (ListAsyncTasks), polling cheaply first:
    the last task through GetAsyncTask, so the benchmark's own reads do not load the store."""
    await fc.wait_for(name, ids[-1], {"Succeeded"}, deadline_s=deadline_s)
    end = time.perf_counter() + deadline_s
    while await count_succeeded(fc, name) < len(ids):
        if time.perf_counter() > end:
            raise TimeoutError("tasks did not all succeed")
        await asyncio.sleep(0.1)


async def throughput_phase(fc: FcClient, base_url: str, n: int) -> dict[str, float]:
    name = "bench_throughput"
    await fc.create_function(name, code={"index.py": NOOP})
    ids = [f"tp{i:06d}" for i in range(n)]
    started = time.perf_counter()
    submit_s = await submit_many(base_url, name, ids, concurrency=32)
    await wait_all_succeeded(fc, name, ids)
    done_s = time.perf_counter() - started
    return {"submit_per_s": n / submit_s, "complete_per_s": n / done_s, "total_s": done_s}


async def paced_phase(fc: FcClient, n: int, rate: float, *, name: str = "bench_latency") -> dict[str, list[float]]:
    """Submit `n` tasks at `rate` per second (each at its own moment, not waiting for the last
    answer), then read each task's timeline: submit -> Running and submit -> Succeeded."""
    await fc.create_function(name, code={"index.py": NOOP})
    await fc.invoke_async(name, b"{}", task_id="warm")  # a warm instance, as the goal states
    await fc.wait_for(name, "warm", {"Succeeded"}, deadline_s=60)
    submitted: dict[str, float] = {}
    in_flight = asyncio.Semaphore(32)  # within the client's connection pool, however slow answers get

    async def submit(task_id: str) -> None:
        async with in_flight:
            submitted[task_id] = time.time() * 1000
            response = await fc.invoke_async(name, b"{}", task_id=task_id)
        assert response.status_code == 202, response.text

    pending = []
    t0 = time.perf_counter()
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing the load generator, not synchronization
        pending.append(asyncio.create_task(submit(f"lat{i:05d}")))
    await asyncio.gather(*pending)
    to_running, to_succeeded = [], []
    for task_id, at_ms in submitted.items():
        task = await fc.wait_for(name, task_id, {"Succeeded"}, deadline_s=60)
        events = {e["status"]: e["timestamp"] for e in task["events"]}
        to_running.append(events["Running"] - at_ms)
        to_succeeded.append(events["Succeeded"] - at_ms)
    get_ms = []
    for task_id in list(submitted)[:500]:
        started = time.perf_counter()
        await fc.get_task(name, task_id)
        get_ms.append((time.perf_counter() - started) * 1000)
    return {"to_running": to_running, "to_succeeded": to_succeeded, "get": get_ms}


async def projection_lag_phase(fc: FcClient, n: int, *, name: str = "bench_lag") -> list[float]:
    """On an idle system: once GetAsyncTask shows a task Succeeded, how long until
    ListAsyncTasks (the read model) does too. One task at a time."""
    await fc.create_function(name, code={"index.py": NOOP})
    lags = []
    for i in range(n):
        task_id = f"lag{i:04d}"
        await fc.invoke_async(name, b"{}", task_id=task_id)
        await fc.wait_for(name, task_id, {"Succeeded"}, deadline_s=60, interval_s=0.001)
        seen_by_get = time.perf_counter()
        while True:
            page = (await fc.list_tasks(name, prefix=task_id, status="Succeeded")).json()
            if page["tasks"]:
                break
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
            lat = await paced_phase(fc, args.paced, args.rate)
            fast = await paced_phase(fc, args.paced * 5, args.fast_rate, name="bench_latency_fast")
            lag = await projection_lag_phase(fc, args.lag_samples)
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
