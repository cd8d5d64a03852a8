"""nats-server's CPU per new task, by how the tasks' first events are appended.

One nats-server with the event stream, one client, N Enqueued events of distinct tasks:
- `atomic batches`: JetStream atomic batches of 500 (the intake before), 4 in flight;
- `pipelined`: `TaskCreator` (what the `nats` trigger does): a plain publish each, carrying the
  dedup condition (no event on the task's subjects yet), thousands awaiting their acks at once;
- `pipelined, no condition`: the same publishes without the condition (what the condition costs).
Prints the rate and the CPU per task of nats-server and of the client; asserts nothing.
Run: `python -m bench.first_appends --tasks 50000`.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import nats
import psutil
import uvloop
from nats.aio.client import Client
from nats.aio.msg import Msg

from shared import wire
from shared.bus import header_block, publish_prepared
from shared.devstack import start_nats
from shared.events import TaskEnqueued, encode_event
from shared.eventstore import EventStore, TaskCreator, ensure_stream, now_ms

PARTITIONS = 4
BATCH = 500


def events(count: int, prefix: str) -> list[TaskEnqueued]:
    at = now_ms()
    return [TaskEnqueued(task_id=f"{prefix}{i:07d}", function="bench", version=1, at_ms=at, payload=b"{}",
                         request_id=f"r{i}") for i in range(count)]


def subject(event: TaskEnqueued) -> str:
    return wire.event_subject(event.function, event.task_id, event.status, partitions=PARTITIONS)


async def pipelined(store: EventStore, todo: list[TaskEnqueued]) -> None:
    creator = TaskCreator(store)
    await creator.start()
    finished = asyncio.Event()
    left = len(todo)

    async def done(error: Exception | None) -> None:
        nonlocal left
        assert error is None, error
        left -= 1
        if not left:
            finished.set()

    for event in todo:
        await creator.create(event, done)
    await finished.wait()
    await creator.close()


async def unconditional(nc: Client, todo: list[TaskEnqueued]) -> None:
    inbox = nc.new_inbox()
    finished = asyncio.Event()
    left = len(todo)

    async def on_ack(msg: Msg) -> None:
        nonlocal left
        left -= 1
        if not left:
            finished.set()

    await nc.subscribe(f"{inbox}.*", cb=on_ack, pending_msgs_limit=0, pending_bytes_limit=0)
    for i, event in enumerate(todo):
        await publish_prepared(nc, subject(event), encode_event(event), reply=f"{inbox}.{i}")
    await finished.wait()


async def atomic(nc: Client, todo: list[TaskEnqueued]) -> None:
    slots = asyncio.Semaphore(4)

    async def batch(chunk: list[TaskEnqueued]) -> None:
        async with slots:
            batch_id = uuid.uuid4().hex
            for index, event in enumerate(chunk, start=1):
                headers = {wire.HEADER_EXPECTED_LAST_SUBJECT_SEQ: "0",
                           wire.HEADER_EXPECTED_LAST_SUBJECT_SEQ_SUBJECT: wire.task_subjects(event.function,
                                                                                             event.task_id),
                           wire.HEADER_BATCH_ID: batch_id, wire.HEADER_BATCH_SEQUENCE: str(index)}
                if index < len(chunk):
                    await publish_prepared(nc, subject(event), encode_event(event), headers=header_block(headers))
                else:
                    headers[wire.HEADER_BATCH_COMMIT] = "1"
                    reply = await nc.request(subject(event), encode_event(event), timeout=30, headers=headers)
                    assert b'"error"' not in reply.data, reply.data

    await asyncio.gather(*(batch(todo[i:i + BATCH]) for i in range(0, len(todo), BATCH)))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=50_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_nats(Path(tmp))
        try:
            nc = await nats.connect(server.url, pending_size=64 * 1024 * 1024)
            js = nc.jetstream()
            await ensure_stream(js)
            store = EventStore(js, partitions=PARTITIONS)
            processes = {"nats-server": psutil.Process(server.process.pid), "client": psutil.Process()}
            print(f"{'first appends of ' + str(args.tasks) + ' tasks':34s} {'tasks/s':>8s}  "
                  f"CPU per task (µs): nats-server / client")
            # The stream grows from mode to mode: the intake before goes first.
            modes: dict[str, Callable[[list[TaskEnqueued]], Awaitable[None]]] = {
                "atomic batches of 500": lambda todo: atomic(nc, todo),
                "pipelined (TaskCreator)": lambda todo: pipelined(store, todo),
                "pipelined, no condition": lambda todo: unconditional(nc, todo),
            }
            for number, (label, run) in enumerate(modes.items()):
                todo = events(args.tasks, f"m{number}x")
                before = {name: sum(p.cpu_times()[:2]) for name, p in processes.items()}
                started = time.perf_counter()
                await run(todo)
                elapsed = time.perf_counter() - started
                used = {name: (sum(p.cpu_times()[:2]) - before[name]) / args.tasks * 1e6
                        for name, p in processes.items()}
                print(f"{label:34s} {args.tasks / elapsed:8.0f}  {used['nats-server']:6.1f} / {used['client']:6.1f}")
            await nc.close()
        finally:
            server.stop()


if __name__ == "__main__":
    uvloop.run(main())
