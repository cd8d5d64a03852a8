"""CreateAlias, GetAlias, UpdateAlias, DeleteAlias, ListAliases.

An alias names a version and may send a share of its calls to one other version
(`additionalVersionWeight`, `{"<versionId>": 0.1}`): a canary. Everything an alias refers to is
checked before it is written.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import msgspec
from fastapi import APIRouter, Response

from services.gateway import params
from services.gateway.deps import BodyDep, ResourcesDep
from services.gateway.errors import json_response
from services.gateway.schemas import CreateAliasInput, UpdateAliasInput, decode_json
from services.gateway.versions import versions_of
from shared.errors import AliasNotFound, ConcurrentUpdateError, InvalidArgument
from shared.qualifiers import ALIAS_NAME_RE, VERSION_ID_RE
from shared.versions import AliasRecord, Versions
from shared.wire import LATEST

log = logging.getLogger(__name__)

router = APIRouter()

_UPDATE_ATTEMPTS: Final = 5


def _check_alias_name(name: str) -> str:
    if name == LATEST or not ALIAS_NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"invalid alias name {name[:80]!r}: it must match {ALIAS_NAME_RE.pattern} and not be LATEST"
        )
    return name


async def _checked(versions: Versions, function: str, record: AliasRecord) -> AliasRecord:
    """`record` if every version it names exists and its weights make sense."""
    if not VERSION_ID_RE.fullmatch(record.version_id):
        raise InvalidArgument(f"invalid versionId {record.version_id[:40]!r}: a published version id is required")
    await versions.get_version(function, record.version_id)
    weights = record.additional_version_weight
    if len(weights) > 1:
        raise InvalidArgument("additionalVersionWeight may name one version besides versionId")
    for version_id, weight in weights.items():
        if version_id == record.version_id:
            raise InvalidArgument("additionalVersionWeight must name a version other than versionId")
        if not VERSION_ID_RE.fullmatch(version_id):
            raise InvalidArgument(f"invalid version id {version_id[:40]!r} in additionalVersionWeight")
        if not 0 <= weight <= 1:
            raise InvalidArgument(f"weight {weight} of version {version_id} is out of range [0, 1]")
        await versions.get_version(function, version_id)
    return record


def _view(record: AliasRecord) -> dict[str, Any]:
    view: dict[str, Any] = msgspec.to_builtins(record)
    return view


@router.post("/functions/{function_name}/aliases")
async def create_alias(function_name: str, resources: ResourcesDep, raw: BodyDep) -> Response:
    params.check_function_name(function_name)
    body = decode_json(raw, CreateAliasInput)
    _check_alias_name(body.alias_name)
    if body.version_id is None:
        raise InvalidArgument("versionId is required")
    await resources.catalog.get_function(function_name)
    versions = versions_of(resources)
    now = params.format_time()
    record = await _checked(versions, function_name, AliasRecord(
        alias_name=body.alias_name, version_id=body.version_id, description=body.description or "",
        additional_version_weight=dict(body.additional_version_weight or {}), created_time=now,
        last_modified_time=now,
    ))
    await versions.create_alias(function_name, record)
    log.info("alias created", extra={"function": function_name, "alias": record.alias_name,
                                     "version_id": record.version_id})
    return json_response(_view(record))


@router.get("/functions/{function_name}/aliases/{alias_name}")
async def get_alias(function_name: str, alias_name: str, resources: ResourcesDep) -> Response:
    params.check_function_name(function_name)
    await resources.catalog.get_function(function_name)
    if not ALIAS_NAME_RE.fullmatch(alias_name):
        raise AliasNotFound(f"alias {alias_name[:80]!r} of function {function_name} does not exist")
    return json_response(_view(await versions_of(resources).get_alias(function_name, alias_name)))


@router.put("/functions/{function_name}/aliases/{alias_name}")
async def update_alias(function_name: str, alias_name: str, resources: ResourcesDep, raw: BodyDep) -> Response:
    params.check_function_name(function_name)
    body = decode_json(raw, UpdateAliasInput)
    await resources.catalog.get_function(function_name)
    if not ALIAS_NAME_RE.fullmatch(alias_name):
        raise AliasNotFound(f"alias {alias_name[:80]!r} of function {function_name} does not exist")
    versions = versions_of(resources)
    for attempt in range(_UPDATE_ATTEMPTS):
        current, revision = await versions.get_alias_versioned(function_name, alias_name)
        changes: dict[str, Any] = {"last_modified_time": params.format_time()}
        if body.version_id is not None:
            changes["version_id"] = body.version_id
        if body.description is not None:
            changes["description"] = body.description
        if body.additional_version_weight is not None:
            changes["additional_version_weight"] = dict(body.additional_version_weight)
        updated = await _checked(versions, function_name, msgspec.structs.replace(current, **changes))
        try:
            await versions.replace_alias(function_name, updated, revision=revision)
        except ConcurrentUpdateError:
            if attempt == _UPDATE_ATTEMPTS - 1:
                raise
            continue
        log.info("alias updated", extra={"function": function_name, "alias": alias_name,
                                         "version_id": updated.version_id})
        return json_response(_view(updated))
    raise AssertionError("unreachable")


@router.delete("/functions/{function_name}/aliases/{alias_name}", status_code=204)
async def delete_alias(function_name: str, alias_name: str, resources: ResourcesDep) -> Response:
    params.check_function_name(function_name)
    await resources.catalog.get_function(function_name)
    if not ALIAS_NAME_RE.fullmatch(alias_name):
        raise AliasNotFound(f"alias {alias_name[:80]!r} of function {function_name} does not exist")
    await versions_of(resources).delete_alias(function_name, alias_name)
    if await resources.catalog.find_async_config(function_name, alias_name) is not None:
        await resources.catalog.delete_async_config(function_name, alias_name)  # configs go with their qualifier
    log.info("alias deleted", extra={"function": function_name, "alias": alias_name})
    return Response(status_code=204)


@router.get("/functions/{function_name}/aliases")
async def list_aliases(
    function_name: str, resources: ResourcesDep, limit: str | None = None, nextToken: str | None = None,
    prefix: str | None = None,
) -> Response:
    params.check_function_name(function_name)
    page_size = params.parse_limit(limit)
    after = params.decode_token(nextToken)
    await resources.catalog.get_function(function_name)
    aliases = {a.alias_name: a for a in await versions_of(resources).list_aliases(function_name)
               if not prefix or a.alias_name.startswith(prefix)}
    page, token = params.paginate(sorted(aliases), after=after, limit=page_size)
    return json_response({"aliases": [_view(aliases[name]) for name in page], "nextToken": token})
