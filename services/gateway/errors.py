"""Errors at the edge: the gateway's own error types and their FC error JSON responses.

An error body is `{"Code", "Message", "RequestId"}` with the error's HTTP status (plus `TaskId`
for a duplicate task). `context.py` installs the handlers that answer with these.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from starlette.responses import Response

from shared.errors import TaskAlreadyExists, TaskmodeError
from shared.wire import FC_REQUEST_ID_HEADER


def _enc_hook(obj: Any) -> Any:
    # Documents read from MongoDB may hold BSON's int subclasses (Int64) and similar wrappers.
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    raise NotImplementedError(f"cannot encode {type(obj).__name__} as JSON")


_encode = msgspec.json.Encoder(enc_hook=_enc_hook).encode


class InternalServerError(TaskmodeError):
    code = "InternalServerError"
    http_status = 500


class InvocationTimeout(TaskmodeError):
    """No executor answered a synchronous invocation within the function timeout plus slack."""

    code = "InvocationTimeout"
    http_status = 504


def json_response(content: Any, *, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response encoded with msgspec (read-model documents hold only JSON-able values)."""
    return Response(_encode(content), status_code=status_code, headers=headers, media_type="application/json")


def error_response(err: TaskmodeError, request_id: str, *, task_id: str = "") -> Response:
    """FC's error body. `task_id` (a submission's, once chosen) is added to a 5xx body as `TaskId`:
    only there does the client need it to retry safely, and 4xx bodies keep FC's shape (the
    `x-fc-async-task-id` header is on every answer, added by the request middleware)."""
    body: dict[str, Any] = {"Code": err.code, "Message": err.message, "RequestId": request_id}
    if isinstance(err, TaskAlreadyExists):
        body["TaskId"] = err.existing_task_id
    elif task_id and err.http_status >= 500:
        body["TaskId"] = task_id
    return json_response(body, status_code=err.http_status, headers={FC_REQUEST_ID_HEADER: request_id})


# FC codes an executor may report for a synchronous call where no handler ran, beyond ours.
_EXTRA_STATUS: Final = {"ResourceExhausted": 429, "ResourceThrottled": 503, "FunctionNotReady": 503}


def _known_statuses() -> dict[str, int]:
    found: dict[str, int] = {}
    pending: list[type[TaskmodeError]] = [TaskmodeError]
    while pending:
        cls = pending.pop()
        found.setdefault(cls.code, cls.http_status)
        pending.extend(cls.__subclasses__())
    return found


class ReportedError(TaskmodeError):
    """An FC error another service reported by code (e.g. the executor over request/reply)."""

    def __init__(self, message: str, *, code: str, http_status: int) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status


def reported_error(code: str, message: str) -> TaskmodeError:
    """The error for an FC `code` reported by another service, with its usual HTTP status."""
    status = _known_statuses().get(code) or _EXTRA_STATUS.get(code, 500)
    return ReportedError(message or code, code=code, http_status=status)
