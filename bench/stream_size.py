"""Bytes on disk per task in the event stream, with and without S2 compression.

`.venv/bin/python -m bench.stream_size [--tasks 5000] [--payload 200]` starts a nats-server of its
own, appends every event of N typical tasks (Enqueued with a JSON payload, Processed carrying it,
Running, Succeeded with a small result) through the event store, as the services do, and prints
the stream's size on disk per task and per day at a given rate. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import uuid
from pathlib import Path

import nats

from shared import wire
from shared.devstack import start_nats
from shared.events import TaskEnqueued, TaskProcessed, TaskStarted, TaskSucceeded
from shared.eventstore import EventStore, StoredEvent, ensure_stream, follow, now_ms


def _disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and wire.EVENT_STREAM in str(p))


async def measure(*, compressed: bool, tasks: int, payload_bytes: int) -> tuple[int, int]:
    """(bytes on disk, bytes the stream reports) after `tasks` complete tasks."""
    with tempfile.TemporaryDirectory() as tmp:
        server = start_nats(Path(tmp))
        try:
            nc = await nats.connect(server.url)
            js = nc.jetstream()
            await ensure_stream(js, compressed=compressed)
            events = EventStore(js, partitions=4)
            payload = json.dumps({"order": "x" * max(0, payload_bytes - 20), "n": 1}).encode()[:payload_bytes]
            for i in range(tasks):
                at = now_ms()
                enqueued = TaskEnqueued(task_id=f"task-{uuid.uuid4().hex}", function="orders", version=1, at_ms=at,
                                        payload=payload, request_id=str(uuid.uuid4()), due_at_ms=at)
                seq = await events.append(enqueued, expected_seq=0)
                processed = follow(StoredEvent(seq, enqueued), TaskProcessed,
                                   submission=TaskProcessed.carrying(enqueued))
                seq = await events.append(processed, expected_seq=seq)
                started = follow(StoredEvent(seq, processed), TaskStarted, instance_id=f"orders-{i % 4:08x}")
                seq = await events.append(started, expected_seq=seq)
                done = follow(StoredEvent(seq, started), TaskSucceeded, result=b'{"ok": true}', instance_id=started.instance_id)
                await events.append(done, expected_seq=seq)
            reported = int((await js.stream_info(wire.EVENT_STREAM)).state.bytes)
            await nc.close()
        finally:
            server.stop()
        return _disk_bytes(Path(tmp) / "nats"), reported


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--payload", type=int, default=200, help="bytes of JSON payload per task")
    parser.add_argument("--rate", type=float, default=100.0, help="tasks per second, for the per-day figure")
    args = parser.parse_args()
    print(f"{args.tasks} tasks, {args.payload}-byte payloads, 4 events each")
    for compressed in (False, True):
        disk, reported = await measure(compressed=compressed, tasks=args.tasks, payload_bytes=args.payload)
        per_task = disk / args.tasks
        per_day_gib = per_task * args.rate * 86400 / 2**30
        print(f"  {'S2  ' if compressed else 'none'}: {per_task:7.0f} B/task on disk ({reported / args.tasks:.0f} B "
              f"reported), {per_day_gib:6.1f} GiB/day and {7 * per_day_gib:6.1f} GiB per 7-day retention "
              f"at {args.rate:g} tasks/s")


if __name__ == "__main__":
    asyncio.run(main())
