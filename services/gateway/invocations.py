"""InvokeFunction: `Async` appends a task's first event, `Sync` asks an executor over NATS."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request, Response
from nats.aio.client import Client
from nats.errors import MaxPayloadError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from shared import wire
from shared.catalog import FunctionRecord
from shared.errors import EntityTooLarge, ServiceUnavailable, TaskmodeError
from shared.qualifiers import MAIN_VERSION_DRAW, resolve
from services.gateway import openapi, params as validation
from services.gateway.context import note_task_id, request_id_of, task_id_of
from services.gateway.deps import body_of, metrics_of, resources_of
from services.gateway.errors import InvocationTimeout, reported_error
from services.gateway.flow_control import refuse_if_blocked
from services.gateway.metrics import GatewayMetrics
from services.gateway.submission import submit_task
from shared.wire import (
    FC_ERROR_TYPE_HEADER as ERROR_TYPE_HEADER,
    FC_INSTANCE_ID_HEADER as INSTANCE_ID_HEADER,
    FC_INVOCATION_TYPE_HEADER as INVOCATION_TYPE_HEADER,
    FC_LOG_RESULT_HEADER as LOG_RESULT_HEADER,
    FC_LOG_TYPE_HEADER as LOG_TYPE_HEADER,
    FC_REQUEST_ID_HEADER as REQUEST_ID_HEADER,
    FC_STATEFUL_INVOCATION_ID_HEADER as STATEFUL_ID_HEADER,
    FC_TASK_ID_HEADER as TASK_ID_HEADER,
)

log = logging.getLogger(__name__)

router = APIRouter()

# How much longer than the function's own timeout we wait for the executor's reply.
SYNC_REPLY_SLACK_S = 5.0


@router.post("/functions/{function_name}/invocations", openapi_extra=openapi.invocation())
async def invoke_function(function_name: str, request: Request, qualifier: str | None = None) -> Response:
    validation.check_function_name(function_name)
    invocation_type = validation.parse_invocation_type(request.headers.get(INVOCATION_TYPE_HEADER))
    log_tail = validation.parse_log_type(request.headers.get(LOG_TYPE_HEADER))
    try:
        checked_qualifier = validation.check_qualifier(qualifier)
        # Only whether the qualifier names something: which version runs is decided when the
        # invocation runs (an alias may be repointed meanwhile, and splits calls by weight).
        resolved = await resolve(resources_of(request).catalog, function_name, checked_qualifier,
                                 draw=lambda: MAIN_VERSION_DRAW)
    except Exception:
        if invocation_type == "Async":
            metrics_of(request).submissions.labels(outcome="rejected").inc()
        raise
    if invocation_type == "Async":
        return await _submit(request, resolved.function, qualifier=resolved.qualifier)
    return await _invoke_sync(request, resolved.function, qualifier=resolved.qualifier, log_tail=log_tail)


async def _submit(request: Request, function: FunctionRecord, *, qualifier: str) -> Response:
    request_id = request_id_of(request)
    task_id = await submit_task(resources_of(request), metrics_of(request), function=function,
                                payload=body_of(request), headers=request.headers, request_id=request_id,
                                qualifier=qualifier, chosen=lambda task_id: note_task_id(request, task_id),
                                task_id=task_id_of(request) or None)
    headers = {REQUEST_ID_HEADER: request_id, TASK_ID_HEADER: task_id}
    if request.headers.get(STATEFUL_ID_HEADER, "").strip():
        headers[STATEFUL_ID_HEADER] = task_id  # FC 2.0 clients read it back under its own name
    return Response(status_code=202, headers=headers)


async def _invoke_sync(request: Request, function: FunctionRecord, *, qualifier: str, log_tail: bool) -> Response:
    request_id = request_id_of(request)
    try:
        await refuse_if_blocked(resources_of(request), function.function_name)
    except TaskmodeError:
        metrics_of(request).sync_invocations.labels(outcome="blocked").inc()
        raise
    data, response_headers = await call_function(
        function, body_of(request), nc=resources_of(request).nc, request_id=request_id, metrics=metrics_of(request),
        qualifier=qualifier, log_tail=log_tail)
    return Response(
        content=data, status_code=200, headers=response_headers, media_type="application/octet-stream"
    )


async def call_function(function: FunctionRecord, payload: bytes, *, nc: Client, request_id: str,
                        metrics: GatewayMetrics, qualifier: str = wire.LATEST,
                        log_tail: bool = False) -> tuple[bytes, dict[str, str]]:
    """Run `function` synchronously on an executor: its result and the FC response headers."""
    validation.check_payload_size(payload, limit=validation.MAX_SYNC_PAYLOAD_BYTES)
    name = function.function_name
    try:
        reply = await nc.request(
            wire.sync_invoke_subject(name),
            payload,
            timeout=function.timeout + SYNC_REPLY_SLACK_S,
            headers={wire.REQUEST_ID_HEADER: request_id, wire.REQUEST_QUALIFIER: qualifier,
                     wire.REQUEST_LOG_TAIL: "1" if log_tail else ""},
        )
    except NoRespondersError as err:
        metrics.sync_invocations.labels(outcome="no_responders").inc()
        raise ServiceUnavailable(f"no executor is available to run function {name}") from err
    except (NatsTimeoutError, asyncio.TimeoutError) as err:
        metrics.sync_invocations.labels(outcome="timeout").inc()
        raise InvocationTimeout(
            f"function {name} did not answer within {function.timeout + SYNC_REPLY_SLACK_S:g} seconds"
        ) from err
    except MaxPayloadError as err:
        metrics.sync_invocations.labels(outcome="rejected").inc()
        raise EntityTooLarge(f"payload size exceeds the bus limit ({nc.max_payload} bytes)") from err
    headers = reply.headers or {}
    system_error = headers.get(wire.REPLY_SYSTEM_ERROR, "")
    if system_error:
        metrics.sync_invocations.labels(outcome="system_error").inc()
        raise reported_error(system_error, reply.data.decode("utf-8", errors="replace"))
    response_headers = {REQUEST_ID_HEADER: request_id}
    instance_id = headers.get(wire.REPLY_INSTANCE_ID, "")
    if instance_id:
        response_headers[INSTANCE_ID_HEADER] = instance_id
    if log_tail:
        response_headers[LOG_RESULT_HEADER] = headers.get(wire.REPLY_LOG_TAIL, "")
    error_type = headers.get(wire.REPLY_ERROR_TYPE, "")
    if error_type:
        # FC answers 200 for a handler error and says so in x-fc-error-type.
        response_headers[ERROR_TYPE_HEADER] = error_type
    metrics.sync_invocations.labels(outcome="handler_error" if error_type else "ok").inc()
    return reply.data, response_headers
