"""The one table of allowed task status transitions.

Every service asks `check_transition` before it appends an event and the projection refuses an
event the table does not allow, so the state machine lives in exactly one place.
"""

from __future__ import annotations

import enum
from typing import Final

from shared.errors import TransitionNotAllowed


class Status(enum.StrEnum):
    ENQUEUED = "Enqueued"
    PROCESSED = "Processed"
    RUNNING = "Running"
    RETRYING = "Retrying"
    STOPPING = "Stopping"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    STOPPED = "Stopped"
    EXPIRED = "Expired"
    INVALID = "Invalid"


TERMINAL: Final[frozenset[Status]] = frozenset(
    {Status.SUCCEEDED, Status.FAILED, Status.STOPPED, Status.EXPIRED, Status.INVALID}
)

# A Stopping task can still end Succeeded: the handler may finish before the kill lands, and the
# result it produced is the truth (a failure while stopping ends Stopped: no retry was wanted). Retrying goes straight back to Running (as in FC: "the
# status changes to Running once the retry starts") or ends if the function vanished or a stop
# arrived during the backoff.
ALLOWED: Final[dict[Status | None, frozenset[Status]]] = {
    None: frozenset({Status.ENQUEUED}),
    Status.ENQUEUED: frozenset({Status.PROCESSED, Status.EXPIRED, Status.INVALID, Status.STOPPED}),
    Status.PROCESSED: frozenset(
        {Status.RUNNING, Status.EXPIRED, Status.INVALID, Status.STOPPED}
    ),
    Status.RUNNING: frozenset(
        {Status.SUCCEEDED, Status.FAILED, Status.RETRYING, Status.STOPPING}
    ),
    Status.RETRYING: frozenset({Status.RUNNING, Status.STOPPED, Status.INVALID, Status.FAILED}),
    Status.STOPPING: frozenset({Status.STOPPED, Status.SUCCEEDED}),
    Status.SUCCEEDED: frozenset(),
    Status.FAILED: frozenset(),
    Status.STOPPED: frozenset(),
    Status.EXPIRED: frozenset(),
    Status.INVALID: frozenset(),
}

# ListAsyncTasks accepts the older FC name for the dequeued state.
STATUS_ALIASES: Final[dict[str, Status]] = {"Dequeued": Status.PROCESSED}


def is_allowed(current: Status | None, new: Status) -> bool:
    """Whether a task in `current` (None: no events yet) may move to `new`."""
    return new in ALLOWED[current]


def check_transition(current: Status | None, new: Status, *, task_id: str) -> None:
    """Raise `TransitionNotAllowed` unless the table has the edge `current → new`."""
    if not is_allowed(current, new):
        raise TransitionNotAllowed(
            f"task {task_id}: transition {current or 'none'} -> {new} is not allowed"
        )


def parse_status(text: str) -> Status:
    """A status name as a user writes it (`Dequeued` accepted for `Processed`)."""
    if text in STATUS_ALIASES:
        return STATUS_ALIASES[text]
    return Status(text)
