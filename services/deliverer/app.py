"""The deliverer: per partition it holds, a consumer over the final events, delivering records.

Partitions are split between instances by leases (group `deliverer`), like the scheduler's,
so each task's record is handled by one instance at a time.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import httpx
from shared.metrics_registry import new_registry

from services.deliverer.handlers import Deliverer
from services.deliverer.metrics import DelivererMetrics
from services.deliverer.senders import Senders
from services.deliverer.settings import DelivererSettings
from shared import wire
from shared.bootstrap import open_bus, open_catalog
from shared.bus import Batching, consume, decoded, ensure_consumer
from shared.deliveries import DeliveryLog
from shared.partitions import PartitionLeases, open_leases, run_partitioned
from shared.service import Readiness, serve_http
from shared.transitions import Status

# The final statuses that can fire a destination (Stopped and Invalid fire none).
FIRING: tuple[Status, ...] = (Status.SUCCEEDED, Status.FAILED, Status.EXPIRED)
# Deliveries of one partition attempted at once. A batch is settled before the next fetch, so a
# receiver that hangs delays its partition's next deliveries by at most one attempt's timeout
# (TASKMODE_DELIVERY_TIMEOUT_S); a dead one (refused connections) costs nothing.
BATCH = 64
# Busy (more than 5 final events a second in a partition), a partition gathers for 50 ms
# between fetches: most final events fire nothing, and settled in batches they cost one pull
# and one write of acks instead of a fetch each. A destination waits 50 ms more at most.
BATCHING = Batching(size=BATCH, gather_s=0.05, busy_rate=5.0)


async def run(settings: DelivererSettings, stop: asyncio.Event, stack: AsyncExitStack) -> None:
    metrics = DelivererMetrics.build(new_registry())
    readiness = Readiness()
    serve_http(metrics.registry, readiness, port=settings.common.metrics_port, host=settings.common.metrics_host,
               stack=stack)
    bus = await open_bus(settings.common, stack, name=wire.DELIVERER_CLIENT_NAME, stop=stop)
    catalog = await open_catalog(bus, stack)
    http = httpx.AsyncClient(timeout=settings.timeout_s, follow_redirects=False)
    stack.push_async_callback(http.aclose)
    senders = Senders(http=http, nc=bus.nc, events=bus.events, catalog=catalog, secret=settings.secret,
                      timeout_s=settings.timeout_s)
    deliverer = Deliverer(events=bus.events, deliveries=DeliveryLog(bus.js, partitions=settings.common.partitions),
                          catalog=catalog, senders=senders, metrics=metrics, settings=settings)
    leases = PartitionLeases(await open_leases(bus.js, replicas=settings.common.stream_replicas),
                             group="deliverer", partitions=settings.common.partitions, lease_s=settings.common.lease_s)
    readiness.add("nats", lambda: bus.nc.is_connected)
    readiness.add("partitions", lambda: bool(leases.held))

    async def consume_partition(partition: int, partition_stop: asyncio.Event) -> None:
        durable = wire.partition_durable(wire.DELIVERER_DURABLE, partition)
        await ensure_consumer(
            bus.js,
            stream=wire.EVENT_STREAM,
            durable=durable,
            filter_subjects=[wire.status_subjects(status, partition=partition) for status in FIRING],
            ack_wait_s=settings.ack_wait_s,
            max_ack_pending=100_000,
        )
        await consume(bus.js, stream=wire.EVENT_STREAM, durable=durable, stop=partition_stop,
                      on_message=decoded(deliverer.handle), batching=BATCHING)

    await run_partitioned(leases, consume_partition, stop=stop, lease_s=settings.common.lease_s)
