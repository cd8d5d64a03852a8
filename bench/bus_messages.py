"""How many messages each service exchanges with nats-server per task.

Starts a stack whose nats-server serves its HTTP monitoring on loopback, runs N no-op tasks
(signed HTTP, 32 connections) until all are Succeeded in the read model, and prints, per
connection name, the messages it published to nats-server ("in") and received from it ("out")
per task, from nats-server's /connz before and after. Asserts nothing.
Run: `python -m bench.bus_messages --tasks 2000`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import bench.full_stack as full
from shared.devstack import Stack, free_port
from tests.fc_client import FcClient


def per_connection(monitor_port: int) -> tuple[Counter[str], Counter[str]]:
    """Messages in and out so far, summed per connection name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/connz?limit=4096", timeout=10) as answer:
        connections = json.load(answer)["connections"]
    sent: Counter[str] = Counter()
    received: Counter[str] = Counter()
    for connection in connections:
        name = connection.get("name") or connection.get("authorized_user") or "unnamed"
        sent[name] += connection["in_msgs"]
        received[name] += connection["out_msgs"]
    return sent, received


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=2000)
    args = parser.parse_args()
    monitor_port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(data_dir=Path(tmp), access_keys=f"{full.KEY_ID}:{full.SECRET}", gateway_port=free_port(),
                      nats_monitor_port=monitor_port)
        stack.start_infra()
        stack.start_services()
        fc = FcClient(f"http://127.0.0.1:{stack.gateway_port}", access_key_id=full.KEY_ID,
                           access_key_secret=full.SECRET)
        base = f"http://127.0.0.1:{stack.gateway_port}"
        try:
            await fc.create_function("bus", code={"index.py": full.NOOP})
            await full.submit_many(base, "bus", ["warm-up"], concurrency=1)
            await full.wait_all_succeeded(base, "bus", ["warm-up"])
            sent_before, received_before = per_connection(monitor_port)
            ids = [f"m{i:06d}" for i in range(args.tasks)]
            started = time.perf_counter()
            await full.submit_many(base, "bus", ids, concurrency=32)
            await full.wait_all_succeeded(base, "bus", ids)
            elapsed = time.perf_counter() - started
            sent, received = per_connection(monitor_port)
        finally:
            await fc.close()
            stack.stop()
    print(f"\n== messages through nats-server per task ({args.tasks} no-op tasks, {args.tasks / elapsed:.0f} tasks/s) ==")
    print(f"{'connection':28s} {'published':>10s} {'received':>10s}")
    for name in sorted(sent):
        print(f"{name:28s} {(sent[name] - sent_before[name]) / args.tasks:10.2f} "
              f"{(received[name] - received_before[name]) / args.tasks:10.2f}")
    print(f"{'all':28s} {(sent.total() - sent_before.total()) / args.tasks:10.2f} "
          f"{(received.total() - received_before.total()) / args.tasks:10.2f}")


if __name__ == "__main__":
    asyncio.run(main())
