"""Delayed tasks, timed by nats-server's message schedules (nats-server 2.12+).

A task due later used to wait in the scheduler's consumer, nak'd until its due time: it held one
of the consumer's unacked slots all that while, so once more tasks were waiting than the
consumer's cap, a due task of the same function queued behind them; and its timing was a
redelivery timer. Now the scheduler files a schedule and acknowledges the Enqueued event at once.
nats-server keeps the schedule in the event stream (it survives a restart of every service and
of the server) and at the due time publishes a tick on the task's due subject. The function's
dequeue queue delivers the tick like a due Enqueued event. A task stopped before it is due finds
its tick ignored: the tick names the Enqueued event it was filed for, and the task has moved on.

Tasks due within `SCHEDULE_LEAD_S` are not worth a schedule: they wait in the consumer as before,
a few at a time.
"""

from __future__ import annotations

import datetime
from typing import Final

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shared import wire

SCHEDULE_LEAD_S: Final = 2.0
SCHEDULE_HEADER: Final = "Nats-Schedule"
TARGET_HEADER: Final = "Nats-Schedule-Target"


class DueTick(msgspec.Struct, frozen=True, kw_only=True):
    """What a schedule fires: the task's Enqueued event (as stored) and its stream sequence, so
    the scheduler dispatches from the tick alone, without reading the task back; an append
    expecting that sequence fails if the task moved on meanwhile."""

    function: str
    task_id: str
    enqueued_seq: int
    enqueued: bytes


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(DueTick).decode


def schedule_time(due_at_ms: int) -> str:
    """`@at` in the RFC 3339 form nats-server reads, to the millisecond."""
    at = datetime.datetime.fromtimestamp(due_at_ms / 1000, datetime.UTC)
    return f"@at {at:%Y-%m-%dT%H:%M:%S}.{at.microsecond // 1000:03d}Z"


async def file_schedule(js: JetStreamContext, *, function: str, task_id: str, enqueued_seq: int, enqueued: bytes,
                        due_at_ms: int) -> None:
    """Have nats-server publish the task's due tick at `due_at_ms` (filing it again replaces it)."""
    tick = DueTick(function=function, task_id=task_id, enqueued_seq=enqueued_seq, enqueued=enqueued)
    headers = {SCHEDULE_HEADER: schedule_time(due_at_ms), TARGET_HEADER: wire.due_subject(function, task_id)}
    await js.publish(wire.schedule_subject(function, task_id), _encode(tick), stream=wire.EVENT_STREAM,
                     headers=headers)


def is_tick(msg: Msg) -> bool:
    return msg.subject.startswith(f"{wire.DUE_SUBJECT_PREFIX}.")


def decode_tick(data: bytes) -> DueTick:
    return _decode(data)


async def pending_schedules(js: JetStreamContext, function: str) -> int:
    """How many of `function`'s tasks have a schedule that has not fired yet."""
    info = await js.stream_info(wire.EVENT_STREAM, subjects_filter=f"{wire.SCHEDULE_SUBJECT_PREFIX}.{function}.*")
    return sum((info.state.subjects or {}).values())
