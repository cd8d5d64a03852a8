from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from services.executor import orphans
from services.executor.code_cache import CodeCache
from services.executor.pool import InstancePool
from services.executor.metrics import ExecutorMetrics
from services.executor.runner import TaskRunner
from services.executor.settings import ExecutorSettings
from services.executor.sync_invoke import SyncInvoker
from shared import wire
from shared.bus import connect, ensure_consumer, fetch
from shared.catalog import Catalog
from shared.events import decode_event
from shared.eventstore import EventStore, ensure_stream
from shared.service import cancel_all, periodically, serve_metrics
from shared.transitions import Status

log = logging.getLogger(__name__)
Spawn = Callable[[Coroutine[Any, Any, None]], None]  # runs a coroutine as a tracked background task
SHUTDOWN_GRACE_S = 10.0  # running tasks may finish; those cut off count as a lost attempt


async def run(settings: ExecutorSettings, stop: asyncio.Event) -> None:
    metrics = ExecutorMetrics.build(CollectorRegistry())
    serve_metrics(metrics.registry, port=settings.common.metrics_port, host=settings.common.metrics_host)
    nc = await connect(settings.common.nats_url, name=wire.EXECUTOR_CLIENT_NAME)
    orphans.reap(settings.common.data_dir / "instances")
    pool = InstancePool(
        work_dir=settings.common.data_dir / "instances",
        max_instances_per_function=settings.max_instances_per_function,
        idle_timeout_s=settings.idle_timeout_s,
    )
    background: set[asyncio.Task[None]] = set()
    try:
        js = nc.jetstream()
        await ensure_stream(js)
        await ensure_consumer(
            js,
            stream=wire.EVENT_STREAM,
            durable=wire.EXECUTOR_DURABLE,
            filter_subjects=[wire.status_subjects(Status.PROCESSED), wire.status_subjects(Status.RETRYING)],
            ack_wait_s=settings.ack_wait_s,
            max_ack_pending=200_000,
        )
        catalog = await Catalog.open(js)
        await catalog.watch()
        code = CodeCache(catalog=catalog, root=settings.common.data_dir / "code")
        runner = TaskRunner(events=EventStore(js), catalog=catalog, code=code, pool=pool, metrics=metrics,
                            settings=settings)
        sync = SyncInvoker(nc=nc, catalog=catalog, code=code, pool=pool)

        def spawn(coro: Coroutine[Any, Any, None]) -> None:
            task = asyncio.create_task(coro)
            background.add(task)
            task.add_done_callback(background.discard)

        async def on_stopping(msg: Msg) -> None:
            event = decode_event(msg.data)
            spawn(runner.stop_requested(event.function, event.task_id))

        async def on_sync(msg: Msg) -> None:
            spawn(_guarded(sync.handle(msg), "sync invocation"))

        await nc.subscribe(wire.status_subjects(Status.STOPPING), cb=on_stopping)
        await nc.subscribe(f"{wire.SYNC_INVOKE_PREFIX}.*", queue=wire.EXECUTOR_QUEUE_GROUP, cb=on_sync)
        usage = asyncio.create_task(
            periodically(UsageExporter(pool, metrics).export, every_s=5, stop=stop, what="usage export"))
        await _dispatch_loop(js, runner, settings, stop, spawn, background)
        await cancel_all(usage)
    finally:
        pending = [t for t in background if not t.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=SHUTDOWN_GRACE_S)
            for task in still:  # unacked: another executor picks these up after ack_wait
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)
        await pool.close()
        with contextlib.suppress(Exception):
            await nc.drain()


async def _guarded(coro: Awaitable[None], what: str) -> None:
    try:
        await coro
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - the message stays unacked and is redelivered
        log.exception("%s failed", what)


async def _dispatch_loop(js: JetStreamContext, runner: TaskRunner, settings: ExecutorSettings,
                         stop: asyncio.Event, spawn: Spawn, background: set[asyncio.Task[None]]) -> None:
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

        try:
            await _guarded(runner.handle(msg, release_slot=release_slot), "dispatch")
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
        for labels in self._seen - live:
            with contextlib.suppress(KeyError):
                self._metrics.instance_cpu.remove(*labels)
                self._metrics.instance_rss.remove(*labels)
        for function in {f for f, _ in self._seen | live}:
            self._metrics.instances.labels(function).set(per_function.get(function, 0))
        self._seen = live
