"""Put/Get/DeleteAsyncInvokeConfig and ListAsyncInvokeConfigs (LATEST semantics only)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response

from services.gateway import openapi, params
from services.gateway.deps import BodyDep, ResourcesDep
from services.gateway.errors import json_response
from services.gateway.schemas import PutAsyncInvokeConfigInput, decode_json
from shared.catalog import AsyncConfigRecord
from shared.events import DEFAULT_MAX_EVENT_AGE_S, DEFAULT_MAX_RETRIES

log = logging.getLogger(__name__)

router = APIRouter()


@router.put("/functions/{function_name}/async-invoke-config",
            openapi_extra=openapi.request_body(PutAsyncInvokeConfigInput))
async def put_async_invoke_config(
    function_name: str, resources: ResourcesDep, raw: BodyDep, qualifier: str | None = None
) -> Response:
    params.check_function_name(function_name)
    params.check_qualifier(qualifier)
    body = decode_json(raw, PutAsyncInvokeConfigInput)
    catalog = resources.catalog
    function = await catalog.get_function(function_name)
    existing = await catalog.find_async_config(function_name)
    now = params.format_time()
    # A put replaces the whole config (omitted fields take their defaults), like FC; only the
    # creation time survives.
    record = AsyncConfigRecord(
        function_arn=function.function_arn,
        async_task=bool(body.async_task),
        max_async_event_age_in_seconds=(
            body.max_async_event_age_in_seconds
            if body.max_async_event_age_in_seconds is not None
            else DEFAULT_MAX_EVENT_AGE_S
        ),
        max_async_retry_attempts=(
            body.max_async_retry_attempts if body.max_async_retry_attempts is not None else DEFAULT_MAX_RETRIES
        ),
        destination_config=body.destination_config,
        created_time=existing.created_time if existing is not None and existing.created_time else now,
        last_modified_time=now,
    )
    await catalog.put_async_config(function_name, record)
    log.info(
        "async invoke config put",
        extra={
            "function": function_name,
            "async_task": record.async_task,
            "max_event_age_s": record.max_async_event_age_in_seconds,
            "max_retries": record.max_async_retry_attempts,
        },
    )
    return json_response(record)


@router.get("/functions/{function_name}/async-invoke-config")
async def get_async_invoke_config(function_name: str, resources: ResourcesDep, qualifier: str | None = None) -> Response:
    params.check_function_name(function_name)
    params.check_qualifier(qualifier)
    catalog = resources.catalog
    await catalog.get_function(function_name)
    return json_response(await catalog.get_async_config(function_name))


@router.delete("/functions/{function_name}/async-invoke-config", status_code=204)
async def delete_async_invoke_config(function_name: str, resources: ResourcesDep, qualifier: str | None = None) -> Response:
    params.check_function_name(function_name)
    params.check_qualifier(qualifier)
    catalog = resources.catalog
    await catalog.get_function(function_name)
    await catalog.delete_async_config(function_name)
    log.info("async invoke config deleted", extra={"function": function_name})
    return Response(status_code=204)


@router.get("/async-invoke-configs")
async def list_async_invoke_configs(
    resources: ResourcesDep, functionName: str | None = None, limit: str | None = None, nextToken: str | None = None
) -> Response:
    page_size = params.parse_limit(limit)
    after = params.decode_token(nextToken)
    configs = dict(await resources.catalog.list_async_configs())
    names = sorted(n for n in configs if not functionName or n == functionName)
    page, token = params.paginate(names, after=after, limit=page_size)
    return json_response({"configs": [configs[n] for n in page], "nextToken": token})
