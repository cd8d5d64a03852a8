"""The Tasks tab (list, filters, paging, Submit Task, Stop), a task's page, and the Monitoring tab."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Any, Final
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Request, Response
from fastapi.responses import JSONResponse

from shared import eventwatch
from shared.submission import MAX_DELAY_S as MAX_SUBMISSION_DELAY_S
from services.gateway import params as validation
from services.gateway.deps import resources_of
from services.gateway.console.api_client import ApiFailure, console_api
from services.gateway.console.common import CONSOLE_PREFIX, ConsoleRoute, console_state, fragment, render
from services.gateway.console.render import row_view
from services.gateway.console.session import Session, current_session
from services.gateway.console.tasklogs import task_log_lines
from shared.wire import FC_DELAY_HEADER, FC_INVOCATION_TYPE_HEADER, FC_TASK_ID_HEADER

router = APIRouter(prefix=CONSOLE_PREFIX, route_class=ConsoleRoute)

SessionDep = Annotated[Session, Depends(current_session)]
PAGE_SIZES: Final = (20, 50, 100)
MAX_DELAY_S: Final = MAX_SUBMISSION_DELAY_S  # the 7-day retention, as for x-fc-async-delay


@dataclass(frozen=True)
class TaskFilters:
    """The Tasks tab's filters, as given in the page's query string."""

    status: str = ""
    prefix: str = ""
    since: str = ""  # datetime-local, UTC
    until: str = ""
    limit: int = 20
    token: str = ""

    def api_query(self) -> dict[str, str]:
        query = {"limit": str(self.limit), "sortOrderByTime": "desc", "status": self.status,
                 "prefix": self.prefix, "nextToken": self.token}
        if self.since:
            query["startedTimeBegin"] = str(utc_input_ms(self.since))
        if self.until:
            query["startedTimeEnd"] = str(utc_input_ms(self.until))
        return query

    def live_query(self, *, after_seq: int) -> str:
        """The live stream's query: the same filters, where to start, and whether new rows go on top."""
        params = {"after": str(after_seq), "status": self.status, "prefix": self.prefix,
                  "since": self.since, "until": self.until, "top": "" if self.token else "1"}
        return urlencode({k: v for k, v in params.items() if v})

    def page_query(self, **changes: str) -> str:
        params = {"status": self.status, "prefix": self.prefix, "since": self.since, "until": self.until,
                  "limit": str(self.limit), "token": self.token, **changes}
        return urlencode({k: v for k, v in params.items() if v})


def utc_input_ms(text: str) -> int:
    """A datetime-local input value (taken as UTC) as epoch milliseconds."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as err:
        raise ApiFailure(status=400, code="InvalidArgument", message=f"not a date and time: {text[:40]!r}") from err
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


def _filters(status: str, prefix: str, since: str, until: str, limit: str, token: str) -> TaskFilters:
    size = int(limit) if limit.isdigit() and int(limit) in PAGE_SIZES else PAGE_SIZES[0]
    return TaskFilters(status=status, prefix=prefix.strip(), since=since, until=until, limit=size, token=token)


@router.get("/functions/{name}/tasks")
async def tasks_page(request: Request, session: SessionDep, name: str, status: str = "", prefix: str = "",
                     since: str = "", until: str = "", limit: str = "", token: str = "") -> Response:
    filters = _filters(status, prefix, since, until, limit, token)
    # The stream position is read before the list, so the live stream replays anything the list
    # may have missed; a replayed change only redraws a row with what it already shows.
    after_seq = await eventwatch.last_sequence(resources_of(request).nc.jetstream())
    async with console_api(request, session) as api:
        try:
            function = await api.json("GET", f"/functions/{name}")
        except ApiFailure as failure:
            return render(request, "error.html", status_code=failure.status, session=session, error=failure)
        error = None
        try:
            page = await api.json("GET", f"/functions/{name}/async-tasks", query=filters.api_query())
        except ApiFailure as failure:
            page, error = {"tasks": [], "nextToken": ""}, failure
    rows = [row_view(task) for task in page.get("tasks", [])]
    return render(request, "tasks.html", session=session, function=function, rows=rows, filters=filters,
                  next_token=page.get("nextToken") or "", live_query=filters.live_query(after_seq=after_seq),
                  page_sizes=PAGE_SIZES, error=error, tab="tasks")


def _task_id_header(mode: str, custom_id: str) -> dict[str, str]:
    if mode != "custom":
        return {}
    if not custom_id.strip():
        raise ApiFailure(status=400, code="InvalidArgument", message="enter a task id, or choose Auto")
    return {FC_TASK_ID_HEADER: custom_id.strip()}


def _delay_header(when: str, delay_s: str, at: str) -> dict[str, str]:
    if when == "delay":
        if not delay_s.strip().isdigit():
            raise ApiFailure(status=400, code="InvalidArgument", message="the delay is a whole number of seconds")
        return {FC_DELAY_HEADER: delay_s.strip()}
    if when == "at":
        if not at:
            raise ApiFailure(status=400, code="InvalidArgument", message="choose the time to run at")
        # The gateway does not read an absolute execution time (x-fc-async-execution-time) yet,
        # so the chosen time is sent as a delay from now, which it does read.
        delay = max(0, math.ceil((utc_input_ms(at) - time.time() * 1000) / 1000))
        if delay > MAX_DELAY_S:
            raise ApiFailure(status=400, code="InvalidArgument",
                             message=f"that is {delay} s ahead; a task can be delayed by at most {MAX_DELAY_S} s")
        return {FC_DELAY_HEADER: str(delay)}
    return {}


def _payload(payload_format: str, payload: str) -> bytes:
    if payload_format == "json" and payload.strip():
        try:
            json.loads(payload)
        except ValueError as err:
            raise ApiFailure(status=400, code="InvalidArgument", message=f"the payload is not valid JSON: {err}") from err
    return payload.encode()


@router.post("/functions/{name}/tasks")
async def submit_task(
    request: Request,
    session: SessionDep,
    name: str,
    task_id_mode: Annotated[str, Form()] = "auto",
    task_id: Annotated[str, Form(max_length=256)] = "",
    when: Annotated[str, Form()] = "now",
    delay_s: Annotated[str, Form(max_length=10)] = "",
    at: Annotated[str, Form(max_length=40)] = "",
    payload_format: Annotated[str, Form()] = "json",
    payload: Annotated[str, Form(max_length=128 * 1024)] = "",
) -> Response:
    """The Submit Task dialog: answers into the dialog, and on success closes it (HX-Trigger)."""
    try:
        headers = {FC_INVOCATION_TYPE_HEADER: "Async", **_task_id_header(task_id_mode, task_id),
                   **_delay_header(when, delay_s, at)}
        body = _payload(payload_format, payload)
        async with console_api(request, session) as api:
            response = await api.call("POST", f"/functions/{name}/invocations", body=body, headers=headers)
    except ApiFailure as failure:
        return render(request, "_submit_result.html", error=failure, submitted=None)
    submitted = response.headers.get(FC_TASK_ID_HEADER, "")
    return render(request, "_submit_result.html", error=None, submitted=submitted, function_name=name,
                  headers={"HX-Trigger-After-Swap": "taskSubmitted"})


@router.put("/functions/{name}/tasks/{task_id}/stop")
async def stop_task(request: Request, session: SessionDep, name: str, task_id: str) -> Response:
    try:
        async with console_api(request, session) as api:
            await api.call("PUT", f"/functions/{name}/async-tasks/{task_id}/stop")
    except ApiFailure as failure:
        return render(request, "_flash.html", error=failure, message=None)
    return render(request, "_flash.html", error=None, message=f"Stop requested for {task_id}.")


@router.get("/functions/{name}/tasks/{task_id}")
async def task_page(request: Request, session: SessionDep, name: str, task_id: str) -> Response:
    async with console_api(request, session) as api:
        try:
            function = await api.json("GET", f"/functions/{name}")
            task = await api.json("GET", f"/functions/{name}/async-tasks/{task_id}")
        except ApiFailure as failure:
            return render(request, "error.html", status_code=failure.status, session=session, error=failure)
    return render(request, "task.html", session=session, function=function, task=task, tab="tasks")


@router.get("/functions/{name}/tasks/{task_id}/logs")
async def task_logs(request: Request, session: SessionDep, name: str, task_id: str) -> Response:
    logs_dir = console_state(request).settings.logs_dir
    async with console_api(request, session) as api:
        try:
            task = await api.json("GET", f"/functions/{name}/async-tasks/{task_id}")
        except ApiFailure as failure:
            return render(request, "_flash.html", error=failure, message=None)
    lines = task_log_lines(logs_dir, task) if logs_dir is not None and logs_dir.is_dir() else None
    return render(request, "_task_logs.html", lines=lines)


@router.get("/functions/{name}/monitoring")
async def monitoring_page(request: Request, session: SessionDep, name: str) -> Response:
    async with console_api(request, session) as api:
        try:
            function = await api.json("GET", f"/functions/{name}")
        except ApiFailure as failure:
            return render(request, "error.html", status_code=failure.status, session=session, error=failure)
    sample_every_s = console_state(request).settings.sample_every_s
    return render(request, "monitoring.html", session=session, function=function, tab="monitoring",
                  refresh_ms=int(sample_every_s * 1000))


@router.get("/functions/{name}/monitoring/data")
async def monitoring_data(request: Request, session: SessionDep, name: str) -> Response:
    validation.check_function_name(name)
    data: dict[str, Any] = await console_state(request).sampler.series(name)
    return JSONResponse(data, headers={"Cache-Control": "no-store"})


def task_row_html(request: Request, function_name: str, task: dict[str, Any], *, oob: bool, insert_top: bool) -> str:
    return fragment(request, "_task_row.html", row=row_view(task), function_name=function_name, oob=oob,
                    insert_top=insert_top)
