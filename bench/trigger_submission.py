"""Submission rate through a `nats` trigger, beside the HTTP submission rate, from the same run.

Both measure the submission step alone: a task counts when its submitter has the answer (the
publisher's reply `{"taskId"}`, the HTTP 202), which comes only after the task's Enqueued event
is stored. Only nats-server, the MongoDB-wire server and the admission services run (triggers,
and the gateway, idle during the trigger phase; nothing schedules, executes or projects), so
both figures are what admission itself sustains. Each round runs the trigger phase, then the
HTTP phase, and prints both rates, their ratio, the load average around them and the CPU per
task of each process during the trigger phase (the machine may be shared: the ratio and the CPU
are steadier than the rates). Prints figures; asserts nothing about speed.
Run: `python -m bench.trigger_submission --tasks 60000 --rounds 3` (`--profile DIR`: py-spy
samples of the triggers service and the publisher during the trigger phase, as raw stacks).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import nats
import psutil
from nats.aio.msg import Msg
import uvloop

from bench.full_stack import KEY_ID, NOOP, SECRET, submit_many
from shared.bus import publish_prepared
from shared.devstack import Stack, free_port
from tests.fc_client import FcClient

SUBJECT = "bench.submit"


def cpu_seconds(stack: Stack) -> dict[str, float]:
    """CPU time (user + system) used so far by nats-server, each service and this process."""
    processes = {child.name: child.process.pid for child in [*stack.infra, *stack.services.values()]}
    processes["load generator"] = psutil.Process().pid
    used = {}
    for name, pid in processes.items():
        times = psutil.Process(pid).cpu_times()
        used[name] = times.user + times.system
    return used


def start_profilers(stack: Stack, out: Path) -> list[subprocess.Popen[bytes]]:
    """py-spy on the triggers service and on this process (the publisher) during the bus phase."""
    py_spy = shutil.which("py-spy") or str(Path(__file__).resolve().parents[1] / ".venv/bin/py-spy")
    out.mkdir(parents=True, exist_ok=True)
    targets = {"triggers": stack.services["triggers"].process.pid, "publisher": os.getpid()}
    return [subprocess.Popen([py_spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
                              "--output", str(out / f"{name}.txt"), "--nonblocking"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, pid in targets.items()]


def stop_profilers(samplers: list[subprocess.Popen[bytes]]) -> None:
    for sampler in samplers:
        sampler.send_signal(signal.SIGINT)  # py-spy writes its output and exits
    for sampler in samplers:
        sampler.wait(timeout=60)


async def publish_all(url: str, count: int, *, in_flight: int, prefix: str,
                      credentials: tuple[str, str] | None = None) -> float:
    """Publish `count` messages with a reply subject each, at most `in_flight` unanswered; the
    seconds until every reply is in.

    Replies come to one wildcard inbox subscription instead of a `request()` per message: any
    NATS client can do this, and it keeps the load generator's own cost per message small on
    the two cores it shares with the system under test. Messages go out in runs as the window
    opens (half of it at least), each built in one step (`shared.bus.publish_prepared`).
    """
    user, password = credentials or (None, None)  # the stack's bus asks for a role: `publisher`
    nc = await nats.connect(url, pending_size=64 * 1024 * 1024, user=user, password=password)
    inbox = nc.new_inbox()
    room = asyncio.Event()
    all_answered = asyncio.Event()
    answered = 0
    sent = 0
    refused: list[bytes] = []

    async def on_reply(msg: Msg) -> None:
        nonlocal answered
        answered += 1
        if b"taskId" not in msg.data:
            refused.append(msg.data)
        if sent - answered <= in_flight // 2:
            room.set()
        if answered == count:
            all_answered.set()

    await nc.subscribe(f"{inbox}.*", cb=on_reply, pending_msgs_limit=0, pending_bytes_limit=0)
    task_id_header = f"NATS/1.0\r\nx-fc-async-task-id: {prefix}%07d\r\n\r\n".encode()
    started = time.perf_counter()
    while sent < count:
        end = min(count, answered + in_flight)
        if end <= sent:
            room.clear()
            await room.wait()
            continue
        for i in range(sent, end):
            await publish_prepared(nc, SUBJECT, b"{}", reply=f"{inbox}.{i}", headers=task_id_header % i)
        sent = end
    await asyncio.wait_for(all_answered.wait(), timeout=300)
    elapsed = time.perf_counter() - started
    await nc.close()
    if refused:
        raise RuntimeError(f"{len(refused)} submissions were refused, e.g. {refused[0]!r}")
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=60_000)
    parser.add_argument("--http-tasks", type=int, default=3_000)
    parser.add_argument("--in-flight", type=int, default=4_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--profile", type=Path, help="py-spy the triggers service and write raw stacks here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(data_dir=Path(tmp), access_keys=f"{KEY_ID}:{SECRET}", gateway_port=free_port())
        stack.start_infra()
        for service in ("triggers", "gateway"):
            stack.start_service(service)
        base = f"http://127.0.0.1:{stack.gateway_port}"
        fc = FcClient(base, access_key_id=KEY_ID, access_key_secret=SECRET)
        try:
            name = "bench_bus"
            await fc.create_function(name, code={"index.py": NOOP})
            created = await fc.request("POST", f"/functions/{name}/triggers", json={
                "triggerName": "bus", "triggerType": "nats", "triggerConfig": json.dumps({"subject": SUBJECT})})
            assert created.status_code == 200, created.text
            await asyncio.sleep(2)  # the service subscribes within its 0.5 s sync period
            await publish_all(stack.nats_url, 2_000, in_flight=500, prefix="warm",
                              credentials=stack.nats_credentials("publisher"))
            for round_no in range(1, args.rounds + 1):
                load_before = os.getloadavg()[0]
                samplers = start_profilers(stack, args.profile) if args.profile and round_no == 1 else []
                cpu_before = cpu_seconds(stack)
                bus_s = await publish_all(stack.nats_url, args.tasks, in_flight=args.in_flight,
                                          prefix=f"bus{round_no}x", credentials=stack.nats_credentials("publisher"))
                cpu_after = cpu_seconds(stack)
                stop_profilers(samplers)
                http_ids = [f"http{round_no}x{i:07d}" for i in range(args.http_tasks)]
                http_s = await submit_many(base, name, http_ids, concurrency=32)
                report(round_no, args, bus_s, http_s, cpu_before, cpu_after,
                       (load_before, os.getloadavg()[0]))
        finally:
            await fc.close()
            stack.stop()


def report(round_no: int, args: argparse.Namespace, bus_s: float, http_s: float, cpu_before: dict[str, float],
           cpu_after: dict[str, float], load: tuple[float, float]) -> None:
    bus_rate, http_rate = args.tasks / bus_s, args.http_tasks / http_s
    print(f"\n== round {round_no}: submission step alone (nothing executes meanwhile); "
          f"load average {load[0]:.2f} before, {load[1]:.2f} after ==")
    print(f"nats trigger, request/reply  {bus_rate:8.0f} tasks/s  ({args.tasks} tasks, "
          f"{args.in_flight} in flight, {bus_s:.1f} s)")
    print(f"HTTP InvokeFunction (Async)  {http_rate:8.0f} tasks/s  ({args.http_tasks} tasks, "
          f"32 connections, {http_s:.1f} s)")
    print(f"trigger / HTTP               {bus_rate / http_rate:8.1f}")
    print("-- CPU per task on the nats trigger path (microseconds)")
    total = 0.0
    for name in cpu_before:
        per_task_us = (cpu_after[name] - cpu_before[name]) / args.tasks * 1e6
        total += per_task_us
        print(f"{name:28s} {per_task_us:8.1f}")
    print(f"{'all':28s} {total:8.1f}   -> two idle cores sustain about {2e6 / total:,.0f} tasks/s")


if __name__ == "__main__":
    uvloop.run(main())
