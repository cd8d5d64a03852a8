from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from typing import Any

import msgspec

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from services.executor import orphans
from services.executor.code_cache import CodeCache
from services.executor.pool import InstancePool, new_sandbox
from services.executor.sandbox import SandboxUnavailable
from services.executor.metrics import ExecutorMetrics
from services.executor.runner import TaskRunner
from services.executor.settings import ExecutorSettings
from services.executor.sync_invoke import SyncInvoker
from shared import wire
from shared.bootstrap import open_bus, open_catalog
from shared.bus import Verdict, decoded, ensure_consumer, fetch, settle
from shared.events import AnyTaskEvent, decode_event
from shared.task_logs import AttemptLog, ensure_logs_stream, store_attempt_log
from shared.transitions import Status
from shared.metrics_registry import new_registry
from shared.service import Readiness, background, periodically, serve_http

log = logging.getLogger(__name__)
Spawn = Callable[[Coroutine[Any, Any, None]], None]  # runs a coroutine as a tracked background task
SHUTDOWN_GRACE_S = 10.0  # running tasks may finish; those cut off count as a lost attempt
EXIT_NO_SANDBOX = 5  # a supervisor should not restart us: nothing changes until the host does


async def run(settings: ExecutorSettings, stop: asyncio.Event, stack: AsyncExitStack) -> None:
    metrics = ExecutorMetrics.build(new_registry())
    readiness = Readiness()
    serve_http(metrics.registry, readiness, port=settings.common.metrics_port, host=settings.common.metrics_host,
               stack=stack)
    work_dir = settings.common.data_dir / "instances"
    sandbox = new_sandbox(settings.sandbox, work_dir=work_dir)
    try:
        await asyncio.to_thread(sandbox.check)
    except SandboxUnavailable as err:
        log.critical("NO SANDBOX FOR FUNCTION INSTANCES; refusing to run them: %s", err)
        raise SystemExit(EXIT_NO_SANDBOX) from err
    if not sandbox.enabled:
        log.warning("FUNCTION INSTANCES RUN UNSANDBOXED (TASKMODE_SANDBOX=false): a function can read the "
                    "executor's files and reach everything it can reach")
    bus = await open_bus(settings.common, stack, name=wire.EXECUTOR_CLIENT_NAME, stop=stop)
    orphans.reap(work_dir)
    pool = InstancePool(
        work_dir=work_dir,
        max_instances_per_function=settings.max_instances_per_function,
        idle_timeout_s=settings.idle_timeout_s,
        sandbox=sandbox,
    )
    stack.push_async_callback(pool.close)
    await ensure_consumer(
        bus.js,
        stream=wire.EVENT_STREAM,
        durable=wire.EXECUTOR_DURABLE,
        filter_subjects=[wire.status_subjects(Status.PROCESSED), wire.status_subjects(Status.RETRYING)],
        ack_wait_s=settings.ack_wait_s,
        max_ack_pending=200_000,
    )
    catalog = await open_catalog(bus, stack)
    # Closed first: running tasks still have the bus, the catalog and their instances meanwhile.
    background_tasks: set[asyncio.Task[None]] = set()
    stack.push_async_callback(_finish_or_cancel, background_tasks)
    code = CodeCache(catalog=catalog, root=settings.common.data_dir / "code")
    await ensure_logs_stream(bus.js, replicas=settings.common.stream_replicas)

    async def keep_log(function: str, task_id: str, entry: AttemptLog) -> None:
        await store_attempt_log(bus.js, function=function, task_id=task_id, log=entry)

    runner = TaskRunner(events=bus.events, catalog=catalog, code=code, pool=pool, metrics=metrics, settings=settings,
                        logs=keep_log)
    sync = SyncInvoker(nc=bus.nc, catalog=catalog, code=code, pool=pool)

    def spawn(coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        background_tasks.add(task)
        task.add_done_callback(background_tasks.discard)

    async def on_stopping(msg: Msg) -> None:
        try:
            event = decode_event(msg.data)
        except msgspec.DecodeError:
            return
        spawn(runner.stop_requested(event.function, event.task_id))

    async def on_sync(msg: Msg) -> None:
        spawn(_guarded(sync.handle(msg), "sync invocation"))

    await bus.nc.subscribe(wire.status_subjects(Status.STOPPING), cb=on_stopping)
    await bus.nc.subscribe(f"{wire.SYNC_INVOKE_PREFIX}.*", queue=wire.EXECUTOR_QUEUE_GROUP, cb=on_sync)
    readiness.add("nats", lambda: bus.nc.is_connected)
    background(stack, periodically(UsageExporter(pool, metrics).export, every_s=5, stop=stop, what="usage export"))

    async def collect_code() -> None:
        in_use = await catalog.referenced_code() | {i.spec.code_dir.name for i in pool.instances()}
        await code.sweep(in_use, grace_s=settings.code_gc_grace_s)

    background(stack, periodically(collect_code, every_s=min(60.0, max(settings.code_gc_grace_s / 4, 0.5)),
                                   stop=stop, what="code directory garbage collection"))
    await _dispatch_loop(bus.js, runner, settings, stop, spawn)


async def _finish_or_cancel(tasks: set[asyncio.Task[None]]) -> None:
    """Let running tasks finish for a while; those cut off are unacked and run again elsewhere."""
    pending = [t for t in tasks if not t.done()]
    if not pending:
        return
    _, still = await asyncio.wait(pending, timeout=SHUTDOWN_GRACE_S)
    for task in still:
        task.cancel()
    await asyncio.gather(*still, return_exceptions=True)


async def _guarded(coro: Coroutine[Any, Any, None], what: str) -> None:
    try:
        await coro
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - the message stays unacked and is redelivered
        log.exception("%s failed", what)


async def _dispatch_loop(js: JetStreamContext, runner: TaskRunner, settings: ExecutorSettings,
                         stop: asyncio.Event, spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
    sub = await js.pull_subscribe_bind(durable=wire.EXECUTOR_DURABLE, stream=wire.EVENT_STREAM)
    in_flight = 0
    freed = asyncio.Event()

    async def one(msg: Msg) -> None:
        released = False

        def release_slot() -> None:
            # Called early by a dispatch that parks behind a busy function: its slot goes to
            # the next fetch, so other functions' tasks are not held up.
            nonlocal in_flight, released
            if not released:
                released = True
                in_flight -= 1
                freed.set()

        async def handle(event: AnyTaskEvent, msg: Msg) -> Verdict:
            return await runner.handle(event, msg, release_slot=release_slot)

        try:
            await settle(msg, decoded(handle))
        finally:
            release_slot()

    try:
        while not stop.is_set():
            free = settings.concurrency - in_flight
            if free <= 0:
                freed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(freed.wait(), 0.5)
                continue
            msgs = await fetch(js, sub, stream=wire.EVENT_STREAM, durable=wire.EXECUTOR_DURABLE, batch=free, wait_s=0.5)
            for msg in msgs:
                in_flight += 1
                spawn(one(msg))
    finally:
        await sub.unsubscribe()


class UsageExporter:
    """Per-instance CPU and memory gauges; labels of instances that are gone are removed."""

    def __init__(self, pool: InstancePool, metrics: ExecutorMetrics) -> None:
        self._pool = pool
        self._metrics = metrics
        self._seen: set[tuple[str, str]] = set()

    async def export(self) -> None:
        live: set[tuple[str, str]] = set()
        per_function: dict[str, int] = {}
        for instance in self._pool.instances():
            labels = (instance.spec.name, instance.instance_id)
            live.add(labels)
            per_function[instance.spec.name] = per_function.get(instance.spec.name, 0) + 1
            with contextlib.suppress(Exception):  # the process may exit between listing and reading
                cpu_s, rss = instance.usage()
                self._metrics.instance_cpu.labels(*labels).set(cpu_s)
                self._metrics.instance_rss.labels(*labels).set(rss)
                self._metrics.instance_requests.labels(*labels).set(instance.requests_in_flight)
        for labels in self._seen - live:
            with contextlib.suppress(KeyError):
                self._metrics.instance_cpu.remove(*labels)
                self._metrics.instance_rss.remove(*labels)
                self._metrics.instance_requests.remove(*labels)
        for function in {f for f, _ in self._seen | live}:
            self._metrics.instances.labels(function).set(per_function.get(function, 0))
        self._seen = live
