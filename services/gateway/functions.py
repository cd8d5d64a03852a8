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
from services.gateway.handler_check import check_handler_in_archive
from services.gateway.schemas import CreateFunctionInput, UpdateFunctionInput, decode_json
from shared.catalog import FunctionRecord, function_arn, function_view
from shared.errors import ConcurrentUpdateError, InvalidArgument
from shared.function_fields import Tag
from shared.qualifiers import MAIN_VERSION_DRAW, resolve

log = logging.getLogger(__name__)

router = APIRouter()

_UPDATE_ATTEMPTS = 5
_decode_tags = msgspec.json.Decoder(list[Tag]).decode


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
    return json_response(function_view(record))


@router.get("/functions/{function_name}")
async def get_function(function_name: str, resources: ResourcesDep, qualifier: str | None = None) -> Response:
    params.check_function_name(function_name)
    resolved = await resolve(resources.catalog, function_name, params.check_qualifier(qualifier),
                             draw=lambda: MAIN_VERSION_DRAW)
    return json_response(function_view(resolved.function))


def _matches(
    record: FunctionRecord, *, prefix: str | None, runtime: str | None, description: str | None,
    name_part: str | None, tags: list[Tag], resource_group: str | None, gpu_type: str | None,
) -> bool:
    """ListFunctions' filters: every one given must hold (tags: each tag given must be set)."""
    settings = record.settings
    own_tags = {tag.Key: tag.Value for tag in settings.tags or []}
    return (
        (not prefix or record.function_name.startswith(prefix))
        and (not name_part or name_part in record.function_name)
        and (not runtime or record.runtime == runtime)
        and (not description or description in record.description)
        and all(tag.Key in own_tags and (not tag.Value or own_tags[tag.Key] == tag.Value) for tag in tags)
        and (not resource_group or settings.resource_group_id == resource_group)
        and (not gpu_type or (settings.gpu_config or {}).get("gpuType") == gpu_type)
    )


def _parse_tags(value: str | None) -> list[Tag]:
    """`tags` as the SDK sends it: a JSON list of {"Key", "Value"}."""
    if not value:
        return []
    try:
        return _decode_tags(value)
    except msgspec.DecodeError as err:
        raise InvalidArgument(f'invalid tags {value[:80]!r}: a JSON list of {{"Key": ..., "Value": ...}} is required') from err


@router.get("/functions")
async def list_functions(
    resources: ResourcesDep,
    prefix: str | None = None,
    limit: str | None = None,
    nextToken: str | None = None,
    runtime: str | None = None,
    description: str | None = None,
    functionName: str | None = None,
    tags: str | None = None,
    resourceGroupId: str | None = None,
    gpuType: str | None = None,
    fcVersion: str | None = None,
) -> Response:
    page_size = params.parse_limit(limit)
    after = params.decode_token(nextToken)
    wanted_tags = _parse_tags(tags)
    if fcVersion not in (None, "", "v3", "v2"):
        raise InvalidArgument(f"invalid fcVersion {fcVersion[:20]!r}: use v3 or v2")
    records = {
        r.function_name: r
        for r in await resources.catalog.list_functions()
        if fcVersion != "v2"  # every function here is an FC 3.0 function
        and _matches(r, prefix=prefix, runtime=runtime, description=description, name_part=functionName,
                     tags=wanted_tags, resource_group=resourceGroupId, gpu_type=gpuType)
    }
    page, token = params.paginate(sorted(records), after=after, limit=page_size)
    return json_response({"functions": [function_view(records[n]) for n in page], "nextToken": token})


@router.put("/functions/{function_name}", openapi_extra=openapi.request_body(UpdateFunctionInput))
async def update_function(function_name: str, resources: ResourcesDep, raw: BodyDep) -> Response:
    params.check_function_name(function_name)
    body = decode_json(raw, UpdateFunctionInput)
    code = await asyncio.to_thread(function_records.decode_code, body.code, required=False)
    catalog = resources.catalog
    for attempt in range(_UPDATE_ATTEMPTS):
        current, revision = await catalog.get_function_versioned(function_name)
        # Checked in full (custom runtime needs a command, handler in the zip, ...) before
        # anything is written.
        updated = function_records.apply_update(current, body, code=code, now=params.format_time())
        if function_records.needs_handler_check(body):
            archive = code.data if code is not None else await catalog.get_code(current.code_key)
            check_handler_in_archive(runtime=updated.runtime, handler=updated.handler, archive=archive)
        if code is not None and attempt == 0:
            await catalog.put_code(code.checksum, code.data)
        try:
            await catalog.replace_function(updated, revision=revision)
        except ConcurrentUpdateError:
            if attempt == _UPDATE_ATTEMPTS - 1:
                raise
            continue
        log.info("function updated", extra={"function": function_name})
        return json_response(function_view(updated))
    raise AssertionError("unreachable")


@router.delete("/functions/{function_name}", status_code=204)
async def delete_function(function_name: str, resources: ResourcesDep) -> Response:
    params.check_function_name(function_name)
    await resources.catalog.delete_function(function_name)
    if resources.triggers is not None:  # a deleted function's triggers go with it
        await resources.triggers.delete_all(function_name)
    if resources.flow is not None:  # its concurrency and scaling configs go with it, as in FC
        await resources.flow.delete_all(function_name)
    log.info("function deleted", extra={"function": function_name})
    return Response(status_code=204)
