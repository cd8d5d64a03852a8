from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry

from services.scheduler.handlers import Dispatcher
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.settings import SchedulerSettings
from shared import wire
from shared.bus import connect, consume, ensure_consumer
from shared.catalog import Catalog
from shared.eventstore import EventStore, ensure_stream
from shared.service import cancel_all, periodically, serve_metrics
from shared.transitions import Status

log = logging.getLogger(__name__)


async def run(settings: SchedulerSettings, stop: asyncio.Event) -> None:
    metrics = SchedulerMetrics.build(CollectorRegistry())
    serve_metrics(metrics.registry, port=settings.common.metrics_port, host=settings.common.metrics_host)
    nc = await connect(settings.common.nats_url, name=wire.SCHEDULER_CLIENT_NAME)
    try:
        js = nc.jetstream()
        await ensure_stream(js)
        await ensure_consumer(
            js,
            stream=wire.EVENT_STREAM,
            durable=wire.SCHEDULER_DURABLE,
            filter_subjects=[wire.status_subjects(Status.ENQUEUED)],
            ack_wait_s=settings.ack_wait_s,
            max_ack_pending=settings.max_parked,
        )
        catalog = await Catalog.open(js)
        await catalog.watch()
        dispatcher = Dispatcher(events=EventStore(js), catalog=catalog, metrics=metrics)
        async def read_backlog() -> None:
            info = await js.consumer_info(wire.EVENT_STREAM, wire.SCHEDULER_DURABLE)
            metrics.backlog.set(info.num_pending + info.num_ack_pending)

        backlog = asyncio.create_task(periodically(read_backlog, every_s=5, stop=stop, what="backlog read"))
        try:
            await consume(
                js,
                stream=wire.EVENT_STREAM,
                durable=wire.SCHEDULER_DURABLE,
                handle_batch=dispatcher.handle_batch,
                stop=stop,
                batch=settings.batch_size,
            )
        finally:
            await cancel_all(backlog)
    finally:
        await nc.drain()
