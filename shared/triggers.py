"""Triggers: what starts tasks besides InvokeFunction, stored in their own JetStream KV bucket.

A trigger belongs to a function and fires on a qualifier. Three types exist:

- `nats` (ours): every message published on `triggerConfig.subject` (wildcards allowed) becomes
  an async task; the triggers service subscribes.
- `http`: FC's HTTP trigger, served by the gateway (`authType` anonymous or function).
- `timer`: FC's TimerTriggerConfig (`cronExpression`, `payload`, `enable`); the triggers
  service submits one task per tick.

Records use FC 3.0's `Trigger` JSON names; `triggerConfig` is a JSON string, as in FC's API.
Keys are `<function>.<trigger>` (both names exclude dots).
"""

from __future__ import annotations

import asyncio
import enum
import re
import uuid
from collections.abc import Iterator
from typing import Final

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shared import wire
from shared.catalog import KvMirror, bucket_keys, open_bucket, stream_replicas
from shared.errors import ConcurrentUpdateError, InvalidArgument, TriggerAlreadyExists, TriggerNotFound
from shared.schedules import parse_schedule

TRIGGER_NAME_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,127}$")
# A token of a subject a publisher may use: no whitespace, and not a wildcard unless it is one whole.
_SUBJECT_TOKEN: Final = re.compile(r"^[^\s.*>]+$")
# Subjects no trigger may listen on: the system's own traffic, JetStream's API and reply inboxes.
RESERVED_SUBJECT_ROOTS: Final = ("taskmode", "$", "_INBOX")
MAX_SUBJECT_CHARS: Final = 256
HTTP_METHODS: Final = ("GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS")


class TriggerType(enum.StrEnum):
    NATS = "nats"
    HTTP = "http"
    TIMER = "timer"


class HttpAuthType(enum.StrEnum):
    ANONYMOUS = "anonymous"
    FUNCTION = "function"


class NatsTriggerConfig(msgspec.Struct, kw_only=True, rename="camel", forbid_unknown_fields=True):
    subject: str
    enable: bool = True


class TimerTriggerConfig(msgspec.Struct, kw_only=True, rename="camel", forbid_unknown_fields=True):
    cron_expression: str
    payload: str = ""
    enable: bool = True


class HttpTriggerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True,
                        rename={"auth_type": "authType", "auth_config": "authConfig", "methods": "methods",
                                "disable_url_internet": "disableURLInternet", "cors_config": "corsConfig"}):
    auth_type: str = HttpAuthType.ANONYMOUS
    methods: list[str] = msgspec.field(default_factory=lambda: list(HTTP_METHODS))
    disable_url_internet: bool = False
    auth_config: str = ""
    cors_config: dict[str, object] | None = None


TriggerConfig = NatsTriggerConfig | TimerTriggerConfig | HttpTriggerConfig
_CONFIG_TYPES: Final[dict[TriggerType, type[TriggerConfig]]] = {
    TriggerType.NATS: NatsTriggerConfig,
    TriggerType.TIMER: TimerTriggerConfig,
    TriggerType.HTTP: HttpTriggerConfig,
}


class HttpTriggerUrls(msgspec.Struct, kw_only=True, rename="camel"):
    url_internet: str
    url_intranet: str


class TriggerRecord(msgspec.Struct, kw_only=True, rename="camel", omit_defaults=False):
    """A trigger as FC 3.0's `Trigger` model names it (`httpTrigger` is added when shown)."""

    trigger_name: str
    trigger_id: str
    trigger_type: str
    trigger_config: str  # JSON, as FC's API carries it
    qualifier: str = "LATEST"
    description: str = ""
    source_arn: str = ""
    invocation_role: str = ""
    target_arn: str = ""
    status: str = "Enabled"
    created_time: str = ""
    last_modified_time: str = ""

    def config(self) -> TriggerConfig:
        """The typed config (stored records were checked when they were written)."""
        return msgspec.json.decode(self.trigger_config, type=_CONFIG_TYPES[TriggerType(self.trigger_type)])


def check_trigger_name(name: str) -> str:
    if not TRIGGER_NAME_RE.fullmatch(name):
        raise InvalidArgument(f"invalid trigger name {name[:140]!r}: it must match {TRIGGER_NAME_RE.pattern}")
    return name


def check_trigger_type(value: str) -> TriggerType:
    try:
        return TriggerType(value)
    except ValueError as err:
        raise InvalidArgument(
            f"unsupported triggerType {value[:40]!r}: taskmode implements {', '.join(t.value for t in TriggerType)}"
        ) from err


def check_subscribe_subject(subject: str) -> str:
    """A subject a `nats` trigger may listen on: wildcards allowed, the system's own refused."""
    tokens = subject.split(".")
    if not subject or len(subject) > MAX_SUBJECT_CHARS:
        raise InvalidArgument(f"triggerConfig.subject must be 1 to {MAX_SUBJECT_CHARS} characters")
    for index, token in enumerate(tokens):
        if token == "*" or (token == ">" and index == len(tokens) - 1):
            continue
        if not _SUBJECT_TOKEN.fullmatch(token):
            raise InvalidArgument(f"triggerConfig.subject {subject[:80]!r} is not a valid NATS subject")
    if tokens[0] in ("*", ">") or tokens[0].startswith(RESERVED_SUBJECT_ROOTS):
        raise InvalidArgument(
            f"triggerConfig.subject {subject[:80]!r} may not start with a wildcard, 'taskmode', '$' or '_INBOX'"
        )
    return subject


def check_publish_subject(subject: str) -> str:
    """A subject taskmode may publish to (a `nats:` destination): no wildcards, not the system's own."""
    check_subscribe_subject(subject)
    if any(token in ("*", ">") for token in subject.split(".")):
        raise InvalidArgument(f"subject {subject[:80]!r} may not contain wildcards")
    return subject


def parse_config(trigger_type: TriggerType, raw: object) -> TriggerConfig:
    """Check a `triggerConfig` (a JSON string, as the SDK sends it, or an object) for its type."""
    if isinstance(raw, str):
        try:
            raw = msgspec.json.decode(raw)
        except msgspec.DecodeError as err:
            raise InvalidArgument(f"triggerConfig is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise InvalidArgument("triggerConfig must be a JSON object")
    try:
        config = msgspec.convert(raw, type=_CONFIG_TYPES[trigger_type])
    except msgspec.ValidationError as err:
        raise InvalidArgument(f"invalid triggerConfig for a {trigger_type} trigger: {err}") from err
    if isinstance(config, NatsTriggerConfig):
        check_subscribe_subject(config.subject)
    elif isinstance(config, TimerTriggerConfig):
        parse_schedule(config.cron_expression)
    else:
        if config.auth_type not in tuple(HttpAuthType):
            raise InvalidArgument(f"triggerConfig.authType {config.auth_type[:40]!r}: use anonymous or function")
        methods = [m.upper() for m in config.methods]
        unknown = [m for m in methods if m not in HTTP_METHODS]
        if unknown or not methods:
            raise InvalidArgument(f"triggerConfig.methods must be a non-empty list of {', '.join(HTTP_METHODS)}")
        config.methods = methods
    return config


def is_enabled(config: TriggerConfig) -> bool:
    """Whether the trigger fires at all (`enable: false` turns a nats or timer trigger off)."""
    return getattr(config, "enable", True)


def encode_config(config: TriggerConfig) -> str:
    return msgspec.json.encode(config).decode()


def new_trigger_id() -> str:
    return uuid.uuid4().hex


def trigger_key(function: str, trigger: str) -> str:
    return f"{function}.{trigger}"


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(TriggerRecord).decode


class TriggerCatalog:
    """Reads and writes triggers; after `watch()`, reads come from a local, pushed mirror."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._mirror: KvMirror[TriggerRecord] | None = None

    @classmethod
    async def open(cls, js: JetStreamContext) -> TriggerCatalog:
        return cls(await open_bucket(js, wire.TRIGGERS_BUCKET, replicas=await stream_replicas(js)))

    async def watch(self) -> None:
        self._mirror = KvMirror(self._kv, _decode)
        await self._mirror.start()

    async def close(self) -> None:
        if self._mirror is not None:
            await self._mirror.stop()

    def all(self) -> Iterator[tuple[str, TriggerRecord]]:
        """(function, record) for every trigger in the mirror (an empty view before `watch`)."""
        records = self._mirror.records if self._mirror is not None else {}
        for key, record in list(records.items()):
            yield key.split(".", 1)[0], record

    async def create(self, function: str, record: TriggerRecord) -> None:
        key = trigger_key(function, record.trigger_name)
        try:
            await self._kv.create(key, _encode(record))
        except KeyWrongLastSequenceError as err:
            raise TriggerAlreadyExists(f"trigger {record.trigger_name} of function {function} already exists") from err
        if self._mirror is not None:
            self._mirror.records[key] = record

    async def get_versioned(self, function: str, name: str) -> tuple[TriggerRecord, int]:
        try:
            entry = await self._kv.get(trigger_key(function, name))
        except KeyNotFoundError as err:
            raise TriggerNotFound(f"trigger {name} of function {function} does not exist") from err
        if not entry.value:
            raise TriggerNotFound(f"trigger {name} of function {function} does not exist")
        return _decode(entry.value), int(entry.revision or 0)

    async def find(self, function: str, name: str) -> TriggerRecord | None:
        """The trigger from the mirror (falling back to the bucket: it may be seconds old)."""
        key = trigger_key(function, name)
        if self._mirror is not None and key in self._mirror.records:
            return self._mirror.records[key]
        try:
            return (await self.get_versioned(function, name))[0]
        except TriggerNotFound:
            return None

    async def replace(self, function: str, record: TriggerRecord, *, revision: int) -> None:
        key = trigger_key(function, record.trigger_name)
        try:
            await self._kv.update(key, _encode(record), last=revision)
        except KeyWrongLastSequenceError as err:
            raise ConcurrentUpdateError(f"trigger {record.trigger_name} changed concurrently") from err
        if self._mirror is not None:
            self._mirror.records[key] = record

    async def delete(self, function: str, name: str) -> None:
        await self.get_versioned(function, name)
        await self._kv.purge(trigger_key(function, name))
        if self._mirror is not None:
            self._mirror.records.pop(trigger_key(function, name), None)

    async def list(self, function: str) -> list[TriggerRecord]:
        """The function's triggers, sorted by name."""
        prefix = f"{function}."
        records = []
        for key in sorted(k for k in await bucket_keys(self._kv) if k.startswith(prefix)):
            record = await self.find(function, key[len(prefix):])
            if record is not None:
                records.append(record)
        return records

    async def delete_all(self, function: str) -> None:
        """Remove every trigger of a function (it is being deleted)."""
        for record in await self.list(function):
            await asyncio.gather(self.delete(function, record.trigger_name), return_exceptions=True)
