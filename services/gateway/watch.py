"""Live watch API: a task's transitions, and a function's task changes, as Server-Sent Events.

`GET /functions/{name}/async-tasks/{taskId}/events` streams the task's history and then each new
transition as it is appended, and ends after the terminal one. `GET
/functions/{name}/async-task-events` streams every transition of every task of the function
from now on. Both are signed like the rest of the API and are fed from the event stream (an
ordered consumer, `shared.eventwatch`), never by polling the read model.

Every transition is one SSE message whose `id:` is its stream sequence. A client that loses the
connection (a network blip, a gateway restart) reconnects with `Last-Event-ID` (or `?after=`)
and gets exactly the transitions after it, so nothing is missed or repeated.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any, Final

import msgspec
from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from shared import eventwatch, taskview, wire
from shared.errors import AsyncTaskNotFound, InvalidArgument
from shared.eventstore import StoredEvent
from shared.transitions import TERMINAL
from services.gateway import params as validation
from services.gateway.deps import resources_of

router = APIRouter()

TRANSITION_EVENT: Final = "transition"
END_EVENT: Final = "end"
PING_INTERVAL_S: Final = 15
# A client that stops reading for this long is dropped rather than holding the stream open.
SEND_TIMEOUT_S: Final = 30
# Tells EventSource clients how soon to reconnect after a dropped connection.
RETRY_MS: Final = 1000
LAST_EVENT_ID_HEADER: Final = "last-event-id"
_encode = msgspec.json.Encoder().encode


def transition_data(stored: StoredEvent) -> dict[str, Any]:
    """One transition as the stream carries it: FC's `events[]` item plus the task it belongs to."""
    event = stored.event
    return {
        "functionName": event.function,
        "taskId": event.task_id,
        "eventId": event.version,
        "status": str(event.status),
        "timestamp": event.at_ms,
        "eventDetail": taskview.event_detail(event),
    }


def transition_message(stored: StoredEvent) -> ServerSentEvent:
    return ServerSentEvent(
        data=_encode(transition_data(stored)).decode(), event=TRANSITION_EVENT, id=str(stored.seq), retry=RETRY_MS
    )


def end_message(stored: StoredEvent) -> ServerSentEvent:
    data = {"taskId": stored.event.task_id, "status": str(stored.event.status)}
    return ServerSentEvent(data=_encode(data).decode(), event=END_EVENT)


def parse_cursor(last_event_id: str | None, after: str | None) -> int | None:
    """The stream sequence to resume after: `Last-Event-ID` first, then `?after=`; None if neither."""
    for name, value in ((LAST_EVENT_ID_HEADER, last_event_id), ("after", after)):
        if value is not None and value.strip():
            text = value.strip()
            if not (text.isascii() and text.isdigit()) or len(text) > 18:
                raise InvalidArgument(f"invalid {name} {value[:40]!r}: a stream sequence number is required")
            return int(text)
    return None


def event_stream(events: AsyncIterator[ServerSentEvent]) -> EventSourceResponse:
    # no-store: a proxy must neither cache nor buffer a live stream.
    return EventSourceResponse(
        events,
        ping=PING_INTERVAL_S,
        send_timeout=SEND_TIMEOUT_S,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def task_transitions(request: Request, function_name: str, task_id: str, *, after_seq: int) -> AsyncGenerator[StoredEvent, None]:
    """The task's transitions after `after_seq`, ending with its terminal one.

    Raises `AsyncTaskNotFound` (before anything is streamed) for a task without events. A task
    that already ended at or before `after_seq` yields nothing more than its terminal event's
    end marker, which the caller renders.
    """
    validation.check_function_name(function_name)
    if not validation.TASK_ID_RE.fullmatch(task_id):
        raise AsyncTaskNotFound(f"task {task_id[:140]!r} of function {function_name} does not exist")
    resources = resources_of(request)
    last = await resources.events.last(function_name, task_id)
    if last is None:
        raise AsyncTaskNotFound(f"task {task_id} of function {function_name} does not exist")
    return _until_terminal(request, last, function_name, task_id, after_seq=after_seq)


async def _until_terminal(
    request: Request, last: StoredEvent, function_name: str, task_id: str, *, after_seq: int
) -> AsyncGenerator[StoredEvent, None]:
    if last.event.status in TERMINAL and last.seq <= after_seq:
        yield last  # already seen by this client: only its end remains to be said
        return
    js = resources_of(request).nc.jetstream()
    subject = wire.task_events_filter(function_name, task_id)
    async with aclosing(eventwatch.watch(js, subject_filter=subject, after_seq=after_seq)) as watched:
        async for stored in watched:
            yield stored
            if stored.event.status in TERMINAL:
                return


@router.get("/functions/{function_name}/async-tasks/{task_id}/events")
async def watch_async_task(
    function_name: str, task_id: str, request: Request, after: str | None = None, qualifier: str | None = None
) -> EventSourceResponse:
    validation.check_qualifier(qualifier)
    after_seq = parse_cursor(request.headers.get(LAST_EVENT_ID_HEADER), after) or 0
    transitions = await task_transitions(request, function_name, task_id, after_seq=after_seq)

    async def messages() -> AsyncIterator[ServerSentEvent]:
        async with aclosing(transitions) as watched:
            async for stored in watched:
                if stored.seq > after_seq:
                    yield transition_message(stored)
                if stored.event.status in TERMINAL:
                    yield end_message(stored)

    return event_stream(messages())


@router.get("/functions/{function_name}/async-task-events")
async def watch_function_tasks(
    function_name: str, request: Request, after: str | None = None, qualifier: str | None = None
) -> EventSourceResponse:
    validation.check_function_name(function_name)
    validation.check_qualifier(qualifier)
    js = resources_of(request).nc.jetstream()
    after_seq = parse_cursor(request.headers.get(LAST_EVENT_ID_HEADER), after)
    if after_seq is None:
        # "From now" means from this request, not from whenever the consumer gets created after
        # the response has started: a change made right after the request is never missed.
        after_seq = await eventwatch.last_sequence(js)
    subject = wire.function_events_filter(function_name)

    async def messages() -> AsyncIterator[ServerSentEvent]:
        async with aclosing(eventwatch.watch(js, subject_filter=subject, after_seq=after_seq)) as watched:
            async for stored in watched:
                yield transition_message(stored)

    return event_stream(messages())
