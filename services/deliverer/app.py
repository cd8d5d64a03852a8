"""The deliverer: a queue per function that has a destination, over its final events.

Only functions whose async config names a destination are read: a final event of any other
function fires nothing, so it never reaches the deliverer (on a system where few functions have
destinations, most final events used to be read and acknowledged for nothing). A function's queue
(shared/function_queues.py) is created when its config first names a destination and starts at
that config's time, so a task that ends after the config was put is delivered however late the
queue is created; it is deleted when the config names none. Functions are spread over the
partition leases by a hash of their name (`wire.function_partition`), like the scheduler's
queues, so each task's record is handled by one instance at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from contextlib import AsyncExitStack
from typing import Final

import httpx
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from services.deliverer.handlers import Deliverer
from services.deliverer.metrics import DelivererMetrics
from services.deliverer.senders import Senders
from services.deliverer.settings import DelivererSettings
from shared import wire
from shared.bootstrap import open_bus, open_catalog
from shared.bus import decoded, settle
from shared.catalog import AsyncConfigRecord
from shared.deliveries import DeliveryLog
from shared.function_queues import FunctionQueues, QueueSpec, durables_with_prefix
from shared.metrics_registry import new_registry
from shared.partitions import PartitionLeases, open_leases, run_partitioned
from shared.service import Readiness, serve_http
from shared.transitions import Status

log = logging.getLogger(__name__)

# The final statuses that can fire a destination (Stopped and Invalid fire none).
FIRING: tuple[Status, ...] = (Status.SUCCEEDED, Status.FAILED, Status.EXPIRED)
# Deliveries of one function attempted at once. A batch is settled before the next fetch, so a
# receiver that hangs delays its function's next deliveries by at most one attempt's timeout
# (TASKMODE_DELIVERY_TIMEOUT_S); a dead one (refused connections) costs nothing.
BATCH: Final = 64
SYNC_EVERY_S: Final = 0.25  # how soon a function's new destination is read from
FORGOTTEN_EVERY_S: Final = 3.0  # how often queues left without a destination are looked for
# A queue starts this long before its config's time (whole seconds, another machine's clock).
START_MARGIN: Final = datetime.timedelta(seconds=2)


def has_destination(config: AsyncConfigRecord | None) -> bool:
    destinations = config.destination_config if config is not None else None
    return destinations is not None and any(
        entry is not None and bool(entry.destination) for entry in (destinations.on_success, destinations.on_failure))


def start_time(config: AsyncConfigRecord) -> datetime.datetime:
    """Where a function's new delivery queue starts: just before its config was last put."""
    for stamp in (config.last_modified_time, config.created_time):
        with contextlib.suppress(ValueError):
            put = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
            return put - START_MARGIN
    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)


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
    partitions = settings.common.partitions
    on_event = decoded(deliverer.handle)

    async def on_batch(_function: str, msgs: list[Msg]) -> None:
        await asyncio.gather(*(settle(msg, on_event) for msg in msgs))

    queues = FunctionQueues(bus.js, durable_of=lambda function: f"{wire.DELIVERY_DURABLE_PREFIX}{function}",
                            room=lambda _function: BATCH, on_batch=on_batch)
    stack.push_async_callback(queues.close)

    def spec(function: str, config: AsyncConfigRecord) -> QueueSpec:
        return QueueSpec(filter_subjects=tuple(wire.function_status_subjects(function, status) for status in FIRING),
                         max_ack_pending=100_000, ack_wait_s=settings.ack_wait_s, start_time=start_time(config))

    async def keep_partition(partition: int, partition_stop: asyncio.Event) -> None:
        with contextlib.suppress(NotFoundError):  # this partition's consumer of an earlier version
            await bus.js.delete_consumer(wire.EVENT_STREAM, wire.partition_durable(wire.OLD_DELIVERER_DURABLE, partition))
        mine: set[str] = set()
        loop = asyncio.get_running_loop()
        next_sweep = 0.0
        try:
            while not partition_stop.is_set():
                try:
                    wanted = {name: spec(name, config) for name, config in (await catalog.latest_async_configs()).items()
                              if has_destination(config) and wire.function_partition(name, partitions) == partition}
                    mine |= await queues.ensure_all(wanted)
                    for name in sorted(mine - set(wanted)):
                        await queues.delete(name)  # no destination any more: nothing to deliver
                        mine.discard(name)
                    if loop.time() >= next_sweep:
                        next_sweep = loop.time() + FORGOTTEN_EVERY_S
                        await _forgotten(bus.js, queues, set(wanted), partition, partitions)
                except Exception as err:  # noqa: BLE001 - the bus is away: the queues pulled so far go on
                    log.warning("delivery queue sync failed", extra={"partition": partition, "error": repr(err)})
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(partition_stop.wait(), SYNC_EVERY_S)
        finally:
            for name in list(mine):  # the partition moved on: its functions' queues go with it
                await queues.release(name)

    await run_partitioned(leases, keep_partition, stop=stop, lease_s=settings.common.lease_s)


async def _forgotten(js: JetStreamContext, queues: FunctionQueues, wanted: set[str], partition: int,
                     partitions: int) -> None:
    """Delivery queues of this partition's functions that no longer have a destination, left
    behind while no deliverer held the partition (the config was removed, the function deleted)."""
    for durable in await durables_with_prefix(js, wire.DELIVERY_DURABLE_PREFIX):
        name = durable.removeprefix(wire.DELIVERY_DURABLE_PREFIX)
        if name not in wanted and name not in queues.functions and wire.function_partition(name, partitions) == partition:
            await queues.delete(name)
