"""Per-invocation logs of async tasks: one JetStream message per task attempt.

What a handler printed or logged during one attempt (framed by FC's `FC Invoke Start/End
RequestId` lines, at most 256 KB, the newest kept) is stored on
`taskmode.logs.<function>.<taskId>.<attempt>` in the stream TASKMODE_LOGS, which keeps each for
the 7-day retention of tasks. The executor writes them; the gateway serves them at
`GET /2023-03-30/functions/{name}/async-tasks/{taskId}/logs`.
"""

from __future__ import annotations

import msgspec
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from shared import wire


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
