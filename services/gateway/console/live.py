"""The console's live streams (cookie session), fed by the same event-stream watch as the API's.

- The Tasks tab: every change of the function's tasks becomes its row, re-rendered and sent as
  an htmx out-of-band swap (`rows` events). Changes are gathered for a moment and each task is
  drawn once per batch, so a busy function does not flood the browser.
- A task's page: its summary and whole timeline, re-rendered on each transition (`task`
  events), then `end` once it is final (the page's EventSource closes on it).

Rows and summaries are folds of the task's events (`shared.taskview`), so they never wait for
the read model.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from shared.taskview import TaskDocument
from shared import eventwatch, taskview, wire
from shared.errors import TaskmodeError
from shared.eventstore import StoredEvent
from shared.ports import EventLog
from shared.transitions import TERMINAL
from services.gateway import params as validation
from services.gateway.deps import resources_of
from services.gateway.console.common import CONSOLE_PREFIX, ConsoleRoute, fragment
from services.gateway.console.session import Session, current_session
from services.gateway.console.task_pages import TaskFilters, task_row_html, utc_input_ms
from services.gateway.watch import event_stream

router = APIRouter(prefix=CONSOLE_PREFIX, route_class=ConsoleRoute)

SessionDep = Annotated[Session, Depends(current_session)]
BATCH_WINDOW_S: Final = 0.2
CACHED_TASKS: Final = 2000


class TaskFolds:
    """The latest document of each task seen on a stream: the next event is folded in, and a
    task first seen mid-way is folded from its history."""

    def __init__(self, events: EventLog) -> None:
        self._events = events
        self._docs: OrderedDict[str, TaskDocument] = OrderedDict()

    async def apply(self, stored: StoredEvent) -> TaskDocument | None:
        event = stored.event
        doc = self._docs.get(event.task_id)
        try:
            if doc is not None and doc["version"] >= event.version:
                return doc
            if doc is not None and doc["version"] + 1 == event.version:
                doc = taskview.evolve(doc, event)
            else:
                history = await self._events.history(event.function, event.task_id)
                doc = taskview.fold([item.event for item in history])
        except TaskmodeError:
            return None  # its early events aged out of the stream: nothing sound to draw
        if doc is None:
            return None
        self._docs[event.task_id] = doc
        self._docs.move_to_end(event.task_id)
        while len(self._docs) > CACHED_TASKS:
            self._docs.popitem(last=False)
        return doc


def matches(filters: TaskFilters, task: dict[str, Any], *, new: bool) -> bool:
    """Whether a row not on the page belongs at its top: a new task (or, with a status filter, a
    task that just reached that status) that passes every filter."""
    if filters.status:
        if task.get("status") != filters.status:
            return False
    elif not new:
        return False
    if filters.prefix and not str(task.get("taskId", "")).startswith(filters.prefix):
        return False
    started = int(task.get("startedTime") or 0)
    if filters.since and started < utc_input_ms(filters.since):
        return False
    return not (filters.until and started > utc_input_ms(filters.until))


async def _batches(events: AsyncIterator[StoredEvent]) -> AsyncGenerator[list[StoredEvent], None]:
    """Events gathered for up to `BATCH_WINDOW_S` after the first of each batch."""
    queue: asyncio.Queue[StoredEvent] = asyncio.Queue()

    async def pump() -> None:
        async for stored in events:
            await queue.put(stored)

    pumping = asyncio.create_task(pump())
    loop = asyncio.get_running_loop()
    try:
        while True:
            getting = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getting, pumping}, return_when=asyncio.FIRST_COMPLETED)
            if getting not in done:
                getting.cancel()
                pumping.result()  # the watch ended: raise what ended it
                return
            batch = [getting.result()]
            deadline = loop.time() + BATCH_WINDOW_S
            while (left := deadline - loop.time()) > 0:
                try:
                    batch.append(await asyncio.wait_for(queue.get(), left))
                except TimeoutError:
                    break
            yield batch
    finally:
        pumping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pumping


@router.get("/functions/{name}/tasks-live")
async def live_task_rows(request: Request, session: SessionDep, name: str, after: str = "", status: str = "",
                         prefix: str = "", since: str = "", until: str = "", top: str = "") -> EventSourceResponse:
    validation.check_function_name(name)
    filters = TaskFilters(status=status, prefix=prefix, since=since, until=until)
    after_seq = int(after) if after.isdigit() else None
    resources = resources_of(request)
    folds = TaskFolds(resources.events)
    subject = wire.function_events_filter(name)

    async def messages() -> AsyncIterator[ServerSentEvent]:
        watched = eventwatch.watch(resources.nc.jetstream(), subject_filter=subject, after_seq=after_seq)
        async with aclosing(watched), aclosing(_batches(watched)) as batches:
            async for batch in batches:
                latest = {stored.event.task_id: stored for stored in batch}
                created = {stored.event.task_id for stored in batch if stored.event.version == 1}
                rows = []
                for task_id, stored in latest.items():
                    doc = await folds.apply(stored)
                    if doc is None:
                        continue
                    view = taskview.public_view(doc)
                    insert_top = bool(top) and matches(filters, view, new=task_id in created)
                    rows.append(task_row_html(request, name, view, oob=True, insert_top=insert_top))
                if rows:
                    yield ServerSentEvent(data="".join(rows), event="rows")

    return event_stream(messages())


@router.get("/functions/{name}/tasks/{task_id}/live")
async def live_task(request: Request, session: SessionDep, name: str, task_id: str) -> EventSourceResponse:
    validation.check_function_name(name)
    validation.check_task_id(task_id)
    resources = resources_of(request)
    folds = TaskFolds(resources.events)
    subject = wire.task_events_filter(name, task_id)

    async def messages() -> AsyncIterator[ServerSentEvent]:
        watched = eventwatch.watch(resources.nc.jetstream(), subject_filter=subject, after_seq=0)
        async with aclosing(watched), aclosing(_batches(watched)) as batches:
            async for batch in batches:
                doc = None
                for stored in batch:
                    doc = await folds.apply(stored) or doc
                if doc is None:
                    continue
                task = taskview.public_view(doc)
                html = fragment(request, "_task_live.html", task=task, function_name=name)
                yield ServerSentEvent(data=html, event="task")
                if any(stored.event.status in TERMINAL for stored in batch):
                    yield ServerSentEvent(data="", event="end")
                    return

    return event_stream(messages())
