"""Turns due Enqueued tasks into dispatches (Processed), or Expired / Invalid."""

from __future__ import annotations

import asyncio
import logging

import msgspec
from nats.aio.msg import Msg

from services.scheduler.metrics import SchedulerMetrics
from shared.errors import ConcurrentUpdateError
from shared.events import TaskEnqueued, TaskEvent, TaskExpired, TaskInvalid, TaskProcessed, decode_event
from shared.eventstore import StoredEvent, follow, now_ms
from shared.ports import EventLog, FunctionCatalog

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(self, *, events: EventLog, catalog: FunctionCatalog, metrics: SchedulerMetrics) -> None:
        self._events = events
        self._catalog = catalog
        self._metrics = metrics

    async def handle_batch(self, msgs: list[Msg]) -> None:
        await asyncio.gather(*(self._handle_safely(msg) for msg in msgs))

    async def _handle_safely(self, msg: Msg) -> None:
        try:
            await self._handle(msg)
        except Exception:  # noqa: BLE001 - one bad message must not stop the others; retried later
            log.exception("dispatch failed; retrying in 1s", extra={"subject": msg.subject})
            await msg.nak(delay=1)

    async def _handle(self, msg: Msg) -> None:
        try:
            event = decode_event(msg.data)
        except msgspec.DecodeError:
            log.error("undecodable event dropped", extra={"subject": msg.subject})
            await msg.term()
            return
        if not isinstance(event, TaskEnqueued):
            await msg.term()
            return
        now = now_ms()
        if now < event.due_at_ms:
            await msg.nak(delay=(event.due_at_ms - now) / 1000)
            return
        current = StoredEvent(msg.metadata.sequence.stream, event)
        fields = {"task_id": event.task_id, "function": event.function}
        # The catalog answers from its local mirror: no round trip per task.
        if await self._catalog.find_function(event.function) is None:
            outcome: TaskEvent = follow(current, TaskInvalid, reason=f"function {event.function} was deleted")
            self._metrics.invalid.labels(event.function).inc()
        elif now - event.due_at_ms > event.max_event_age_s * 1000:
            outcome = follow(
                current, TaskExpired, reason=f"not run within maxAsyncEventAgeInSeconds={event.max_event_age_s}"
            )
            self._metrics.expired.labels(event.function).inc()
        else:
            outcome = follow(current, TaskProcessed)
        try:
            await self._events.append(outcome, expected_seq=current.seq)
        except ConcurrentUpdateError:
            # A stop (or an earlier delivery of this message) moved the task on: nothing to do.
            log.info("task moved on before dispatch", extra={**fields, "status": "superseded"})
        else:
            if isinstance(outcome, TaskProcessed):
                self._metrics.dispatched.labels(event.function).inc()
                self._metrics.dispatch_latency.labels(event.function).observe(max(0, now - event.due_at_ms) / 1000)
            log.info("task %s", outcome.status, extra={**fields, "status": str(outcome.status)})
        await msg.ack()
