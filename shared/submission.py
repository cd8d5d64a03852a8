"""Admission: the one way a task comes into being, whichever door it arrives through.

InvokeFunction over HTTP, a message on a `nats` trigger's subject, an `http` trigger request, a
timer tick and a destination that targets a function all check their input with the rules here
and create the task with `submit`, so dedup, validation and the first events are identical
whichever way a task arrives.

A task is created by appending its Enqueued event; the scheduler dispatches it when it is due.
The first event expects sequence 0 on the task's subjects: a task id that already has an event
in the stream (7-day retention) is refused with `TaskAlreadyExists`. Many tasks at once (a bus
trigger's stream of messages) go through `submit_pipelined`: the same append, thousands in flight
on one connection, each settled by its own acknowledgement.
"""

from __future__ import annotations

import asyncio
import datetime
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final

from shared import wire
from shared.catalog import AsyncConfigRecord
from shared.errors import (
    ConcurrentUpdateError,
    EntityTooLarge,
    InvalidArgument,
    ServiceUnavailable,
    TaskAlreadyExists,
    TaskmodeError,
)
from shared.events import DEFAULT_MAX_EVENT_AGE_S, DEFAULT_MAX_RETRIES, TaskEnqueued
from shared.eventstore import TaskCreator, now_ms
from shared.ports import EventLog
from shared.wire import EXECUTION_TIME_HEADER, FC_DELAY_HEADER, FC_REQUEST_ID_HEADER, FC_TASK_ID_HEADER, RETENTION_S

TASK_ID_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,127}$")
# A request id that is not a task id but can become one with a leading "_" (e.g. a UUID).
_PREFIXABLE_REQUEST_ID_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,127}$")
# What we accept as a caller's x-fc-request-id (echoed back, so kept printable).
REQUEST_ID_RE: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
MAX_ASYNC_PAYLOAD_BYTES: Final = 128 * 1024
# FC documents x-fc-async-delay up to 3,600 s; taskmode takes up to the 7-day retention.
MAX_DELAY_S: Final = RETENTION_S
LATEST: Final = wire.LATEST


def accepted_request_id(value: str | None) -> str | None:
    """A caller's x-fc-request-id if it is safe to echo back, else None (we make our own)."""
    if value and REQUEST_ID_RE.fullmatch(value):
        return value
    return None


def new_request_id() -> str:
    return str(uuid.uuid4())


def check_task_id(value: str, *, source: str = FC_TASK_ID_HEADER) -> str:
    """`value` if it satisfies FC's task-id rule, else `InvalidArgument` naming `source`."""
    if not TASK_ID_RE.fullmatch(value):
        raise InvalidArgument(
            f"invalid task id {value[:140]!r} in {source}: it must start with a letter or '_', "
            "contain only letters, digits, '_' and '-', and be at most 128 characters"
        )
    return value


def new_task_id() -> str:
    """A generated task id; the prefix makes it satisfy the task-id rule (no leading digit)."""
    return f"task-{uuid.uuid4().hex}"


def task_id_from_request_id(request_id: str) -> str:
    """The task id a caller's request id stands for when no task id is given.

    FC's rule is "the request id is the task id", but request ids are freer than task ids (a
    UUID starts with a digit 60% of the time): one that is a task id is used as it is, one that
    only breaks the first-character rule gets a leading `_` (so retries with the same request id
    still find the same task), and any other gets a generated id.
    """
    if TASK_ID_RE.fullmatch(request_id):
        return request_id
    if _PREFIXABLE_REQUEST_ID_RE.fullmatch(request_id):
        return f"_{request_id}"
    return new_task_id()


def choose_task_id(*, task_id_header: str | None, request_id_header: str | None, source: str = FC_TASK_ID_HEADER) -> str:
    """FC's rule: the given task id (checked), else one made from the caller's request id, else
    a generated one. `source` names the header the task id came in, for the error message."""
    if task_id_header is not None and task_id_header.strip():
        return check_task_id(task_id_header.strip(), source=source)
    if request_id_header is not None and request_id_header.strip():
        return task_id_from_request_id(request_id_header.strip())
    return new_task_id()


def parse_delay(value: str | None) -> int:
    """x-fc-async-delay: whole seconds in [0, MAX_DELAY_S] (absent: 0)."""
    if value is None or not value.strip():
        return 0
    text = value.strip()
    if not text.isdigit() or not text.isascii():
        raise InvalidArgument(
            f"invalid {FC_DELAY_HEADER} {value[:40]!r}: an integer number of seconds is required"
        )
    delay = int(text)
    if delay > MAX_DELAY_S:
        raise InvalidArgument(f"{FC_DELAY_HEADER} {delay} is out of range [0, {MAX_DELAY_S}]")
    return delay


def parse_execution_time(value: str | None, *, now_ms: int) -> int | None:
    """x-taskmode-execution-time: epoch milliseconds or RFC 3339 (absent: None).

    A time already past means "now"; one more than the retention period away (ahead, or behind:
    most likely seconds sent as milliseconds) is refused.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        at_ms = int(text)
    else:
        try:
            moment = datetime.datetime.fromisoformat(text)
        except ValueError as err:
            raise InvalidArgument(
                f"invalid {EXECUTION_TIME_HEADER} {value[:40]!r}: use epoch milliseconds or RFC 3339, "
                "e.g. 2026-01-02T03:04:05Z"
            ) from err
        if moment.tzinfo is None:
            raise InvalidArgument(f"invalid {EXECUTION_TIME_HEADER} {value[:40]!r}: the time zone is required")
        at_ms = int(moment.timestamp() * 1000)
    if abs(at_ms - now_ms) > RETENTION_S * 1000:
        raise InvalidArgument(
            f"{EXECUTION_TIME_HEADER} {value[:40]!r} is more than {RETENTION_S} seconds (the retention period) "
            "from now"
        )
    return max(at_ms, now_ms)


def due_time(*, delay_header: str | None, execution_time_header: str | None, now_ms: int) -> int:
    """When a submitted task is due: after x-fc-async-delay, at x-taskmode-execution-time, or now."""
    at_ms = parse_execution_time(execution_time_header, now_ms=now_ms)
    delay_s = parse_delay(delay_header)
    if at_ms is not None and delay_header is not None and delay_header.strip():
        raise InvalidArgument(f"give either {FC_DELAY_HEADER} or {EXECUTION_TIME_HEADER}, not both")
    return at_ms if at_ms is not None else now_ms + delay_s * 1000


def check_payload_size(payload: bytes, *, limit: int) -> None:
    if len(payload) > limit:
        raise EntityTooLarge(f"payload size exceeds maximum allowed size ({limit} bytes)")


@dataclass(frozen=True)
class Admission:
    """A checked request for one task: everything `submit` needs besides the function's config."""

    function: str
    task_id: str
    payload: bytes
    request_id: str
    qualifier: str = LATEST
    delay_s: int = 0
    function_id: str = ""
    due_at_ms: int = 0  # an absolute due time (x-taskmode-execution-time); 0: now plus delay_s  # the incarnation submitted to (a recreated function is another one)


def first_event(admission: Admission, config: AsyncConfigRecord | None, *, at_ms: int | None = None) -> TaskEnqueued:
    """The task's first event.

    The function's async config is taken now and recorded in the Enqueued event, so a later
    change does not affect tasks already submitted.
    """
    at = at_ms or now_ms()
    return TaskEnqueued(
        task_id=admission.task_id,
        function=admission.function,
        version=1,
        at_ms=at,
        payload=admission.payload,
        request_id=admission.request_id,
        qualifier=admission.qualifier,
        due_at_ms=admission.due_at_ms or at + admission.delay_s * 1000,
        max_event_age_s=config.max_async_event_age_in_seconds if config else DEFAULT_MAX_EVENT_AGE_S,
        max_retries=config.max_async_retry_attempts if config else DEFAULT_MAX_RETRIES,
        function_id=admission.function_id,
    )


async def submit(events: EventLog, admission: Admission, config: AsyncConfigRecord | None) -> None:
    """Create the task.

    Raises `TaskAlreadyExists` for a task id the function already used within the retention
    period, `ServiceUnavailable` when the event store cannot be reached.
    """
    try:
        await events.append(first_event(admission, config), expected_seq=0)
    except ConcurrentUpdateError as err:
        raise duplicate(admission) from err


# Called once a pipelined submission is settled: None (the task is stored) or why it is not.
Submitted = Callable[[TaskmodeError | None], Awaitable[None]]


async def submit_pipelined(creator: TaskCreator, admission: Admission, config: AsyncConfigRecord | None,
                           done: Submitted) -> None:
    """`submit` without waiting for the stream: `done` gets its outcome once the append is acknowledged.

    Same event, same condition, same errors as `submit` (`TaskAlreadyExists` for a task id
    already used, also by a submission still in flight: the stream applies them in order).
    Returns once the append is sent; waits only while the creator has its maximum in flight.
    """
    async def settled(error: Exception | None) -> None:
        if error is None:
            await done(None)
        elif isinstance(error, ConcurrentUpdateError):
            await done(duplicate(admission))
        elif isinstance(error, TaskmodeError):
            await done(error)
        else:
            await done(ServiceUnavailable(f"event store trouble: {error!r}"))

    await creator.create(first_event(admission, config), settled)


def duplicate(admission: Admission) -> TaskAlreadyExists:
    """The error for a task id that is already taken."""
    return TaskAlreadyExists(
        f"task {admission.task_id} already exists for function {admission.function}; "
        "task ids are unique for the retention period",
        existing_task_id=admission.task_id,
    )
