"""The projection: one AckAll consumer per partition it holds, folding events into MongoDB."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import logging
import time
from contextlib import AsyncExitStack

from nats.js import JetStreamContext
from nats.js.api import AckPolicy
from nats.js.errors import NotFoundError

from services.projection.handlers import Projector, WrittenDocuments
from services.projection.metrics import ProjectionMetrics
from services.projection.task_gauges import TaskGauges
from services.projection.settings import ProjectionSettings
from shared import wire
from shared.bootstrap import open_bus
from shared.events import decode_event
from shared.bus import Batching, consume, ensure_consumer
from shared.metrics_registry import new_registry
from shared.partitions import PartitionLeases, open_leases, run_partitioned
from shared.service import Readiness, background, periodically, serve_http
from shared.taskstore import TaskStore

log = logging.getLogger(__name__)


def _durable(partition: int) -> str:
    return wire.partition_durable(wire.PROJECTION_DURABLE, partition)


async def _has_position(js: JetStreamContext, partition: int) -> bool:
    try:
        await js.consumer_info(wire.EVENT_STREAM, _durable(partition))
    except NotFoundError:
        return False
    return True


async def run(settings: ProjectionSettings, stop: asyncio.Event, stack: AsyncExitStack) -> None:
    metrics = ProjectionMetrics.build(new_registry())
    readiness = Readiness()
    serve_http(metrics.registry, readiness, port=settings.common.metrics_port, host=settings.common.metrics_host,
               stack=stack)
    store = await TaskStore.connect(settings.common.mongodb_url)
    stack.push_async_callback(store.close)
    await store.ensure_indexes(ttl_index=not settings.expiry_sweep_s)
    bus = await open_bus(settings.common, stack, name=wire.PROJECTION_CLIENT_NAME, stop=stop)
    gauges = TaskGauges(metrics.registry, partitions=settings.common.partitions)
    projector = Projector(store=store, events=bus.events, metrics=metrics, settings=settings.common, gauges=gauges)
    partitions = settings.common.partitions
    leases = PartitionLeases(await open_leases(bus.js, replicas=settings.common.stream_replicas),
                             group="projection", partitions=partitions, lease_s=settings.common.lease_s)
    readiness.add("nats", lambda: bus.nc.is_connected)
    readiness.add("partitions", lambda: bool(leases.held))
    batching = Batching(size=settings.batch_size, wait_s=0.5, gather_s=settings.min_batch_interval_s,
                        busy_rate=settings.busy_rate)

    async def consume_partition(partition: int, partition_stop: asyncio.Event) -> None:
        if not await _has_position(bus.js, partition):
            # The partition's position lives in its durable consumer: without one, what the
            # collection holds for it is not known to match the stream, so it is rebuilt.
            removed = await store.delete_partition(partition, partitions=partitions)
            log.info("no projection position: replaying the partition", extra={"partition": partition,
                                                                               "removed": removed})
        await ensure_consumer(
            bus.js,
            stream=wire.EVENT_STREAM,
            durable=_durable(partition),
            filter_subjects=[wire.partition_subjects(partition), wire.delivery_partition_subjects(partition)],
            ack_wait_s=settings.ack_wait_s,
            max_ack_pending=20_000,
            ack_policy=AckPolicy.ALL,
        )
        info = await bus.js.consumer_info(wire.EVENT_STREAM, _durable(partition))
        if info.num_ack_pending:
            # A previous owner (dead, or finishing its last batch) holds deliveries not yet acked. One
            # AckAll of a later message would acknowledge them unprocessed (an event lost from the
            # read model), so wait until they are redeliverable: they then come back ahead of newer ones.
            log.info("waiting for a previous owner's deliveries", extra={"partition": partition,
                                                                         "pending": info.num_ack_pending})
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(partition_stop.wait(), settings.ack_wait_s + 0.5)
            if partition_stop.is_set():
                return
        # What is unfinished in the partition, before its first new event is folded.
        gauges.seed(partition, await store.unfinished(partition, partitions=partitions))
        try:
            written = WrittenDocuments()  # fresh with every claim: another owner may have written since
            await consume(bus.js, stream=wire.EVENT_STREAM, durable=_durable(partition), stop=partition_stop,
                          on_batch=functools.partial(projector.handle_batch, written=written), batching=batching)
        finally:
            gauges.forget(partition)

    async def read_lag() -> None:
        pending, oldest_ms = 0, 0
        for partition in leases.held:
            info = await bus.js.consumer_info(wire.EVENT_STREAM, _durable(partition))
            pending += info.num_pending
            if info.num_pending and info.delivered is not None and info.delivered.stream_seq is not None:
                # The oldest event not yet projected: the one after the last delivered.
                with contextlib.suppress(Exception):
                    msg = await bus.js.get_msg(wire.EVENT_STREAM, seq=info.delivered.stream_seq + 1,
                                               subject=wire.partition_subjects(partition), next=True, direct=True)
                    at_ms = decode_event(msg.data or b"").at_ms
                    oldest_ms = min(oldest_ms or at_ms, at_ms)
        metrics.lag.set(pending)
        metrics.lag_seconds.set(max(0.0, time.time() - oldest_ms / 1000) if oldest_ms else 0.0)

    async def sweep_expired() -> None:
        # Only where no TTL index expires tasks (see TaskStore.ensure_indexes).
        removed = await store.purge_expired(datetime.datetime.now(datetime.UTC))
        if removed:
            log.info("expired tasks removed", extra={"count": removed})

    background(stack, periodically(read_lag, every_s=5, stop=stop, what="lag read"))
    if settings.expiry_sweep_s:
        background(stack, periodically(sweep_expired, every_s=settings.expiry_sweep_s, stop=stop, what="expiry sweep"))
    await run_partitioned(leases, consume_partition, stop=stop, lease_s=settings.common.lease_s)


async def rebuild(settings: ProjectionSettings) -> None:
    """Drop the read model and the projection's positions, so the projection replays the stream.

    A running projection loses its consumers, exits, and (restarted by `make run` or a
    supervisor) rebuilds on start; the documents are dropped here too for a stopped one.
    """
    async with AsyncExitStack() as stack:
        store = await TaskStore.connect(settings.common.mongodb_url)
        stack.push_async_callback(store.close)
        bus = await open_bus(settings.common, stack, name=wire.PROJECTION_REBUILD_CLIENT_NAME)
        # Documents first, positions second: a projection still running until it notices the
        # lost consumer can only write documents that its restart wipes again.
        await store.delete_all()
        await store.ensure_indexes(ttl_index=not settings.expiry_sweep_s)
        for partition in range(settings.common.partitions):
            with contextlib.suppress(NotFoundError):
                await bus.js.delete_consumer(wire.EVENT_STREAM, _durable(partition))
        log.info("read model dropped; the projection replays the stream on its next start")
