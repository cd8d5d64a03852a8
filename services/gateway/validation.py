"""Request bodies and parameters: decoding and checking, with no I/O.

Every check raises a typed `TaskmodeError` (mostly `InvalidArgument`) whose message names the
offending field, so routes validate everything before writing anything.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import time
import uuid
import zipfile
from typing import Annotated, Final, TypeVar

import msgspec

from shared.catalog import (
    CustomRuntimeConfig,
    DestinationConfig,
    FunctionRecord,
)
from shared.errors import EntityTooLarge, InvalidArgument, InvalidNextToken
from services.gateway.archive_check import check_archive
from shared.transitions import Status, parse_status

FUNCTION_NAME_RE: Final = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_-]{0,63}$")
TASK_ID_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,127}$")
RUNTIME_RE: Final = re.compile(r"^(python3(\.\d+)?|custom(\.debian(10|11|12))?)$")
QUALIFIER_RE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
# What we accept as a caller's x-fc-request-id (echoed back in a header, so kept printable).
REQUEST_ID_RE: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")

MAX_ASYNC_PAYLOAD_BYTES: Final = 128 * 1024
MAX_SYNC_PAYLOAD_BYTES: Final = 32 * 1024 * 1024
MAX_CODE_BYTES: Final = 50 * 1024 * 1024
MAX_DELAY_S: Final = 3600
DEFAULT_LIMIT: Final = 20
MAX_LIMIT: Final = 100
LATEST: Final = "LATEST"

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


class UpdateFunctionInput(msgspec.Struct, kw_only=True, rename="camel"):
    """FC's `UpdateFunctionInput` (the implemented subset); None means "leave as it is"."""

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


class PutAsyncInvokeConfigInput(msgspec.Struct, kw_only=True, rename="camel"):
    async_task: bool | None = None
    max_async_event_age_in_seconds: EventAge | None = None
    max_async_retry_attempts: RetryAttempts | None = None
    destination_config: DestinationConfig | None = None


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


# --- names and identifiers ---------------------------------------------------------------------


def check_function_name(name: str) -> str:
    if not FUNCTION_NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"invalid function name {name[:80]!r}: it must match {FUNCTION_NAME_RE.pattern}"
        )
    return name


def check_task_id(value: str, *, source: str = "x-fc-async-task-id") -> str:
    if not TASK_ID_RE.fullmatch(value):
        raise InvalidArgument(
            f"invalid task id {value[:140]!r} in {source}: it must start with a letter or '_', "
            "contain only letters, digits, '_' and '-', and be at most 128 characters"
        )
    return value


def check_runtime(runtime: str) -> str:
    if not RUNTIME_RE.fullmatch(runtime):
        raise InvalidArgument(
            f"unsupported runtime {runtime[:40]!r}: use python3, python3.<minor>, custom, "
            "custom.debian10, custom.debian11 or custom.debian12"
        )
    return runtime


def check_qualifier(qualifier: str | None) -> str:
    """The qualifier as given (None or empty: LATEST); only LATEST semantics exist here."""
    if not qualifier:
        return LATEST
    if not QUALIFIER_RE.fullmatch(qualifier):
        raise InvalidArgument(f"invalid qualifier {qualifier[:40]!r}")
    return qualifier


def accepted_request_id(value: str | None) -> str | None:
    """A caller's x-fc-request-id if it is safe to echo back, else None (we make our own)."""
    if value and REQUEST_ID_RE.fullmatch(value):
        return value
    return None


def new_request_id() -> str:
    return str(uuid.uuid4())


def new_task_id() -> str:
    """A generated task id; the prefix makes it satisfy the task-id rule (no leading digit)."""
    return f"task-{uuid.uuid4().hex}"


def choose_task_id(*, task_id_header: str | None, request_id_header: str | None) -> str:
    """FC's rule: the given task id, else the caller's request id, else a generated one."""
    if task_id_header is not None and task_id_header.strip():
        return check_task_id(task_id_header.strip())
    if request_id_header is not None and request_id_header.strip():
        return check_task_id(request_id_header.strip(), source="x-fc-request-id")
    return new_task_id()


# --- invocation headers -----------------------------------------------------------------------


def parse_invocation_type(value: str | None) -> str:
    """`Sync` (default) or `Async`, case-insensitively."""
    if value is None or not value.strip():
        return "Sync"
    normalized = value.strip().lower()
    if normalized == "sync":
        return "Sync"
    if normalized == "async":
        return "Async"
    raise InvalidArgument(f"invalid x-fc-invocation-type {value[:40]!r}: use Sync or Async")


def parse_delay(value: str | None) -> int:
    """x-fc-async-delay: whole seconds in [0, 3600] (absent: 0)."""
    if value is None or not value.strip():
        return 0
    text = value.strip()
    if not text.isdigit() or not text.isascii():
        raise InvalidArgument(f"invalid x-fc-async-delay {value[:40]!r}: an integer number of seconds is required")
    delay = int(text)
    if delay > MAX_DELAY_S:
        raise InvalidArgument(f"x-fc-async-delay {delay} is out of range [0, {MAX_DELAY_S}]")
    return delay


def check_payload_size(payload: bytes, *, limit: int) -> None:
    if len(payload) > limit:
        raise EntityTooLarge(f"payload size exceeds maximum allowed size ({limit} bytes)")


# --- query parameters -------------------------------------------------------------------------


def parse_bool(name: str, value: str | None, *, default: bool) -> bool:
    """A boolean query value; the Python SDK sends `True`/`False`, so case is ignored."""
    if value is None or value == "":
        return default
    lowered = value.strip().lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    raise InvalidArgument(f"invalid {name} {value[:40]!r}: use true or false")


_PLAIN_INTEGER = re.compile(r"-?[0-9]{1,18}")


def parse_int(name: str, value: str | None, *, default: int | None, lo: int, hi: int) -> int | None:
    if value is None or value == "":
        return default
    # Plain ASCII digits only: int() would also take "1_0", " 5" and non-ASCII digits.
    if not _PLAIN_INTEGER.fullmatch(value):
        raise InvalidArgument(f"invalid {name} {value[:40]!r}: an integer is required")
    number = int(value)
    if not lo <= number <= hi:
        raise InvalidArgument(f"{name} {number} is out of range [{lo}, {hi}]")
    return number


def parse_limit(value: str | None) -> int:
    limit = parse_int("limit", value, default=DEFAULT_LIMIT, lo=1, hi=MAX_LIMIT)
    assert limit is not None
    return limit


def parse_time_ms(name: str, value: str | None) -> int | None:
    return parse_int(name, value, default=None, lo=0, hi=2**53)


def parse_sort_order(value: str | None) -> bool:
    """sortOrderByTime: `asc` (default) or `desc`; returns whether the order is descending."""
    if value is None or value == "":
        return False
    lowered = value.strip().lower()
    if lowered in ("asc", "desc"):
        return lowered == "desc"
    raise InvalidArgument(f"invalid sortOrderByTime {value[:40]!r}: use asc or desc")


def parse_status_filter(value: str | None) -> Status | None:
    if value is None or value == "":
        return None
    try:
        return parse_status(value)
    except ValueError as err:
        names = ", ".join([*(s.value for s in Status), "Dequeued"])
        raise InvalidArgument(f"invalid status {value[:40]!r}: use one of {names}") from err


# --- pagination over sorted names (functions, async configs) ----------------------------------


def encode_token(after: str) -> str:
    return base64.urlsafe_b64encode(after.encode()).decode().rstrip("=")


def decode_token(token: str | None) -> str | None:
    """The name a nextToken continues after (None: from the start)."""
    if not token:
        return None
    try:
        name = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as err:
        raise InvalidNextToken("nextToken is not valid") from err
    if not FUNCTION_NAME_RE.fullmatch(name):
        raise InvalidNextToken("nextToken is not valid")
    return name


def paginate(names: list[str], *, after: str | None, limit: int) -> tuple[list[str], str]:
    """One page of sorted `names` after `after`, and the token for the next page ("" at the end)."""
    remaining = [n for n in names if after is None or n > after]
    page = remaining[:limit]
    token = encode_token(page[-1]) if len(remaining) > limit else ""
    return page, token


# --- functions --------------------------------------------------------------------------------


def format_time(epoch_s: float | None = None) -> str:
    """FC's timestamp form, e.g. `2023-05-01T08:15:27Z`."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if epoch_s is None else epoch_s))


class CodeArchive(msgspec.Struct, frozen=True):
    data: bytes
    checksum: str  # sha256 hex


def decode_code(code: InputCode | None, *, required: bool) -> CodeArchive | None:
    """Decode and check `code.zipFile` (base64 zip, at most 50 MB decoded)."""
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
            check_archive(archive)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as err:
        raise InvalidArgument("code.zipFile is not a valid zip archive") from err
    return CodeArchive(data=data, checksum=hashlib.sha256(data).hexdigest())


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
        code_checksum=code.checksum,
        code_size=len(code.data),
        created_time=now,
        last_modified_time=now,
    )
    if body.cpu is not None:
        record.cpu = body.cpu
    if body.disk_size is not None:
        record.disk_size = body.disk_size
    _check_runtime_config(record)
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
        changes["code_checksum"] = code.checksum
        changes["code_size"] = len(code.data)
    updated = msgspec.structs.replace(record, **changes)
    _check_runtime_config(updated)
    return updated
