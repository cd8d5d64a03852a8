"""Per-invocation logs of async tasks: one JetStream message per task attempt.

What a handler printed or logged during one attempt (framed by FC's `FC Invoke Start/End
RequestId` lines, at most 256 KB, the newest kept) is stored on
`taskmode.logs.<function>.<taskId>.<attempt>` in the stream TASKMODE_LOGS, which keeps each for
the 7-day retention of tasks. The executor writes them; the gateway serves them at
`GET /2023-03-30/functions/{name}/async-tasks/{taskId}/logs`.

An attempt whose handler wrote nothing stores no message (a quiet handler then costs no extra
append per task): its entry is made from the task's own events by `quiet_attempts`.
"""

from __future__ import annotations

import json

import msgspec
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from shared import wire
from shared.taskview import TaskDocument
from shared.transitions import Status


class AttemptLog(msgspec.Struct, kw_only=True, rename="camel"):
    """One attempt's log, as the logs endpoint shows it."""

    attempt: int
    request_id: str
    instance_id: str = ""
    function_version: str = ""
    start_time: int = 0  # epoch ms
    end_time: int = 0
    truncated: bool = False  # the start was dropped to keep within the size limit
    content: str = ""


_decode = msgspec.json.Decoder(AttemptLog).decode


def logs_stream_config(*, replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=wire.LOGS_STREAM,
        subjects=[f"{wire.LOGS_SUBJECT_PREFIX}.>"],
        max_age=wire.RETENTION_S,
        max_msgs_per_subject=1,  # a redelivered attempt's log replaces the lost one's
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        allow_direct=True,
        num_replicas=replicas,
    )


async def ensure_logs_stream(js: JetStreamContext, *, replicas: int = 1) -> None:
    """Create the logs stream, or bring an existing one to the current configuration."""
    config = logs_stream_config(replicas=replicas)
    try:
        await js.stream_info(wire.LOGS_STREAM)
    except NotFoundError:
        await js.add_stream(config)
        return
    await js.update_stream(config)


async def store_attempt_log(js: JetStreamContext, *, function: str, task_id: str, log: AttemptLog) -> None:
    """Keep one attempt's log (replacing an earlier one of the same attempt)."""
    await js.publish(wire.log_subject(function, task_id, log.attempt), msgspec.json.encode(log),
                     stream=wire.LOGS_STREAM)


async def read_task_logs(js: JetStreamContext, *, function: str, task_id: str, attempts: int) -> list[AttemptLog]:
    """The logs of attempts 0 .. attempts-1 that exist, in order."""
    logs = []
    for attempt in range(attempts):
        try:
            msg = await js.get_last_msg(wire.LOGS_STREAM, wire.log_subject(function, task_id, attempt), direct=True)
        except NotFoundError:
            continue
        if msg.data:
            logs.append(_decode(msg.data))
    return logs


def quiet_attempts(doc: TaskDocument) -> dict[int, AttemptLog]:
    """The log entry of every finished attempt of `doc` as it is when the handler wrote nothing:
    only FC's framing lines. Stored logs replace these where they exist."""
    entries: dict[int, AttemptLog] = {}
    events = doc["events"]
    request_id = doc["requestId"]
    for index, entry in enumerate(events):
        if entry["status"] != Status.RUNNING:
            continue
        # An attempt runs until the next event that is not Stopping; none yet: still running.
        end = next((later for later in events[index + 1:] if later["status"] != Status.STOPPING), None)
        if end is None:
            continue
        detail = json.loads(entry["eventDetail"] or "{}")
        attempt = int(detail.get("attempt", 0))
        entries[attempt] = AttemptLog(
            attempt=attempt, request_id=request_id, instance_id=str(detail.get("instanceId", "")),
            function_version=str(detail.get("functionVersion", "")), start_time=entry["timestamp"],
            end_time=end["timestamp"],
            content=f"FC Invoke Start RequestId: {request_id}\nFC Invoke End RequestId: {request_id}\n",
        )
    return entries
