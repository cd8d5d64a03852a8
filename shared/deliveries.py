"""Delivery records: what became of a finished task's destination record, kept in the stream.

The deliverer appends one record per attempt outcome on `taskmode.deliveries.<partition>.
<function>.<taskId>`, in the event stream but outside every task wildcard, so it is neither a
task event nor a task status (the transition table is untouched). The deliverer reads a task's
last record before sending, which is what makes a record delivered at most once per task across
restarts; the projection folds the records into the task document's `destinationStatus`, in
stream order after the final event they follow.
"""

from __future__ import annotations

import enum
from typing import Final

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from shared import wire
from shared.taskview import TaskDocument


class DeliveryState(enum.StrEnum):
    """A task's `destinationStatus`: null when it has no destination for its outcome."""

    DELIVERING = "Delivering"  # an attempt failed; it is retried with backoff
    DELIVERED = "Delivered"
    DELIVERY_FAILED = "DeliveryFailed"  # every attempt failed; no more are made


FINAL_STATES: Final = frozenset({DeliveryState.DELIVERED, DeliveryState.DELIVERY_FAILED})


class DeliveryRecorded(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="delivery.recorded"):
    task_id: str
    function: str
    state: str  # a DeliveryState
    destination: str
    condition: str
    attempt: int  # 1 for the first attempt
    at_ms: int
    error: str = ""


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(DeliveryRecorded).decode


def decode_delivery(data: bytes) -> DeliveryRecorded:
    """Decode a delivery record; raises `msgspec.DecodeError` on garbage."""
    return _decode(data)


class DeliveryLog:
    """Appends and reads delivery records."""

    def __init__(self, js: JetStreamContext, *, partitions: int) -> None:
        self._js = js
        self._partitions = partitions

    def _subject(self, function: str, task_id: str) -> str:
        return wire.delivery_subject(function, task_id, partitions=self._partitions)

    async def record(self, record: DeliveryRecorded) -> None:
        """Append a record; a retried publish of the same attempt's outcome is stored once."""
        msg_id = f"delivery:{record.function}:{record.task_id}:{record.attempt}:{record.state}"
        await self._js.publish(self._subject(record.function, record.task_id), _encode(record),
                               headers={wire.HEADER_MSG_ID: msg_id})

    async def last(self, function: str, task_id: str) -> DeliveryRecorded | None:
        """The task's latest delivery record, or None."""
        try:
            msg = await self._js.get_last_msg(wire.EVENT_STREAM, self._subject(function, task_id), direct=True)
        except NotFoundError:
            return None
        assert msg.data is not None
        return _decode(msg.data)


def with_delivery(doc: TaskDocument, record: DeliveryRecorded) -> TaskDocument:
    """The document with the record's state as `destinationStatus` (pure: `doc` is not changed).

    A final state is never replaced by a later non-final one (a replay out of order cannot
    make a delivered record look pending again).
    """
    current = doc.get("destinationStatus")
    if current in FINAL_STATES and record.state not in FINAL_STATES:
        return doc
    new = doc.copy()
    new["destinationStatus"] = record.state
    return new
