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
from shared.errors import (
    EntityTooLarge,
    FunctionNotFound,
    ServiceUnavailable,
    TaskAlreadyExists,
)
from shared.submission import Admission, submit
from shared.transitions import Status
from services.gateway import params as validation
from services.gateway.context import request_id_of
from services.gateway.deps import body_of, metrics_of, resources_of
from services.gateway.errors import InvocationTimeout, reported_error
from services.gateway.metrics import GatewayMetrics
from shared.wire import (
    FC_DELAY_HEADER as DELAY_HEADER,
    FC_ERROR_TYPE_HEADER as ERROR_TYPE_HEADER,
    FC_INSTANCE_ID_HEADER as INSTANCE_ID_HEADER,
    FC_INVOCATION_TYPE_HEADER as INVOCATION_TYPE_HEADER,
    FC_REQUEST_ID_HEADER as REQUEST_ID_HEADER,
    FC_TASK_ID_HEADER as TASK_ID_HEADER,
)

log = logging.getLogger(__name__)

router = APIRouter()

# How much longer than the function's own timeout we wait for the executor's reply.
SYNC_REPLY_SLACK_S = 5.0


@router.post("/functions/{function_name}/invocations")
async def invoke_function(function_name: str, request: Request, qualifier: str | None = None) -> Response:
    validation.check_function_name(function_name)
    invocation_type = validation.parse_invocation_type(request.headers.get(INVOCATION_TYPE_HEADER))
    resolved_qualifier = validation.check_qualifier(qualifier)
    function = await resources_of(request).catalog.find_function(function_name)
    if function is None:
        if invocation_type == "Async":
            metrics_of(request).submissions.labels(outcome="rejected").inc()
        raise FunctionNotFound(f"function {function_name} does not exist")
    if invocation_type == "Async":
        return await _submit(request, function, qualifier=resolved_qualifier)
    return await _invoke_sync(request, function)


async def _submit(request: Request, function: FunctionRecord, *, qualifier: str) -> Response:
    """Enqueue a task: everything is checked before the single append that creates it."""
    metrics = metrics_of(request)
    resources = resources_of(request)
    payload = body_of(request)
    request_id = request_id_of(request)
    name = function.function_name
    try:
        validation.check_payload_size(payload, limit=validation.MAX_ASYNC_PAYLOAD_BYTES)
        task_id = validation.choose_task_id(
            task_id_header=request.headers.get(TASK_ID_HEADER),
            request_id_header=request.headers.get(REQUEST_ID_HEADER),
        )
        delay_s = validation.parse_delay(request.headers.get(DELAY_HEADER))
    except Exception:
        metrics.submissions.labels(outcome="rejected").inc()
        raise
    config = await resources.catalog.find_async_config(name)
    admission = Admission(function=name, task_id=task_id, payload=payload, request_id=request_id,
                          qualifier=qualifier, delay_s=delay_s)
    try:
        if await submit(resources.events, admission, config):
            metrics.dispatched.labels(name).inc()
    except TaskAlreadyExists:
        metrics.submissions.labels(outcome="duplicate").inc()
        log.info(
            "task submission refused: duplicate task id",
            extra={"task_id": task_id, "function": name, "status": "Rejected", "request_id": request_id},
        )
        raise
    metrics.submissions.labels(outcome="enqueued").inc()
    log.info(
        "task submitted",
        extra={
            "task_id": task_id,
            "function": name,
            "status": str(Status.ENQUEUED),
            "request_id": request_id,
            "delay_s": delay_s,
            "payload_bytes": len(payload),
        },
    )
    return Response(status_code=202, headers={REQUEST_ID_HEADER: request_id, TASK_ID_HEADER: task_id})


async def _invoke_sync(request: Request, function: FunctionRecord) -> Response:
    request_id = request_id_of(request)
    data, response_headers = await call_function(
        function, body_of(request), nc=resources_of(request).nc, request_id=request_id, metrics=metrics_of(request))
    return Response(
        content=data, status_code=200, headers=response_headers, media_type="application/octet-stream"
    )


async def call_function(function: FunctionRecord, payload: bytes, *, nc: Client, request_id: str,
                        metrics: GatewayMetrics) -> tuple[bytes, dict[str, str]]:
    """Run `function` synchronously on an executor: its result and the FC response headers."""
    validation.check_payload_size(payload, limit=validation.MAX_SYNC_PAYLOAD_BYTES)
    name = function.function_name
    try:
        reply = await nc.request(
            wire.sync_invoke_subject(name),
            payload,
            timeout=function.timeout + SYNC_REPLY_SLACK_S,
            headers={wire.REQUEST_ID_HEADER: request_id},
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
    error_type = headers.get(wire.REPLY_ERROR_TYPE, "")
    if error_type:
        # FC answers 200 for a handler error and says so in x-fc-error-type.
        response_headers[ERROR_TYPE_HEADER] = error_type
    metrics.sync_invocations.labels(outcome="handler_error" if error_type else "ok").inc()
    return reply.data, response_headers
