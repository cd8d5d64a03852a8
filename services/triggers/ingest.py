"""`nats` triggers: every message on a trigger's subject becomes a task of its function.

Each message is checked and its task's first event sent as it arrives, through the one admission
path (`shared.submission.submit_pipelined`): thousands of appends in flight on one connection,
none awaited on its own. Each publisher that gave a reply subject is answered once its task is
stored: `{"taskId": ...}`, or FC's error object with `HttpStatus` (409 `TaskAlreadyExists` for a
task id already used, also by a message still in flight). Publishers set the task id in
`x-fc-async-task-id`, a delay in `x-fc-async-delay` and may set `x-fc-request-id`, exactly as
over HTTP.

Each trigger subscribes in a queue group of its own, so several instances of this service share
a trigger's messages and each message becomes one task, while two triggers on one subject each
get every message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any, Final

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from services.triggers.metrics import TriggersMetrics
from shared import wire
from shared.bus import publish_prepared
from shared.errors import FunctionNotFound, ServiceUnavailable, TaskAlreadyExists, TaskmodeError
from shared.eventstore import TaskCreator
from shared.ports import FunctionCatalog
from shared.submission import (
    MAX_ASYNC_PAYLOAD_BYTES,
    Admission,
    accepted_request_id,
    check_payload_size,
    choose_task_id,
    parse_delay,
    submit_pipelined,
)
from shared.transitions import Status
from shared.triggers import NatsTriggerConfig, TriggerCatalog, TriggerType, is_enabled

log = logging.getLogger(__name__)

_encode = msgspec.json.Encoder().encode
# Pending messages one subscription may hold before nats-py drops (publishers then time out).
_PENDING_MSGS = 1_000_000
_PENDING_BYTES = 512 * 1024 * 1024
# How often the outcome counts reach the metrics and the log (one line per period, not per task).
REPORT_EVERY_S: Final = 0.5


@dataclass(frozen=True)
class Binding:
    """What one subscription feeds: a trigger of a function, firing on a qualifier."""

    function: str
    trigger: str
    subject: str
    qualifier: str


def error_reply(err: TaskmodeError, request_id: str) -> bytes:
    """FC's error object, with the HTTP status the same refusal gets from the gateway."""
    body: dict[str, Any] = {"Code": err.code, "Message": err.message, "RequestId": request_id,
                            "HttpStatus": err.http_status}
    if isinstance(err, TaskAlreadyExists):
        body["TaskId"] = err.existing_task_id
    return _encode(body)


class NatsIngest:
    def __init__(self, *, nc: Client, creator: TaskCreator, catalog: FunctionCatalog, triggers: TriggerCatalog,
                 metrics: TriggersMetrics) -> None:
        self._nc = nc
        self._creator = creator
        self._catalog = catalog
        self._triggers = triggers
        self._metrics = metrics
        self._subs: dict[Binding, Subscription] = {}
        # Outcomes since the last report, by binding and outcome; counted here (a dict update),
        # reported every REPORT_EVERY_S (a labelled Prometheus counter costs more per call).
        self._outcomes: Counter[tuple[Binding, str]] = Counter()
        # Request ids for messages that bring none: a random per-process prefix and a counter,
        # unique without a uuid4 per message (which costs more than the rest of its admission).
        self._id_prefix = uuid.uuid4().hex[:12]
        self._ids = itertools.count()
        self._debug = log.isEnabledFor(logging.DEBUG)

    @property
    def bindings(self) -> set[Binding]:
        return set(self._subs)

    async def sync(self) -> None:
        """Subscribe to every enabled nats trigger, and only to those (called periodically)."""
        self._debug = log.isEnabledFor(logging.DEBUG)
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
                # Drained, not dropped: messages already taken off the socket are still answered.
                await self._subs.pop(binding).drain()  # type: ignore[no-untyped-call]
            log.info("nats trigger unsubscribed", extra={"function": binding.function, "trigger": binding.trigger,
                                                         "subject": binding.subject})
        for binding in wanted - set(self._subs):
            self._subs[binding] = await self._nc.subscribe(
                binding.subject, queue=wire.trigger_queue_group(binding.function, binding.trigger),
                cb=self._collector(binding), pending_msgs_limit=_PENDING_MSGS, pending_bytes_limit=_PENDING_BYTES)
            log.info("nats trigger subscribed", extra={"function": binding.function, "trigger": binding.trigger,
                                                       "subject": binding.subject})

    def _collector(self, binding: Binding) -> Any:
        return functools.partial(self._take, binding=binding)

    async def run(self, stop: asyncio.Event) -> None:
        """Report outcomes until `stop`; then stop listening and settle the appends in flight."""
        try:
            while not stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=REPORT_EVERY_S)
                self._report()
        finally:
            for sub in self._subs.values():
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            await self._creator.close()  # every message taken is answered before the bus closes
            self._report()

    def _report(self) -> None:
        outcomes, self._outcomes = self._outcomes, Counter()
        for (binding, outcome), count in outcomes.items():
            self._metrics.trigger_events.labels(binding.function, binding.trigger, str(TriggerType.NATS),
                                                outcome).inc(count)
        if outcomes:
            log.info("trigger messages taken", extra={
                outcome: sum(n for (_, o), n in outcomes.items() if o == outcome)
                for outcome in ("submitted", "duplicate", "rejected")})

    async def _take(self, msg: Msg, binding: Binding) -> None:
        """Check one message and send its task's first event; its publisher is answered later."""
        headers = msg.headers or {}
        request_id = (accepted_request_id(headers.get(wire.FC_REQUEST_ID_HEADER))
                      or f"{self._id_prefix}-{next(self._ids)}")
        try:
            # The catalog answers from local mirrors.
            if await self._catalog.find_function(binding.function) is None:
                raise FunctionNotFound(f"function {binding.function} does not exist")
            admission = self._admission(msg, binding, headers, request_id)
            config = await self._catalog.find_async_config(binding.function)
        except Exception as caught:  # noqa: BLE001 - every refusal is answered, the unexpected as a 503
            err = caught if isinstance(caught, TaskmodeError) else ServiceUnavailable(f"catalog trouble: {caught!r}")
            self._outcomes[(binding, "rejected")] += 1
            log.info("trigger message refused", extra={"function": binding.function, "trigger": binding.trigger,
                                                       "error": err.message, "request_id": request_id})
            await self._reply(msg.reply, error_reply(err, request_id))
            return
        reply = msg.reply

        async def settled(error: TaskmodeError | None) -> None:
            if error is None:
                self._outcomes[(binding, "submitted")] += 1
                if self._debug:
                    log.debug("task submitted", extra={"task_id": admission.task_id, "function": binding.function,
                                                       "status": str(Status.ENQUEUED), "trigger": binding.trigger})
                if reply:
                    # `{"taskId": ...}`; a task id needs no JSON escaping (TASK_ID_RE).
                    await self._reply(reply, b'{"taskId":"%s"}' % admission.task_id.encode())
                return
            self._outcomes[(binding, "duplicate" if isinstance(error, TaskAlreadyExists) else "rejected")] += 1
            log.info("trigger task refused", extra={"task_id": admission.task_id, "function": binding.function,
                                                    "trigger": binding.trigger, "code": error.code})
            await self._reply(reply, error_reply(error, request_id))

        await submit_pipelined(self._creator, admission, config, settled)

    def _admission(self, msg: Msg, binding: Binding, headers: dict[str, str], request_id: str) -> Admission:
        check_payload_size(msg.data, limit=MAX_ASYNC_PAYLOAD_BYTES)
        task_id = choose_task_id(task_id_header=headers.get(wire.FC_TASK_ID_HEADER),
                                 request_id_header=headers.get(wire.FC_REQUEST_ID_HEADER))
        delay_s = parse_delay(headers.get(wire.FC_DELAY_HEADER))
        return Admission(function=binding.function, task_id=task_id, payload=msg.data, request_id=request_id,
                         qualifier=binding.qualifier, delay_s=delay_s)

    async def _reply(self, reply: str, data: bytes) -> None:
        if reply:
            with contextlib.suppress(Exception):  # a publisher that went away needs no answer
                await publish_prepared(self._nc, reply, data)
