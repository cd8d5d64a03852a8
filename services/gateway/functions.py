"""CreateFunction, GetFunction, ListFunctions, UpdateFunction, DeleteFunction."""

from __future__ import annotations

import asyncio
import logging
import uuid

import msgspec
from fastapi import APIRouter, Response

from services.gateway import function_records, openapi, params
from services.gateway.deps import BodyDep, ResourcesDep, SettingsDep
from services.gateway.errors import json_response
from services.gateway.schemas import CreateFunctionInput, UpdateFunctionInput, decode_json
from shared.catalog import function_arn
from shared.errors import ConcurrentUpdateError

log = logging.getLogger(__name__)

router = APIRouter()

_UPDATE_ATTEMPTS = 5


@router.post("/functions", openapi_extra=openapi.request_body(CreateFunctionInput))
async def create_function(resources: ResourcesDep, settings: SettingsDep, raw: BodyDep) -> Response:
    body = decode_json(raw, CreateFunctionInput)
    params.check_function_name(body.function_name)
    code = await asyncio.to_thread(function_records.decode_code, body.code, required=True)
    assert code is not None
    record = function_records.build_function(
        body,
        function_id=str(uuid.uuid4()),
        arn=function_arn(
            region=settings.common.region, account_id=settings.common.account_id, function=body.function_name
        ),
        code=code,
        now=params.format_time(),
    )
    catalog = resources.catalog
    # Code first: an orphaned archive (content-addressed) is harmless, a record without code is not.
    await catalog.put_code(code.checksum, code.data)
    await catalog.create_function(record)
    log.info("function created", extra={"function": record.function_name, "runtime": record.runtime})
    return json_response(msgspec.to_builtins(record))


@router.get("/functions/{function_name}")
async def get_function(function_name: str, resources: ResourcesDep) -> Response:
    params.check_function_name(function_name)
    record = await resources.catalog.get_function(function_name)
    return json_response(msgspec.to_builtins(record))


@router.get("/functions")
async def list_functions(
    resources: ResourcesDep, prefix: str | None = None, limit: str | None = None, nextToken: str | None = None
) -> Response:
    page_size = params.parse_limit(limit)
    after = params.decode_token(nextToken)
    records = {r.function_name: r for r in await resources.catalog.list_functions()}
    names = sorted(n for n in records if not prefix or n.startswith(prefix))
    page, token = params.paginate(names, after=after, limit=page_size)
    return json_response({"functions": [msgspec.to_builtins(records[n]) for n in page], "nextToken": token})


@router.put("/functions/{function_name}", openapi_extra=openapi.request_body(UpdateFunctionInput))
async def update_function(function_name: str, resources: ResourcesDep, raw: BodyDep) -> Response:
    params.check_function_name(function_name)
    body = decode_json(raw, UpdateFunctionInput)
    code = await asyncio.to_thread(function_records.decode_code, body.code, required=False)
    catalog = resources.catalog
    for attempt in range(_UPDATE_ATTEMPTS):
        current, revision = await catalog.get_function_versioned(function_name)
        # Checked in full (custom runtime needs a command, ...) before anything is written.
        updated = function_records.apply_update(current, body, code=code, now=params.format_time())
        if code is not None and attempt == 0:
            await catalog.put_code(code.checksum, code.data)
        try:
            await catalog.replace_function(updated, revision=revision)
        except ConcurrentUpdateError:
            if attempt == _UPDATE_ATTEMPTS - 1:
                raise
            continue
        log.info("function updated", extra={"function": function_name})
        return json_response(msgspec.to_builtins(updated))
    raise AssertionError("unreachable")


@router.delete("/functions/{function_name}", status_code=204)
async def delete_function(function_name: str, resources: ResourcesDep) -> Response:
    params.check_function_name(function_name)
    await resources.catalog.delete_function(function_name)
    log.info("function deleted", extra={"function": function_name})
    return Response(status_code=204)
