"""Function records: the code archive of a request, and the record a create or update makes.

Pure: `build_function` and `apply_update` check the resulting record as a whole (a custom
runtime needs a command) before any route writes it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import zipfile
from typing import Final

import msgspec

from services.gateway.params import check_function_name, check_runtime
from services.gateway.schemas import CreateFunctionInput, CustomRuntimeInput, InputCode, UpdateFunctionInput
from services.gateway.handler_check import check_handler_in_archive
from shared import codezip
from shared.catalog import CustomRuntimeConfig, FunctionRecord
from shared.errors import EntityTooLarge, InvalidArgument
from shared.function_fields import crc64, merged, settings_of

MAX_CODE_BYTES: Final = 50 * 1024 * 1024


class CodeArchive(msgspec.Struct, frozen=True):
    data: bytes
    checksum: str  # sha256 hex: the zip's key in the object store
    crc64: str  # FC's codeChecksum


def decode_code(code: InputCode | None, *, required: bool) -> CodeArchive | None:
    """Decode and check `code.zipFile` (base64 zip, at most 50 MB decoded, within `shared.codezip`'s
    limits once unpacked). CPU-bound on a large archive: callers run it off the event loop."""
    if code is None or code.zip_file is None:
        if code is not None and (code.oss_bucket_name or code.oss_object_name):
            raise InvalidArgument("code from OSS is not supported here: send code.zipFile")
        if required:
            raise InvalidArgument("code.zipFile is required")
        return None
    text = code.zip_file.strip()
    if len(text) > (MAX_CODE_BYTES // 3 + 2) * 4:
        raise EntityTooLarge(f"code.zipFile exceeds maximum allowed size ({MAX_CODE_BYTES} bytes decoded)")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidArgument("code.zipFile is not valid base64") from err
    if len(data) > MAX_CODE_BYTES:
        raise EntityTooLarge(f"code.zipFile exceeds maximum allowed size ({MAX_CODE_BYTES} bytes decoded)")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            codezip.check_declared(archive, archive_bytes=len(data))  # cheap, and before inflating anything
            codezip.check_members(archive)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as err:
        raise InvalidArgument("code.zipFile is not a valid zip archive") from err
    checksum = crc64(data)
    if code.checksum and code.checksum.strip() != checksum:
        raise InvalidArgument(
            f"code.checksum {code.checksum[:40]!r} does not match the zip's CRC-64 ({checksum})"
        )
    return CodeArchive(data=data, checksum=hashlib.sha256(data).hexdigest(), crc64=checksum)


def _custom_runtime(given: CustomRuntimeInput | None, current: CustomRuntimeConfig | None) -> CustomRuntimeConfig | None:
    if given is None:
        return current
    base = current or CustomRuntimeConfig()
    return CustomRuntimeConfig(
        command=list(given.command) if given.command is not None else list(base.command),
        args=list(given.args) if given.args is not None else list(base.args),
        port=given.port if given.port is not None else base.port,
    )


def _check_runtime_config(record: FunctionRecord) -> None:
    gpu = record.settings.gpu_config or {}
    if gpu.get("gpuType") or gpu.get("gpuMemorySize"):
        raise InvalidArgument("gpuConfig cannot be honoured here: taskmode runs functions without GPUs")
    if record.runtime.startswith("custom"):
        config = record.custom_runtime_config
        if config is None or not config.command or not all(part for part in config.command):
            raise InvalidArgument(
                f"runtime {record.runtime} requires customRuntimeConfig.command (a non-empty list of strings)"
            )


def build_function(
    body: CreateFunctionInput, *, function_id: str, arn: str, code: CodeArchive, now: str
) -> FunctionRecord:
    """The record for a CreateFunction body, checked as a whole."""
    check_function_name(body.function_name)
    if body.runtime is None:
        raise InvalidArgument("runtime is required")
    if body.handler is None:
        raise InvalidArgument("handler is required")
    record = FunctionRecord(
        function_name=body.function_name,
        function_id=function_id,
        function_arn=arn,
        runtime=check_runtime(body.runtime),
        handler=body.handler,
        timeout=body.timeout if body.timeout is not None else 3,
        memory_size=body.memory_size if body.memory_size is not None else 128,
        description=body.description or "",
        environment_variables=dict(body.environment_variables or {}),
        custom_runtime_config=_custom_runtime(body.custom_runtime_config, None),
        instance_concurrency=body.instance_concurrency if body.instance_concurrency is not None else 1,
        code_checksum=code.crc64,
        code_object=code.checksum,
        code_size=len(code.data),
        created_time=now,
        last_modified_time=now,
        settings=settings_of(body),
    )
    if body.cpu is not None:
        record.cpu = body.cpu
    if body.disk_size is not None:
        record.disk_size = body.disk_size
    _check_runtime_config(record)
    check_handler_in_archive(runtime=record.runtime, handler=record.handler, archive=code.data)
    return record


def apply_update(
    record: FunctionRecord, body: UpdateFunctionInput, *, code: CodeArchive | None, now: str
) -> FunctionRecord:
    """`record` with the fields `body` sets replaced (pure: `record` is not modified)."""
    changes: dict[str, object] = {"last_modified_time": now}
    if body.runtime is not None:
        changes["runtime"] = check_runtime(body.runtime)
    for name in ("handler", "timeout", "memory_size", "cpu", "disk_size", "description", "instance_concurrency"):
        value = getattr(body, name)
        if value is not None:
            changes[name] = value
    if body.environment_variables is not None:
        changes["environment_variables"] = dict(body.environment_variables)
    if body.custom_runtime_config is not None:
        changes["custom_runtime_config"] = _custom_runtime(body.custom_runtime_config, record.custom_runtime_config)
    if code is not None:
        changes["code_checksum"] = code.crc64
        changes["code_object"] = code.checksum
        changes["code_size"] = len(code.data)
    changes["settings"] = merged(record.settings, settings_of(body))
    updated = msgspec.structs.replace(record, **changes)
    _check_runtime_config(updated)
    return updated


def needs_handler_check(body: UpdateFunctionInput) -> bool:
    """Whether an update can change what the handler check looks at."""
    return body.code is not None or body.handler is not None or body.runtime is not None
