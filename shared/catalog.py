"""Functions and their async-invoke configs: JetStream KV buckets, code in the object store.

The catalog is configuration, not task state, so it lives beside the event stream in NATS
rather than in the read model: every service can read it (and watch it) without MongoDB.
Records use FC 3.0 JSON names so the gateway can return them as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Final, Generic, TypeVar

import msgspec
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, ObjectStoreConfig
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoKeysError,
    NotFoundError,
    ObjectNotFoundError,
)
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from nats.js.object_store import ObjectStore

from shared import wire
from shared.object_chunks import read_object
from shared.errors import AsyncConfigNotFound, ConcurrentUpdateError, FunctionAlreadyExists, FunctionNotFound
from shared.events import DEFAULT_MAX_EVENT_AGE_S, DEFAULT_MAX_RETRIES
from shared.function_fields import FunctionSettings, settings_view
from shared.wire import LATEST

if TYPE_CHECKING:
    from shared.versions import Versions

log = logging.getLogger(__name__)


class CustomRuntimeConfig(msgspec.Struct, kw_only=True, rename="camel", omit_defaults=True):
    command: list[str] = []
    args: list[str] = []
    port: int = 9000


class FunctionRestriction(msgspec.Struct, kw_only=True, rename="camel", omit_defaults=True):
    """FC's `FunctionRestriction`: whether invocations are disabled (paused), why, and since when.

    `abortOngoingRequest` is ours: it records that the disable stopped the running tasks.
    """

    disable: bool
    reason: str
    last_modified_time: str
    abort_ongoing_request: bool = False  # shown only when set


class FunctionRecord(msgspec.Struct, kw_only=True, rename="camel"):
    """A function as FC 3.0's `Function` model names it (the subset taskmode implements)."""

    function_name: str
    function_id: str
    function_arn: str
    runtime: str
    handler: str
    timeout: int = 3
    memory_size: int = 128
    cpu: float = 0.35
    disk_size: int = 512
    description: str = ""
    environment_variables: dict[str, str] = {}
    custom_runtime_config: CustomRuntimeConfig | None = None
    instance_concurrency: int = 1
    code_checksum: str = ""  # FC's: CRC-64/XZ of the zip, decimal (see shared.function_fields.crc64)
    code_size: int = 0
    created_time: str = ""
    last_modified_time: str = ""
    state: str = "Active"
    last_update_status: str = "Successful"
    # The zip's key in the object store (sha256 hex); "" for records written before it existed,
    # whose code_checksum was that key.
    code_object: str = ""
    settings: FunctionSettings = msgspec.field(default_factory=FunctionSettings)
    # DisableFunctionInvocation / EnableFunctionInvocation (None: never restricted).
    invocation_restriction: FunctionRestriction | None = None

    @property
    def disabled(self) -> bool:
        """Invocations are disabled (DisableFunctionInvocation): tasks wait Enqueued, nothing starts."""
        return self.invocation_restriction is not None and self.invocation_restriction.disable

    @property
    def code_key(self) -> str:
        """Where the zip is in the object store."""
        return self.code_object or self.code_checksum


# Stored with a function record, never shown: internal keys, and `settings` (shown flattened).
_HIDDEN_FUNCTION_FIELDS: Final = ("codeObject", "settings")


def function_view(record: FunctionRecord) -> dict[str, object]:
    """FC's `Function` JSON for `record`: its own fields plus the stored-only settings, flattened."""
    view: dict[str, object] = msgspec.to_builtins(record)
    for name in _HIDDEN_FUNCTION_FIELDS:
        view.pop(name, None)
    view.update(settings_view(record.settings))
    return view


class Destination(msgspec.Struct, kw_only=True, omit_defaults=True):
    destination: str = ""


class DestinationConfig(msgspec.Struct, kw_only=True, rename="camel", omit_defaults=True):
    on_success: Destination | None = None
    on_failure: Destination | None = None


class AsyncConfigRecord(msgspec.Struct, kw_only=True, rename="camel"):
    """FC 3.0's `AsyncConfig` for one function and qualifier (`qualifier` is ours, not FC's)."""

    function_arn: str
    qualifier: str = LATEST
    async_task: bool = False
    max_async_event_age_in_seconds: int = DEFAULT_MAX_EVENT_AGE_S
    max_async_retry_attempts: int = DEFAULT_MAX_RETRIES
    destination_config: DestinationConfig | None = None
    created_time: str = ""
    last_modified_time: str = ""


def function_arn(*, region: str, account_id: str, function: str, qualifier: str = LATEST) -> str:
    """The ARN of `function` (`acs:fc:<region>:<account>:functions/<name>`), with `:<qualifier>`
    appended for any qualifier but LATEST."""
    arn = f"acs:fc:{region}:{account_id}:functions/{function}"
    return arn if qualifier == LATEST else f"{arn}:{qualifier}"


def async_config_key(function: str, qualifier: str) -> str:
    """KV key of one qualifier's async config: the bare name for LATEST (as before qualifiers
    existed), `<name>.<qualifier>` otherwise (function names never contain a dot)."""
    return function if qualifier == LATEST else f"{function}.{qualifier}"


_encode = msgspec.json.Encoder().encode
_decode_function = msgspec.json.Decoder(FunctionRecord).decode
_decode_async_config = msgspec.json.Decoder(AsyncConfigRecord).decode


R = TypeVar("R")
MIRROR_SYNC_TIMEOUT_S: Final = 30.0


class _Mirror(Generic[R]):
    """A local copy of one KV bucket, kept current by a watch (pushed, not polled).

    A watch can silently stop delivering (its ordered consumer does not survive every server
    restart), so a check every `check_every_s` compares the bucket's last sequence with the last
    revision seen and starts a fresh watch when the mirror has fallen behind.
    """

    def __init__(self, kv: KeyValue, decode: Callable[[bytes], R], *, check_every_s: float = 2.0) -> None:
        self._kv = kv
        self._decode = decode
        self._check_every_s = check_every_s
        self.records: dict[str, R] = {}
        self._revision = 0
        self._watch: asyncio.Task[None] | None = None
        self._guard: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._rewatch()
        self._guard = asyncio.create_task(self._keep_current())

    async def _rewatch(self) -> None:
        """Start a watch, wait for its initial values, then swap them in whole."""
        if self._watch is not None:
            await _cancel(self._watch)
        watcher = await self._kv.watchall()
        fresh: dict[str, R] = {}
        synced = asyncio.Event()
        self._watch = asyncio.create_task(self._follow(watcher, fresh, synced))
        try:
            await asyncio.wait_for(synced.wait(), MIRROR_SYNC_TIMEOUT_S)
        except asyncio.TimeoutError:
            await _cancel(self._watch)
            raise

    async def _follow(self, watcher: KeyValue.KeyWatcher, records: dict[str, R], synced: asyncio.Event) -> None:
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout=60)  # type: ignore[no-untyped-call]  # nats-py: unannotated
                except (NatsTimeoutError, asyncio.TimeoutError):
                    continue
                if entry is None:  # the initial values have all arrived: from now on, live
                    self.records = records
                    synced.set()
                    continue
                self._revision = max(self._revision, int(entry.revision or 0))
                if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
                    records.pop(entry.key, None)
                    continue
                try:
                    records[entry.key] = self._decode(entry.value)
                except msgspec.DecodeError:
                    log.error("catalog record cannot be read; ignored", extra={"key": entry.key})
                    records.pop(entry.key, None)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]  # nats-py: unannotated

    async def _keep_current(self) -> None:
        behind_since: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._check_every_s)
            try:
                last_seq = int((await self._kv.status()).stream_info.state.last_seq)
                if last_seq <= self._revision:
                    behind_since = None
                elif behind_since is None:
                    behind_since = loop.time()  # give the watch one period to deliver it
                elif loop.time() - behind_since >= self._check_every_s:
                    log.warning("catalog mirror fell behind; watching again")
                    await self._rewatch()
                    behind_since = None
            except Exception as err:  # noqa: BLE001 - retried on the next check
                log.warning("catalog mirror check failed", extra={"error": str(err)})

    async def stop(self) -> None:
        for task in (self._guard, self._watch):
            if task is not None:
                await _cancel(task)


# Other KV-backed catalogs (triggers) keep their local copies the same way.
KvMirror = _Mirror


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class Catalog:
    """Reads and writes function records, async configs and code archives.

    After `watch()`, reads are served from local mirrors the KV buckets push changes into, so
    the hot paths (every submission, every dispatch) make no round trip. A function missing
    from the mirror is still looked up in the bucket: it may have been created a moment ago
    through another process, and refusing its first task would be wrong.
    """

    def __init__(
        self, *, js: JetStreamContext, functions: KeyValue, async_configs: KeyValue, code: ObjectStore,
        versions: Versions | None = None,
    ) -> None:
        self._js = js
        self._functions = functions
        self._async_configs = async_configs
        self._code = code
        self.versions = versions
        self._function_mirror: _Mirror[FunctionRecord] | None = None
        self._config_mirror: _Mirror[AsyncConfigRecord] | None = None

    async def watch(self) -> None:
        """Start mirroring both buckets locally; returns once the mirrors hold every record."""
        self._function_mirror = _Mirror(self._functions, _decode_function)
        self._config_mirror = _Mirror(self._async_configs, _decode_async_config)
        await asyncio.gather(self._function_mirror.start(), self._config_mirror.start())
        if self.versions is not None:
            await self.versions.watch()

    async def close(self) -> None:
        """Stop the mirrors started by `watch`."""
        for mirror in (self._function_mirror, self._config_mirror):
            if mirror is not None:
                await mirror.stop()
        if self.versions is not None:
            await self.versions.close()

    @classmethod
    async def open(cls, js: JetStreamContext, *, replicas: int | None = None) -> Catalog:
        """Open (creating when missing) the catalog's buckets.

        New buckets get `replicas` copies; by default as many as the event stream has (which
        TASKMODE_STREAM_REPLICAS set when the service ensured it), so a NATS cluster that keeps
        every event on 3 nodes keeps functions and code on 3 as well. Existing ones keep theirs.
        """
        copies = replicas if replicas is not None else await _stream_replicas(js)
        functions = await _key_value(js, wire.FUNCTIONS_BUCKET, replicas=copies)
        async_configs = await _key_value(js, wire.ASYNC_CONFIG_BUCKET, replicas=copies)
        try:
            code = await js.object_store(wire.CODE_BUCKET)
        except BucketNotFoundError:
            code = await js.create_object_store(
                wire.CODE_BUCKET, config=ObjectStoreConfig(description="function code", replicas=copies))
        from shared.versions import Versions  # versions snapshot FunctionRecords: imports this module

        versions = Versions(await _key_value(js, wire.VERSIONS_BUCKET, replicas=copies))
        return cls(js=js, functions=functions, async_configs=async_configs, code=code, versions=versions)

    async def put_code(self, checksum: str, archive: bytes) -> None:
        """Store a code zip under its checksum (idempotent: same checksum, same bytes)."""
        await self._code.put(checksum, archive)

    async def list_code(self) -> list[tuple[str, datetime | None]]:
        """Every stored code archive: (checksum, when it was last put; None if unknown)."""
        try:
            infos = await self._code.list(ignore_deletes=True)
        except NotFoundError:
            return []
        listed: list[tuple[str, datetime | None]] = []
        for info in infos:
            put_at: datetime | None = None
            with contextlib.suppress(TypeError, ValueError):
                put_at = datetime.fromisoformat(str(info.mtime))
            listed.append((str(info.name), put_at))
        return listed

    async def delete_code(self, checksum: str) -> None:
        """Remove a code archive (a no-op if it is already gone)."""
        with contextlib.suppress(ObjectNotFoundError, NotFoundError):
            await self._code.delete(checksum)

    async def referenced_code(self) -> set[str]:
        """The code keys some function's record or published version points at: code to keep."""
        referenced = {record.code_key for record in await self.list_functions()}
        if self.versions is not None:
            referenced |= await self.versions.referenced_code()
        return referenced

    async def get_code(self, checksum: str) -> bytes:
        """The code zip with `checksum`; raises `FunctionNotFound` if it was removed, and a
        timeout (never waits unbounded) while the bus is slow or away."""
        try:
            info = await self._code.get_info(checksum)
            return await read_object(self._js, info)
        except NotFoundError as err:  # the object, or a chunk of it, removed meanwhile
            raise FunctionNotFound(f"code {checksum} not found") from err

    async def create_function(self, record: FunctionRecord) -> None:
        """Add a function; `FunctionAlreadyExists` if the name is taken."""
        try:
            await self._functions.create(record.function_name, _encode(record))
        except KeyWrongLastSequenceError as err:
            raise FunctionAlreadyExists(f"function {record.function_name} already exists") from err
        if self._function_mirror is not None:
            self._function_mirror.records[record.function_name] = record

    async def get_function_versioned(self, name: str) -> tuple[FunctionRecord, int]:
        """The function and its KV revision (for compare-and-set updates)."""
        try:
            entry = await self._functions.get(name)
        except KeyNotFoundError as err:
            raise FunctionNotFound(f"function {name} does not exist") from err
        if entry.value is None:
            raise FunctionNotFound(f"function {name} does not exist")
        return _decode_function(entry.value), int(entry.revision or 0)

    async def get_function(self, name: str) -> FunctionRecord:
        """The function called `name`; `FunctionNotFound` if there is none."""
        record, _ = await self.get_function_versioned(name)
        return record

    async def find_function(self, name: str) -> FunctionRecord | None:
        """Like `get_function`, but None for a missing function."""
        if self._function_mirror is not None and name in self._function_mirror.records:
            return self._function_mirror.records[name]
        try:
            return await self.get_function(name)
        except FunctionNotFound:
            return None

    def cached_function(self, name: str) -> FunctionRecord | None:
        """The function as the local mirror has it right now (None: not mirrored, or no mirror).

        For checks that must not wait, such as whether a function is paused: the mirror follows
        every change within milliseconds.
        """
        return self._function_mirror.records.get(name) if self._function_mirror is not None else None

    async def known_functions(self) -> dict[str, FunctionRecord]:
        """Every function by name: from the mirror after `watch()` (no round trip), else listed."""
        if self._function_mirror is not None:
            return dict(self._function_mirror.records)
        return {record.function_name: record for record in await self.list_functions()}

    async def replace_function(self, record: FunctionRecord, *, revision: int) -> None:
        """Overwrite a function read at `revision`; `ConcurrentUpdateError` if it changed since."""
        try:
            await self._functions.update(record.function_name, _encode(record), last=revision)
        except KeyWrongLastSequenceError as err:
            raise ConcurrentUpdateError(f"function {record.function_name} changed concurrently") from err
        if self._function_mirror is not None:
            self._function_mirror.records[record.function_name] = record

    async def delete_function(self, name: str) -> None:
        """Remove a function, its async configs, versions and aliases; `FunctionNotFound` if absent.

        The record goes first: from then on nothing resolves the function, so what follows
        cannot be half-visible even if this is interrupted (a recreated function gets a new id
        and never sees leftovers: see `shared.versions`).
        """
        await self.get_function(name)
        await self._functions.purge(name)
        if self._function_mirror is not None:
            self._function_mirror.records.pop(name, None)
        for qualifier, _ in await self.list_async_configs_of(name):
            await self.delete_async_config(name, qualifier)
        if self.versions is not None:
            await self.versions.delete_all(name)

    async def list_functions(self) -> list[FunctionRecord]:
        """Every function, sorted by name."""
        records = []
        for name in sorted(await _keys(self._functions)):
            record = await self.find_function(name)
            if record is not None:
                records.append(record)
        return records

    async def put_async_config(self, name: str, record: AsyncConfigRecord) -> None:
        """Store the async-invoke config of function `name` for `record.qualifier`."""
        key = async_config_key(name, record.qualifier)
        await self._async_configs.put(key, _encode(record))
        if self._config_mirror is not None:
            self._config_mirror.records[key] = record

    async def find_async_config(self, name: str, qualifier: str = LATEST) -> AsyncConfigRecord | None:
        """The async config of `name` for `qualifier`, or None when it was never put."""
        key = async_config_key(name, qualifier)
        if self._config_mirror is not None:
            # Configs change rarely and a missing one is the common case: trust the mirror
            # both ways (a put through another gateway shows up within milliseconds).
            return self._config_mirror.records.get(key)
        try:
            entry = await self._async_configs.get(key)
        except KeyNotFoundError:
            return None
        return _decode_async_config(entry.value) if entry.value else None

    async def get_async_config(self, name: str, qualifier: str = LATEST) -> AsyncConfigRecord:
        """The async config of `name` for `qualifier`; `AsyncConfigNotFound` if none was put."""
        record = await self.find_async_config(name, qualifier)
        if record is None:
            raise AsyncConfigNotFound(f"async invoke config of function {name} (qualifier {qualifier}) not found")
        return record

    async def delete_async_config(self, name: str, qualifier: str = LATEST) -> None:
        """Remove the async config of `name` for `qualifier`; `AsyncConfigNotFound` if none was put."""
        await self.get_async_config(name, qualifier)
        key = async_config_key(name, qualifier)
        await self._async_configs.purge(key)
        if self._config_mirror is not None:
            self._config_mirror.records.pop(key, None)

    async def list_async_configs(self) -> list[tuple[str, AsyncConfigRecord]]:
        """Every (function name, async config), sorted by name, then LATEST before other qualifiers."""
        out = []
        for key in sorted(await _keys(self._async_configs), key=_config_order):
            name, _, qualifier = key.partition(".")
            record = await self.find_async_config(name, qualifier or LATEST)
            if record is not None:
                out.append((name, record))
        return out

    async def latest_async_configs(self) -> dict[str, AsyncConfigRecord]:
        """Each function's LATEST async config, by function name (from the mirror when watched)."""
        if self._config_mirror is not None:
            # A LATEST config's key is the bare function name (`async_config_key`).
            return {key: record for key, record in self._config_mirror.records.items() if "." not in key}
        return {name: record for name, record in await self.list_async_configs() if record.qualifier == LATEST}

    async def list_async_configs_of(self, name: str) -> list[tuple[str, AsyncConfigRecord]]:
        """Every (qualifier, async config) of one function."""
        return [(record.qualifier, record) for owner, record in await self.list_async_configs() if owner == name]


def _config_order(key: str) -> tuple[str, bool, str]:
    name, dot, qualifier = key.partition(".")
    return name, bool(dot), qualifier


async def _stream_replicas(js: JetStreamContext) -> int:
    try:
        info = await js.stream_info(wire.EVENT_STREAM)
    except NotFoundError:
        return 1
    return int(info.config.num_replicas or 1)


async def _key_value(js: JetStreamContext, bucket: str, *, replicas: int) -> KeyValue:
    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        return await js.create_key_value(KeyValueConfig(bucket=bucket, history=1, replicas=replicas))


async def _keys(kv: KeyValue) -> list[str]:
    """Every key with an entry in the bucket, deleted ones included (callers read each key and
    skip the missing). Listed from the stream's subject counts: KeyValue.keys() watches the bucket
    and can mark its end before entries already delivered are read, leaving keys out of the list
    (code GC once removed a live function's archive that way)."""
    prefix = kv._pre  # "$KV.<bucket>."
    try:
        info = await kv._js.stream_info(kv._stream, subjects_filter=f"{prefix}>")
    except Exception:  # noqa: BLE001 - a role without stream info: the watcher's list
        try:
            return list(await kv.keys())
        except NoKeysError:
            return []
    return [subject[len(prefix):] for subject in (info.state.subjects or {})]


# For the other KV-backed catalogs (triggers): the same bucket opening and key listing.
open_bucket = _key_value
stream_replicas = _stream_replicas
bucket_keys = _keys
