"""The event store: one JetStream stream holding every task transition.

A task's events live on `taskmode.events.<partition>.<function>.<taskId>.<Status>`. Appends carry
`Nats-Expected-Last-Subject-Sequence` scoped to the task's wildcard, so the stream itself
arbitrates races (a stop against a completion) and refuses a second first event for a task id
for as long as any of its events is retained: that is the task-id deduplication.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import msgspec
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RawStreamMsg, StorageType, StoreCompression, StreamConfig
from nats.js.errors import APIError, NotFoundError

from shared import wire
from shared.errors import ConcurrentUpdateError, ServiceUnavailable
from shared.events import AnyTaskEvent, TaskEvent, decode_event, encode_event
from shared.transitions import Status, check_transition

log = logging.getLogger(__name__)

E = TypeVar("E", bound=TaskEvent)


@dataclass(frozen=True)
class StoredEvent:
    """An event with its stream sequence (what the next append must name as expected)."""

    seq: int
    event: AnyTaskEvent


class _AckError(msgspec.Struct):
    err_code: int = 0
    description: str = ""


class _BatchAck(msgspec.Struct):
    seq: int = 0
    error: _AckError | None = None


_batch_ack: Final = msgspec.json.Decoder(_BatchAck)


# JetStream's limit on the messages of one atomic batch (nats-server's default).
MAX_BATCH_MESSAGES: Final = 1000


def now_ms() -> int:
    return int(time.time() * 1000)


def stream_config(*, replicas: int = 1, compressed: bool = True) -> StreamConfig:
    """The event stream's configuration: 7-day retention, never discard new appends, S2-compressed
    on disk (README "Operations" gives the size per task, with and without: bench/stream_size.py)."""
    return StreamConfig(
        name=wire.EVENT_STREAM,
        subjects=[wire.EVENT_SUBJECTS_ALL, wire.DELIVERY_SUBJECTS_ALL],
        max_age=wire.STREAM_MAX_AGE_S,  # a task delayed by up to RETENTION_S outlives its due time by as much
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        duplicate_window=120,
        allow_direct=True,
        # Bus submissions create many tasks per commit (append_new_tasks). Not used for single
        # tasks: a commit costs nats-server milliseconds whatever its size.
        allow_atomic=True,
        num_replicas=replicas,
        compression=StoreCompression.S2 if compressed else StoreCompression.NONE,
    )


async def ensure_stream(js: JetStreamContext, *, replicas: int = 1, compressed: bool = True) -> None:
    """Create the event stream, or bring an existing one to the current configuration."""
    config = stream_config(replicas=replicas, compressed=compressed)
    try:
        await js.stream_info(wire.EVENT_STREAM)
    except NotFoundError:
        await js.add_stream(config)
        return
    await js.update_stream(config)


def follow(current: StoredEvent, cls: type[E], **fields: Any) -> E:
    """The event that moves `current`'s task to `cls`'s status, checked against the table."""
    event = cls(
        task_id=current.event.task_id,
        function=current.event.function,
        version=current.event.version + 1,
        at_ms=fields.pop("at_ms", None) or now_ms(),
        **fields,
    )
    check_transition(current.event.status, event.status, task_id=event.task_id)
    return event


class EventStore:
    """Appends and reads task events."""

    def __init__(self, js: JetStreamContext, *, partitions: int, publish_timeout_s: float = 5.0) -> None:
        self._js = js
        self._nc = js._nc  # atomic batches are plain publishes with batch headers
        self._partitions = partitions
        self._timeout_s = publish_timeout_s

    @property
    def partitions(self) -> int:
        return self._partitions

    def _subject(self, event: TaskEvent) -> str:
        return wire.event_subject(event.function, event.task_id, event.status, partitions=self._partitions)

    async def append_new_tasks(self, firsts: Sequence[tuple[TaskEvent, TaskEvent | None]]) -> None:
        """Create several tasks in one atomic batch: every event is stored, or none is.

        Each pair is a new task's first event (expected sequence 0, as in `append`) and an
        optional second one (its dispatch). A task id that already has an event fails the whole
        batch with `ConcurrentUpdateError`; the caller finds the duplicates and tries again
        without them. One commit for many tasks is what makes bus submissions cheap: the
        stream acknowledges batches, not messages. At most `MAX_BATCH_MESSAGES` events.
        """
        messages: list[tuple[TaskEvent, dict[str, str]]] = []
        for first, second in firsts:
            messages.append((first, {
                wire.HEADER_EXPECTED_LAST_SUBJECT_SEQ: "0",
                wire.HEADER_EXPECTED_LAST_SUBJECT_SEQ_SUBJECT: wire.task_subjects(first.function, first.task_id),
            }))
            if second is not None:
                messages.append((second, {}))
        if not messages:
            return
        if len(messages) > MAX_BATCH_MESSAGES:
            raise ValueError(f"an atomic batch holds at most {MAX_BATCH_MESSAGES} events")
        batch_id = uuid.uuid4().hex
        for index, (event, headers) in enumerate(messages[:-1], start=1):
            headers[wire.HEADER_BATCH_ID] = batch_id
            headers[wire.HEADER_BATCH_SEQUENCE] = str(index)
            await self._nc.publish(self._subject(event), encode_event(event), headers=headers)
        last, headers = messages[-1]
        headers.update({wire.HEADER_BATCH_ID: batch_id, wire.HEADER_BATCH_SEQUENCE: str(len(messages)),
                        wire.HEADER_BATCH_COMMIT: "1"})
        try:
            reply = await self._nc.request(self._subject(last), encode_event(last), timeout=self._timeout_s,
                                           headers=headers)
        except (NatsTimeoutError, asyncio.TimeoutError) as err:
            landed = await self.last(last.function, last.task_id)
            if landed is not None and landed.event == last:
                return
            raise ServiceUnavailable("event store did not acknowledge the batch") from err
        ack = _batch_ack.decode(reply.data)
        if ack.error is not None:
            if ack.error.err_code == wire.JS_ERR_WRONG_LAST_SEQUENCE:
                raise ConcurrentUpdateError("a task of the batch already exists")
            raise ServiceUnavailable(f"event store refused the batch: {ack.error.description}")

    async def append(self, event: TaskEvent, *, expected_seq: int) -> int:
        """Append `event` if the task's last event is still at `expected_seq` (0: no events).

        Returns the new event's stream sequence. Raises `ConcurrentUpdateError` when another
        writer appended first, `ServiceUnavailable` when the stream cannot be reached. A publish
        that timed out is retried with the same message id, so it is never applied twice.
        """
        headers = {
            wire.HEADER_MSG_ID: wire.message_id(event.function, event.task_id, event.version),
            wire.HEADER_EXPECTED_LAST_SUBJECT_SEQ: str(expected_seq),
            wire.HEADER_EXPECTED_LAST_SUBJECT_SEQ_SUBJECT: wire.task_subjects(event.function, event.task_id),
        }
        subject = self._subject(event)
        data = encode_event(event)
        for attempt in range(3):
            try:
                ack = await self._js.publish(subject, data, headers=headers, timeout=self._timeout_s)
                return int(ack.seq)
            except APIError as err:
                if err.err_code == wire.JS_ERR_WRONG_LAST_SEQUENCE:
                    if attempt > 0:  # our timed-out first try may be the one that landed
                        landed = await self.last(event.function, event.task_id)
                        if landed is not None and landed.event == event:
                            return landed.seq
                    raise ConcurrentUpdateError(
                        f"task {event.task_id}: another transition was recorded first"
                    ) from err
                raise
            except (NatsTimeoutError, asyncio.TimeoutError) as err:
                log.warning("append timed out", extra={"task_id": event.task_id, "attempt": attempt})
                last_err: Exception = err
        raise ServiceUnavailable("event store did not acknowledge the append") from last_err

    async def last(self, function: str, task_id: str) -> StoredEvent | None:
        """The task's latest event, or None if the task has none in the stream."""
        return await self._last_on(wire.task_subjects(function, task_id))

    async def last_with_status(self, function: str, task_id: str, status: Status) -> StoredEvent | None:
        """The task's latest event of one status (e.g. its `Enqueued` event, which has the payload)."""
        return await self._last_on(wire.task_status_subject(function, task_id, status))

    async def history(self, function: str, task_id: str) -> list[StoredEvent]:
        """Every retained event of the task, in order (direct gets along the subject index)."""
        subject = wire.task_subjects(function, task_id)
        events: list[StoredEvent] = []
        seq = 1
        while True:
            try:
                msg = await self._get(seq=seq, subject=subject)
            except NotFoundError:
                return events
            assert msg.seq is not None and msg.data is not None
            try:
                events.append(StoredEvent(msg.seq, decode_event(msg.data)))
            except msgspec.DecodeError:
                # Written by a newer or foreign producer: left out, so a fold sees the gap and
                # refuses the history instead of this reader crashing on it.
                log.warning("undecodable event skipped", extra={"subject": msg.subject, "seq": msg.seq})
            seq = msg.seq + 1

    async def _get(self, *, seq: int, subject: str) -> RawStreamMsg:
        """The first event at or after `seq` on `subject`; see `_last_on` for the second try."""
        try:
            return await self._js.get_msg(wire.EVENT_STREAM, seq=seq, subject=subject, next=True, direct=True)
        except NotFoundError:
            return await self._js.get_msg(wire.EVENT_STREAM, seq=seq, subject=subject, next=True)

    async def _last_on(self, subject: str) -> StoredEvent | None:
        try:
            msg = await self._js.get_last_msg(wire.EVENT_STREAM, subject, direct=True)
        except NotFoundError:
            # In a cluster any replica may answer a direct get, also one that is still catching
            # up (a node just restarted) and lacks the newest events: "not found" is believed
            # only from the stream leader, which a non-direct get asks.
            try:
                msg = await self._js.get_last_msg(wire.EVENT_STREAM, subject)
            except NotFoundError:
                return None
        assert msg.seq is not None and msg.data is not None
        return StoredEvent(msg.seq, decode_event(msg.data))
