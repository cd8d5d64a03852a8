from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging

from nats.js import JetStreamContext
from nats.js.api import AckPolicy
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry

from services.projection.handlers import Projector
from services.projection.metrics import ProjectionMetrics
from services.projection.settings import ProjectionSettings
from shared import wire
from shared.bus import connect, consume, ensure_consumer
from shared.eventstore import EventStore, ensure_stream
from shared.service import serve_metrics
from shared.taskstore import TaskStore

log = logging.getLogger(__name__)


async def _ensure_consumer(js: JetStreamContext, *, ack_wait_s: float) -> None:
    await ensure_consumer(
        js,
        stream=wire.EVENT_STREAM,
        durable=wire.PROJECTION_DURABLE,
        filter_subjects=[wire.EVENT_SUBJECTS_ALL],
        ack_wait_s=ack_wait_s,
        max_ack_pending=20_000,
        ack_policy=AckPolicy.ALL,
    )


async def run(settings: ProjectionSettings, stop: asyncio.Event) -> None:
    metrics = ProjectionMetrics.build(CollectorRegistry())
    serve_metrics(metrics.registry, port=settings.common.metrics_port)
    store = await TaskStore.connect(settings.common.mongodb_url)
    nc = await connect(settings.common.nats_url, name="taskmode-projection")
    try:
        await store.ensure_indexes(ttl_index=not settings.expiry_sweep_s)
        js = nc.jetstream()
        await ensure_stream(js)
        await _ensure_consumer(js, ack_wait_s=settings.ack_wait_s)
        projector = Projector(store=store, events=EventStore(js), metrics=metrics, settings=settings.common)
        lag = asyncio.create_task(_track_lag(js, metrics, stop))
        sweep = asyncio.create_task(_sweep_expired(store, settings.expiry_sweep_s, stop))
        try:
            await consume(
                js,
                stream=wire.EVENT_STREAM,
                durable=wire.PROJECTION_DURABLE,
                handle_batch=projector.handle_batch,
                stop=stop,
                batch=settings.batch_size,
                wait_s=settings.fetch_wait_s,
                min_interval_s=settings.min_batch_interval_s,
            )
        finally:
            for task in (lag, sweep):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    finally:
        await nc.drain()
        await store.close()


async def rebuild(settings: ProjectionSettings) -> None:
    """Drop the read model and the projection's position, so the next start replays the stream."""
    store = await TaskStore.connect(settings.common.mongodb_url)
    nc = await connect(settings.common.nats_url, name="taskmode-projection-rebuild")
    try:
        js = nc.jetstream()
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(wire.EVENT_STREAM, wire.PROJECTION_DURABLE)
        await store.delete_all()
        await store.ensure_indexes(ttl_index=not settings.expiry_sweep_s)
        log.info("read model dropped; the projection replays the stream on its next start")
    finally:
        await nc.drain()
        await store.close()


async def _track_lag(js: JetStreamContext, metrics: ProjectionMetrics, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            info = await js.consumer_info(wire.EVENT_STREAM, wire.PROJECTION_DURABLE)
            metrics.lag.set(info.num_pending)
        except Exception as err:  # noqa: BLE001 - a metrics read must never stop projecting
            log.warning("lag read failed", extra={"error": str(err)})
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 5)


async def _sweep_expired(store: TaskStore, every_s: float, stop: asyncio.Event) -> None:
    """Delete tasks past retention when no TTL index does it (see TaskStore.ensure_indexes)."""
    if not every_s:
        return
    while not stop.is_set():
        try:
            removed = await store.purge_expired(datetime.datetime.now(datetime.UTC))
            if removed:
                log.info("expired tasks removed", extra={"count": removed})
        except Exception as err:  # noqa: BLE001 - a failed sweep is retried on the next tick
            log.warning("expiry sweep failed", extra={"error": str(err)})
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
