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
from collections.abc import AsyncIterator
from typing import Any, Final
from urllib.parse import unquote_plus

from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from services.gateway import params
from services.gateway.auth import check_nonce, read_chunks, verify_headers
from services.gateway.deps import Resources
from services.gateway.errors import error_response
from services.gateway.metrics import GatewayMetrics
from services.gateway.settings import GatewaySettings
from services.gateway.submission import early_task_id, submit_task
from shared import wire
from shared.errors import TaskmodeError
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
        # While the bus is down the route's guard answers (a quick 503), without a catalog lookup.
        if headers.get(FC_INVOCATION_TYPE_HEADER, "").strip().lower() != "async" or not resources.nc.is_connected:
            await self.app(scope, receive, send)
            return
        name = match.group(1)
        # Only a well-formed name is looked up (a KV key cannot hold every character); the route
        # gives the exact error for the others, and for a function that does not exist.
        function = await resources.catalog.find_function(name) if params.FUNCTION_NAME_RE.fullmatch(name) else None
        if function is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = _ROUTE
        state: dict[str, Any] = scope["state"]
        request_id: str = state["request_id"]
        settings: GatewaySettings = self.state.settings
        metrics: GatewayMetrics = self.state.metrics
        try:
            # The route's guard, step for step (the bus is up): signature from the headers, nonce,
            # then the body under the async payload cap, hashed as it streams in.
            expected_sha256 = None
            if not settings.auth_disabled:
                verified = verify_headers(settings, scope, headers)
                if task_id := early_task_id(headers):
                    state["task_id"] = task_id  # the nonce is a bus round trip: its 503 carries the id too
                await check_nonce(resources, verified)
                expected_sha256 = verified.content_sha256
            body = await read_chunks(_body_chunks(receive), declared_length=headers.get("content-length"),
                                     limit=params.MAX_ASYNC_PAYLOAD_BYTES, expected_sha256=expected_sha256)
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
                                        headers=headers, request_id=request_id, qualifier=resolved.qualifier,
                                        chosen=lambda task_id: state.__setitem__("task_id", task_id),
                                        task_id=state.get("task_id") or None)
        except TaskmodeError as err:
            # RequestContextMiddleware stamps the task id (once chosen) on this answer's headers.
            await error_response(err, request_id, task_id=str(state.get("task_id", "")))(scope, receive, send)
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


async def _body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The request body's chunks as the server hands them over."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return
