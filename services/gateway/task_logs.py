"""GET /functions/{name}/async-tasks/{taskId}/logs: what a task's handler printed, per attempt.

Not an FC 3.0 operation (FC sends logs to SLS): taskmode's own, documented in the README. The
answer is `{"taskId", "logs": [AttemptLog...]}`, oldest attempt first; an attempt that is still
running has no log yet, and one whose handler wrote nothing shows only FC's framing lines.
"""

from __future__ import annotations

import msgspec
from fastapi import APIRouter, Response

from services.gateway.deps import MetricsDep, ResourcesDep, SettingsDep
from services.gateway.errors import json_response
from services.gateway.tasks import check_function_and_qualifier, check_ids, task_document
from shared.task_logs import quiet_attempts, read_task_logs

router = APIRouter()


@router.get("/functions/{function_name}/async-tasks/{task_id}/logs")
async def get_async_task_logs(
    function_name: str, task_id: str, resources: ResourcesDep, settings: SettingsDep, metrics: MetricsDep,
    qualifier: str | None = None,
) -> Response:
    await check_function_and_qualifier(resources, function_name, qualifier)
    check_ids(function_name, task_id)
    doc = await task_document(
        resources=resources, settings=settings, metrics=metrics, function_name=function_name, task_id=task_id
    )
    attempts = doc["alreadyRetriedTimes"] + 1 if doc["startedTime"] is not None else 0
    stored = await read_task_logs(resources.nc.jetstream(), function=function_name, task_id=task_id, attempts=attempts)
    logs = {**quiet_attempts(doc), **{entry.attempt: entry for entry in stored}}
    return json_response({"taskId": task_id, "logs": [msgspec.to_builtins(logs[n]) for n in sorted(logs)]})
