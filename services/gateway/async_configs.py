"""Put/Get/DeleteAsyncInvokeConfig and ListAsyncInvokeConfigs, one config per qualifier.

As in FC, LATEST, each version and each alias have their own config: a task takes the config of
the qualifier it was submitted with (none put: FC's defaults), never another qualifier's.
"""

from __future__ import annotations

import logging
import re
from typing import Final

from fastapi import APIRouter, Response

from services.gateway import openapi, params
from services.gateway.deps import BodyDep, ResourcesDep, SettingsDep
from services.gateway.settings import GatewaySettings
from services.gateway.errors import json_response
from services.gateway.schemas import PutAsyncInvokeConfigInput, decode_json
from shared.catalog import AsyncConfigRecord, DestinationConfig, async_config_key, function_arn
from shared.destinations import FunctionTarget, parse_destination
from shared.errors import InvalidArgument
from shared.ports import FunctionCatalog
from shared.events import DEFAULT_MAX_EVENT_AGE_S, DEFAULT_MAX_RETRIES
from shared.qualifiers import MAIN_VERSION_DRAW, resolve

log = logging.getLogger(__name__)

router = APIRouter()

_CONFIG_KEY_RE: Final = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_-]{0,63}(\.[A-Za-z0-9_-]{1,128})?$")


async def _existing_qualifier(resources: ResourcesDep, function_name: str, qualifier: str | None) -> str:
    """The qualifier, once it is known to name something (404 FunctionNotFound / VersionNotFound /
    AliasNotFound otherwise)."""
    params.check_function_name(function_name)
    checked = params.check_qualifier(qualifier)
    await resolve(resources.catalog, function_name, checked, draw=lambda: MAIN_VERSION_DRAW)
    return checked


@router.put("/functions/{function_name}/async-invoke-config",
            openapi_extra=openapi.request_body(PutAsyncInvokeConfigInput))
async def put_async_invoke_config(
    function_name: str, resources: ResourcesDep, settings: SettingsDep, raw: BodyDep, qualifier: str | None = None
) -> Response:
    body = decode_json(raw, PutAsyncInvokeConfigInput)
    checked = await _existing_qualifier(resources, function_name, qualifier)
    catalog = resources.catalog
    await _check_destinations(body.destination_config, function=function_name, catalog=catalog, settings=settings)
    existing = await catalog.find_async_config(function_name, checked)
    now = params.format_time()
    # A put replaces the whole config (omitted fields take their defaults), like FC; only the
    # creation time survives.
    record = AsyncConfigRecord(
        function_arn=function_arn(region=settings.common.region, account_id=settings.common.account_id,
                                  function=function_name, qualifier=checked),
        qualifier=checked,
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
            "qualifier": checked,
            "async_task": record.async_task,
            "max_event_age_s": record.max_async_event_age_in_seconds,
            "max_retries": record.max_async_retry_attempts,
        },
    )
    return json_response(record)


async def _check_destinations(config: DestinationConfig | None, *, function: str, catalog: FunctionCatalog,
                              settings: GatewaySettings) -> None:
    """Every destination must parse and exist; a function may not be its own destination."""
    if config is None:
        return
    for name, entry in (("onSuccess", config.on_success), ("onFailure", config.on_failure)):
        if entry is None or not entry.destination:
            continue
        try:
            target = parse_destination(entry.destination, region=settings.common.region,
                                       account_id=settings.common.account_id)
        except InvalidArgument as err:
            raise InvalidArgument(f"destinationConfig.{name}: {err.message}") from err
        if isinstance(target, FunctionTarget):
            if target.function == function:
                raise InvalidArgument(f"destinationConfig.{name}: a function cannot be its own destination")
            if await catalog.find_function(target.function) is None:
                raise InvalidArgument(f"destinationConfig.{name}: function {target.function} does not exist")


@router.get("/functions/{function_name}/async-invoke-config")
async def get_async_invoke_config(function_name: str, resources: ResourcesDep, qualifier: str | None = None) -> Response:
    checked = await _existing_qualifier(resources, function_name, qualifier)
    return json_response(await resources.catalog.get_async_config(function_name, checked))


@router.delete("/functions/{function_name}/async-invoke-config", status_code=204)
async def delete_async_invoke_config(function_name: str, resources: ResourcesDep, qualifier: str | None = None) -> Response:
    checked = await _existing_qualifier(resources, function_name, qualifier)
    await resources.catalog.delete_async_config(function_name, checked)
    log.info("async invoke config deleted", extra={"function": function_name, "qualifier": checked})
    return Response(status_code=204)


@router.get("/async-invoke-configs")
async def list_async_invoke_configs(
    resources: ResourcesDep, functionName: str | None = None, limit: str | None = None, nextToken: str | None = None
) -> Response:
    page_size = params.parse_limit(limit)
    after = params.decode_token(nextToken, pattern=_CONFIG_KEY_RE)
    configs = {
        async_config_key(name, record.qualifier): record
        for name, record in await resources.catalog.list_async_configs()
        if not functionName or name == functionName
    }
    page, token = params.paginate(sorted(configs), after=after, limit=page_size)
    return json_response({"configs": [configs[key] for key in page], "nextToken": token})
