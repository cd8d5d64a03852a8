"""The scheduler: one dequeue queue per function, over that function's Enqueued events.

Functions are spread over the partition leases by a hash of their name
(`wire.function_partition`): the scheduler holding a partition pulls the queues of its
functions, so two schedulers never pull one function's queue, and a dead scheduler's functions
move with its partitions. A queue per function is what keeps one function's flood of due tasks
from delaying another function's (see shared/function_queues.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from contextlib import AsyncExitStack
from typing import Final

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from services.scheduler.handlers import Dispatcher
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.settings import SchedulerSettings
from shared import wire
from shared.bootstrap import open_bus, open_catalog
from shared.bus import decoded, settle
from shared.catalog import Catalog
from shared.delays import is_tick, pending_schedules
from shared.flowconfig import FlowConfigs
from shared.function_queues import FunctionQueues, QueueSpec, durables_with_prefix, queue_start_time
from shared.metrics_registry import new_registry
from shared.partitions import PartitionLeases, open_leases, run_partitioned
from shared.service import Readiness, background, periodically, serve_http
from shared.transitions import Status

log = logging.getLogger(__name__)

SYNC_EVERY_S: Final = 0.25  # how soon a new function's queue is pulled
LEFTOVERS_EVERY_S: Final = 3.0  # how often deleted functions' queues are looked for


async def run(settings: SchedulerSettings, stop: asyncio.Event, stack: AsyncExitStack) -> None:
    metrics = SchedulerMetrics.build(new_registry())
    readiness = Readiness()
    serve_http(metrics.registry, readiness, port=settings.common.metrics_port, host=settings.common.metrics_host,
               stack=stack)
    bus = await open_bus(settings.common, stack, name=wire.SCHEDULER_CLIENT_NAME, stop=stop)
    catalog = await open_catalog(bus, stack)
    flow = await FlowConfigs.open(bus.js, replicas=settings.common.stream_replicas)
    await flow.watch()
    stack.push_async_callback(flow.close)
    dispatcher = Dispatcher(js=bus.js, events=bus.events, catalog=catalog, metrics=metrics, flow=flow)
    leases = PartitionLeases(await open_leases(bus.js, replicas=settings.common.stream_replicas),
                             group="scheduler", partitions=settings.common.partitions, lease_s=settings.common.lease_s)
    readiness.add("nats", lambda: bus.nc.is_connected)
    readiness.add("partitions", lambda: bool(leases.held))
    partitions = settings.common.partitions

    on_event = decoded(dispatcher.handle)

    async def on_batch(function: str, msgs: list[Msg]) -> None:
        await asyncio.gather(*(settle(msg, dispatcher.handle_tick if is_tick(msg) else on_event) for msg in msgs))

    queues = FunctionQueues(bus.js, durable_of=lambda function: f"{wire.DEQUEUE_DURABLE_PREFIX}{function}",
                            room=lambda _function: settings.batch_size, on_batch=on_batch)
    stack.push_async_callback(queues.close)
    held: dict[int, set[str]] = {}  # partition -> functions pulled for it

    def spec(created_time: str, function: str) -> QueueSpec:
        return QueueSpec(filter_subjects=(wire.function_status_subjects(function, Status.ENQUEUED),
                                          wire.function_due_subjects(function)),
                         max_ack_pending=settings.max_parked, ack_wait_s=settings.ack_wait_s,
                         start_time=queue_start_time(created_time))

    async def keep_partition(partition: int, partition_stop: asyncio.Event) -> None:
        mine = held.setdefault(partition, set())
        next_leftovers = 0.0
        loop = asyncio.get_running_loop()
        try:
            while not partition_stop.is_set():
                try:
                    functions = await catalog.known_functions()
                    mine |= await queues.ensure_all({
                        name: spec(record.created_time, name) for name, record in functions.items()
                        if wire.function_partition(name, partitions) == partition})
                    if loop.time() >= next_leftovers:
                        next_leftovers = loop.time() + LEFTOVERS_EVERY_S
                        await _leftovers(bus.js, queues, catalog, set(functions), partition, partitions, mine)
                except Exception as err:  # noqa: BLE001 - the bus is away: the queues pulled so far go on
                    log.warning("function queue sync failed", extra={"partition": partition, "error": repr(err)})
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(partition_stop.wait(), SYNC_EVERY_S)
        finally:
            for name in list(mine):  # the partition moved on: its functions' queues go with it
                await queues.release(name)
            mine.clear()

    async def read_backlog() -> None:
        pending = 0
        for function in queues.functions:
            info = await queues.info(function)
            if info is not None:
                pending += int(info.num_pending or 0) + int(info.num_ack_pending or 0)
        metrics.backlog.set(pending)

    background(stack, periodically(read_backlog, every_s=5, stop=stop, what="backlog read"))
    await run_partitioned(leases, keep_partition, stop=stop, lease_s=settings.common.lease_s)


async def _leftovers(js: JetStreamContext, queues: FunctionQueues, catalog: Catalog, known: set[str], partition: int, partitions: int,
                     mine: set[str]) -> None:
    """Queues of deleted functions: pulled while they hold tasks (which end Invalid), then deleted."""
    for durable in await durables_with_prefix(js, wire.DEQUEUE_DURABLE_PREFIX):
        name = durable.removeprefix(wire.DEQUEUE_DURABLE_PREFIX)
        if name in known or wire.function_partition(name, partitions) != partition:
            continue
        info = await queues.info(name)
        if info is None:
            continue
        # Delayed tasks of a deleted function still tick (and end Invalid): keep its queue for them.
        if int(info.num_pending or 0) + int(info.num_ack_pending or 0) > 0 or await pending_schedules(js, name):
            await queues.attach(name)
            mine.add(name)
        elif await catalog.find_function(name) is None:  # looked up again: not one created meanwhile
            await queues.delete(name)
            mine.discard(name)
