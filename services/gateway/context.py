"""The request context: every call's request id, its timing, and its errors as FC error JSON.

Every response carries `x-fc-request-id` (the caller's when it is safe to echo, else a new
one). Typed errors become FC error bodies through the exception handlers installed here; anything
unexpected is logged with its traceback and answered with a 500 `InternalServerError` that
leaks nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.errors import InternalServerError, error_response
from shared.errors import InvalidArgument, PathNotSupported, TaskmodeError
from shared.submission import accepted_request_id, new_request_id
from shared.wire import FC_REQUEST_ID_HEADER, FC_TASK_ID_HEADER

log = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST: Final = 499  # FC's status for a request the client abandoned


def request_id_of(request: Request) -> str:
    """The id of this request (the caller's x-fc-request-id when usable, else generated)."""
    return str(getattr(request.state, "request_id", "") or "")


def note_task_id(request: Request, task_id: str) -> None:
    """A submission chose its task id: from now on every answer carries it, errors included, so
    a client that retries after a 5xx (whose append may still have landed) retries with that id
    and is deduplicated instead of running the work twice."""
    request.state.task_id = task_id


def task_id_of(request: Request) -> str:
    return str(getattr(request.state, "task_id", "") or "")


async def _taskmode_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TaskmodeError)
    if exc.http_status >= 500:
        log.warning("request failed", extra={"code": exc.code, "error": exc.message, "path": request.url.path,
                                             "task_id": task_id_of(request)})
    return error_response(exc, request_id_of(request), task_id=task_id_of(request))


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
        request_id = accepted_request_id(Headers(scope=scope).get(FC_REQUEST_ID_HEADER)) or new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
                headers = MutableHeaders(scope=message)
                headers[FC_REQUEST_ID_HEADER] = request_id
                if state.get("task_id"):
                    headers[FC_TASK_ID_HEADER] = state["task_id"]
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
            response = error_response(InternalServerError("internal server error"), request_id,
                                      task_id=str(state.get("task_id", "")))
            await response(scope, receive, send_with_id)
        finally:
            if self.observe is not None:
                route = scope.get("route")
                template = getattr(route, "path", None) or "unmatched"
                self.observe(scope.get("method", ""), template, status, time.perf_counter() - began)
