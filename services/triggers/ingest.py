"""`nats` triggers: every message on a trigger's subject becomes a task of its function.

Messages are gathered for about a millisecond (or until a batch is full) and appended as one
atomic batch through the one admission path (`shared.submission.submit_many`), several batches
in flight at once; each publisher that gave a reply subject is answered once its task is stored:
`{"taskId": ...}`, or FC's error object with `HttpStatus` (409 `TaskAlreadyExists` for a task id
already used). Publishers set the task id in `x-fc-async-task-id`, a delay in `x-fc-async-delay`
and may set `x-fc-request-id`, exactly as over HTTP.

Each trigger subscribes in a queue group of its own, so several instances of this service share
a trigger's messages and each message becomes one task, while two triggers on one subject each
get every message.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from services.triggers.metrics import TriggersMetrics
from services.triggers.settings import TriggersSettings
from shared import wire
from shared.catalog import AsyncConfigRecord
from shared.errors import FunctionNotFound, TaskAlreadyExists, TaskmodeError
from shared.ports import EventLog, FunctionCatalog
from shared.submission import (
    MAX_ASYNC_PAYLOAD_BYTES,
    Admission,
    accepted_request_id,
    check_payload_size,
    choose_task_id,
    parse_delay,
    submit_many,
)
from shared.transitions import Status
from shared.triggers import NatsTriggerConfig, TriggerCatalog, TriggerType, is_enabled

log = logging.getLogger(__name__)

_encode = msgspec.json.Encoder().encode
# Pending messages one subscription may hold before nats-py drops (publishers then time out).
_PENDING_MSGS = 1_000_000
_PENDING_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class Binding:
    """What one subscription feeds: a trigger of a function, firing on a qualifier."""

    function: str
    trigger: str
    subject: str
    qualifier: str


class _Accepted(msgspec.Struct, rename="camel"):
    task_id: str


def error_reply(err: TaskmodeError, request_id: str) -> bytes:
    """FC's error object, with the HTTP status the same refusal gets from the gateway."""
    body: dict[str, Any] = {"Code": err.code, "Message": err.message, "RequestId": request_id,
                            "HttpStatus": err.http_status}
    if isinstance(err, TaskAlreadyExists):
        body["TaskId"] = err.existing_task_id
    return _encode(body)


class NatsIngest:
    def __init__(self, *, nc: Client, events: EventLog, catalog: FunctionCatalog, triggers: TriggerCatalog,
                 metrics: TriggersMetrics, settings: TriggersSettings) -> None:
        self._nc = nc
        self._events = events
        self._catalog = catalog
        self._triggers = triggers
        self._metrics = metrics
        self._settings = settings
        self._subs: dict[Binding, Subscription] = {}
        self._buffer: list[tuple[Msg, Binding]] = []
        self._ready = asyncio.Event()
        self._slots = asyncio.Semaphore(settings.batches_in_flight)
        self._in_flight: set[asyncio.Task[None]] = set()
        # Request ids for messages that bring none: a random per-process prefix and a counter,
        # unique without a uuid4 per message (which costs more than the rest of its admission).
        self._id_prefix = uuid.uuid4().hex[:12]
        self._ids = itertools.count()

    @property
    def bindings(self) -> set[Binding]:
        return set(self._subs)

    async def sync(self) -> None:
        """Subscribe to every enabled nats trigger, and only to those (called periodically)."""
        wanted: set[Binding] = set()
        for function, record in self._triggers.all():
            if record.trigger_type != TriggerType.NATS:
                continue
            config = record.config()
            assert isinstance(config, NatsTriggerConfig)
            if is_enabled(config):
                wanted.add(Binding(function, record.trigger_name, config.subject, record.qualifier))
        for binding in set(self._subs) - wanted:
            with contextlib.suppress(Exception):
                await self._subs.pop(binding).unsubscribe()
            log.info("nats trigger unsubscribed", extra={"function": binding.function, "trigger": binding.trigger,
                                                         "subject": binding.subject})
        for binding in wanted - set(self._subs):
            self._subs[binding] = await self._nc.subscribe(
                binding.subject, queue=wire.trigger_queue_group(binding.function, binding.trigger),
                cb=self._collector(binding), pending_msgs_limit=_PENDING_MSGS, pending_bytes_limit=_PENDING_BYTES)
            log.info("nats trigger subscribed", extra={"function": binding.function, "trigger": binding.trigger,
                                                       "subject": binding.subject})

    def _collector(self, binding: Binding) -> Any:
        async def collect(msg: Msg) -> None:
            self._buffer.append((msg, binding))
            self._ready.set()

        return collect

    async def run(self, stop: asyncio.Event) -> None:
        """Append gathered messages in batches until `stop`; then finish the batches in flight."""
        stopped = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                ready = asyncio.create_task(self._ready.wait())
                await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
                ready.cancel()
                if stop.is_set():
                    break
                if len(self._buffer) < self._settings.batch_tasks:
                    await asyncio.sleep(self._settings.gather_s)  # let a burst gather into one batch
                batch = self._buffer[:self._settings.batch_tasks]
                del self._buffer[:self._settings.batch_tasks]
                if not self._buffer:
                    self._ready.clear()
                await self._slots.acquire()
                task = asyncio.create_task(self._append(batch))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
        finally:
            stopped.cancel()
            for sub in self._subs.values():
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            if self._in_flight:
                await asyncio.gather(*self._in_flight, return_exceptions=True)

    async def _append(self, batch: list[tuple[Msg, Binding]]) -> None:
        try:
            await self._submit(batch)
        except Exception:  # noqa: BLE001 - unanswered publishers time out and may send again
            log.exception("nats trigger batch failed", extra={"count": len(batch)})
        finally:
            self._slots.release()

    async def _submit(self, batch: list[tuple[Msg, Binding]]) -> None:
        items: list[tuple[Admission, AsyncConfigRecord | None]] = []
        accepted: list[tuple[Msg, Binding, str]] = []
        outcomes: Counter[tuple[Binding, str]] = Counter()
        # The catalog answers from local mirrors; once per function per batch is enough.
        functions: dict[str, tuple[bool, AsyncConfigRecord | None]] = {}
        for binding in {b for _, b in batch}:
            functions[binding.function] = (await self._catalog.find_function(binding.function) is not None,
                                           await self._catalog.find_async_config(binding.function))
        for msg, binding in batch:
            headers = msg.headers or {}
            request_id = (accepted_request_id(headers.get(wire.FC_REQUEST_ID_HEADER))
                          or f"{self._id_prefix}-{next(self._ids)}")
            exists, config = functions[binding.function]
            try:
                if not exists:
                    raise FunctionNotFound(f"function {binding.function} does not exist")
                admission = self._admission(msg, binding, headers, request_id)
            except TaskmodeError as err:
                outcomes[(binding, "rejected")] += 1
                log.info("trigger message refused", extra={"function": binding.function, "trigger": binding.trigger,
                                                           "error": err.message, "request_id": request_id})
                await self._reply(msg, error_reply(err, request_id))
                continue
            items.append((admission, config))
            accepted.append((msg, binding, request_id))
        results = await submit_many(self._events, items) if items else []
        self._metrics.batch_tasks.observe(len(items))
        for (msg, binding, request_id), (admission, _), error in zip(accepted, items, results):
            if error is None:
                outcomes[(binding, "submitted")] += 1
                log.debug("task submitted", extra={"task_id": admission.task_id, "function": binding.function,
                                                   "status": str(Status.ENQUEUED), "trigger": binding.trigger})
                await self._reply(msg, _encode(_Accepted(task_id=admission.task_id)))
            else:
                outcomes[(binding, "duplicate" if isinstance(error, TaskAlreadyExists) else "rejected")] += 1
                log.info("trigger task refused", extra={"task_id": admission.task_id, "function": binding.function,
                                                        "trigger": binding.trigger, "code": error.code})
                await self._reply(msg, error_reply(error, request_id))
        for (binding, outcome), count in outcomes.items():
            self._metrics.trigger_events.labels(binding.function, binding.trigger, str(TriggerType.NATS),
                                                outcome).inc(count)
        # One line per batch rather than per task: at thousands of tasks a second, a line each
        # would cost more than the submission (each task is still logged at DEBUG).
        if items:
            log.info("trigger batch submitted", extra={"count": len(items), "submitted": sum(e is None for e in results),
                                                       "first_task_id": items[0][0].task_id,
                                                       "last_task_id": items[-1][0].task_id})

    def _admission(self, msg: Msg, binding: Binding, headers: dict[str, str], request_id: str) -> Admission:
        check_payload_size(msg.data, limit=MAX_ASYNC_PAYLOAD_BYTES)
        task_id = choose_task_id(task_id_header=headers.get(wire.FC_TASK_ID_HEADER),
                                 request_id_header=headers.get(wire.FC_REQUEST_ID_HEADER))
        delay_s = parse_delay(headers.get(wire.FC_DELAY_HEADER))
        return Admission(function=binding.function, task_id=task_id, payload=msg.data, request_id=request_id,
                         qualifier=binding.qualifier, delay_s=delay_s)

    async def _reply(self, msg: Msg, data: bytes) -> None:
        if msg.reply:
            with contextlib.suppress(Exception):  # a publisher that went away needs no answer
                await self._nc.publish(msg.reply, data)
