"""The event store: one JetStream stream holding every task transition.

A task's events live on `taskmode.events.<partition>.<function>.<taskId>.<Status>`. Appends carry
`Nats-Expected-Last-Subject-Sequence` scoped to the task's wildcard, so the stream itself
arbitrates races (a stop against a completion) and refuses a second first event for a task id
for as long as any of its events is retained: that is the task-id deduplication.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import msgspec
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RawStreamMsg, StorageType, StoreCompression, StreamConfig
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import APIError, NotFoundError

from shared import wire
from shared.acks import AckInbox, decode_pub_ack, expected_seq_headers, read_pub_ack
from shared.bus import publish_prepared
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


def now_ms() -> int:
    return int(time.time() * 1000)


def stream_config(*, replicas: int = 1, compressed: bool = True) -> StreamConfig:
    """The event stream's configuration: 7-day retention, never discard new appends, S2-compressed
    on disk (README "Operations" gives the size per task, with and without: bench/stream_size.py)."""
    return StreamConfig(
        name=wire.EVENT_STREAM,
        subjects=[wire.EVENT_SUBJECTS_ALL, wire.DELIVERY_SUBJECTS_ALL, wire.SCHEDULE_SUBJECTS_ALL, wire.DUE_SUBJECTS_ALL],
        max_age=wire.STREAM_MAX_AGE_S,  # a task delayed by up to RETENTION_S outlives its due time by as much
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        duplicate_window=120,
        allow_direct=True,
        # Atomic batches are not used (a commit costs nats-server milliseconds, more than the
        # single appends it replaces: bench/first_appends.py); left on so that streams
        # created with it need no change.
        allow_atomic=True,
        # Delayed tasks are timed by nats-server itself (shared/delays.py).
        allow_msg_schedules=True,
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
        self._nc = js._nc  # appends are plain publishes, acknowledged to inboxes of our own
        self._partitions = partitions
        self._timeout_s = publish_timeout_s
        self._acks = AckInbox(self._nc)

    @property
    def partitions(self) -> int:
        return self._partitions

    def _subject(self, event: TaskEvent) -> str:
        return wire.event_subject(event.function, event.task_id, event.status, partitions=self._partitions)

    async def append(self, event: TaskEvent, *, expected_seq: int) -> int:
        """Append `event` if the task's last event is still at `expected_seq` (0: no events).

        Returns the new event's stream sequence. Raises `ConcurrentUpdateError` when another
        writer appended first, `ServiceUnavailable` when the stream cannot be reached. A publish
        that timed out is retried with the same message id, so it is never applied twice.
        """
        # No Nats-Msg-Id: the expected sequence already makes a retried append land once (a
        # retry of one that landed is refused, and recognised below); a message id would cost
        # nats-server an entry in its duplicate window per event and every consumer a header.
        headers = expected_seq_headers(expected_seq, wire.task_subjects(event.function, event.task_id))
        subject = self._subject(event)
        data = encode_event(event)
        for attempt in range(3):
            try:
                answer = await self._acks.request(subject, data, headers, timeout_s=self._timeout_s)
            except (NatsTimeoutError, asyncio.TimeoutError) as err:
                log.warning("append timed out", extra={"task_id": event.task_id, "attempt": attempt})
                last_err: Exception = err
                continue
            ack = read_pub_ack(answer)
            if ack.error is None:
                return ack.seq
            if ack.error.err_code == wire.JS_ERR_WRONG_LAST_SEQUENCE:
                if attempt > 0:  # our timed-out first try may be the one that landed
                    landed = await self.last(event.function, event.task_id)
                    if landed is not None and landed.event == event:
                        return landed.seq
                raise ConcurrentUpdateError(f"task {event.task_id}: another transition was recorded first")
            APIError.from_error(msgspec.structs.asdict(ack.error))  # raises the typed error, as js.publish would
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


# The header block of a first append, up to the task's wildcard (`TaskCreator.create`).
_FIRST_APPEND_HEADERS: Final = (f"NATS/1.0\r\n{wire.HEADER_EXPECTED_LAST_SUBJECT_SEQ}: 0\r\n"
                                f"{wire.HEADER_EXPECTED_LAST_SUBJECT_SEQ_SUBJECT}: ").encode()

# What `TaskCreator.create` reports once the task's first event is settled: None when it is
# stored, `ConcurrentUpdateError` when the task id already has events, `ServiceUnavailable`
# when the stream refused or never acknowledged it.
Created = Callable[[Exception | None], Awaitable[None]]


class TaskCreator:
    """First appends of new tasks, many in flight at once: the `nats` trigger's intake.

    Each task's first event is one plain publish carrying exactly the condition of
    `EventStore.append(event, expected_seq=0)` (no event on the task's subjects yet), with a
    reply subject of its own under one inbox subscription. The stream's acknowledgements
    arrive there and settle the callbacks given to `create`; nothing is awaited per event, so
    thousands are in flight on one connection. Per event this costs nats-server less than an
    atomic batch does (whose commit costs it milliseconds), and there is no gathering delay.

    An append unacknowledged after `timeout_s` (its publish or its acknowledgement was lost
    in a reconnect) is settled by reading the task's Enqueued event back: ours is stored ->
    None, another's -> `ConcurrentUpdateError`, none -> `ServiceUnavailable`.
    """

    def __init__(self, store: EventStore, *, max_in_flight: int = 8192, timeout_s: float | None = None) -> None:
        self._store = store
        self._nc = store._nc
        self._max_in_flight = max_in_flight
        self._timeout_s = store._timeout_s if timeout_s is None else timeout_s
        self._pending: dict[int, tuple[TaskEvent, Created, float]] = {}  # in publish order
        self._tokens = itertools.count()
        self._room = asyncio.Event()
        self._room.set()
        self._drained = asyncio.Event()
        self._drained.set()
        self._prefix = ""
        self._sub: Subscription | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._settling: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        self._prefix = f"{self._nc.new_inbox()}."
        self._sub = await self._nc.subscribe(f"{self._prefix}*", cb=self._on_ack,
                                             pending_msgs_limit=0, pending_bytes_limit=0)
        self._sweeper = asyncio.create_task(self._sweep())

    async def close(self) -> None:
        """Stop; appends still unacknowledged are settled by reading their tasks back."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._drained.wait(), timeout=self._timeout_s)
        self._settle_expired(float("inf"))
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def create(self, event: TaskEvent, done: Created) -> None:
        """Publish `event` as its task's first event; `done` is called once it is settled.

        Waits only while `max_in_flight` appends are unacknowledged.
        """
        while len(self._pending) >= self._max_in_flight:
            self._room.clear()
            await self._room.wait()
        token = next(self._tokens)
        self._pending[token] = (event, done, time.monotonic() + self._timeout_s)
        self._drained.clear()
        try:
            await publish_prepared(
                self._nc, wire.event_subject(event.function, event.task_id, event.status,
                                             partitions=self._store.partitions),
                encode_event(event), reply=f"{self._prefix}{token}",
                headers=b"%s%s\r\n\r\n" % (_FIRST_APPEND_HEADERS,
                                              wire.task_subjects(event.function, event.task_id).encode()))
        except Exception as err:  # noqa: BLE001 - a publish that cannot even be buffered
            if self._pending.pop(token, None) is not None:
                if not self._pending:
                    self._drained.set()
                await done(ServiceUnavailable(f"event store unreachable: {err!r}"))

    async def _on_ack(self, msg: Msg) -> None:
        entry = self._pending.pop(int(msg.subject[len(self._prefix):]), None)
        if entry is None:
            return  # settled already by the sweep
        if len(self._pending) < self._max_in_flight:
            self._room.set()
            if not self._pending:
                self._drained.set()
        done = entry[1]
        try:
            ack = decode_pub_ack(msg.data)
        except msgspec.DecodeError:
            # No JSON: a status message (no responders while the stream is unavailable).
            await done(ServiceUnavailable("event store did not take the append"))
            return
        if ack.error is None:
            await done(None)
        elif ack.error.err_code == wire.JS_ERR_WRONG_LAST_SEQUENCE:
            await done(ConcurrentUpdateError(f"task {entry[0].task_id} already has events"))
        else:
            await done(ServiceUnavailable(f"event store refused the append: {ack.error.description}"))

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self._timeout_s / 2))
            self._settle_expired(time.monotonic())

    def _settle_expired(self, now: float) -> None:
        expired = []
        for token, (_, _, deadline) in self._pending.items():  # oldest first
            if deadline > now:
                break
            expired.append(token)
        if not expired:
            return
        entries = [self._pending.pop(token) for token in expired]
        self._room.set()
        if not self._pending:
            self._drained.set()
        log.warning("appends unacknowledged, reading their tasks back", extra={"count": len(entries)})
        task = asyncio.create_task(self._settle_by_reading(entries))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle_by_reading(self, entries: list[tuple[TaskEvent, Created, float]]) -> None:
        for event, done, _ in entries:
            try:
                landed = await self._store.last_with_status(event.function, event.task_id, event.status)
            except Exception as err:  # noqa: BLE001 - unknown outcome: the caller may retry
                await done(ServiceUnavailable(f"event store did not acknowledge the append: {err!r}"))
                continue
            if landed is None:
                await done(ServiceUnavailable("event store did not acknowledge the append"))
            elif landed.event == event:
                await done(None)
            else:
                await done(ConcurrentUpdateError(f"task {event.task_id} already has events"))
