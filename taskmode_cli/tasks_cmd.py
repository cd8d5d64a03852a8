"""`taskmode invoke` and `taskmode tasks get|list|stop|watch`."""

from __future__ import annotations

import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Final

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from taskmode_cli.api import TERMINAL_STATUSES, Transition
from taskmode_cli.output import (
    TASK_COLUMNS,
    format_ms,
    print_json,
    print_record,
    print_table,
    status_text,
    stderr,
    stdout,
    task_row,
)
from taskmode_cli.state import CliState, UsageProblem

tasks_app = typer.Typer(help="Look at, stop and watch async tasks.", no_args_is_help=True)

QualifierOpt = Annotated[str | None, typer.Option("--qualifier", "-q", help="a version id or an alias (default: LATEST)")]

EXIT_NOT_SUCCEEDED: Final = 1
MAX_DELAY_S: Final = 7 * 24 * 3600  # the gateway takes delays up to the 7-day retention
SUCCEEDED: Final = "Succeeded"


def parse_time_ms(text: str, *, option: str) -> int:
    """Epoch milliseconds, or an RFC 3339 / ISO 8601 time (without a zone it is UTC)."""
    value = text.strip()
    if value.isdigit():
        return int(value)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as err:
        raise UsageProblem(f"{option} takes epoch milliseconds or an RFC 3339 time, got {text!r}") from err
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


def delay_until(at_ms: int, *, now_ms: int) -> int:
    """Whole seconds from now until `at_ms` (rounded up, never negative), within the API's limit."""
    delay_s = max(0, math.ceil((at_ms - now_ms) / 1000))
    if delay_s > MAX_DELAY_S:
        raise UsageProblem(f"--at is {delay_s} s ahead; a task can be delayed by at most {MAX_DELAY_S} s")
    return delay_s


def _payload(payload: str | None, payload_file: Path | None) -> bytes:
    if payload is not None and payload_file is not None:
        raise UsageProblem("give --payload or --payload-file, not both")
    if payload_file is not None:
        return sys.stdin.buffer.read() if str(payload_file) == "-" else payload_file.read_bytes()
    return (payload or "").encode()


def invoke(
    ctx: typer.Context,
    name: str,
    payload: Annotated[str | None, typer.Option("--payload", "-p", help="the event, as text (JSON or anything)")] = None,
    payload_file: Annotated[Path | None, typer.Option("--payload-file", help="the event from a file ('-': stdin)")] = None,
    is_async: Annotated[bool, typer.Option("--async", help="submit an async task instead of calling synchronously")] = False,
    task_id: Annotated[str | None, typer.Option("--task-id", help="the task's id (default: generated)")] = None,
    delay: Annotated[int | None, typer.Option("--delay", help="seconds before the task may run (0-604800)")] = None,
    at: Annotated[str | None, typer.Option("--at", help="when the task may run: epoch ms or RFC 3339")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="with --async: follow the task until it ends")] = False,
    qualifier: QualifierOpt = None,
) -> None:
    """Invoke a function: synchronously (prints the result) or, with --async, as a task."""
    state: CliState = ctx.obj
    body = _payload(payload, payload_file)
    if not is_async:
        if task_id or delay is not None or at or watch:
            raise UsageProblem("--task-id, --delay, --at and --watch need --async")
        _invoke_sync(state, name, body, qualifier)
        return
    if delay is not None and at is not None:
        raise UsageProblem("give --delay or --at, not both")
    headers = {"x-fc-invocation-type": "Async"}
    if task_id:
        headers["x-fc-async-task-id"] = task_id
    if at is not None:
        # The gateway has no absolute execution time yet (x-fc-async-execution-time is not read),
        # so the time becomes a delay from now, which it does read.
        delay = delay_until(parse_time_ms(at, option="--at"), now_ms=int(time.time() * 1000))
    if delay is not None:
        headers["x-fc-async-delay"] = str(delay)
    response = state.api().invoke(name, body, headers=headers, qualifier=qualifier)
    submitted = response.headers.get("x-fc-async-task-id", "")
    if state.json and not watch:
        print_json({"taskId": submitted, "requestId": response.headers.get("x-fc-request-id", ""),
                    "statusCode": response.status_code})
    elif not state.json:
        stderr.print(f"task {submitted} submitted")
    if watch:
        _watch(state, name, submitted)


def _invoke_sync(state: CliState, name: str, body: bytes, qualifier: str | None) -> None:
    response = state.api().invoke(name, body, headers={}, qualifier=qualifier)
    error_type = response.headers.get("x-fc-error-type", "")
    if state.json:
        try:
            result: Any = response.json()
        except ValueError:
            result = response.content.decode("utf-8", errors="replace")
        print_json({"statusCode": response.status_code, "requestId": response.headers.get("x-fc-request-id", ""),
                    "instanceId": response.headers.get("x-fc-instance-id", ""), "errorType": error_type or None,
                    "result": result})
    else:
        sys.stdout.buffer.write(response.content)
        if response.content and not response.content.endswith(b"\n"):
            sys.stdout.buffer.write(b"\n")
        sys.stdout.flush()
    if error_type:
        if not state.json:
            stderr.print(Text.assemble(("handler error ", "bold red"), error_type))
        raise typer.Exit(EXIT_NOT_SUCCEEDED)


@tasks_app.command("get")
def get_task(ctx: typer.Context, name: str, task_id: str, qualifier: QualifierOpt = None) -> None:
    """Show a task: status, times, result, error and its transitions."""
    state: CliState = ctx.obj
    task = state.api().get_task(name, task_id, qualifier=qualifier)
    if state.json:
        print_json(task)
        return
    print_record({k: v for k, v in task.items() if k != "events"}, title=f"task {task_id}")
    rows = [[format_ms(e.get("timestamp")), status_text(str(e.get("status", ""))), e.get("eventDetail", "")]
            for e in task.get("events") or []]
    print_table(("time", "status", "detail"), rows, title="transitions")


@tasks_app.command("list")
def list_tasks(
    ctx: typer.Context,
    name: str,
    status: Annotated[str | None, typer.Option(help="only this status (e.g. Running, Failed)")] = None,
    prefix: Annotated[str | None, typer.Option(help="only task ids starting so")] = None,
    since: Annotated[str | None, typer.Option(help="submitted at or after: epoch ms or RFC 3339")] = None,
    until: Annotated[str | None, typer.Option(help="submitted at or before: epoch ms or RFC 3339")] = None,
    limit: Annotated[int, typer.Option(help="tasks per page (1-100)")] = 20,
    oldest_first: Annotated[bool, typer.Option("--oldest-first", help="ascending submission time")] = False,
    next_token: Annotated[str | None, typer.Option("--next-token", help="continue a previous listing")] = None,
    qualifier: QualifierOpt = None,
) -> None:
    """List a function's tasks, newest first."""
    state: CliState = ctx.obj
    query: dict[str, str] = {"limit": str(limit), "sortOrderByTime": "asc" if oldest_first else "desc"}
    for key, value in (("status", status), ("prefix", prefix), ("nextToken", next_token), ("qualifier", qualifier)):
        if value:
            query[key] = value
    if since:
        query["startedTimeBegin"] = str(parse_time_ms(since, option="--since"))
    if until:
        query["startedTimeEnd"] = str(parse_time_ms(until, option="--until"))
    page = state.api().list_tasks(name, query)
    if state.json:
        print_json(page)
        return
    print_table(TASK_COLUMNS, [task_row(task) for task in page.get("tasks", [])])
    if page.get("nextToken"):
        stderr.print(f"more: --next-token {page['nextToken']}")


@tasks_app.command("stop")
def stop_task(ctx: typer.Context, name: str, task_id: str, qualifier: QualifierOpt = None) -> None:
    """Stop a task (a running one is killed; a finished one is an error)."""
    state: CliState = ctx.obj
    state.api().stop_task(name, task_id, qualifier=qualifier)
    if state.json:
        print_json({"taskId": task_id, "stopRequested": True})
    else:
        stderr.print(f"stop requested for {task_id}")


@tasks_app.command("watch")
def watch_task(ctx: typer.Context, name: str, task_id: str) -> None:
    """Follow a task's transitions live until it ends; exit 0 only if it Succeeded."""
    _watch(ctx.obj, name, task_id)


class _Timeline:
    """The transitions so far and the time since submission, re-rendered by Rich Live."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.transitions: list[Transition] = []
        self.ended_at_ms: int | None = None

    def elapsed_s(self) -> float:
        if not self.transitions:
            return 0.0
        first = int(self.transitions[0].data.get("timestamp", 0))
        last = self.ended_at_ms if self.ended_at_ms is not None else int(time.time() * 1000)
        return max(0.0, (last - first) / 1000)

    def __rich__(self) -> Group:
        table = Table(title=f"task {self.task_id}", header_style="bold")
        for column in ("time", "status", "+s", "detail"):
            table.add_column(column)
        first = int(self.transitions[0].data.get("timestamp", 0)) if self.transitions else 0
        for item in self.transitions:
            at = int(item.data.get("timestamp", 0))
            table.add_row(format_ms(at), status_text(item.status), f"{(at - first) / 1000:.3f}",
                          str(item.data.get("eventDetail", "")))
        state = "ended" if self.ended_at_ms is not None else "elapsed"
        return Group(table, Text(f"{state} {self.elapsed_s():.1f} s"))


def _watch(state: CliState, name: str, task_id: str) -> None:
    timeline = _Timeline(task_id)
    final = ""
    live_view = not state.json and stdout.is_terminal
    transitions = state.api().watch_task(name, task_id)
    if live_view:
        with Live(timeline, console=stdout, refresh_per_second=4, transient=False):
            for item in transitions:
                timeline.transitions.append(item)
                if item.status in TERMINAL_STATUSES:
                    final = item.status
                    timeline.ended_at_ms = int(item.data.get("timestamp", 0))
    else:
        for item in transitions:
            timeline.transitions.append(item)
            if state.json:
                sys.stdout.write(json.dumps({"seq": item.seq, **item.data}) + "\n")
                sys.stdout.flush()
            else:
                stdout.print(Text.assemble(format_ms(item.data.get("timestamp")), "  ", status_text(item.status),
                                           "  ", str(item.data.get("eventDetail", ""))))
            if item.status in TERMINAL_STATUSES:
                final = item.status
                timeline.ended_at_ms = int(item.data.get("timestamp", 0))
        if not state.json:
            stdout.print(f"{final or 'unfinished'} after {timeline.elapsed_s():.1f} s")
    if final != SUCCEEDED:
        raise typer.Exit(EXIT_NOT_SUCCEEDED)
