"""The triggers service: `nats` triggers (bus publishers' submissions) and `timer` triggers.

Both create tasks through the one admission path (`shared.submission`). nats triggers are
subscribed in per-trigger queue groups, so instances share the load; timer triggers run on the
partitions whose lease an instance holds (group `timers`), so each fires from one place at a
time, and tick-derived task ids make a second firing a duplicate anyway.
"""

from __future__ import annotations

import asyncio
import gc
from contextlib import AsyncExitStack

from shared.metrics_registry import new_registry

from services.triggers.ingest import NatsIngest
from services.triggers.metrics import TriggersMetrics
from services.triggers.settings import TriggersSettings
from services.triggers.timers import TimerLoop
from shared import wire
from shared.bootstrap import open_bus, open_catalog
from shared.eventstore import TaskCreator
from shared.partitions import PartitionLeases, open_leases, run_partitioned
from shared.service import Readiness, background, periodically, serve_http
from shared.triggers import TriggerCatalog

# How soon a created, changed or deleted nats trigger is (un)subscribed.
SUBSCRIPTION_SYNC_S = 0.5
# Thousands of appends in flight keep their messages, events and callbacks alive for a few
# milliseconds each, long enough to survive CPython's youngest-generation collections at the
# default thresholds (700, 10, 10), which then run every few hundred tasks and keep rescanning
# them. Startup's objects are frozen out of collection and the thresholds raised: the triggers
# service's CPU per task fell by 15-35 % in paired runs (bench/trigger_submission.py).
GC_THRESHOLDS = (50_000, 20, 100)


async def run(settings: TriggersSettings, stop: asyncio.Event, stack: AsyncExitStack) -> None:
    metrics = TriggersMetrics.build(new_registry())
    readiness = Readiness()
    serve_http(metrics.registry, readiness, port=settings.common.metrics_port, host=settings.common.metrics_host,
               stack=stack)
    bus = await open_bus(settings.common, stack, name=wire.TRIGGERS_CLIENT_NAME, stop=stop)
    catalog = await open_catalog(bus, stack)
    triggers = await TriggerCatalog.open(bus.js)
    await triggers.watch()
    stack.push_async_callback(triggers.close)
    creator = TaskCreator(bus.events, max_in_flight=settings.appends_in_flight)
    await creator.start()
    metrics.appends_in_flight.set_function(lambda: creator.in_flight)
    ingest = NatsIngest(nc=bus.nc, creator=creator, catalog=catalog, triggers=triggers, metrics=metrics)
    timers = TimerLoop(events=bus.events, catalog=catalog, triggers=triggers, metrics=metrics, settings=settings)
    leases = PartitionLeases(await open_leases(bus.js, replicas=settings.common.stream_replicas),
                             group="timers", partitions=settings.common.partitions, lease_s=settings.common.lease_s)
    readiness.add("nats", lambda: bus.nc.is_connected)
    readiness.add("partitions", lambda: bool(leases.held))
    await ingest.sync()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    background(stack, periodically(ingest.sync, every_s=SUBSCRIPTION_SYNC_S, stop=stop, what="trigger subscriptions"))
    await asyncio.gather(
        ingest.run(stop),
        run_partitioned(leases, timers.run_partition, stop=stop, lease_s=settings.common.lease_s),
    )
