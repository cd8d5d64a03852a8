"""The async submission route without the web framework in the way.

`POST /2023-03-30/functions/{name}/invocations` with `x-fc-invocation-type: Async` is most of
the gateway's traffic. Routing, dependency solving and Request objects cost more CPU than the
signature check and the append together (measured with bench/profile_stack.py), so this ASGI
middleware answers that one request shape itself, with the same checks, the same
`submit_task`, the same errors and the same metrics as the route. Every other request, and a
submission it cannot take (e.g. an unknown function), goes on to FastAPI unchanged.
"""

from __future__ import annotations

import re
from typing import Any, Final
from urllib.parse import unquote_plus

from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from services.gateway import params
from services.gateway.auth import verify
from services.gateway.deps import Resources
from services.gateway.errors import error_response
from services.gateway.metrics import GatewayMetrics
from services.gateway.settings import GatewaySettings
from services.gateway.submission import submit_task
from shared import wire
from shared.errors import EntityTooLarge, TaskmodeError
from shared.qualifiers import MAIN_VERSION_DRAW, resolve
from shared.wire import (
    FC_INVOCATION_TYPE_HEADER,
    FC_REQUEST_ID_HEADER,
    FC_STATEFUL_INVOCATION_ID_HEADER,
    FC_TASK_ID_HEADER,
)

_PATH: Final = re.compile(rf"^/{wire.API_VERSION}/functions/([^/]+)/invocations$")
_QUALIFIER: Final = re.compile(r"(?:^|&)qualifier=([^&]*)")


class _Route:
    """What the request-metrics observer reads from `scope["route"]`."""

    path: Final = f"/{wire.API_VERSION}/functions/{{function_name}}/invocations"


_ROUTE: Final = _Route()


class AsyncSubmissionFastPath:
    """ASGI middleware: serve async submissions directly, pass everything else to `app`.

    It sits inside `RequestContextMiddleware`, which has given the request its id
    (`scope["state"]["request_id"]`), times it, and turns an unexpected exception into a 500.
    """

    def __init__(self, app: ASGIApp, *, state: Any) -> None:
        self.app = app
        self.state = state  # the FastAPI app's state: settings, metrics, resources (once open)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = _PATH.match(scope.get("path", "")) if scope["type"] == "http" and scope["method"] == "POST" else None
        resources: Resources | None = getattr(self.state, "resources", None)
        if match is None or resources is None:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if headers.get(FC_INVOCATION_TYPE_HEADER, "").strip().lower() != "async":
            await self.app(scope, receive, send)
            return
        function = await resources.catalog.find_function(match.group(1))
        if function is None:  # the route gives the exact error (and checks the name's form)
            await self.app(scope, receive, send)
            return
        scope["route"] = _ROUTE
        request_id: str = scope["state"]["request_id"]
        settings: GatewaySettings = self.state.settings
        metrics: GatewayMetrics = self.state.metrics
        try:
            body = await _read_body(receive, headers, limit=settings.max_request_body_bytes)
            verify(settings, scope, headers, body)
            try:
                checked = params.check_qualifier(_qualifier(scope))
                # As the route: only whether the qualifier names something; the version that runs
                # is picked when the task runs.
                resolved = await resolve(resources.catalog, function.function_name, checked,
                                         draw=lambda: MAIN_VERSION_DRAW)
            except TaskmodeError:
                metrics.submissions.labels(outcome="rejected").inc()
                raise
            task_id = await submit_task(resources, metrics, function=resolved.function, payload=body,
                                        headers=headers, request_id=request_id, qualifier=resolved.qualifier)
        except TaskmodeError as err:
            await error_response(err, request_id)(scope, receive, send)
            return
        answer = [
            (b"content-length", b"0"),
            (FC_REQUEST_ID_HEADER.encode(), request_id.encode()),
            (FC_TASK_ID_HEADER.encode(), task_id.encode()),
        ]
        if headers.get(FC_STATEFUL_INVOCATION_ID_HEADER, "").strip():
            answer.append((FC_STATEFUL_INVOCATION_ID_HEADER.encode(), task_id.encode()))
        await send({"type": "http.response.start", "status": 202, "headers": answer})
        await send({"type": "http.response.body", "body": b""})


def _qualifier(scope: Scope) -> str | None:
    query = scope.get("query_string", b"").decode("latin-1")
    found = _QUALIFIER.search(query) if query else None
    return unquote_plus(found.group(1)) if found else None


async def _read_body(receive: Receive, headers: Headers, *, limit: int) -> bytes:
    """The whole body, refusing more than `limit` bytes before reading them all."""
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise EntityTooLarge(f"request body exceeds maximum allowed size ({limit} bytes)")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise EntityTooLarge(f"request body exceeds maximum allowed size ({limit} bytes)")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)
