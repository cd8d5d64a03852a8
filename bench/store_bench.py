"""Benchmark the task read model (shared/taskstore.py) against a MongoDB-wire server.

Run from the repository root as `.venv/bin/python -m bench.store_bench [--n 10000]` or
`.venv/bin/python bench/store_bench.py`. Starts its own embedded nx-27017 server in a temporary
directory unless `MONGODB_URL` (or `--url`) points at a MongoDB; uses a throw-away database and
drops it at the end. Prints one table of throughputs and latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from shared.devstack import start_mongo_wire
from shared.taskstore import TaskQuery, TaskStore
from shared.taskview import document_id, expire_at

FUNCTION = "bench-fn"
STATUSES = ("Succeeded", "Succeeded", "Succeeded", "Failed", "Running", "Enqueued")


@dataclass(frozen=True)
class Row:
    """One line of the result table."""

    name: str
    samples: int
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    rate: str = ""


def make_doc(i: int, *, now_ms: int, rnd: random.Random) -> dict[str, Any]:
    """A realistic finished task: three events, a ~200-byte payload, a short result."""
    task_id = f"task-{i:07d}"
    started = now_ms - 3_600_000 + (i // 3)  # three tasks per millisecond: ties on submitTime
    status = rnd.choice(STATUSES)
    return {
        "_id": document_id(FUNCTION, task_id),
        "functionName": FUNCTION,
        "version": 3,
        "expireAt": expire_at(started),
        "taskId": task_id,
        "status": status,
        "events": [
            {"eventId": 1, "status": "Enqueued", "timestamp": started, "eventDetail": ""},
            {"eventId": 2, "status": "Running", "timestamp": started + 7, "eventDetail": '{"instanceId":"i-1"}'},
            {"eventId": 3, "status": status, "timestamp": started + 90, "eventDetail": ""},
        ],
        "taskPayload": '{"image":"' + "x" * 180 + '"}',
        "returnPayload": '{"ok":true}',
        "taskErrorMessage": None,
        "alreadyRetriedTimes": 0,
        "submitTime": started,
        "startedTime": started + 7,
        "endTime": started + 90,
        "durationMs": 83,
        "requestId": f"req-{i}",
        "instanceId": "i-1",
        "functionArn": f"acs:fc:local:0:functions/{FUNCTION}",
        "qualifier": "LATEST",
        "executedVersion": "LATEST",
        "destinationStatus": "",
    }


def percentile(samples_s: list[float], q: float) -> float:
    """The `q`-quantile (0..1) of `samples_s`, in milliseconds (nearest rank)."""
    ordered = sorted(samples_s)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] * 1000


async def timed(name: str, calls: int, call: Callable[[], Awaitable[object]]) -> Row:
    """Await `call()` `calls` times, one after another, and summarise the latencies."""
    samples: list[float] = []
    for _ in range(calls):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return Row(
        name,
        calls,
        p50_ms=statistics.median(samples) * 1000,
        p99_ms=percentile(samples, 0.99),
        max_ms=max(samples) * 1000,
        rate=f"{calls / sum(samples):,.0f} calls/s",
    )


async def save_all(store: TaskStore, docs: list[dict[str, Any]], batch: int, name: str) -> Row:
    """save_many over `docs` in batches of `batch`; the rate is documents per second."""
    per_batch: list[float] = []
    for offset in range(0, len(docs), batch):
        start = time.perf_counter()
        await store.save_many(docs[offset : offset + batch])
        per_batch.append(time.perf_counter() - start)
    total_s = sum(per_batch)
    return Row(
        name,
        len(per_batch),
        p50_ms=statistics.median(per_batch) * 1000,
        p99_ms=percentile(per_batch, 0.99),
        max_ms=max(per_batch) * 1000,
        rate=f"{len(docs) / total_s:,.0f} docs/s",
    )


async def deep_token(store: TaskStore, query: TaskQuery, depth: int) -> str:
    """The next token after roughly `depth` tasks of `query` (walked in pages of 100)."""
    token = ""
    walked = 0
    while walked < depth:
        page = await store.list_tasks(replace(query, limit=100, next_token=token or None))
        walked += len(page.tasks)
        if not page.next_token:
            break
        token = page.next_token
    return token


async def run(url: str, *, n: int, batch: int, calls: int, seed: int) -> list[Row]:
    """Fill a fresh database with `n` tasks and measure the store's operations."""
    rnd = random.Random(seed)
    now_ms = int(time.time() * 1000)
    docs = [make_doc(i, now_ms=now_ms, rnd=rnd) for i in range(n)]
    database = f"taskmode_bench_{uuid.uuid4().hex}"
    store = await TaskStore.connect(url, database=database)
    rows: list[Row] = []
    try:
        await store.ensure_indexes()
        rows.append(await save_all(store, docs, batch, f"save_many insert ({batch}/batch)"))
        rows.append(await save_all(store, docs, batch, f"save_many replace ({batch}/batch)"))

        ids = [d["_id"] for d in docs]
        sample = min(500, n)
        rows.append(await timed(f"load_many {sample} ids", 10, lambda: store.load_many(rnd.sample(ids, sample))))
        task_ids = [d["taskId"] for d in docs]
        rows.append(await timed("get", calls, lambda: store.get(FUNCTION, rnd.choice(task_ids))))

        asc = TaskQuery(FUNCTION, limit=20)
        desc = replace(asc, descending=True)
        failed = replace(asc, status="Failed")
        rows.append(await timed("list first page asc (20)", 20, lambda: store.list_tasks(asc)))
        rows.append(await timed("list first page desc (20)", 20, lambda: store.list_tasks(desc)))
        rows.append(await timed("list first page status=Failed (20)", 20, lambda: store.list_tasks(failed)))
        prefixed = replace(asc, prefix=f"task-{n // 2:07d}"[:-2])
        rows.append(await timed("list first page prefix (20)", 20, lambda: store.list_tasks(prefixed)))

        depth = int(n * 0.9)
        deep_asc = replace(asc, next_token=await deep_token(store, asc, depth) or None)
        deep_desc = replace(desc, next_token=await deep_token(store, desc, depth) or None)
        rows.append(await timed(f"list deep page asc @{depth} (20)", 20, functools.partial(store.list_tasks, deep_asc)))
        rows.append(await timed(f"list deep page desc @{depth} (20)", 20, functools.partial(store.list_tasks, deep_desc)))

        # nx-27017 purges expired documents on every read when a TTL index exists; show its cost.
        async for index in await store.collection.list_indexes():
            if "expireAfterSeconds" in index:
                await store.collection.drop_index(index["name"])
        rows.append(await timed("get, no TTL index", calls, lambda: store.get(FUNCTION, rnd.choice(task_ids))))
        rows.append(await timed("list first page asc, no TTL index", 20, lambda: store.list_tasks(asc)))
        rows.append(
            await timed(f"list deep page asc @{depth}, no TTL index", 20, functools.partial(store.list_tasks, deep_asc))
        )
    finally:
        await store.collection.database.client.drop_database(database)
        await store.close()
    return rows


def print_table(rows: list[Row], *, backend: str, n: int) -> None:
    def ms(value: float | None) -> str:
        return "" if value is None else f"{value:,.1f}"

    header = ("operation", "samples", "p50 ms", "p99 ms", "max ms", "rate")
    lines = [(r.name, str(r.samples), ms(r.p50_ms), ms(r.p99_ms), ms(r.max_ms), r.rate) for r in rows]
    widths = [max(len(str(col)) for col in column) for column in zip(header, *lines, strict=False)]
    print(f"\ntask store benchmark: {n:,} tasks on {backend}\n")
    for i, line in enumerate([header, *lines]):
        print("  ".join(cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(line, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=10_000, help="tasks to store (default 10000)")
    parser.add_argument("--batch", type=int, default=500, help="documents per save_many (default 500)")
    parser.add_argument("--calls", type=int, default=500, help="get() calls to time (default 500)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--url", default=os.environ.get("MONGODB_URL"), help="MongoDB URL (default: embedded server)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    if args.url:
        rows = asyncio.run(run(args.url, n=args.n, batch=args.batch, calls=args.calls, seed=args.seed))
        print_table(rows, backend="MongoDB (MONGODB_URL)", n=args.n)
        return
    with tempfile.TemporaryDirectory(prefix="taskstore-bench-") as data_dir:
        server = start_mongo_wire(Path(data_dir))
        try:
            rows = asyncio.run(run(server.url, n=args.n, batch=args.batch, calls=args.calls, seed=args.seed))
        finally:
            server.stop()
    print_table(rows, backend="embedded nx-27017", n=args.n)


if __name__ == "__main__":
    main()
