"""HTTP triggers: `<gateway>/http-triggers/<function>/<trigger>/<path>` runs the function.

The request becomes FC's HTTP-trigger event (version, rawPath, headers, queryParameters, body,
isBase64Encoded, requestContext). With `x-fc-invocation-type: Async` it is submitted as a task
through the one admission path and answered 202 with the task id; otherwise the function runs
synchronously and its result becomes the response (a result with `statusCode` is FC's response
struct: statusCode, headers, body, isBase64Encoded). `authType: anonymous` takes unsigned
requests; `authType: function` requires the same ACS3 signature as the API.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time

import msgspec
from fastapi import APIRouter, Request, Response

from services.gateway import params
from services.gateway.auth import read_body, require_bus, signed_body
from services.gateway.context import note_task_id, request_id_of
from services.gateway.deps import metrics_of, resources_of, settings_of
from services.gateway.flow_control import refuse_if_blocked
from services.gateway.invocations import call_function
from shared import wire
from shared.errors import TaskmodeError, TriggerNotFound
from shared.qualifiers import MAIN_VERSION_DRAW, resolve
from shared.submission import MAX_ASYNC_PAYLOAD_BYTES, Admission, check_payload_size, choose_task_id, parse_delay, submit
from shared.transitions import Status
from shared.triggers import TRIGGER_NAME_RE, HttpAuthType, HttpTriggerConfig, TriggerRecord, TriggerType

log = logging.getLogger(__name__)

router = APIRouter()

_ALL_METHODS = ["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS"]
# Hop-by-hop and framing headers are the server's to set, never the function's.
_RESPONSE_HEADERS_DROPPED = {"content-length", "transfer-encoding", "connection"}


class MethodNotAllowed(TaskmodeError):
    code = "MethodNotAllowed"
    http_status = 405


class _ResponseStruct(msgspec.Struct, rename="camel"):
    """FC's HTTP-trigger response struct, when the handler returns one."""

    status_code: int
    headers: dict[str, str] = {}
    body: str = ""
    is_base64_encoded: bool = False


def _joined(items: list[tuple[str, str]]) -> dict[str, str]:
    merged: dict[str, str] = {}
    for key, value in items:
        merged[key] = f"{merged[key]},{value}" if key in merged else value
    return merged


def http_event(request: Request, *, path: str, body: bytes, trigger: str, account_id: str, request_id: str) -> bytes:
    """FC's HTTP-trigger event for `request`, as the JSON the handler receives."""
    try:
        text, encoded = body.decode("utf-8"), False
    except UnicodeDecodeError:
        text, encoded = base64.b64encode(body).decode(), True
    now = time.time()
    client = request.client
    event = {
        "version": "v1",
        "rawPath": path,
        "body": text,
        "isBase64Encoded": encoded,
        "headers": _joined([(k.title(), v) for k, v in request.headers.items()]),
        "queryParameters": _joined(list(request.query_params.multi_items())),
        "requestContext": {
            "accountId": account_id,
            "domainName": request.headers.get("host", ""),
            "domainPrefix": trigger,
            "http": {
                "method": request.method,
                "path": path,
                "protocol": f"HTTP/{request.scope.get('http_version', '1.1')}",
                "sourceIp": client.host if client else "",
                "userAgent": request.headers.get("user-agent", ""),
            },
            "requestId": request_id,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "timeEpoch": str(int(now * 1000)),
        },
    }
    return msgspec.json.encode(event)


def http_response(result: bytes, headers: dict[str, str]) -> Response:
    """The response for a function's result: FC's response struct if it is one, else the bytes."""
    try:
        struct = msgspec.json.decode(result, type=_ResponseStruct)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return Response(content=result, status_code=200, headers=headers)
    try:
        body = base64.b64decode(struct.body) if struct.is_base64_encoded else struct.body.encode()
    except (binascii.Error, ValueError):
        body = struct.body.encode()
    out = {k: v for k, v in struct.headers.items() if k.lower() not in _RESPONSE_HEADERS_DROPPED}
    return Response(content=body, status_code=struct.status_code, headers={**out, **headers})


async def _trigger(request: Request, function_name: str, trigger_name: str) -> tuple[TriggerRecord, HttpTriggerConfig]:
    params.check_function_name(function_name)
    triggers = resources_of(request).triggers
    # A name no trigger can have is not looked up (a KV key cannot hold every character).
    well_formed = TRIGGER_NAME_RE.fullmatch(trigger_name) is not None
    record = await triggers.find(function_name, trigger_name) if triggers is not None and well_formed else None
    if record is None or record.trigger_type != TriggerType.HTTP:
        raise TriggerNotFound(f"http trigger {trigger_name[:130]} of function {function_name} does not exist")
    config = record.config()
    assert isinstance(config, HttpTriggerConfig)
    return record, config


@router.api_route(f"{wire.HTTP_TRIGGER_PREFIX}/{{function_name}}/{{trigger_name}}", methods=_ALL_METHODS)
@router.api_route(f"{wire.HTTP_TRIGGER_PREFIX}/{{function_name}}/{{trigger_name}}/{{path:path}}", methods=_ALL_METHODS)
async def http_trigger(function_name: str, trigger_name: str, request: Request, path: str = "") -> Response:
    settings = settings_of(request)
    metrics = metrics_of(request)
    resources = resources_of(request)
    record, config = await _trigger(request, function_name, trigger_name)
    if request.method not in config.methods:
        raise MethodNotAllowed(f"method {request.method} is not allowed by trigger {trigger_name}")
    require_bus(resources)
    # The body becomes (part of) an invocation's payload: a sync payload is the most it can be.
    limit = params.MAX_SYNC_PAYLOAD_BYTES
    if config.auth_type == HttpAuthType.FUNCTION and not settings.auth_disabled:
        body = await signed_body(request, limit=limit)  # headers and nonce before the body, as the API
    else:
        body = await read_body(request, limit=limit)
    # The trigger fires on its qualifier, sync or async, as InvokeFunction with that qualifier
    # would: which version an alias picks is drawn when the invocation runs.
    resolved = await resolve(resources.catalog, function_name, record.qualifier, draw=lambda: MAIN_VERSION_DRAW)
    request_id = request_id_of(request)
    event = http_event(request, path="/" + path, body=body, trigger=trigger_name,
                       account_id=settings.common.account_id, request_id=request_id)
    labels = {"function": function_name, "trigger": trigger_name, "trigger_type": str(TriggerType.HTTP)}
    invocation = params.parse_invocation_type(request.headers.get(wire.FC_INVOCATION_TYPE_HEADER))
    if invocation == "Sync":
        await refuse_if_blocked(resources, function_name)
        result, headers = await call_function(resolved.function, event, nc=resources.nc, request_id=request_id,
                                              metrics=metrics, qualifier=resolved.qualifier)
        metrics.trigger_events.labels(**labels, outcome="invoked").inc()
        if wire.FC_ERROR_TYPE_HEADER in headers:
            # The handler failed: FC's error JSON, with a status a browser or client treats as one.
            return Response(content=result, status_code=502, headers=headers, media_type="application/json")
        return http_response(result, headers)
    try:
        check_payload_size(event, limit=MAX_ASYNC_PAYLOAD_BYTES)
        task_id = choose_task_id(task_id_header=request.headers.get(wire.FC_TASK_ID_HEADER),
                                 request_id_header=request.headers.get(wire.FC_REQUEST_ID_HEADER))
        note_task_id(request, task_id)  # on every answer from here on, as InvokeFunction's
        admission = Admission(function=function_name, task_id=task_id, payload=event, request_id=request_id,
                              qualifier=resolved.qualifier, delay_s=parse_delay(request.headers.get(wire.FC_DELAY_HEADER)))
        await submit(resources.events, admission, await resources.catalog.find_async_config(function_name))
    except TaskmodeError as err:
        metrics.trigger_events.labels(**labels, outcome="duplicate" if err.http_status == 409 else "rejected").inc()
        raise
    metrics.trigger_events.labels(**labels, outcome="submitted").inc()
    log.info("task submitted", extra={"task_id": task_id, "function": function_name, "trigger": trigger_name,
                                      "status": str(Status.ENQUEUED), "request_id": request_id})
    return Response(status_code=202, headers={wire.FC_REQUEST_ID_HEADER: request_id, wire.FC_TASK_ID_HEADER: task_id})
