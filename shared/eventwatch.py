"""Watching task transitions live, straight from the event stream.

`watch` opens an ordered ephemeral JetStream consumer filtered on some task events (one task's,
or one function's) and yields each event with its stream sequence, in stream order: first the
retained history from where the caller asks to start, then every new transition as it is
appended. The stream sequence is a cursor: a watcher that lost its connection (or whose gateway
restarted) starts again after the last sequence it saw and misses nothing, sees nothing twice.

The consumer lives in server memory and holds no acks; it disappears when the watcher
unsubscribes, or by itself shortly after the watcher's connection is gone.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Final

import msgspec
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from shared import wire
from shared.events import AnyTaskEvent, decode_event
from shared.eventstore import StoredEvent

log = logging.getLogger(__name__)

# Heartbeats let the client notice a consumer that vanished (e.g. a nats-server restart) and
# recreate it from the last sequence it delivered.
IDLE_HEARTBEAT_S: Final = 5.0
# The server removes a watch consumer this long after its subscriber went away without saying so.
INACTIVE_THRESHOLD_S: Final = 30.0


def start_after(after_seq: int | None) -> ConsumerConfig:
    """Where a watch starts: after `after_seq` (0: the whole retained history), None: new events only."""
    if after_seq is None:
        return ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
    if after_seq <= 0:
        return ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    return ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after_seq + 1)


async def watch(
    js: JetStreamContext, *, subject_filter: str, after_seq: int | None
) -> AsyncGenerator[StoredEvent, None]:
    """Every event on `subject_filter` after `after_seq`, in stream order, until the caller stops.

    `subject_filter` comes from `wire` (`task_events_filter`, `function_events_filter`). An event
    this process cannot decode (written by a newer producer) is skipped with a warning; its
    sequence still advances the consumer, so the watch does not stall on it.
    """
    sub = await js.subscribe(
        subject_filter,
        stream=wire.EVENT_STREAM,
        ordered_consumer=True,
        idle_heartbeat=IDLE_HEARTBEAT_S,
        inactive_threshold=INACTIVE_THRESHOLD_S,
        config=start_after(after_seq),
    )
    try:
        async for msg in sub.messages:
            seq = msg.metadata.sequence.stream
            try:
                event: AnyTaskEvent = decode_event(msg.data)
            except msgspec.DecodeError:
                log.warning("undecodable event skipped", extra={"subject": msg.subject, "seq": seq})
                continue
            yield StoredEvent(seq, event)
    finally:
        await sub.unsubscribe()


async def last_sequence(js: JetStreamContext) -> int:
    """The event stream's current last sequence: a cursor for "everything after now"."""
    info = await js.stream_info(wire.EVENT_STREAM)
    return int(info.state.last_seq)
