"""Task events: one frozen msgspec Struct per transition, decoded through one tagged union.

Evolution rules: a new field always has a default, a field never changes type, unknown fields
are ignored (never `forbid_unknown_fields`), and a real break gets a new tag.
"""

from __future__ import annotations

from typing import Final

import msgspec

from shared.transitions import Status

# FC's defaults for a function without an async config (maxAsyncEventAgeInSeconds,
# maxAsyncRetryAttempts); the catalog's AsyncConfigRecord defaults to them as well.
DEFAULT_MAX_EVENT_AGE_S: Final = 86400
DEFAULT_MAX_RETRIES: Final = 3


class TaskEvent(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    task_id: str
    function: str
    version: int  # 1 for the task's first event, +1 for each later one
    at_ms: int

    @property
    def status(self) -> Status:
        return EVENT_STATUS[type(self)]


class TaskEnqueued(TaskEvent, frozen=True, tag="task.enqueued"):
    payload: bytes = b""
    request_id: str = ""
    qualifier: str = "LATEST"
    due_at_ms: int = 0  # when the task may be dispatched (submission time plus any delay)
    max_event_age_s: int = DEFAULT_MAX_EVENT_AGE_S
    max_retries: int = DEFAULT_MAX_RETRIES
    # The incarnation of the function the task was submitted to (FunctionRecord.function_id); a
    # task of a deleted function ends Invalid even if the name has been reused since. "" in
    # events written before incarnations were recorded: then only the name is checked.
    function_id: str = ""


class Submission(msgspec.Struct, frozen=True, kw_only=True):
    """What an executor needs of a task's Enqueued event, carried in its dispatch so that the
    executor need not read it back from the stream (only for payloads up to CARRIED_PAYLOAD_BYTES)."""

    payload: bytes
    request_id: str
    due_at_ms: int
    max_retries: int
    qualifier: str = "LATEST"
    function_id: str = ""


# Larger payloads are read from the Enqueued event instead of being stored twice.
CARRIED_PAYLOAD_BYTES = 16 * 1024


class TaskProcessed(TaskEvent, frozen=True, tag="task.processed"):
    submission: Submission | None = None

    @staticmethod
    def carrying(enqueued: TaskEnqueued) -> Submission | None:
        """The submission to carry for `enqueued`, or None when its payload is too large to copy."""
        if len(enqueued.payload) > CARRIED_PAYLOAD_BYTES:
            return None
        return submission_of(enqueued)


def submission_of(enqueued: TaskEnqueued) -> Submission:
    """What an executor needs of `enqueued`."""
    return Submission(payload=enqueued.payload, request_id=enqueued.request_id, due_at_ms=enqueued.due_at_ms,
                      max_retries=enqueued.max_retries, qualifier=enqueued.qualifier,
                      function_id=enqueued.function_id)


class TaskStarted(TaskEvent, frozen=True, tag="task.started"):
    instance_id: str
    attempt: int = 0  # 0 for the first run, n for the n-th retry
    # What ran this attempt: LATEST or a version id (an alias resolves when the task runs).
    function_version: str = ""


class TaskSucceeded(TaskEvent, frozen=True, tag="task.succeeded"):
    result: bytes = b""
    instance_id: str = ""
    attempt: int = 0


class TaskFailed(TaskEvent, frozen=True, tag="task.failed"):
    error: str
    instance_id: str = ""
    attempt: int = 0


class TaskRetrying(TaskEvent, frozen=True, tag="task.retrying"):
    error: str
    attempt: int  # the attempt that failed; the next run is attempt + 1
    retry_at_ms: int


class TaskStopping(TaskEvent, frozen=True, tag="task.stopping"):
    reason: str = "stop requested"


class TaskStopped(TaskEvent, frozen=True, tag="task.stopped"):
    reason: str = "stop requested"


class TaskExpired(TaskEvent, frozen=True, tag="task.expired"):
    reason: str


class TaskInvalid(TaskEvent, frozen=True, tag="task.invalid"):
    reason: str


AnyTaskEvent = (
    TaskEnqueued
    | TaskProcessed
    | TaskStarted
    | TaskSucceeded
    | TaskFailed
    | TaskRetrying
    | TaskStopping
    | TaskStopped
    | TaskExpired
    | TaskInvalid
)

EVENT_STATUS: Final[dict[type[TaskEvent], Status]] = {
    TaskEnqueued: Status.ENQUEUED,
    TaskProcessed: Status.PROCESSED,
    TaskStarted: Status.RUNNING,
    TaskSucceeded: Status.SUCCEEDED,
    TaskFailed: Status.FAILED,
    TaskRetrying: Status.RETRYING,
    TaskStopping: Status.STOPPING,
    TaskStopped: Status.STOPPED,
    TaskExpired: Status.EXPIRED,
    TaskInvalid: Status.INVALID,
}

_encoder: Final = msgspec.json.Encoder()
_decoder: Final[msgspec.json.Decoder[AnyTaskEvent]] = msgspec.json.Decoder(AnyTaskEvent)


def encode_event(event: TaskEvent) -> bytes:
    """The event's JSON wire form (bytes fields travel as base64)."""
    return _encoder.encode(event)


def decode_event(data: bytes) -> AnyTaskEvent:
    """Decode any task event from its wire form; raises `msgspec.DecodeError` on garbage."""
    return _decoder.decode(data)
