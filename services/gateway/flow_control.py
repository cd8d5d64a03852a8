"""Flow control: Disable/EnableFunctionInvocation, concurrency and scaling configs, ListInstances.

The restriction lives in the function's record (GetFunction shows it as `invocationRestriction`);
concurrency and scaling configs in their own KV buckets; every service watches them, so a change
takes effect within milliseconds everywhere. Live instances are what the executors register.

A disable with `abortOngoingRequest` stops the function's running tasks the way StopAsyncTask
does (Running -> Stopping -> Stopped), found through the read model; a dispatch that reaches an
executor while the function is disabled is held, not started (services/executor/runner.py).
"""

from __future__ import annotations

import logging
from typing import Final

import msgspec
from fastapi import APIRouter, Response

from services.gateway import params
from services.gateway.deps import BodyDep, MetricsDep, Resources, ResourcesDep
from services.gateway.tasks import stop_tasks
from services.gateway.errors import json_response
from services.gateway.schemas import (
    DisableFunctionInvocationInput,
    PutConcurrencyInput,
    PutScalingConfigInput,
    decode_json,
)
from shared.catalog import FunctionRecord, FunctionRestriction
from shared.errors import (
    ConcurrencyConfigNotFound,
    ConcurrentUpdateError,
    FunctionDisabled,
    InvalidArgument,
    ResourceExhausted,
    ScalingConfigNotFound,
    ServiceUnavailable,
)
from shared.transitions import Status
from shared.flowconfig import (
    ConcurrencyConfigRecord,
    FlowConfigs,
    InstanceRegistry,
    ScalingConfigRecord,
    ScalingPolicy,
)

log = logging.getLogger(__name__)

router = APIRouter()

_UPDATE_ATTEMPTS: Final = 5


def _flow(resources: Resources) -> FlowConfigs:
    if resources.flow is None:
        raise ServiceUnavailable("flow-control settings are not available")
    return resources.flow


def _instances(resources: Resources) -> InstanceRegistry:
    if resources.instances is None:
        raise ServiceUnavailable("the instance registry is not available")
    return resources.instances


async def refuse_if_blocked(resources: Resources, function_name: str) -> None:
    """A synchronous invocation cannot wait: refuse it while the function is disabled
    (`FunctionDisabled`, 403) or its reservedConcurrency is 0 (`ResourceExhausted`, 429)."""
    function = await resources.catalog.find_function(function_name)  # LATEST holds the restriction
    if function is not None and function.disabled:
        reason = function.invocation_restriction.reason if function.invocation_restriction else ""
        raise FunctionDisabled(f"invocations of function {function_name} are disabled" + (f": {reason}" if reason else ""))
    config = resources.flow.concurrency(function_name) if resources.flow is not None else None
    if config is not None and config.reserved_concurrency == 0:
        raise ResourceExhausted(f"function {function_name} has reservedConcurrency 0: its invocations are blocked")


# --- Disable / EnableFunctionInvocation -------------------------------------------------------


async def _restrict(resources: Resources, function_name: str, restriction: FunctionRestriction) -> FunctionRecord:
    """Write `restriction` into the function's record (compare-and-set, retried on a race)."""
    catalog = resources.catalog
    for attempt in range(_UPDATE_ATTEMPTS):
        current, revision = await catalog.get_function_versioned(function_name)
        updated = msgspec.structs.replace(current, invocation_restriction=restriction)
        try:
            await catalog.replace_function(updated, revision=revision)
        except ConcurrentUpdateError:
            if attempt == _UPDATE_ATTEMPTS - 1:
                raise
            continue
        return updated
    raise AssertionError("unreachable")


@router.post("/functions/{function_name}/invoke/disable")
async def disable_function_invocation(function_name: str, resources: ResourcesDep, metrics: MetricsDep,
                                      raw: BodyDep) -> Response:
    params.check_function_name(function_name)
    body = decode_json(raw, DisableFunctionInvocationInput) if raw.strip() else DisableFunctionInvocationInput()
    restriction = FunctionRestriction(disable=True, reason=body.reason or "", last_modified_time=params.format_time(),
                                      abort_ongoing_request=bool(body.abort_ongoing_request))
    await _restrict(resources, function_name, restriction)
    stopped = 0
    if restriction.abort_ongoing_request:
        # The restriction is in place first, so nothing new starts while the running ones stop.
        stopped = await stop_tasks(resources, metrics, function_name, status=Status.RUNNING)
    log.info("function invocation disabled", extra={"function": function_name, "reason": restriction.reason,
                                                    "abort_ongoing_request": restriction.abort_ongoing_request,
                                                    "stopped": stopped})
    return json_response({"success": True})


@router.post("/functions/{function_name}/invoke/enable")
async def enable_function_invocation(function_name: str, resources: ResourcesDep) -> Response:
    params.check_function_name(function_name)
    await _restrict(resources, function_name, FunctionRestriction(disable=False, reason="",
                                                                  last_modified_time=params.format_time()))
    log.info("function invocation enabled", extra={"function": function_name})
    return json_response({"success": True})


# --- concurrency configs ------------------------------------------------------------------------


def _concurrency_view(record: ConcurrencyConfigRecord) -> dict[str, object]:
    view: dict[str, object] = {"functionArn": record.function_arn, "reservedConcurrency": record.reserved_concurrency}
    if record.start_rate_per_second is not None:  # ours: FC has no start rate
        view["startRatePerSecond"] = record.start_rate_per_second
    return view


@router.put("/functions/{function_name}/concurrency")
async def put_concurrency_config(function_name: str, resources: ResourcesDep, raw: BodyDep) -> Response:
    params.check_function_name(function_name)
    body = decode_json(raw, PutConcurrencyInput)
    if body.reserved_concurrency is None and body.start_rate_per_second is None:
        raise InvalidArgument("reservedConcurrency is required (or startRatePerSecond alone)")
    function = await resources.catalog.get_function(function_name)
    record = ConcurrencyConfigRecord(function_arn=function.function_arn,
                                     reserved_concurrency=body.reserved_concurrency,
                                     start_rate_per_second=body.start_rate_per_second,
                                     last_modified_time=params.format_time())
    await _flow(resources).put_concurrency(function_name, record)
    log.info("concurrency config put", extra={"function": function_name,
                                              "reserved_concurrency": record.reserved_concurrency,
                                              "start_rate_per_second": record.start_rate_per_second})
    return json_response(_concurrency_view(record))


@router.get("/functions/{function_name}/concurrency")
async def get_concurrency_config(function_name: str, resources: ResourcesDep) -> Response:
    params.check_function_name(function_name)
    await resources.catalog.get_function(function_name)
    record = await _flow(resources).find_concurrency(function_name)
    if record is None:
        raise ConcurrencyConfigNotFound(f"concurrency config of function {function_name} not found")
    return json_response(_concurrency_view(record))


@router.delete("/functions/{function_name}/concurrency", status_code=204)
async def delete_concurrency_config(function_name: str, resources: ResourcesDep) -> Response:
    params.check_function_name(function_name)
    await resources.catalog.get_function(function_name)
    if not await _flow(resources).delete_concurrency(function_name):
        raise ConcurrencyConfigNotFound(f"concurrency config of function {function_name} not found")
    log.info("concurrency config deleted", extra={"function": function_name})
    return Response(status_code=204)


@router.get("/concurrency-configs")
async def list_concurrency_configs(resources: ResourcesDep, functionName: str | None = None,
                                   limit: str | None = None, nextToken: str | None = None) -> Response:
    page_size = params.parse_limit(limit)
    after = params.decode_token(nextToken)
    configs = dict(await _flow(resources).list_concurrency())
    names = sorted(n for n in configs if not functionName or n == functionName)
    page, token = params.paginate(names, after=after, limit=page_size)
    return json_response({"configs": [_concurrency_view(configs[n]) for n in page], "nextToken": token})


# --- scaling configs ----------------------------------------------------------------------------


async def _scaling_view(resources: Resources, function_name: str, record: ScalingConfigRecord) -> dict[str, object]:
    """FC's `ScalingConfigStatus`: the config plus how many instances there are now."""
    current = len(await _instances(resources).list(function_name))
    view: dict[str, object] = msgspec.to_builtins(record)
    view.pop("lastModifiedTime", None)
    return {**view, "currentInstances": current, "targetInstances": max(current, record.min_instances),
            "currentError": "", "enableOnDemandScaling": True, "scheduledPolicies": []}


@router.put("/functions/{function_name}/scaling-config")
async def put_scaling_config(function_name: str, resources: ResourcesDep, raw: BodyDep,
                             qualifier: str | None = None) -> Response:
    params.check_function_name(function_name)
    params.check_qualifier(qualifier)
    body = decode_json(raw, PutScalingConfigInput)
    policies = [ScalingPolicy(**{k: v for k, v in msgspec.structs.asdict(p).items() if v is not None})
                for p in body.horizontal_scaling_policies or []]
    function = await resources.catalog.get_function(function_name)
    record = ScalingConfigRecord(function_arn=function.function_arn, min_instances=body.min_instances or 0,
                                 horizontal_scaling_policies=policies, last_modified_time=params.format_time())
    if record.max_instances is not None and record.max_instances < max(1, record.min_instances):
        raise InvalidArgument(f"maxInstances {record.max_instances} must be at least 1 and at least "
                              f"minInstances ({record.min_instances})")
    await _flow(resources).put_scaling(function_name, record)
    log.info("scaling config put", extra={"function": function_name, "min_instances": record.min_instances,
                                          "max_instances": record.max_instances})
    return json_response(await _scaling_view(resources, function_name, record))


@router.get("/functions/{function_name}/scaling-config")
async def get_scaling_config(function_name: str, resources: ResourcesDep, qualifier: str | None = None) -> Response:
    params.check_function_name(function_name)
    params.check_qualifier(qualifier)
    await resources.catalog.get_function(function_name)
    record = await _flow(resources).find_scaling(function_name)
    if record is None:
        raise ScalingConfigNotFound(f"scaling config of function {function_name} not found")
    return json_response(await _scaling_view(resources, function_name, record))


@router.delete("/functions/{function_name}/scaling-config", status_code=204)
async def delete_scaling_config(function_name: str, resources: ResourcesDep, qualifier: str | None = None) -> Response:
    params.check_function_name(function_name)
    params.check_qualifier(qualifier)
    await resources.catalog.get_function(function_name)
    if not await _flow(resources).delete_scaling(function_name):
        raise ScalingConfigNotFound(f"scaling config of function {function_name} not found")
    log.info("scaling config deleted", extra={"function": function_name})
    return Response(status_code=204)


# --- ListInstances ------------------------------------------------------------------------------


@router.get("/functions/{function_name}/instances")
async def list_instances(function_name: str, resources: ResourcesDep, qualifier: str | None = None) -> Response:
    params.check_function_name(function_name)
    params.check_qualifier(qualifier)
    await resources.catalog.get_function(function_name)
    instances = await _instances(resources).list(function_name)
    return json_response({"instances": [msgspec.to_builtins(i) for i in instances]})
