"""Delivers a finished task's record to its destination, once, retrying with backoff.

Each final event (Succeeded, Failed, Expired) of a function whose async config has a
destination for that outcome is delivered; every attempt's outcome is appended as a delivery
record (`shared.deliveries`). Before sending, the task's last record is read: a task already
Delivered (or given up on) is never sent again, whatever a restart or a redelivery replays.
A failed attempt is retried with a delayed nak (doubling, capped), so a slow or dead receiver
holds up no other delivery and no task: deliveries run in their own service, on consumers of
their own.
"""

from __future__ import annotations

import logging
import time

from nats.aio.msg import Msg

from services.deliverer.metrics import DelivererMetrics
from services.deliverer.senders import DeliveryFailed, Senders, kind_of
from services.deliverer.settings import DelivererSettings
from shared.bus import ACK, Nak, Verdict
from shared.catalog import function_arn
from shared.deliveries import FINAL_STATES, DeliveryLog, DeliveryRecorded, DeliveryState
from shared.destinations import Condition, condition_of, destination_record, parse_destination
from shared.errors import InvalidArgument
from shared.events import AnyTaskEvent, TaskEnqueued
from shared.eventstore import now_ms
from shared.ports import EventLog, FunctionCatalog
from shared.transitions import Status

log = logging.getLogger(__name__)


class Deliverer:
    def __init__(self, *, events: EventLog, deliveries: DeliveryLog, catalog: FunctionCatalog, senders: Senders,
                 metrics: DelivererMetrics, settings: DelivererSettings) -> None:
        self._events = events
        self._deliveries = deliveries
        self._catalog = catalog
        self._senders = senders
        self._metrics = metrics
        self._settings = settings

    async def handle(self, event: AnyTaskEvent, msg: Msg) -> Verdict:
        condition = condition_of(event)
        if condition is None:
            return ACK
        config = await self._catalog.find_async_config(event.function)
        destinations = config.destination_config if config is not None else None
        entry = None
        if destinations is not None:
            entry = destinations.on_success if condition == Condition.SUCCESS else destinations.on_failure
        if entry is None or not entry.destination:
            return ACK
        fields = {"task_id": event.task_id, "function": event.function, "status": str(event.status),
                  "destination": entry.destination}
        last = await self._deliveries.last(event.function, event.task_id)
        if last is not None and last.state in FINAL_STATES:
            return ACK  # delivered (or given up on) before a restart or redelivery: never twice
        attempt = msg.metadata.num_delivered

        async def record(state: DeliveryState, error: str = "") -> None:
            await self._deliveries.record(DeliveryRecorded(
                task_id=event.task_id, function=event.function, state=state, destination=entry.destination,
                condition=condition, attempt=attempt, at_ms=now_ms(), error=error))

        try:
            target = parse_destination(entry.destination, region=self._settings.common.region,
                                       account_id=self._settings.common.account_id)
        except InvalidArgument as err:  # stored before destinations were checked: nothing to retry
            await record(DeliveryState.DELIVERY_FAILED, err.message)
            return ACK
        enqueued = await self._events.last_with_status(event.function, event.task_id, Status.ENQUEUED)
        body = destination_record(
            final=event, enqueued=enqueued.event if enqueued and isinstance(enqueued.event, TaskEnqueued) else None,
            function_arn=function_arn(region=self._settings.common.region,
                                      account_id=self._settings.common.account_id, function=event.function),
            condition=condition)
        kind = kind_of(target)
        started = time.perf_counter()
        try:
            await self._senders.send(target, body, function=event.function, task_id=event.task_id)
        except DeliveryFailed as err:
            self._metrics.attempts.labels(kind, "failed").inc()
            if attempt >= self._settings.max_attempts:
                await record(DeliveryState.DELIVERY_FAILED, err.reason)
                self._metrics.errors.labels(event.function, condition).inc()
                log.warning("destination given up", extra={**fields, "attempt": attempt, "error": err.reason})
                return ACK
            await record(DeliveryState.DELIVERING, err.reason)
            delay_s = self._settings.backoff_s(attempt)
            log.info("destination attempt failed; retrying", extra={**fields, "attempt": attempt,
                                                                    "retry_in_s": delay_s, "error": err.reason})
            return Nak(delay_s)
        finally:
            self._metrics.attempt_seconds.labels(kind).observe(time.perf_counter() - started)
        await record(DeliveryState.DELIVERED)
        self._metrics.attempts.labels(kind, "delivered").inc()
        self._metrics.succeeded.labels(event.function, condition).inc()
        log.info("destination delivered", extra={**fields, "attempt": attempt, "condition": str(condition)})
        return ACK
