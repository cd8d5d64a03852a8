from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from typing import Any

import msgspec

from nats.aio.msg import Msg

from services.executor import orphans
from services.executor.code_cache import CodeCache
from services.executor.dispatch import Dispatcher
from services.executor.instance import process_children
from services.executor.pool import InstancePool, new_sandbox
from services.executor.sandbox import SandboxUnavailable
from services.executor.specs import function_spec
from services.executor.metrics import ExecutorMetrics
from services.executor.runner import TaskRunner
from services.executor.settings import ExecutorSettings
from services.executor.slots import LEASE_S as SLOT_LEASE_S, ClusterSlots
from services.executor.sync_invoke import SyncInvoker
from shared import wire
from shared.bootstrap import open_bus, open_catalog
from shared.catalog import Catalog
from shared.flowconfig import INSTANCE_RUNNING, FlowConfigs, InstanceInfo, InstanceRegistry

from shared.events import decode_event
from shared.task_logs import AttemptLog, ensure_logs_stream, store_attempt_log
from shared.transitions import Status
from shared.metrics_registry import new_registry
from shared.service import Readiness, background, periodically, serve_http

log = logging.getLogger(__name__)
Spawn = Callable[[Coroutine[Any, Any, None]], None]  # runs a coroutine as a tracked background task
SHUTDOWN_GRACE_S = 10.0  # running tasks may finish; those cut off count as a lost attempt
EXIT_NO_SANDBOX = 5
INSTANCE_REPORT_S = 2.0
WARM_EVERY_S = 1.0  # how soon a new minInstances (or a reaped or crashed warm instance) is made up  # ListInstances lags a started or reaped instance by at most this  # a supervisor should not restart us: nothing changes until the host does


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
    flow = await FlowConfigs.open(bus.js, replicas=settings.common.stream_replicas)
    await flow.watch()
    stack.push_async_callback(flow.close)
    owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"  # this executor, in shared registries
    registry = await InstanceRegistry.open(bus.js, replicas=settings.common.stream_replicas)
    pool = InstancePool(
        work_dir=work_dir,
        max_instances_per_function=settings.max_instances_per_function,
        idle_timeout_s=settings.idle_timeout_s,
        sandbox=sandbox,
        limits=lambda name: instance_limit(flow, name),
        minimum=lambda name: _min_instances(flow, name),
        observer=metrics.observe_scaling,
    )
    stack.push_async_callback(pool.close)
    catalog = await open_catalog(bus, stack)
    # Closed first: running tasks still have the bus, the catalog and their instances meanwhile.
    background_tasks: set[asyncio.Task[None]] = set()
    stack.push_async_callback(_finish_or_cancel, background_tasks)
    code = CodeCache(catalog=catalog, root=settings.common.data_dir / "code")
    await ensure_logs_stream(bus.js, replicas=settings.common.stream_replicas)

    async def keep_log(function: str, task_id: str, entry: AttemptLog) -> None:
        await store_attempt_log(bus.js, function=function, task_id=task_id, log=entry)

    slots = await ClusterSlots.open(bus.js, owner=owner, replicas=settings.common.stream_replicas,
                                    on_wait=lambda name, key, count: metrics.throttled.labels(
                                        name, "account" if key == wire.RUNNING_ACCOUNT_KEY else "function").set(count))
    background(stack, periodically(slots.refresh, every_s=SLOT_LEASE_S / 3, stop=stop, what="running slot leases"))
    runner = TaskRunner(events=bus.events, catalog=catalog, code=code, pool=pool, metrics=metrics, settings=settings,
                        logs=keep_log, blocked=lambda name: blocked(catalog, flow, name), slots=slots,
                        cap=lambda name: reserved_concurrency(flow, name))
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
    reporter = InstanceReporter(pool, registry, executor=owner)
    stack.push_async_callback(reporter.withdraw)
    background(stack, periodically(reporter.report, every_s=INSTANCE_REPORT_S, stop=stop, what="instance registry"))

    async def keep_minimums() -> None:
        """minInstances: start instances of functions whose scaling config asks for them warm
        (not while a function is disabled or blocked: no new instance starts then)."""
        for name in flow.scaled_functions():
            wanted = _min_instances(flow, name)
            record = catalog.cached_function(name)
            if wanted <= 0 or record is None or blocked(catalog, flow, name) is not None:
                continue
            try:
                spec = await function_spec(record, code)
                await pool.keep_warm(spec, wanted)
            except Exception as err:  # noqa: BLE001 - tried again on the next round
                log.warning("could not keep instances warm", extra={"function": name, "error": repr(err)})

    background(stack, periodically(keep_minimums, every_s=WARM_EVERY_S, stop=stop, what="minimum instances"))

    async def collect_code() -> None:
        in_use = await catalog.referenced_code() | {i.spec.code_dir.name for i in pool.instances()}
        await code.sweep(in_use, grace_s=settings.code_gc_grace_s)

    background(stack, periodically(collect_code, every_s=min(60.0, max(settings.code_gc_grace_s / 4, 0.5)),
                                   stop=stop, what="code directory garbage collection"))
    dispatcher = Dispatcher(bus.js, catalog=catalog, pool=pool, runner=runner, settings=settings,
                            blocked=lambda name: blocked(catalog, flow, name), spawn=spawn,
                            cap=lambda name: reserved_concurrency(flow, name))
    await dispatcher.run(stop)


def blocked(catalog: Catalog, flow: FlowConfigs, function: str) -> str | None:
    """Why `function`'s dispatches may not start now (None: they may), from the local mirrors."""
    record = catalog.cached_function(function)
    if record is not None and record.disabled:
        return "paused"
    config = flow.concurrency(function)
    if config is not None and config.reserved_concurrency == 0:
        return "blocked"
    return None


def reserved_concurrency(flow: FlowConfigs, function: str) -> int | None:
    """The function's cap on running tasks over every executor (None: uncapped; 0 never gets
    this far: such tasks are held Enqueued)."""
    config = flow.concurrency(function)
    return config.reserved_concurrency if config is not None and config.reserved_concurrency else None


def instance_limit(flow: FlowConfigs, function: str) -> int | None:
    """The most instances of `function` this executor may run at once (None: its own default).

    The scaling config's maxInstances caps its instances. A reservedConcurrency of N caps the
    function's running tasks (over every executor, by running slots); as an instance limit it is
    exact at an instanceConcurrency of 1 and loose above (N tasks fill at most ceil(N/C)
    instances: the pool fills busy instances before starting another).
    """
    limits = []
    scaling = flow.scaling(function)
    if scaling is not None and scaling.max_instances is not None:
        limits.append(scaling.max_instances)
    concurrency = flow.concurrency(function)
    if concurrency is not None and concurrency.reserved_concurrency:
        limits.append(concurrency.reserved_concurrency)
    return min(limits) if limits else None


def _min_instances(flow: FlowConfigs, function: str) -> int:
    scaling = flow.scaling(function)
    return scaling.min_instances if scaling is not None else 0


class InstanceReporter:
    """Reports this executor's live instances to the registry ListInstances reads; an entry of
    a dead executor ages out (the bucket's TTL), one of a reaped instance is removed here."""

    def __init__(self, pool: InstancePool, registry: InstanceRegistry, *, executor: str) -> None:
        self._pool = pool
        self._registry = registry
        self._executor = executor
        self._reported: dict[str, InstanceInfo] = {}
        self._born: dict[str, int] = {}

    async def report(self) -> None:
        live: dict[str, InstanceInfo] = {}
        now = int(time.time() * 1000)
        for instance in self._pool.instances():
            born = self._born.setdefault(instance.instance_id, now)
            live[instance.instance_id] = InstanceInfo(
                instance_id=instance.instance_id, status=INSTANCE_RUNNING, function_name=instance.spec.name,
                qualifier=instance.spec.version, version_id=instance.spec.version, created_time_ms=born,
                executor=self._executor)
        for info in live.values():  # every time: a refresh keeps the entry from ageing out
            await self._registry.put(info)
        for instance_id in set(self._reported) - set(live):
            await self._registry.remove(self._reported[instance_id])
            self._born.pop(instance_id, None)
        self._reported = live

    async def withdraw(self) -> None:
        for info in self._reported.values():
            with contextlib.suppress(Exception):
                await self._registry.remove(info)
        self._reported = {}


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


class UsageExporter:
    """Per-instance CPU and memory gauges; labels of instances that are gone are removed."""

    def __init__(self, pool: InstancePool, metrics: ExecutorMetrics) -> None:
        self._pool = pool
        self._metrics = metrics
        self._seen: set[tuple[str, str]] = set()

    async def export(self) -> None:
        live: set[tuple[str, str]] = set()
        per_function: dict[str, int] = {}
        instances = list(self._pool.instances())
        children = process_children() if instances else {}
        for instance in instances:
            labels = (instance.spec.name, instance.instance_id)
            live.add(labels)
            per_function[instance.spec.name] = per_function.get(instance.spec.name, 0) + 1
            with contextlib.suppress(Exception):  # the process may exit between listing and reading
                cpu_s, rss = instance.usage(children)
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
