"""Errors at the edge: typed errors to FC error JSON, and the request context every call gets.

Every response carries `x-fc-request-id`; an error body is `{"Code", "Message", "RequestId"}`
with the error's HTTP status (plus `TaskId` for a duplicate task). Anything unexpected is logged
with its traceback and answered with a 500 `InternalServerError` that leaks nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Final

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import InvalidArgument, PathNotSupported, TaskAlreadyExists, TaskmodeError
from services.gateway.validation import accepted_request_id, new_request_id

log = logging.getLogger(__name__)

REQUEST_ID_HEADER: Final = "x-fc-request-id"
CLIENT_CLOSED_REQUEST: Final = 499  # FC's status for a request the client abandoned


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


def request_id_of(request: Request) -> str:
    """The id of this request (the caller's x-fc-request-id when usable, else generated)."""
    return str(getattr(request.state, "request_id", "") or "")


def error_response(err: TaskmodeError, request_id: str) -> Response:
    body: dict[str, Any] = {"Code": err.code, "Message": err.message, "RequestId": request_id}
    if isinstance(err, TaskAlreadyExists):
        body["TaskId"] = err.existing_task_id
    return json_response(body, status_code=err.http_status, headers={REQUEST_ID_HEADER: request_id})


async def _taskmode_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TaskmodeError)
    if exc.http_status >= 500:
        log.warning("request failed", extra={"code": exc.code, "error": exc.message, "path": request.url.path})
    return error_response(exc, request_id_of(request))


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for item in exc.errors()[:3]:
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
        parts.append(f"{where}: {item.get('msg', 'invalid')}" if where else str(item.get("msg", "invalid")))
    return "invalid request: " + "; ".join(parts) if parts else "invalid request"


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return error_response(InvalidArgument(_describe_validation(exc)), request_id_of(request))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code in (404, 405):
        err: TaskmodeError = PathNotSupported(f"{request.method} {request.url.path} is not supported")
    elif exc.status_code < 500:
        err = InvalidArgument(str(exc.detail))
    else:
        err = InternalServerError("internal server error")
    return error_response(err, request_id_of(request))


def install_exception_handlers(app: FastAPI) -> None:
    app.add_exception_handler(TaskmodeError, _taskmode_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)


RequestObserver = Callable[[str, str, int, float], None]  # method, route template, status, seconds


class RequestContextMiddleware:
    """Gives each request its id, stamps it on the response, times it, and turns a crash into 500.

    A pure ASGI middleware (no response buffering); it sits inside Starlette's outermost error
    middleware, so an unexpected exception still gets an FC-shaped body with the request id.
    """

    def __init__(self, app: ASGIApp, *, observe: RequestObserver | None = None) -> None:
        self.app = app
        self.observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = accepted_request_id(Headers(scope=scope).get(REQUEST_ID_HEADER)) or new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        began = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            # The caller went away mid-request: nothing to answer and nothing went wrong here.
            status = CLIENT_CLOSED_REQUEST
            log.info("client disconnected", extra={"path": scope.get("path", ""), "request_id": request_id})
        except Exception:
            log.exception(
                "unhandled error", extra={"path": scope.get("path", ""), "method": scope.get("method", "")}
            )
            if started:
                raise
            response = error_response(InternalServerError("internal server error"), request_id)
            await response(scope, receive, send_with_id)
        finally:
            if self.observe is not None:
                route = scope.get("route")
                template = getattr(route, "path", None) or "unmatched"
                self.observe(scope.get("method", ""), template, status, time.perf_counter() - began)


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
        self.code = code  # type: ignore[misc]
        self.http_status = http_status  # type: ignore[misc]


def reported_error(code: str, message: str) -> TaskmodeError:
    """The error for an FC `code` reported by another service, with its usual HTTP status."""
    status = _known_statuses().get(code) or _EXTRA_STATUS.get(code, 500)
    return ReportedError(message or code, code=code, http_status=status)
