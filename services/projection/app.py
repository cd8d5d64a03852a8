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
from shared.service import cancel_all, periodically, serve_metrics
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
    serve_metrics(metrics.registry, port=settings.common.metrics_port, host=settings.common.metrics_host)
    store = await TaskStore.connect(settings.common.mongodb_url)
    nc = await connect(settings.common.nats_url, name=wire.PROJECTION_CLIENT_NAME)
    try:
        await store.ensure_indexes(ttl_index=not settings.expiry_sweep_s)
        js = nc.jetstream()
        await ensure_stream(js)
        if not await _has_position(js):
            # The read model's position lives in the durable consumer: without one, whatever the
            # collection holds is not known to match the stream, so it is rebuilt from event one.
            log.info("no projection position: rebuilding the read model from the stream")
            await store.delete_all()
        await _ensure_consumer(js, ack_wait_s=settings.ack_wait_s)
        projector = Projector(store=store, events=EventStore(js), metrics=metrics, settings=settings.common)

        async def read_lag() -> None:
            metrics.lag.set((await js.consumer_info(wire.EVENT_STREAM, wire.PROJECTION_DURABLE)).num_pending)

        async def sweep_expired() -> None:
            # Only where no TTL index expires tasks (see TaskStore.ensure_indexes).
            removed = await store.purge_expired(datetime.datetime.now(datetime.UTC))
            if removed:
                log.info("expired tasks removed", extra={"count": removed})

        background = [asyncio.create_task(periodically(read_lag, every_s=5, stop=stop, what="lag read"))]
        if settings.expiry_sweep_s:
            background.append(asyncio.create_task(
                periodically(sweep_expired, every_s=settings.expiry_sweep_s, stop=stop, what="expiry sweep")))
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
            await cancel_all(*background)
    finally:
        await nc.drain()
        await store.close()


async def _has_position(js: JetStreamContext) -> bool:
    try:
        await js.consumer_info(wire.EVENT_STREAM, wire.PROJECTION_DURABLE)
    except NotFoundError:
        return False
    return True


async def rebuild(settings: ProjectionSettings) -> None:
    """Drop the read model and the projection's position, so the projection replays the stream.

    A running projection loses its consumer, exits, and (restarted by `make run` or a
    supervisor) rebuilds on start; the documents are dropped here too for a stopped one.
    """
    store = await TaskStore.connect(settings.common.mongodb_url)
    nc = await connect(settings.common.nats_url, name=wire.PROJECTION_REBUILD_CLIENT_NAME)
    try:
        js = nc.jetstream()
        # Documents first, position second: a projection still running until it notices the
        # lost consumer can only write documents that its restart wipes again.
        await store.delete_all()
        await store.ensure_indexes(ttl_index=not settings.expiry_sweep_s)
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(wire.EVENT_STREAM, wire.PROJECTION_DURABLE)
        log.info("read model dropped; the projection replays the stream on its next start")
    finally:
        await nc.drain()
        await store.close()
