"""Function fields that taskmode stores and returns but does not act on, and the code checksum.

Deployment tools (Serverless Devs, Terraform) send a function's whole configuration and read it
back to decide whether anything changed, so every field of FC 3.0's CreateFunctionInput /
UpdateFunctionInput must round-trip even where it has no effect here (a VPC, a log project,
layers, ...). Nested objects are kept as the JSON the caller sent: taskmode does not interpret
them, so it must not reshape them either.
"""

from __future__ import annotations

from typing import Any, Final

import anycrc
import msgspec

# CRC-64/XZ: the ECMA-182 polynomial, reflected, all-ones initial value and final xor. This is
# the CRC-64 that OSS reports in x-oss-hash-crc64ecma and FC reports as codeChecksum (decimal).
_CRC64: Final = anycrc.Model("CRC64-XZ")

JsonObject = dict[str, Any]


def crc64(data: bytes) -> str:
    """FC's `codeChecksum` of a code zip: its CRC-64/XZ (ECMA-182) as a decimal string."""
    return str(_CRC64.calc(data))


class Tag(msgspec.Struct, kw_only=True, omit_defaults=True):
    """FC's `Tag`; the SDK spells its fields with capitals."""

    Key: str
    Value: str = ""


class FunctionSettings(msgspec.Struct, kw_only=True, rename="camel", omit_defaults=True):
    """The stored-only fields of a function (None: not set). README lists their (lack of) effect."""

    custom_container_config: JsonObject | None = None
    custom_dns: JsonObject | None = None
    disable_inject_credentials: str | None = None
    disable_ondemand: bool | None = None
    enable_long_living: bool | None = None
    gpu_config: JsonObject | None = None
    idle_timeout: int | None = None
    instance_isolation_mode: str | None = None
    instance_lifecycle_config: JsonObject | None = None
    internet_access: bool | None = None
    juice_fs_config: JsonObject | None = None
    layers: list[str] | None = None
    log_config: JsonObject | None = None
    micro_sandbox_config: JsonObject | None = None
    nas_config: JsonObject | None = None
    oss_mount_config: JsonObject | None = None
    polar_fs_config: JsonObject | None = None
    resource_group_id: str | None = None
    role: str | None = None
    session_affinity: str | None = None
    session_affinity_config: str | None = None
    tags: list[Tag] | None = None
    tracing_config: JsonObject | None = None
    vpc_config: JsonObject | None = None


SETTINGS_FIELDS: Final = FunctionSettings.__struct_fields__


def settings_of(source: object) -> FunctionSettings:
    """The stored-only fields `source` (a request body struct) sets."""
    return FunctionSettings(**{name: getattr(source, name, None) for name in SETTINGS_FIELDS})


def merged(current: FunctionSettings, changes: FunctionSettings) -> FunctionSettings:
    """`current` with every field `changes` sets replaced (an update sends only what changes)."""
    given = {name: getattr(changes, name) for name in SETTINGS_FIELDS if getattr(changes, name) is not None}
    return msgspec.structs.replace(current, **given)


def settings_view(settings: FunctionSettings) -> JsonObject:
    """The fields as FC's `Function` model shows them: `layers` become `{arn, size}` objects."""
    view: JsonObject = msgspec.to_builtins(settings)
    if settings.layers is not None:
        view["layers"] = [{"arn": arn, "size": 0} for arn in settings.layers]
    return view
