"""Timer triggers: one task per tick, exactly once per tick.

Timer triggers hash into the task partitions (by function and trigger name) and an instance
runs the timers of the partitions whose lease it holds, so one instance fires a trigger at a
time. Exactly once does not rest on that, though: a tick's task id is derived from the trigger
and the tick time, so a tick fired twice (a lease handover, a restart re-firing recent ticks)
is refused by the event store as a duplicate. Ticks missed while no instance ran are fired
when one runs again, if they are at most `timer_catchup_s` old.

The task's payload is FC's timer event: `{"triggerTime", "triggerName", "payload"}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from datetime import datetime, timezone

import msgspec

from services.triggers.metrics import TriggersMetrics
from services.triggers.settings import TriggersSettings
from shared import wire
from shared.errors import TaskAlreadyExists, TaskmodeError
from shared.eventstore import now_ms
from shared.ports import EventLog, FunctionCatalog
from shared.schedules import Schedule, parse_schedule
from shared.submission import Admission, new_request_id, submit
from shared.transitions import Status
from shared.triggers import TimerTriggerConfig, TriggerCatalog, TriggerRecord, TriggerType, is_enabled

log = logging.getLogger(__name__)

_LONGEST_WAIT_S = 1.0  # new or changed triggers are noticed within this long


def tick_task_id(trigger: str, tick_ms: int) -> str:
    """The task id of one tick: readable when it fits the 128-character rule, hashed when not."""
    suffix = f"-{tick_ms // 1000}"
    if len(trigger) + len(suffix) <= 128:
        return trigger + suffix
    digest = hashlib.sha256(trigger.encode()).hexdigest()[:16]
    return f"{trigger[:128 - len(suffix) - 17]}-{digest}{suffix}"


def timer_event(trigger: str, tick_ms: int, payload: str) -> bytes:
    """FC's timer-trigger event."""
    at = datetime.fromtimestamp(tick_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return msgspec.json.encode({"triggerTime": at, "triggerName": trigger, "payload": payload})


def _epoch_ms(fc_time: str) -> int:
    try:
        return int(datetime.strptime(fc_time, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp() * 1000)
    except ValueError:
        return 0


class TimerLoop:
    def __init__(self, *, events: EventLog, catalog: FunctionCatalog, triggers: TriggerCatalog,
                 metrics: TriggersMetrics, settings: TriggersSettings) -> None:
        self._events = events
        self._catalog = catalog
        self._triggers = triggers
        self._metrics = metrics
        self._settings = settings
        self._schedules: dict[str, Schedule] = {}

    def _schedule(self, expression: str) -> Schedule:
        if expression not in self._schedules:
            self._schedules[expression] = parse_schedule(expression)
        return self._schedules[expression]

    def _timers(self, partition: int) -> list[tuple[str, TriggerRecord, TimerTriggerConfig]]:
        found = []
        for function, record in self._triggers.all():
            if record.trigger_type != TriggerType.TIMER:
                continue
            if wire.partition_of(function, record.trigger_name, self._settings.common.partitions) != partition:
                continue
            config = record.config()
            assert isinstance(config, TimerTriggerConfig)
            if is_enabled(config):
                found.append((function, record, config))
        return found

    async def run_partition(self, partition: int, stop: asyncio.Event) -> None:
        """Fire the due ticks of this partition's timers until `stop`."""
        fired: dict[tuple[str, str, str], int] = {}  # (function, trigger, id) -> last tick fired
        while not stop.is_set():
            now = now_ms()
            wake = now + int(_LONGEST_WAIT_S * 1000)
            for function, record, config in self._timers(partition):
                key = (function, record.trigger_name, record.trigger_id)
                schedule = self._schedule(config.cron_expression)
                # A re-enabled or changed trigger starts from its change, never from before it.
                floor = max(_epoch_ms(record.last_modified_time) - 1000,
                            now - int(self._settings.timer_catchup_s * 1000))
                since = max(fired.get(key, floor), floor)
                for tick in schedule.ticks_between(since, now):
                    if not await self._fire(function, record, config, tick):
                        break  # the bus is away: this tick is tried again on the next round
                    fired[key] = tick
                wake = min(wake, schedule.next_after(now))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, (wake - now_ms()) / 1000))

    async def _fire(self, function: str, record: TriggerRecord, config: TimerTriggerConfig, tick_ms: int) -> bool:
        """Submit one tick's task; False when it should be tried again."""
        labels = (function, record.trigger_name, str(TriggerType.TIMER))
        task_id = tick_task_id(record.trigger_name, tick_ms)
        fields = {"task_id": task_id, "function": function, "trigger": record.trigger_name}
        if await self._catalog.find_function(function) is None:
            return True
        admission = Admission(function=function, task_id=task_id, payload=timer_event(record.trigger_name, tick_ms,
                                                                                         config.payload),
                              request_id=new_request_id(), qualifier=record.qualifier)
        try:
            await submit(self._events, admission, await self._catalog.find_async_config(function))
        except TaskAlreadyExists:
            # Fired already (before a restart or by the previous lease holder): exactly once.
            self._metrics.trigger_events.labels(*labels, "duplicate").inc()
            return True
        except TaskmodeError as err:
            log.warning("timer tick not submitted; retrying", extra={**fields, "error": err.message})
            return False
        self._metrics.trigger_events.labels(*labels, "submitted").inc()
        log.info("timer tick submitted", extra={**fields, "status": str(Status.ENQUEUED),
                                                "lag_ms": int(time.time() * 1000) - tick_ms})
        return True
