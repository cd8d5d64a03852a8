"""GetAsyncTask, ListAsyncTasks and StopAsyncTask.

Reads come from the MongoDB read model, except that GetAsyncTask folds the task's own event
history when the projection has not caught up yet (read-your-writes right after a 202). A stop
is an append to the event store guarded by the sequence of the event it acted on, so it cannot
overwrite a completion that won the race.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Final

import pymongo
from fastapi import APIRouter, Response
from pymongo.errors import PyMongoError

from shared import taskview
from shared.catalog import function_arn
from shared.errors import AsyncTaskNotFound, ConcurrentUpdateError, ServiceUnavailable, TaskAlreadyFinished, TaskmodeError
from shared.events import TaskStopped, TaskStopping
from shared.eventstore import StoredEvent, follow
from shared.ports import EventLog
from shared.qualifiers import MAIN_VERSION_DRAW, resolve
from shared.taskstore import TaskQuery
from shared.taskview import TaskDocument
from shared.transitions import TERMINAL, Status
from services.gateway import params
from services.gateway.deps import MetricsDep, Resources, ResourcesDep, SettingsDep
from services.gateway.errors import json_response
from services.gateway.metrics import GatewayMetrics
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

router = APIRouter()

_STOP_ATTEMPTS: Final = 5
# A read-model lookup slower than this is abandoned for the event stream, which has the answer too.
READ_MODEL_TIMEOUT_S: Final = 1.0
STOP_REASON: Final = "stopped by user"


async def check_function_and_qualifier(resources: Resources, function_name: str, qualifier: str | None) -> str | None:
    """404 FunctionNotFound for a function that does not exist (also when tasks of an earlier
    function of that name are still retained), 404 for a qualifier that names nothing; the
    qualifier as given, or None when none was given."""
    params.check_function_name(function_name)
    checked = params.check_qualifier(qualifier)
    await resolve(resources.catalog, function_name, checked, draw=lambda: MAIN_VERSION_DRAW)
    return checked if qualifier else None


def check_ids(function_name: str, task_id: str) -> None:
    # Both become NATS subject tokens: anything outside the id alphabets (`*`, `>`, `.`) could
    # widen a subject into a wildcard, so such a task simply cannot exist.
    params.check_function_name(function_name)
    if not params.TASK_ID_RE.fullmatch(task_id):
        raise AsyncTaskNotFound(f"task {task_id[:140]!r} of function {function_name} does not exist")


async def task_document(
    *, resources: Resources, settings: GatewaySettings, metrics: GatewayMetrics, function_name: str, task_id: str
) -> TaskDocument:
    docs: dict[str, TaskDocument] = {}
    if not resources.tasks.believed_reachable():  # while MongoDB is known down, straight to the stream
        metrics.read_model_skipped.inc()
    else:
        try:
            with pymongo.timeout(READ_MODEL_TIMEOUT_S):
                docs = await resources.tasks.load_many([taskview.document_id(function_name, task_id)])
        except PyMongoError as err:
            # The read model is unreachable: the event stream alone can still answer.
            log.warning("read model unavailable; answering from the event stream", extra={"error": repr(err)})
    doc = docs.get(taskview.document_id(function_name, task_id))
    last = await resources.events.last(function_name, task_id)
    if doc is None and last is None:
        raise AsyncTaskNotFound(f"task {task_id} of function {function_name} does not exist")
    if last is None or (doc is not None and doc["version"] >= last.event.version):
        assert doc is not None
        return doc
    # The projection lags behind the stream: answer from the task's own history.
    metrics.read_fallbacks.inc()
    arn = function_arn(region=settings.common.region, account_id=settings.common.account_id, function=function_name)
    history = await resources.events.history(function_name, task_id)
    try:
        folded = taskview.fold([stored.event for stored in history], arn=arn)
    except TaskmodeError as err:
        # Early events already aged out of the stream: the stored document is the best we have.
        log.warning("task history does not fold", extra={"task_id": task_id, "function": function_name, "error": str(err)})
        folded = None
    if folded is None:
        if doc is None:
            raise ServiceUnavailable(f"task {task_id} of function {function_name} cannot be read right now")
        return doc
    return folded


@router.get("/functions/{function_name}/async-tasks/{task_id}")
async def get_async_task(
    function_name: str,
    task_id: str,
    resources: ResourcesDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    qualifier: str | None = None,
) -> Response:
    wanted = await check_function_and_qualifier(resources, function_name, qualifier)
    check_ids(function_name, task_id)
    doc = await task_document(
        resources=resources, settings=settings, metrics=metrics, function_name=function_name, task_id=task_id
    )
    if wanted is not None and doc["qualifier"] != wanted:
        raise AsyncTaskNotFound(f"task {task_id} of function {function_name} has no qualifier {wanted}")
    return json_response(taskview.public_view(doc))


@router.get("/functions/{function_name}/async-tasks")
async def list_async_tasks(
    function_name: str,
    resources: ResourcesDep,
    status: str | None = None,
    prefix: str | None = None,
    startedTimeBegin: str | None = None,
    startedTimeEnd: str | None = None,
    limit: str | None = None,
    sortOrderByTime: str | None = None,
    includePayload: str | None = None,
    nextToken: str | None = None,
    qualifier: str | None = None,
) -> Response:
    # The query is checked first (400s), then whether the function and qualifier exist (404s).
    params.check_function_name(function_name)
    wanted = params.check_qualifier(qualifier) if qualifier else None
    status_filter = params.parse_status_filter(status)
    query = TaskQuery(
        function=function_name,
        status=str(status_filter) if status_filter is not None else None,
        prefix=prefix or None,
        qualifier=wanted,
        started_time_begin=params.parse_time_ms("startedTimeBegin", startedTimeBegin),
        started_time_end=params.parse_time_ms("startedTimeEnd", startedTimeEnd),
        limit=params.parse_limit(limit),
        descending=params.parse_sort_order(sortOrderByTime),
        next_token=nextToken or None,
        include_payload=params.parse_bool("includePayload", includePayload, default=False),
    )
    resources.tasks.check_query(query)
    await check_function_and_qualifier(resources, function_name, qualifier)
    if not resources.tasks.believed_reachable():
        raise ServiceUnavailable("the task list is unavailable right now; GetAsyncTask still answers")
    try:
        page = await resources.tasks.list_tasks(query)
    except PyMongoError as err:
        raise ServiceUnavailable("the task list is unavailable right now; GetAsyncTask still answers") from err
    tasks = [taskview.public_view(doc, include_payload=query.include_payload) for doc in page.tasks]
    return json_response({"nextToken": page.next_token, "tasks": tasks})


@router.put("/functions/{function_name}/async-tasks/{task_id}/stop")
async def stop_async_task(
    function_name: str, task_id: str, resources: ResourcesDep, metrics: MetricsDep, qualifier: str | None = None
) -> Response:
    await check_function_and_qualifier(resources, function_name, qualifier)
    check_ids(function_name, task_id)
    events = resources.events
    stops = metrics.stops
    last = await events.last(function_name, task_id)
    if last is None:
        raise AsyncTaskNotFound(f"task {task_id} of function {function_name} does not exist")
    for _ in range(_STOP_ATTEMPTS):
        try:
            outcome = await _try_stop(events, last)
        except TaskAlreadyFinished:
            stops.labels(outcome="finished").inc()
            raise
        if outcome is not None:
            stops.labels(outcome=outcome).inc()
            status = Status.STOPPED if outcome == "stopped" else Status.STOPPING
            log.info("task stop requested", extra={"task_id": task_id, "function": function_name, "status": str(status), "outcome": outcome})
            return json_response({})
        # Another service appended first (the task moved on): decide again from where it is now.
        reloaded = await events.last(function_name, task_id)
        assert reloaded is not None  # a task's events never vanish while it is being stopped
        last = reloaded
    raise ServiceUnavailable(f"task {task_id} kept changing; try stopping it again")


async def _try_stop(events: EventLog, last: StoredEvent, *, reason: str = STOP_REASON) -> str | None:
    """Stop the task from `last`; the outcome, or None when another writer got there first."""
    status = last.event.status
    if status in TERMINAL:
        raise TaskAlreadyFinished(f"task {last.event.task_id} already finished with status {status}")
    if status == Status.STOPPING:
        return "already_stopping"
    if status == Status.RUNNING:
        event: TaskStopping | TaskStopped = follow(last, TaskStopping, reason=reason)
        outcome = "stopping"
    else:  # Enqueued, Processed, Retrying: nothing runs, so the stop is immediate
        event = follow(last, TaskStopped, reason=reason)
        outcome = "stopped"
    try:
        await events.append(event, expected_seq=last.seq)
    except ConcurrentUpdateError:
        return None
    return outcome


ABORT_REASON: Final = "stopped by DisableFunctionInvocation with abortOngoingRequest"


async def stop_tasks(resources: Resources, metrics: GatewayMetrics, function_name: str, *, status: Status) -> int:
    """Stop every task of the function the read model shows in `status` (DisableFunctionInvocation
    with abortOngoingRequest); how many were stopped or asked to stop."""
    events = resources.events
    stopped = 0
    token: str | None = None
    while True:
        page = await resources.tasks.list_tasks(TaskQuery(function=function_name, status=str(status), limit=100,
                                                          next_token=token))
        for doc in page.tasks:
            last = await events.last(function_name, str(doc["taskId"]))
            if last is None:
                continue
            with contextlib.suppress(TaskAlreadyFinished):
                outcome = await _try_stop(events, last, reason=ABORT_REASON)
                if outcome is not None:
                    metrics.stops.labels(outcome=outcome).inc()
                    stopped += 1
        if not page.next_token:
            return stopped
        token = page.next_token
