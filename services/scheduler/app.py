"""The scheduler: one consumer per partition it holds, over that partition's Enqueued events."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack


from services.scheduler.handlers import Dispatcher
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.settings import SchedulerSettings
from shared import wire
from shared.bootstrap import open_bus, open_catalog
from shared.bus import Batching, consume, decoded, ensure_consumer
from shared.flowconfig import FlowConfigs
from shared.metrics_registry import new_registry
from shared.partitions import PartitionLeases, open_leases, run_partitioned
from shared.transitions import Status
from shared.service import Readiness, background, periodically, serve_http


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
    dispatcher = Dispatcher(events=bus.events, catalog=catalog, metrics=metrics, flow=flow)
    leases = PartitionLeases(await open_leases(bus.js, replicas=settings.common.stream_replicas),
                             group="scheduler", partitions=settings.common.partitions, lease_s=settings.common.lease_s)
    readiness.add("nats", lambda: bus.nc.is_connected)
    readiness.add("partitions", lambda: bool(leases.held))

    async def consume_partition(partition: int, partition_stop: asyncio.Event) -> None:
        durable = wire.partition_durable(wire.SCHEDULER_DURABLE, partition)
        await ensure_consumer(
            bus.js,
            stream=wire.EVENT_STREAM,
            durable=durable,
            filter_subjects=[wire.status_subjects(Status.ENQUEUED, partition=partition)],
            ack_wait_s=settings.ack_wait_s,
            max_ack_pending=settings.max_parked,
        )
        await consume(bus.js, stream=wire.EVENT_STREAM, durable=durable, stop=partition_stop,
                      on_message=decoded(dispatcher.handle), batching=Batching(size=settings.batch_size))

    async def read_backlog() -> None:
        pending = 0
        for partition in leases.held:
            info = await bus.js.consumer_info(wire.EVENT_STREAM, wire.partition_durable(wire.SCHEDULER_DURABLE, partition))
            pending += info.num_pending + info.num_ack_pending
        metrics.backlog.set(pending)

    background(stack, periodically(read_backlog, every_s=5, stop=stop, what="backlog read"))
    await run_partitioned(leases, consume_partition, stop=stop, lease_s=settings.common.lease_s)
