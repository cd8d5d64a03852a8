"""Function versions and aliases: immutable snapshots and names for them, in one KV bucket.

Keys (function names never contain a dot):
  `<function>.v.<id>`   a `VersionRecord`: the function record (code checksum included) as it
                        was when published; the code stays in the object store under its key
  `<function>.a.<name>` an `AliasRecord`
  `<function>.last`     the last version id handed out, so ids only increase, also after a
                        version is deleted (compare-and-set: two publishers never share an id)

A version snapshot carries the `functionId` of the incarnation it was published from; a deleted
function's versions and aliases are deleted with it, and resolution (`shared.qualifiers`)
refuses any snapshot whose id is not the current function's, so a recreated function never
runs an old incarnation's code even if a deletion was interrupted.
"""

from __future__ import annotations

import asyncio
from typing import Final

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.kv import KeyValue

from shared.catalog import FunctionRecord, _Mirror, bucket_keys
from shared.errors import AliasAlreadyExists, AliasNotFound, ConcurrentUpdateError, VersionInUse, VersionNotFound

_PUBLISH_ATTEMPTS: Final = 10


class VersionRecord(msgspec.Struct, kw_only=True, rename="camel"):
    """FC's `Version` plus the snapshot it names (`function`, not shown by the API)."""

    version_id: str
    description: str = ""
    created_time: str = ""
    last_modified_time: str = ""
    function: FunctionRecord

    def view(self) -> dict[str, str]:
        """FC's `Version` JSON."""
        return {"versionId": self.version_id, "description": self.description,
                "createdTime": self.created_time, "lastModifiedTime": self.last_modified_time}


class AliasRecord(msgspec.Struct, kw_only=True, rename="camel"):
    """FC's `Alias`: a name for a version, optionally sending a share of calls to one other version."""

    alias_name: str
    version_id: str
    description: str = ""
    additional_version_weight: dict[str, float] = {}
    created_time: str = ""
    last_modified_time: str = ""


class _LastVersion(msgspec.Struct, kw_only=True):
    last: int


_decode_version = msgspec.json.Decoder(VersionRecord).decode
_decode_alias = msgspec.json.Decoder(AliasRecord).decode
_decode_last = msgspec.json.Decoder(_LastVersion).decode
_encode = msgspec.json.Encoder().encode


def _version_key(function: str, version_id: str) -> str:
    return f"{function}.v.{version_id}"


def _alias_key(function: str, alias: str) -> str:
    return f"{function}.a.{alias}"


def _last_key(function: str) -> str:
    return f"{function}.last"


def _raw(data: bytes) -> bytes:
    return data


class Versions:
    """Publishes, reads and deletes versions and aliases (mirrored locally after `watch`)."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._mirror: _Mirror[bytes] | None = None

    async def watch(self) -> None:
        self._mirror = _Mirror(self._kv, _raw)
        await self._mirror.start()

    async def close(self) -> None:
        if self._mirror is not None:
            await self._mirror.stop()

    # --- raw access ---------------------------------------------------------------------------

    async def _get(self, key: str) -> tuple[bytes, int] | None:
        """A value and its revision (0 when served by the mirror), or None."""
        if self._mirror is not None and key in self._mirror.records:
            return self._mirror.records[key], 0
        # Missing from the mirror: it may have been written a moment ago by another process.
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        return bytes(entry.value), int(entry.revision or 0)

    async def _keys(self, prefix: str) -> list[str]:
        if self._mirror is not None:
            keys = list(self._mirror.records)
        else:
            keys = await bucket_keys(self._kv)
        return [key for key in keys if key.startswith(prefix)]

    def _remember(self, key: str, value: bytes | None) -> None:
        if self._mirror is None:
            return
        if value is None:
            self._mirror.records.pop(key, None)
        else:
            self._mirror.records[key] = value

    async def _purge(self, key: str) -> None:
        try:
            await self._kv.purge(key)
        except KeyNotFoundError:
            pass
        self._remember(key, None)

    # --- versions -----------------------------------------------------------------------------

    async def referenced_code(self) -> set[str]:
        """The code keys of every published version's snapshot (code garbage collection keeps
        them). Read from the bucket, not the mirror: a sweep must not miss a version another
        process published a moment ago."""
        try:
            keys = list(await self._kv.keys())
        except NoKeysError:
            return set()
        referenced: set[str] = set()
        for key in keys:
            if key.split(".")[1:2] != ["v"]:
                continue  # an alias or a counter
            try:
                entry = await self._kv.get(key)
            except KeyNotFoundError:
                continue
            if entry.value:
                referenced.add(_decode_version(entry.value).function.code_key)
        return referenced

    async def publish(self, function: FunctionRecord, *, description: str, now: str) -> VersionRecord:
        """Snapshot `function` as its next version (ids are 1, 2, 3, ... per incarnation)."""
        name = function.function_name
        for _ in range(_PUBLISH_ATTEMPTS):
            try:
                entry = await self._kv.get(_last_key(name))
                last, revision = _decode_last(entry.value or b'{"last":0}').last, int(entry.revision or 0)
            except KeyNotFoundError:
                last, revision = 0, 0
            claimed = _encode(_LastVersion(last=last + 1))
            try:
                if revision:
                    await self._kv.update(_last_key(name), claimed, last=revision)
                else:
                    await self._kv.create(_last_key(name), claimed)
            except KeyWrongLastSequenceError:
                await asyncio.sleep(0)
                continue  # another publisher took that id: take the next
            record = VersionRecord(version_id=str(last + 1), description=description, created_time=now,
                                   last_modified_time=now, function=function)
            value = _encode(record)
            await self._kv.put(_version_key(name, record.version_id), value)
            self._remember(_version_key(name, record.version_id), value)
            return record
        raise ConcurrentUpdateError(f"function {name} is being published concurrently; try again")

    async def find_version(self, function: str, version_id: str) -> VersionRecord | None:
        found = await self._get(_version_key(function, version_id))
        return None if found is None else _decode_version(found[0])

    async def get_version(self, function: str, version_id: str) -> VersionRecord:
        """The version; `VersionNotFound` if it does not exist."""
        record = await self.find_version(function, version_id)
        if record is None:
            raise VersionNotFound(f"version {version_id} of function {function} does not exist")
        return record

    async def list_versions(self, function: str) -> list[VersionRecord]:
        """Every version of `function`, oldest first."""
        records = []
        for key in await self._keys(f"{function}.v."):
            found = await self._get(key)
            if found is not None:
                records.append(_decode_version(found[0]))
        return sorted(records, key=lambda record: int(record.version_id))

    async def delete_version(self, function: str, version_id: str) -> None:
        """Delete a version; `VersionInUse` while an alias routes to it."""
        await self.get_version(function, version_id)
        users = [a.alias_name for a in await self.list_aliases(function)
                 if a.version_id == version_id or version_id in a.additional_version_weight]
        if users:
            raise VersionInUse(
                f"version {version_id} of function {function} is used by alias(es) {', '.join(sorted(users))}; "
                "point them elsewhere or delete them first"
            )
        await self._purge(_version_key(function, version_id))

    # --- aliases ------------------------------------------------------------------------------

    async def create_alias(self, function: str, record: AliasRecord) -> None:
        """Add an alias; `AliasAlreadyExists` if the name is taken."""
        value = _encode(record)
        try:
            await self._kv.create(_alias_key(function, record.alias_name), value)
        except KeyWrongLastSequenceError as err:
            raise AliasAlreadyExists(f"alias {record.alias_name} of function {function} already exists") from err
        self._remember(_alias_key(function, record.alias_name), value)

    async def get_alias_versioned(self, function: str, alias: str) -> tuple[AliasRecord, int]:
        """The alias and its KV revision, read from the bucket (for compare-and-set updates)."""
        try:
            entry = await self._kv.get(_alias_key(function, alias))
        except KeyNotFoundError as err:
            raise AliasNotFound(f"alias {alias} of function {function} does not exist") from err
        if not entry.value:
            raise AliasNotFound(f"alias {alias} of function {function} does not exist")
        return _decode_alias(entry.value), int(entry.revision or 0)

    async def find_alias(self, function: str, alias: str) -> AliasRecord | None:
        found = await self._get(_alias_key(function, alias))
        return None if found is None else _decode_alias(found[0])

    async def get_alias(self, function: str, alias: str) -> AliasRecord:
        record = await self.find_alias(function, alias)
        if record is None:
            raise AliasNotFound(f"alias {alias} of function {function} does not exist")
        return record

    async def replace_alias(self, function: str, record: AliasRecord, *, revision: int) -> None:
        """Overwrite an alias read at `revision`; `ConcurrentUpdateError` if it changed since."""
        value = _encode(record)
        try:
            await self._kv.update(_alias_key(function, record.alias_name), value, last=revision)
        except KeyWrongLastSequenceError as err:
            raise ConcurrentUpdateError(f"alias {record.alias_name} changed concurrently") from err
        self._remember(_alias_key(function, record.alias_name), value)

    async def delete_alias(self, function: str, alias: str) -> None:
        await self.get_alias(function, alias)
        await self._purge(_alias_key(function, alias))

    async def list_aliases(self, function: str) -> list[AliasRecord]:
        """Every alias of `function`, by name."""
        records = []
        for key in sorted(await self._keys(f"{function}.a.")):
            found = await self._get(key)
            if found is not None:
                records.append(_decode_alias(found[0]))
        return records

    async def delete_all(self, function: str) -> None:
        """Forget every version, alias and the id counter of a deleted function."""
        for key in await self._keys(f"{function}."):
            await self._purge(key)
        await self._purge(_last_key(function))
