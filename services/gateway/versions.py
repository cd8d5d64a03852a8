"""PublishFunctionVersion, ListFunctionVersions, DeleteFunctionVersion."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response

from services.gateway import params
from services.gateway.deps import BodyDep, Resources, ResourcesDep
from services.gateway.errors import json_response
from services.gateway.schemas import PublishVersionInput, decode_json
from shared.errors import InvalidArgument, VersionNotFound
from shared.qualifiers import VERSION_ID_RE
from shared.versions import Versions

log = logging.getLogger(__name__)

router = APIRouter()


def versions_of(resources: Resources) -> Versions:
    versions = resources.catalog.versions
    if versions is None:  # only a catalog built by hand in a test lacks them
        raise VersionNotFound("this catalog keeps no versions")
    return versions


@router.post("/functions/{function_name}/versions")
async def publish_function_version(function_name: str, resources: ResourcesDep, raw: BodyDep) -> Response:
    params.check_function_name(function_name)
    body = decode_json(raw, PublishVersionInput) if raw.strip() else PublishVersionInput()
    function = await resources.catalog.get_function(function_name)
    version = await versions_of(resources).publish(function, description=body.description or "",
                                                   now=params.format_time())
    log.info("version published", extra={"function": function_name, "version_id": version.version_id})
    return json_response(version.view())


@router.get("/functions/{function_name}/versions")
async def list_function_versions(
    function_name: str, resources: ResourcesDep, limit: str | None = None, nextToken: str | None = None,
    direction: str | None = None,
) -> Response:
    params.check_function_name(function_name)
    page_size = params.parse_limit(limit)
    order = (direction or "BACKWARD").upper()
    if order not in ("FORWARD", "BACKWARD"):
        raise InvalidArgument(f"invalid direction {direction[:20] if direction else ''!r}: use FORWARD or BACKWARD")
    after = params.decode_version_token(nextToken)
    await resources.catalog.get_function(function_name)
    versions = await versions_of(resources).list_versions(function_name)
    if order == "BACKWARD":  # FC's default: newest first
        versions.reverse()
    if after is not None:
        versions = [v for v in versions if (int(v.version_id) > after if order == "FORWARD" else int(v.version_id) < after)]
    page = versions[:page_size]
    token = params.encode_version_token(int(page[-1].version_id)) if len(versions) > page_size else ""
    return json_response({"versions": [v.view() for v in page], "direction": order, "nextToken": token})


@router.delete("/functions/{function_name}/versions/{version_id}", status_code=204)
async def delete_function_version(function_name: str, version_id: str, resources: ResourcesDep) -> Response:
    params.check_function_name(function_name)
    await resources.catalog.get_function(function_name)
    if not VERSION_ID_RE.fullmatch(version_id):
        raise VersionNotFound(f"version {version_id[:40]!r} of function {function_name} does not exist")
    await versions_of(resources).delete_version(function_name, version_id)
    if await resources.catalog.find_async_config(function_name, version_id) is not None:
        await resources.catalog.delete_async_config(function_name, version_id)  # configs go with their qualifier
    log.info("version deleted", extra={"function": function_name, "version_id": version_id})
    return Response(status_code=204)
