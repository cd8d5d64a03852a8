"""Flow-control benchmark: cold starts, dispatch precision, a concurrency cap, a flooded neighbour.

Prints figures; asserts nothing about speed. Run: `.venv/bin/python -m bench.flow_control`
(options: `--due 10000 --cap 4 --flood 100000 --cold 40`, `--cold-only`). Everything runs on this
machine at once.

1. Cold start: a Python instance from nothing to serving, in the instance sandbox (as the
   executor runs it) and without, p50/p99 (InstancePool alone, no services): the first of a
   function (its template starts, then forks), further ones (forked from the warm template), and
   with templates off.
2. Dispatch precision: lone tasks, each due at its own moment (x-taskmode-execution-time), and N
   tasks due in the same second; due -> Processed and due -> Running, p50/p99.
3. Throughput under reservedConcurrency C with 50 ms tasks, against the ideal C / 0.05 s.
4. A flooded neighbour: another function's task, submit -> Running, with no backlog and then
   beside a backlog of N tasks of a flooded function, p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import nats
from nats.js import JetStreamContext

from bench.full_stack import fmt_ms, pct, start_stack
from services.executor.instance import FunctionSpec, InvokeContext
from services.executor.pool import InstancePool, new_sandbox
from services.executor.sandbox import SandboxSettings
from shared import submission, wire
from shared.events import decode_event
from shared.eventstore import EventStore, TaskCreator
from shared.transitions import Status
from tests.fc_client import FcClient

NOOP = "def handler(event, context):\n    return event\n"
SLEEP = "import time\n\ndef handler(event, context):\n    time.sleep(float(event or b'0'))\n    return 'ok'\n"


# --- 1. cold start -------------------------------------------------------------------------------


async def cold_starts(count: int, *, sandboxed: bool, work: Path, mode: str) -> list[float]:
    """`count` cold starts (ms, start until it serves) of one kind:

    - "first": a new code version each time, so each pays for its template and then a fork;
    - "fork": one function, each instance killed after its invocation, so the next is forked
      from the warm template;
    - "direct": templates off (TASKMODE_FORK_TEMPLATES=false), a new process each time.
    """
    code = work / "code"
    code.mkdir(parents=True, exist_ok=True)
    (code / "index.py").write_text(NOOP)
    times: list[float] = []
    settings = SandboxSettings(enabled=sandboxed, fork_templates=mode != "direct")
    sandbox = new_sandbox(settings, work_dir=work / "instances")
    pool = InstancePool(work_dir=work / "instances", max_instances_per_function=4, sandbox=sandbox,
                        observer=lambda _name, direction, cold_s: times.append(cold_s * 1000) if direction == "up" else None)
    try:
        if mode == "fork":  # the template's own start is not one of the samples
            await pool.keep_warm(FunctionSpec(name="cold", runtime="python3.10", handler="index.handler",
                                              timeout_s=10, code_dir=code, code_checksum="v"), 1)
            times.clear()
        for i in range(count):
            version = "v" if mode == "fork" else f"v{i}"  # a new code version: every lease is a cold start
            spec = FunctionSpec(name="cold", runtime="python3.10", handler="index.handler", timeout_s=10,
                                code_dir=code, code_checksum=version)
            async with pool.lease(spec) as instance:
                result = await instance.invoke(b"x", InvokeContext(request_id="r", task_id="t"))
                assert result.ok, result.error_message
                if mode == "fork":
                    await instance.kill()  # not kept idle: the next lease starts one
    finally:
        await pool.close()
    return times


async def print_cold_starts(count: int, work: Path) -> None:
    print(f"\n== cold start of a Python instance, {count} each (start until it serves, ms) ==")
    for sandboxed in (True, False):
        for mode, label in (("first", "first of a function (template + fork)"), ("fork", "further (fork)"),
                            ("direct", "templates off (a new process)")):
            times = await cold_starts(count, sandboxed=sandboxed, work=work / f"{sandboxed}-{mode}", mode=mode)
            where = "sandbox" if sandboxed else "plain  "
            print(f"{where} {label:38} {fmt_ms(times)}")


# --- helpers over the running stack --------------------------------------------------------------


async def events_of(js: JetStreamContext, function: str, status: Status, count: int) -> list[Any]:
    """The first `count` events of one transition of `function`, read straight from the stream."""
    sub = await js.subscribe(f"{wire.EVENT_SUBJECT_PREFIX}.*.{function}.*.{status}", ordered_consumer=True)
    found: list[Any] = []
    try:
        while len(found) < count:
            msg = await sub.next_msg(timeout=300)
            found.append(decode_event(msg.data))
    finally:
        await sub.unsubscribe()
    return found


async def put(fc: FcClient, path: str, body: dict[str, Any], method: str = "PUT") -> None:
    response = await fc.request(method, path, json=body)
    assert response.status_code == 200, response.text


async def create(fc: FcClient, name: str, code: str) -> str:
    response = await fc.create_function(name, code={"index.py": code})
    assert response.status_code == 200, response.text
    return str(response.json()["functionId"])


async def bulk_submit(events: EventStore, name: str, function_id: str, ids: list[str], *, due_at_ms: int = 0,
                      payload: bytes = b"") -> None:
    """What a bus trigger's burst does: pipelined first appends (fast to set up N tasks)."""
    creator = TaskCreator(events)
    await creator.start()
    failures: list[Exception] = []

    async def settled(error: Exception | None) -> None:
        if error is not None:
            failures.append(error)

    for task_id in ids:
        await submission.submit_pipelined(
            creator, submission.Admission(function=name, task_id=task_id, payload=payload, request_id=uuid.uuid4().hex,
                                          function_id=function_id, due_at_ms=due_at_ms), None, settled)
    await creator.close()
    assert not failures, failures[:3]


async def lone_precision(fc: FcClient, n: int) -> dict[str, list[float]]:
    """Tasks due one at a time (a quarter second apart): the precision, not throughput."""
    name = "bench_lone"
    await create(fc, name, NOOP)
    first_ms = int(time.time() * 1000) + 3000
    for i in range(n):
        response = await fc.invoke_async(name, b"", task_id=f"lone{i:03d}",
                                          headers={wire.EXECUTION_TIME_HEADER: str(first_ms + i * 250)})
        assert response.status_code == 202, response.text
    processed, running = [], []
    for i in range(n):
        task = await fc.wait_for(name, f"lone{i:03d}", {"Succeeded"}, deadline_s=120)
        at = {e["status"]: e["timestamp"] for e in task["events"]}
        processed.append(at["Processed"] - task["scheduledTime"])
        running.append(at["Running"] - task["scheduledTime"])
    return {"processed": processed, "running": running}


async def dispatch_precision(fc: FcClient, js: JetStreamContext, events: EventStore, n: int) -> dict[str, list[float]]:
    name = "bench_due"
    function_id = await create(fc, name, NOOP)
    due_ms = (int(time.time()) + max(20, n // 500 + 10)) * 1000  # a whole second, after all are in
    await bulk_submit(events, name, function_id, [f"due{i:06d}" for i in range(n)], due_at_ms=due_ms)
    assert time.time() * 1000 < due_ms, "submission outlasted the lead time; raise it"
    processed = await events_of(js, name, Status.PROCESSED, n)
    running = await events_of(js, name, Status.RUNNING, n)
    return {"processed": [e.at_ms - due_ms for e in processed], "running": [e.at_ms - due_ms for e in running]}


async def capped_throughput(fc: FcClient, js: JetStreamContext, cap: int, n: int) -> dict[str, float]:
    name = "bench_capped"
    await create(fc, name, SLEEP)
    await put(fc, f"/functions/{name}/concurrency", {"reservedConcurrency": cap})
    for start in range(0, n, 100):
        results = await asyncio.gather(*(fc.invoke_async(name, b"0.05", task_id=f"cap{i:05d}")
                                         for i in range(start, min(n, start + 100))))
        assert all(r.status_code == 202 for r in results)
    running = await events_of(js, name, Status.RUNNING, n)
    done = await events_of(js, name, Status.SUCCEEDED, n)
    span_s = (max(e.at_ms for e in done) - min(e.at_ms for e in running)) / 1000
    ends = {e.task_id: e.at_ms for e in done}
    edges = sorted([(e.at_ms, 1) for e in running] + [(ends[e.task_id], -1) for e in running])
    peak = level = 0
    for _, step in edges:
        level += step
        peak = max(peak, level)
    return {"per_s": n / span_s, "ideal_per_s": cap / 0.05, "peak": peak}


async def neighbour_latency(fc: FcClient, name: str, probes: int, tag: str) -> list[float]:
    ms = []
    for i in range(probes):
        task_id = f"{tag}{i:03d}"
        sent = time.time() * 1000
        assert (await fc.invoke_async(name, b"", task_id=task_id)).status_code == 202
        task = await fc.wait_for(name, task_id, {"Succeeded"}, deadline_s=120)
        ms.append(next(e["timestamp"] for e in task["events"] if e["status"] == "Running") - sent)
        await asyncio.sleep(0.05)  # pacing the probes, not synchronization
    return ms


async def flooded_neighbour(fc: FcClient, js: JetStreamContext, events: EventStore, flood_n: int,
                            probes: int) -> dict[str, Any]:
    flood, neighbour = "bench_flood", "bench_neighbour"
    flood_id = await create(fc, flood, SLEEP)
    await create(fc, neighbour, NOOP)
    await put(fc, f"/functions/{flood}/scaling-config", {"horizontalScalingPolicies": [{"maxInstances": 2}]})
    quiet = await neighbour_latency(fc, neighbour, probes, "quiet")
    await bulk_submit(events, flood, flood_id, [f"fl{i:06d}" for i in range(flood_n)], payload=b"0.05")
    await events_of(js, flood, Status.PROCESSED, min(flood_n, 2000))  # the flood is being dispatched
    flooded = await neighbour_latency(fc, neighbour, probes, "flooded")
    await put(fc, f"/functions/{flood}/invoke/disable", {"abortOngoingRequest": True}, method="POST")
    return {"quiet": quiet, "flooded": flooded}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cold", type=int, default=40)
    parser.add_argument("--cold-only", action="store_true", help="only the cold starts (no services)")
    parser.add_argument("--lone", type=int, default=40)
    parser.add_argument("--due", type=int, default=10_000)
    parser.add_argument("--cap", type=int, default=4)
    parser.add_argument("--capped", type=int, default=400)
    parser.add_argument("--flood", type=int, default=100_000)
    parser.add_argument("--probes", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        await print_cold_starts(args.cold, Path(tmp))
        if args.cold_only:
            return
        stack, fc, _ = start_stack(Path(tmp) / "stack")
        user, password = stack.nats_credentials("admin") or (None, None)
        nc = await nats.connect(stack.nats_url, user=user, password=password)
        try:
            js = nc.jetstream()
            events = EventStore(js, partitions=int(stack.service_env.get("TASKMODE_PARTITIONS", "4")))
            lone = await lone_precision(fc, args.lone)
            print(f"\n== {args.lone} lone tasks, each due at its own moment ==")
            print(f"due -> Processed             {fmt_ms(lone['processed'])}")
            print(f"due -> Running               {fmt_ms(lone['running'])}")
            due = await dispatch_precision(fc, js, events, args.due)
            print(f"\n== {args.due} tasks due in the same second ==")
            print(f"due -> Processed             {fmt_ms(due['processed'])}")
            print(f"due -> Running               {fmt_ms(due['running'])}")
            capped = await capped_throughput(fc, js, args.cap, args.capped)
            print(f"\n== throughput under reservedConcurrency {args.cap}, {args.capped} tasks of 50 ms ==")
            print(f"measured {capped['per_s']:.1f} tasks/s against the ideal {capped['ideal_per_s']:.0f} "
                  f"({capped['per_s'] / capped['ideal_per_s']:.0%}); most running at once: {capped['peak']:.0f}")
            flooded = await flooded_neighbour(fc, js, events, args.flood, args.probes)
            print(f"\n== another function's task, submit -> Running, {args.probes} probes ==")
            print(f"no backlog                   {fmt_ms(flooded['quiet'])}")
            print(f"beside a flood of {args.flood:<10} {fmt_ms(flooded['flooded'])}")
            print(f"delay the flood adds, p50    {pct(flooded['flooded'], 50) - pct(flooded['quiet'], 50):.1f} ms, "
                  f"p99 {pct(flooded['flooded'], 99) - pct(flooded['quiet'], 99):.1f} ms, "
                  f"worst {max(flooded['flooded']):.1f} ms (mean {statistics.mean(flooded['flooded']):.1f} ms)")
        finally:
            await nc.close()
            await fc.close()
            stack.stop()


if __name__ == "__main__":
    asyncio.run(main())
