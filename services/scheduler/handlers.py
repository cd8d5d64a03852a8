"""Turns due Enqueued tasks into dispatches (Processed), or Expired / Invalid.

The dispatch carries what the executor needs of the submission (payloads up to 16 KB), so the
executor reads nothing back from the stream.
"""

from __future__ import annotations

import logging

from nats.aio.msg import Msg

from services.scheduler.metrics import SchedulerMetrics
from shared.bus import ACK, Nak, Term, Verdict
from shared.errors import ConcurrentUpdateError
from shared.events import AnyTaskEvent, TaskEnqueued, TaskExpired, TaskInvalid, TaskProcessed
from shared.eventstore import StoredEvent, follow, now_ms
from shared.ports import EventLog, FunctionCatalog

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(self, *, events: EventLog, catalog: FunctionCatalog, metrics: SchedulerMetrics) -> None:
        self._events = events
        self._catalog = catalog
        self._metrics = metrics

    async def handle(self, event: AnyTaskEvent, msg: Msg) -> Verdict:
        if not isinstance(event, TaskEnqueued):
            return Term(f"not an Enqueued event: {type(event).__name__}")
        now = now_ms()
        if now < event.due_at_ms:
            return Nak((event.due_at_ms - now) / 1000)
        current = StoredEvent(msg.metadata.sequence.stream, event)
        fields = {"task_id": event.task_id, "function": event.function}
        # The catalog answers from its local mirror: no round trip per task.
        function = await self._catalog.find_function(event.function)
        if function is None or (event.function_id and function.function_id != event.function_id):
            # Gone, or replaced by a new function of the same name: not the one it was submitted to.
            since = "" if function is None else " (a function of that name was created since)"
            outcome: TaskInvalid | TaskExpired | TaskProcessed = follow(
                current, TaskInvalid, reason=f"function {event.function} was deleted{since}")
            self._metrics.invalid.labels(event.function).inc()
        elif now - event.due_at_ms > event.max_event_age_s * 1000:
            outcome = follow(
                current, TaskExpired, reason=f"not run within maxAsyncEventAgeInSeconds={event.max_event_age_s}"
            )
            self._metrics.expired.labels(event.function).inc()
        else:
            outcome = follow(current, TaskProcessed, submission=TaskProcessed.carrying(event))
        try:
            await self._events.append(outcome, expected_seq=current.seq)
        except ConcurrentUpdateError:
            # A stop (or an earlier delivery of this message) moved the task on: nothing to do.
            log.info("task moved on before dispatch", extra={**fields, "status": "superseded"})
            return ACK
        if isinstance(outcome, TaskProcessed):
            self._metrics.dispatched.labels(event.function).inc()
            self._metrics.dispatch_latency.labels(event.function).observe(max(0, now - event.due_at_ms) / 1000)
        log.info("task %s", outcome.status, extra={**fields, "status": str(outcome.status)})
        return ACK
