"""The task read model as a pure fold of its events: `evolve(doc, event) -> doc`.

The projection folds events into MongoDB documents with it, and the gateway folds a task's
stream history with it when the projection lags, so both always agree on what a task looks like.
Documents carry FC 3.0 `AsyncTask` field names plus `_id`, `functionName`, `version`, `expireAt`.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Mapping
from typing import Any, Final, TypedDict

import msgspec

from shared import wire
from shared.errors import VersionGap
from shared.events import (
    AnyTaskEvent,
    TaskEnqueued,
    TaskFailed,
    TaskRetrying,
    TaskStarted,
    TaskSucceeded,
)
from shared.transitions import TERMINAL, Status, check_transition

RETURN_PAYLOAD_PREVIEW_BYTES: Final = 1024 * 1024


class TaskEventEntry(TypedDict):
    """One transition in a task's `events` list, as FC's `AsyncTask.events` shows it."""

    eventId: int  # the event's version
    status: str
    timestamp: int  # epoch milliseconds
    eventDetail: str  # the transition's own fields as a JSON string ("" for none)


class TaskDocument(TypedDict):
    """A task's read-model document: FC's `AsyncTask` fields plus the internal ones.

    What `evolve` folds, `taskstore` saves and loads whole, and the gateway answers from
    (through `public_view`, which drops `INTERNAL_FIELDS`).
    """

    _id: str  # document_id(functionName, taskId)
    functionName: str
    taskId: str
    version: int  # of the last event applied
    status: str  # a Status value
    events: list[TaskEventEntry]
    taskPayload: str | None
    returnPayload: str | None
    taskErrorMessage: str | None
    alreadyRetriedTimes: int
    submitTime: int  # epoch milliseconds of submission (ours; FC has no such field)
    startedTime: int | None  # epoch milliseconds of the first Running (None until it runs)
    endTime: int | None
    durationMs: int | None  # time spent running, summed over attempts (None until one ends)
    executedVersion: str | None  # LATEST or the version id that ran the latest attempt
    requestId: str
    instanceId: str | None
    functionArn: str
    qualifier: str
    destinationStatus: str | None
    scheduledTime: int  # ours: epoch ms the task is due (submitTime unless delayed or scheduled)
    expireAt: dt.datetime  # expire_at(scheduledTime): kept for the retention period after it was due


# Stored for the projection and for expiry, never shown to API callers.
INTERNAL_FIELDS: Final = ("_id", "functionName", "version", "expireAt")
# Not details of the transition: the task's identity, and its payload and result, which the
# document keeps once (a dispatch's `submission` is the payload again, carried for the executor).
_DETAIL_SKIP: Final = {"task_id", "function", "version", "at_ms", "payload", "result", "submission"}
_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def document_id(function: str, task_id: str) -> str:
    """The `_id` of a task's read-model document: task ids are unique per function only."""
    return f"{function}/{task_id}"


def expire_at(submit_time_ms: int) -> dt.datetime:
    """When a task due at `submit_time_ms` leaves the read model (aware UTC datetime).

    A document's `expireAt`: its due time (the submission time unless it was delayed) plus the
    FC retention period, the deletion time
    itself (the TTL index has expireAfterSeconds=0). Millisecond precision, like BSON dates.
    """
    return _EPOCH + dt.timedelta(milliseconds=submit_time_ms, seconds=wire.RETENTION_S)


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


@functools.cache  # a handful of field names, converted for every event projected
def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def event_detail(event: AnyTaskEvent) -> str:
    """The transition's own details as the JSON string FC puts in `eventDetail`."""
    fields = {_camel(k): v for k, v in msgspec.structs.asdict(event).items() if k not in _DETAIL_SKIP}
    return msgspec.json.encode(fields).decode() if fields else ""


def evolve(doc: TaskDocument | None, event: AnyTaskEvent, *, arn: str = "") -> TaskDocument:
    """Apply one event to a task document (None: the task has no document yet).

    Pure: returns a new dict, never mutates `doc`. Raises `VersionGap` unless the event is the
    task's next version and `TransitionNotAllowed` for an edge the transition table lacks;
    callers skip events whose version is already applied (replays are normal).
    """
    expected = 1 if doc is None else doc["version"] + 1
    if event.version != expected:
        raise VersionGap(f"task {event.task_id}: event version {event.version}, expected {expected}")
    current = None if doc is None else Status(doc["status"])
    check_transition(current, event.status, task_id=event.task_id)
    if doc is None:
        new = _first(event, arn)
    else:
        new = doc.copy()
        new["events"] = list(doc["events"])
    new["version"] = event.version
    new["status"] = str(event.status)
    new["events"].append(
        {"eventId": event.version, "status": str(event.status), "timestamp": event.at_ms, "eventDetail": event_detail(event)}
    )
    if current in _RUNNING_STATES and event.status != Status.STOPPING:
        new["durationMs"] = (new["durationMs"] or 0) + max(0, event.at_ms - _last_run_start(new))
    match event:
        case TaskStarted(instance_id=instance_id, attempt=attempt, function_version=version):
            new["instanceId"] = instance_id
            new["alreadyRetriedTimes"] = attempt
            if new["startedTime"] is None:
                new["startedTime"] = event.at_ms
            new["executedVersion"] = version or None
        case TaskSucceeded(result=result):
            new["returnPayload"] = _text(result[:RETURN_PAYLOAD_PREVIEW_BYTES])
            new["taskErrorMessage"] = None
        case TaskFailed(error=error) | TaskRetrying(error=error):
            new["taskErrorMessage"] = error
        case _:
            if event.status in TERMINAL and hasattr(event, "reason"):
                new["taskErrorMessage"] = getattr(event, "reason")
    if event.status in TERMINAL:
        new["endTime"] = event.at_ms
    return new


# An attempt runs from its Running event until the next event that is not Stopping.
_RUNNING_STATES: Final = (Status.RUNNING, Status.STOPPING)


def _last_run_start(doc: TaskDocument) -> int:
    for entry in reversed(doc["events"]):
        if entry["status"] == Status.RUNNING:
            return entry["timestamp"]
    return doc["submitTime"]


def _first(event: AnyTaskEvent, arn: str) -> TaskDocument:
    enqueued = event if isinstance(event, TaskEnqueued) else None
    submitted = event.at_ms
    return {
        "_id": document_id(event.function, event.task_id),
        "functionName": event.function,
        "taskId": event.task_id,
        "version": 0,
        "status": "",
        "events": [],
        "taskPayload": _text(enqueued.payload) if enqueued else None,
        "returnPayload": None,
        "taskErrorMessage": None,
        "alreadyRetriedTimes": 0,
        "submitTime": submitted,
        "startedTime": None,
        "endTime": None,
        "durationMs": None,
        "executedVersion": None,
        "requestId": enqueued.request_id if enqueued else "",
        "instanceId": None,
        "functionArn": arn,
        "qualifier": enqueued.qualifier if enqueued else "LATEST",
        "destinationStatus": None,
        "scheduledTime": max(submitted, enqueued.due_at_ms) if enqueued else submitted,
        "expireAt": expire_at(max(submitted, enqueued.due_at_ms) if enqueued else submitted),
    }


def fold(events: list[AnyTaskEvent], *, arn: str = "") -> TaskDocument | None:
    """The document of a task from its whole history (None for no events)."""
    doc: TaskDocument | None = None
    for event in events:
        doc = evolve(doc, event, arn=arn)
    return doc


def public_view(doc: Mapping[str, Any], *, include_payload: bool = True) -> dict[str, Any]:
    """The AsyncTask JSON a client sees: internal fields dropped, payload on request."""
    view = {k: v for k, v in doc.items() if k not in INTERNAL_FIELDS}
    if not include_payload:
        view.pop("taskPayload", None)
    return view
