"""Request bodies as msgspec structs (FC 3.0's input models), and the one JSON body decoder.

Field constraints live in the types (`Annotated[..., msgspec.Meta(...)]`), so a body that
decodes is already within FC's ranges; `decode_json` turns any mismatch into `InvalidArgument`
naming the field.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

import msgspec

from shared.catalog import DestinationConfig
from shared.function_fields import FunctionSettings
from shared.errors import InvalidArgument

Timeout = Annotated[int, msgspec.Meta(ge=1, le=86400)]
MemorySize = Annotated[int, msgspec.Meta(ge=128, le=32768)]
InstanceConcurrency = Annotated[int, msgspec.Meta(ge=1, le=200)]
Cpu = Annotated[float, msgspec.Meta(gt=0, le=16)]
DiskSize = Annotated[int, msgspec.Meta(ge=512, le=10240)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Description = Annotated[str, msgspec.Meta(max_length=256)]
Handler = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
EventAge = Annotated[int, msgspec.Meta(ge=1, le=604800)]
RetryAttempts = Annotated[int, msgspec.Meta(ge=0, le=8)]


class InputCode(msgspec.Struct, kw_only=True, rename="camel"):
    """FC's `InputCodeLocation`; only `zipFile` is supported (no OSS here)."""

    zip_file: str | None = None
    oss_bucket_name: str | None = None
    oss_object_name: str | None = None
    checksum: str | None = None


class CustomRuntimeInput(msgspec.Struct, kw_only=True, rename="camel"):
    command: list[str] | None = None
    args: list[str] | None = None
    port: Port | None = None


class UpdateFunctionInput(FunctionSettings, kw_only=True, rename="camel"):
    """FC's `UpdateFunctionInput`; None means "leave as it is". The stored-only fields come from
    `FunctionSettings`, so every field the SDK can send is kept."""

    runtime: str | None = None
    handler: Handler | None = None
    timeout: Timeout | None = None
    memory_size: MemorySize | None = None
    cpu: Cpu | None = None
    disk_size: DiskSize | None = None
    description: Description | None = None
    environment_variables: dict[str, str] | None = None
    code: InputCode | None = None
    custom_runtime_config: CustomRuntimeInput | None = None
    instance_concurrency: InstanceConcurrency | None = None


class CreateFunctionInput(UpdateFunctionInput, kw_only=True):
    """FC's `CreateFunctionInput`: a name, a runtime, a handler and code are required."""

    function_name: str


class PublishVersionInput(msgspec.Struct, kw_only=True, rename="camel"):
    description: Description | None = None


VersionWeights = dict[str, Annotated[float, msgspec.Meta(ge=0, le=1)]]


class UpdateAliasInput(msgspec.Struct, kw_only=True, rename="camel"):
    version_id: str | None = None
    description: Description | None = None
    additional_version_weight: VersionWeights | None = None


class CreateAliasInput(UpdateAliasInput, kw_only=True):
    alias_name: str


class PutAsyncInvokeConfigInput(msgspec.Struct, kw_only=True, rename="camel"):
    async_task: bool | None = None
    max_async_event_age_in_seconds: EventAge | None = None
    max_async_retry_attempts: RetryAttempts | None = None
    destination_config: DestinationConfig | None = None



Reason = Annotated[str, msgspec.Meta(max_length=256)]
# A function's cap may not exceed this (nor TASKMODE_ACCOUNT_CONCURRENCY, when that is set).
MAX_RESERVED_CONCURRENCY = 10_000
ReservedConcurrency = Annotated[int, msgspec.Meta(ge=0, le=MAX_RESERVED_CONCURRENCY)]
InstanceCount = Annotated[int, msgspec.Meta(ge=0, le=1000)]
MAX_START_RATE_PER_SECOND = 100_000
StartRate = Annotated[float, msgspec.Meta(gt=0, le=MAX_START_RATE_PER_SECOND)]


class DisableFunctionInvocationInput(msgspec.Struct, kw_only=True, rename="camel"):
    """FC's DisableFunctionInvocation body."""

    reason: Reason | None = None
    abort_ongoing_request: bool | None = None


class PutConcurrencyInput(msgspec.Struct, kw_only=True, rename="camel"):
    """FC's `PutConcurrencyInput`, plus our `startRatePerSecond` (tasks dispatched per second)."""

    reserved_concurrency: ReservedConcurrency | None = None
    start_rate_per_second: StartRate | None = None


class ScalingPolicyInput(msgspec.Struct, kw_only=True, rename="camel"):
    name: str | None = None
    metric_type: str | None = None
    metric_target: float | None = None
    min_instances: InstanceCount | None = None
    max_instances: InstanceCount | None = None
    start_time: str | None = None
    end_time: str | None = None
    time_zone: str | None = None


class PutScalingConfigInput(msgspec.Struct, kw_only=True, rename="camel"):
    """FC's `PutScalingConfigInput` (the implemented subset: minInstances and the policies'
    maxInstances)."""

    min_instances: InstanceCount | None = None
    horizontal_scaling_policies: list[ScalingPolicyInput] | None = None

T = TypeVar("T")


def decode_json(body: bytes, type_: type[T]) -> T:
    """Decode a JSON request body into `type_`; malformed or mistyped input is `InvalidArgument`."""
    if not body.strip():
        raise InvalidArgument("request body is empty; a JSON object is required")
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as err:
        raise InvalidArgument(f"invalid request body: {err}") from err
    except msgspec.DecodeError as err:
        raise InvalidArgument(f"request body is not valid JSON: {err}") from err
    except UnicodeDecodeError as err:  # msgspec's own check of a string's UTF-8
        raise InvalidArgument(f"request body is not valid UTF-8 at byte {err.start}") from err
