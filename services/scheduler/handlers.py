"""Turns due Enqueued tasks into dispatches (Processed), or Expired / Invalid.

The dispatch carries what the executor needs of the submission (payloads up to 16 KB), so the
executor reads nothing back from the stream.

Flow control: a due task of a function whose invocations are disabled (DisableFunctionInvocation)
or whose reservedConcurrency is 0 is held Enqueued, and drained in submission order when that
lifts (services/scheduler/holds.py). Both are read from the local KV mirrors on every delivery.
A function's `startRatePerSecond` spaces its dispatches (services/scheduler/rates.py).
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from services.scheduler.metrics import SchedulerMetrics
from shared.bus import ACK, Nak, Term, Verdict
from shared.delays import SCHEDULE_LEAD_S, decode_tick, file_schedule
from shared.errors import ConcurrentUpdateError
from shared.events import AnyTaskEvent, TaskEnqueued, TaskExpired, TaskInvalid, TaskProcessed, decode_event
from shared.eventstore import StoredEvent, follow, now_ms
from services.scheduler.holds import BLOCKED, PAUSED, REASONS, Holds
from services.scheduler.rates import StartRates
from shared.flowconfig import FlowConfigs
from shared.ports import EventLog, FunctionCatalog

log = logging.getLogger(__name__)

RATE = "rate"  # the reason label of a task waiting for its function's startRatePerSecond

class Dispatcher:
    def __init__(self, *, js: JetStreamContext, events: EventLog, catalog: FunctionCatalog,
                 metrics: SchedulerMetrics, flow: FlowConfigs | None = None) -> None:
        self._js = js
        self._events = events
        self._catalog = catalog
        self._metrics = metrics
        self._flow = flow
        self._holds = Holds()
        self._rates = StartRates()
        self._rate_waiting: dict[str, int] = {}  # per function, dispatches waiting in process for their turn

    def _start_rate(self, function: str) -> float | None:
        config = self._flow.concurrency(function) if self._flow is not None else None
        return config.start_rate_per_second if config is not None else None

    async def _await_turn(self, function: str) -> float:
        """Wait in process for the function's next start under its rate; 0, or how long to hand
        the task back for when its turn is further out."""
        booked, wait_s = self._rates.reserve(function, self._start_rate(function), time.monotonic())
        if wait_s <= 0:
            return 0.0
        self._metrics.holds.labels(function, RATE).inc()
        if not booked:
            return wait_s
        self._rate_waiting[function] = self._rate_waiting.get(function, 0) + 1
        self._metrics.held.labels(function, RATE).set(self._rate_waiting[function])
        try:
            await asyncio.sleep(wait_s)
        finally:
            self._rate_waiting[function] -= 1
            self._metrics.held.labels(function, RATE).set(self._rate_waiting[function])
        return 0.0

    def _hold_reason(self, function: str) -> str | None:
        record = self._catalog.cached_function(function)
        if record is not None and record.disabled:
            return PAUSED
        config = self._flow.concurrency(function) if self._flow is not None else None
        if config is not None and config.reserved_concurrency == 0:
            return BLOCKED
        return None

    def _show_held(self, function: str) -> None:
        for reason in REASONS:
            self._metrics.held.labels(function, reason).set(self._holds.count(function, reason))

    async def handle(self, event: AnyTaskEvent, msg: Msg) -> Verdict:
        """An Enqueued event: dispatched when due; filed as a schedule when due later."""
        if not isinstance(event, TaskEnqueued):
            return Term(f"not an Enqueued event: {type(event).__name__}")
        current = StoredEvent(msg.metadata.sequence.stream, event)
        wait_s = (event.due_at_ms - now_ms()) / 1000
        if wait_s > SCHEDULE_LEAD_S:
            await file_schedule(self._js, function=event.function, task_id=event.task_id, enqueued_seq=current.seq,
                                enqueued=msg.data, due_at_ms=event.due_at_ms)
            self._metrics.scheduled.labels(event.function).inc()
            log.info("task scheduled", extra={"task_id": event.task_id, "function": event.function,
                                              "status": str(event.status), "due_at_ms": event.due_at_ms})
            return ACK
        return await self._due(current)

    async def handle_tick(self, msg: Msg) -> Verdict:
        """A delayed task's due tick: dispatched like a due Enqueued event, unless the task moved
        on (stopped, or an earlier tick dispatched it) before it was due."""
        try:
            tick = decode_tick(msg.data)
            event = decode_event(tick.enqueued)
        except msgspec.DecodeError:
            return Term("undecodable due tick")
        if not isinstance(event, TaskEnqueued):
            return Term(f"a due tick of {type(event).__name__}")
        # The dispatch expects the Enqueued event's sequence: one that moved on fails it (superseded).
        return await self._due(StoredEvent(tick.enqueued_seq, event))

    async def _due(self, current: StoredEvent) -> Verdict:
        event = current.event
        assert isinstance(event, TaskEnqueued), "only Enqueued tasks are dispatched"
        now = now_ms()
        if now < event.due_at_ms:
            return Nak((event.due_at_ms - now) / 1000)
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
            reason = self._hold_reason(event.function)
            if reason is not None:
                delay_s = self._holds.hold(event.function, event.task_id, current.seq, reason)
                self._metrics.holds.labels(event.function, reason).inc()
                self._show_held(event.function)
                return Nak(delay_s)
            wait_s = self._holds.wait_for_turn(event.function, event.task_id, current.seq, time.monotonic())
            if wait_s > 0:  # a hold lifted: the held tasks go in submission order
                self._show_held(event.function)
                return Nak(wait_s)
            later_s = await self._await_turn(event.function)
            if later_s > 0:  # startRatePerSecond: its turn is further out
                return Nak(later_s)
            outcome = follow(current, TaskProcessed, submission=TaskProcessed.carrying(event))
        self._holds.done(event.function, event.task_id)
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
