"""CreateTrigger, GetTrigger, UpdateTrigger, DeleteTrigger, ListTriggers.

Bodies are FC 3.0's `CreateTriggerInput` / `UpdateTriggerInput`; answers are its `Trigger`, with
`httpTrigger.urlInternet`/`urlIntranet` for an http trigger (no `urlInternet` when its config
has `disableURLInternet`). A config is checked in full for its type, and the qualifier must
name a version or alias of the function (as for InvokeFunction), before anything is written.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Any

import msgspec
from fastapi import APIRouter, Request, Response

from services.gateway import params
from services.gateway.deps import BodyDep, Resources, ResourcesDep, SettingsDep
from services.gateway.errors import json_response
from services.gateway.schemas import decode_json
from services.gateway.settings import GatewaySettings
from shared import wire
from shared.errors import ConcurrentUpdateError, InvalidArgument, InvalidNextToken, ServiceUnavailable
from shared.qualifiers import MAIN_VERSION_DRAW, resolve
from shared.triggers import (
    HttpTriggerConfig,
    TriggerCatalog,
    TriggerRecord,
    TRIGGER_NAME_RE,
    TriggerType,
    check_trigger_name,
    check_trigger_type,
    encode_config,
    is_enabled,
    new_trigger_id,
    parse_config,
)

log = logging.getLogger(__name__)

router = APIRouter()

_UPDATE_ATTEMPTS = 5


class CreateTriggerInput(msgspec.Struct, kw_only=True, rename="camel"):
    trigger_name: str
    trigger_type: str
    trigger_config: str | dict[str, Any] | None = None
    qualifier: str | None = None
    description: str | None = None
    source_arn: str | None = None
    invocation_role: str | None = None


class UpdateTriggerInput(msgspec.Struct, kw_only=True, rename="camel"):
    trigger_config: str | dict[str, Any] | None = None
    qualifier: str | None = None
    description: str | None = None
    invocation_role: str | None = None


def _catalog(resources: Resources) -> TriggerCatalog:
    if resources.triggers is None:
        raise ServiceUnavailable("triggers are not available on this gateway")
    return resources.triggers


def http_trigger_url(base: str, function: str, trigger: str) -> str:
    """Where an http trigger is reached: under the gateway, outside the signed API."""
    return f"{base}{wire.HTTP_TRIGGER_PREFIX}/{function}/{trigger}/"


def trigger_view(record: TriggerRecord, *, function: str, base: str) -> dict[str, Any]:
    """The `Trigger` JSON FC answers with."""
    view: dict[str, Any] = msgspec.to_builtins(record)
    if record.trigger_type == TriggerType.HTTP:
        config = record.config()
        assert isinstance(config, HttpTriggerConfig)
        url = http_trigger_url(base, function, record.trigger_name)
        # The gateway's one URL is both; disableURLInternet takes the internet one away and
        # leaves the trigger served at its intranet URL (taskmode cannot tell the two apart).
        view["httpTrigger"] = {"urlIntranet": url} if config.disable_url_internet else {"urlInternet": url,
                                                                                        "urlIntranet": url}
    return view


def _base_url(request: Request, settings: GatewaySettings) -> str:
    return settings.public_url or str(request.base_url).rstrip("/")


def _decode_token(token: str | None) -> str | None:
    """The trigger name a ListTriggers nextToken continues after (None: from the start)."""
    if not token:
        return None
    try:
        name = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as err:
        raise InvalidNextToken("nextToken is not valid") from err
    if not TRIGGER_NAME_RE.fullmatch(name):
        raise InvalidNextToken("nextToken is not valid")
    return name


async def _check_exists(resources: Resources, function_name: str, qualifier: str) -> None:
    """Refuse a qualifier that names no version or alias of the function, as InvokeFunction
    does (404 VersionNotFound / AliasNotFound); LATEST always resolves."""
    await resolve(resources.catalog, function_name, qualifier, draw=lambda: MAIN_VERSION_DRAW)


def _status(config_enabled: bool) -> str:
    return "Enabled" if config_enabled else "Disabled"


@router.post("/functions/{function_name}/triggers")
async def create_trigger(function_name: str, request: Request, resources: ResourcesDep, settings: SettingsDep,
                         raw: BodyDep) -> Response:
    params.check_function_name(function_name)
    body = decode_json(raw, CreateTriggerInput)
    check_trigger_name(body.trigger_name)
    trigger_type = check_trigger_type(body.trigger_type)
    if body.trigger_config is None:
        raise InvalidArgument("triggerConfig is required")
    config = parse_config(trigger_type, body.trigger_config)
    qualifier = params.check_qualifier(body.qualifier)
    function = await resources.catalog.get_function(function_name)
    await _check_exists(resources, function_name, qualifier)
    now = params.format_time()
    record = TriggerRecord(
        trigger_name=body.trigger_name,
        trigger_id=new_trigger_id(),
        trigger_type=trigger_type,
        trigger_config=encode_config(config),
        qualifier=qualifier,
        description=body.description or "",
        source_arn=body.source_arn or "",
        invocation_role=body.invocation_role or "",
        target_arn=function.function_arn,
        status=_status(is_enabled(config)),
        created_time=now,
        last_modified_time=now,
    )
    await _catalog(resources).create(function_name, record)
    log.info("trigger created", extra={"function": function_name, "trigger": record.trigger_name,
                                       "trigger_type": record.trigger_type})
    return json_response(trigger_view(record, function=function_name, base=_base_url(request, settings)))


@router.get("/functions/{function_name}/triggers/{trigger_name}")
async def get_trigger(function_name: str, trigger_name: str, request: Request, resources: ResourcesDep,
                      settings: SettingsDep) -> Response:
    params.check_function_name(function_name)
    check_trigger_name(trigger_name)
    await resources.catalog.get_function(function_name)
    record, _ = await _catalog(resources).get_versioned(function_name, trigger_name)
    return json_response(trigger_view(record, function=function_name, base=_base_url(request, settings)))


@router.put("/functions/{function_name}/triggers/{trigger_name}")
async def update_trigger(function_name: str, trigger_name: str, request: Request, resources: ResourcesDep,
                         settings: SettingsDep, raw: BodyDep) -> Response:
    params.check_function_name(function_name)
    check_trigger_name(trigger_name)
    body = decode_json(raw, UpdateTriggerInput)
    qualifier = params.check_qualifier(body.qualifier) if body.qualifier is not None else None
    await resources.catalog.get_function(function_name)
    if qualifier is not None:
        await _check_exists(resources, function_name, qualifier)
    catalog = _catalog(resources)
    for attempt in range(_UPDATE_ATTEMPTS):
        current, revision = await catalog.get_versioned(function_name, trigger_name)
        changes: dict[str, Any] = {"last_modified_time": params.format_time()}
        if body.trigger_config is not None:
            config = parse_config(TriggerType(current.trigger_type), body.trigger_config)
            changes["trigger_config"] = encode_config(config)
            changes["status"] = _status(is_enabled(config))
        if qualifier is not None:
            changes["qualifier"] = qualifier
        if body.description is not None:
            changes["description"] = body.description
        if body.invocation_role is not None:
            changes["invocation_role"] = body.invocation_role
        updated = msgspec.structs.replace(current, **changes)
        try:
            await catalog.replace(function_name, updated, revision=revision)
        except ConcurrentUpdateError:
            if attempt == _UPDATE_ATTEMPTS - 1:
                raise
            continue
        log.info("trigger updated", extra={"function": function_name, "trigger": trigger_name})
        return json_response(trigger_view(updated, function=function_name, base=_base_url(request, settings)))
    raise AssertionError("unreachable")


@router.delete("/functions/{function_name}/triggers/{trigger_name}", status_code=204)
async def delete_trigger(function_name: str, trigger_name: str, resources: ResourcesDep) -> Response:
    params.check_function_name(function_name)
    check_trigger_name(trigger_name)
    await _catalog(resources).delete(function_name, trigger_name)
    log.info("trigger deleted", extra={"function": function_name, "trigger": trigger_name})
    return Response(status_code=204)


@router.get("/functions/{function_name}/triggers")
async def list_triggers(function_name: str, request: Request, resources: ResourcesDep, settings: SettingsDep,
                        prefix: str | None = None, limit: str | None = None,
                        nextToken: str | None = None) -> Response:
    params.check_function_name(function_name)
    page_size = params.parse_limit(limit)
    after = _decode_token(nextToken)
    await resources.catalog.get_function(function_name)
    records = {r.trigger_name: r for r in await _catalog(resources).list(function_name)}
    names = sorted(n for n in records if not prefix or n.startswith(prefix))
    page, token = params.paginate(names, after=after, limit=page_size)
    base = _base_url(request, settings)
    return json_response({"triggers": [trigger_view(records[n], function=function_name, base=base) for n in page],
                          "nextToken": token})
