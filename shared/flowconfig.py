"""Flow-control settings per function and the registry of live instances, in JetStream KV.

- Concurrency configs (FC's `ConcurrencyConfig`: `reservedConcurrency`): how many of a
  function's tasks may run at once. 0 blocks the function: the scheduler holds its tasks
  Enqueued; a cap N is the executor's limit of the function's instances (see the README).
- Scaling configs (FC's `ScalingConfigStatus` subset): `minInstances` kept warm and the
  `maxInstances` of `horizontalScalingPolicies` as the most a function may have.
- Instances: every executor registers its live instances (refreshed, so a dead executor's
  entries age out); ListInstances reads them.

Services keep local mirrors of the two config buckets (watched, as the catalog does), so the
hot paths never make a round trip for them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Final, TypeVar

import msgspec
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from shared import wire
from shared.catalog import KvMirror as KVMirror, open_bucket
from shared.transitions import Status

R = TypeVar("R")

# FC's ListInstances calls a live instance "Running": the same word as the task status.
INSTANCE_RUNNING: Final = str(Status.RUNNING)

# An executor refreshes its instances' entries this often; the bucket forgets an entry after
# INSTANCE_ENTRY_TTL_S without a refresh (its executor died without cleaning up).
INSTANCE_REFRESH_S: Final = 10.0
INSTANCE_ENTRY_TTL_S: Final = 30.0


class ConcurrencyConfigRecord(msgspec.Struct, kw_only=True, rename="camel", omit_defaults=True):
    """FC's `ConcurrencyConfig`, plus our `startRatePerSecond` (FC has no such field): the most
    tasks of the function the scheduler dispatches per second (None: no limit)."""

    function_arn: str
    reserved_concurrency: int | None = None
    start_rate_per_second: float | None = None
    last_modified_time: str = ""


class ScalingPolicy(msgspec.Struct, kw_only=True, rename="camel", omit_defaults=True):
    """FC's `ScalingPolicy`: only `maxInstances` (and `minInstances`) are acted upon here."""

    name: str = ""
    metric_type: str = ""
    metric_target: float | None = None
    min_instances: int | None = None
    max_instances: int | None = None
    start_time: str = ""
    end_time: str = ""
    time_zone: str = ""


class ScalingConfigRecord(msgspec.Struct, kw_only=True, rename="camel"):
    """A function's scaling config as stored (FC's `PutScalingConfigInput` subset)."""

    function_arn: str
    min_instances: int = 0
    horizontal_scaling_policies: list[ScalingPolicy] = []
    last_modified_time: str = ""

    @property
    def max_instances(self) -> int | None:
        """The smallest `maxInstances` of the policies (None: the executor's own default)."""
        limits = [p.max_instances for p in self.horizontal_scaling_policies if p.max_instances is not None]
        return min(limits) if limits else None


class InstanceInfo(msgspec.Struct, kw_only=True, rename="camel", omit_defaults=True):
    """FC's `InstanceInfo` for ListInstances, plus the function and the executor holding it."""

    instance_id: str
    status: str  # INSTANCE_RUNNING while the process lives
    function_name: str
    qualifier: str = "LATEST"
    version_id: str = "LATEST"
    created_time_ms: int = 0
    executor: str = ""


_encode = msgspec.json.Encoder().encode
_decode_concurrency = msgspec.json.Decoder(ConcurrencyConfigRecord).decode
_decode_scaling = msgspec.json.Decoder(ScalingConfigRecord).decode
_decode_instance = msgspec.json.Decoder(InstanceInfo).decode


async def _bucket(js: JetStreamContext, name: str, *, ttl_s: float | None = None, replicas: int = 1) -> KeyValue:
    try:
        return await js.key_value(name)
    except BucketNotFoundError:
        return await js.create_key_value(KeyValueConfig(bucket=name, history=1, ttl=ttl_s, replicas=replicas))


async def _keys(kv: KeyValue) -> list[str]:
    try:
        return list(await kv.keys())
    except NoKeysError:
        return []


class FlowConfigs:
    """Concurrency and scaling configs: reads from watched mirrors, writes to the buckets."""

    def __init__(self, *, concurrency: KeyValue, scaling: KeyValue) -> None:
        self._concurrency = concurrency
        self._scaling = scaling
        self._concurrency_mirror: KVMirror[ConcurrencyConfigRecord] | None = None
        self._scaling_mirror: KVMirror[ScalingConfigRecord] | None = None

    @classmethod
    async def open(cls, js: JetStreamContext, *, replicas: int = 1) -> FlowConfigs:
        """Open (creating when missing) both buckets."""
        return cls(concurrency=await open_bucket(js, wire.CONCURRENCY_CONFIG_BUCKET, replicas=replicas),
                   scaling=await open_bucket(js, wire.SCALING_CONFIG_BUCKET, replicas=replicas))

    async def watch(self) -> None:
        """Mirror both buckets locally; returns once the mirrors hold every record."""
        self._concurrency_mirror = KVMirror(self._concurrency, _decode_concurrency)
        self._scaling_mirror = KVMirror(self._scaling, _decode_scaling)
        await asyncio.gather(self._concurrency_mirror.start(), self._scaling_mirror.start())

    async def close(self) -> None:
        for mirror in (self._concurrency_mirror, self._scaling_mirror):
            if mirror is not None:
                await mirror.stop()

    # --- concurrency ------------------------------------------------------------------------

    async def put_concurrency(self, name: str, record: ConcurrencyConfigRecord) -> None:
        await self._concurrency.put(name, _encode(record))
        if self._concurrency_mirror is not None:
            self._concurrency_mirror.records[name] = record

    def concurrency(self, name: str) -> ConcurrencyConfigRecord | None:
        """The function's concurrency config from the mirror (None: never put)."""
        return self._concurrency_mirror.records.get(name) if self._concurrency_mirror is not None else None

    async def find_concurrency(self, name: str) -> ConcurrencyConfigRecord | None:
        """The function's concurrency config, read from the bucket when not mirrored."""
        if self._concurrency_mirror is not None:
            return self.concurrency(name)
        return await _get(self._concurrency, name, _decode_concurrency)

    async def delete_concurrency(self, name: str) -> bool:
        """Remove a function's concurrency config; whether there was one."""
        return await _delete(self._concurrency, name, self._concurrency_mirror)

    async def list_concurrency(self) -> list[tuple[str, ConcurrencyConfigRecord]]:
        out = []
        for name in sorted(await _keys(self._concurrency)):
            record = await self.find_concurrency(name)
            if record is not None:
                out.append((name, record))
        return out

    # --- scaling ----------------------------------------------------------------------------

    async def put_scaling(self, name: str, record: ScalingConfigRecord) -> None:
        await self._scaling.put(name, _encode(record))
        if self._scaling_mirror is not None:
            self._scaling_mirror.records[name] = record

    def scaling(self, name: str) -> ScalingConfigRecord | None:
        """The function's scaling config from the mirror (None: never put)."""
        return self._scaling_mirror.records.get(name) if self._scaling_mirror is not None else None

    async def find_scaling(self, name: str) -> ScalingConfigRecord | None:
        if self._scaling_mirror is not None:
            return self.scaling(name)
        return await _get(self._scaling, name, _decode_scaling)

    async def delete_scaling(self, name: str) -> bool:
        return await _delete(self._scaling, name, self._scaling_mirror)

    def scaled_functions(self) -> list[str]:
        """Functions with a scaling config (from the mirror)."""
        return sorted(self._scaling_mirror.records) if self._scaling_mirror is not None else []

    async def delete_all(self, name: str) -> None:
        """Forget a deleted function's configs."""
        await self.delete_concurrency(name)
        await self.delete_scaling(name)


async def _get(kv: KeyValue, name: str, decode: Callable[[bytes], R]) -> R | None:
    value = await _get_value(kv, name)
    return decode(value) if value is not None else None


async def _get_value(kv: KeyValue, name: str) -> bytes | None:
    try:
        entry = await kv.get(name)
    except KeyNotFoundError:
        return None
    return entry.value or None


async def _delete(kv: KeyValue, name: str, mirror: KVMirror[R] | None) -> bool:
    existed = await _get_value(kv, name) is not None
    if existed:
        await kv.purge(name)
    if mirror is not None:
        mirror.records.pop(name, None)
    return existed


class InstanceRegistry:
    """Live instances per function, as the executors report them (ListInstances reads it)."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext, *, replicas: int = 1) -> InstanceRegistry:
        return cls(await _bucket(js, wire.INSTANCES_BUCKET, ttl_s=INSTANCE_ENTRY_TTL_S, replicas=replicas))

    @staticmethod
    def _key(info: InstanceInfo) -> str:
        return f"{info.function_name}.{info.instance_id}"

    async def put(self, info: InstanceInfo) -> None:
        await self._kv.put(self._key(info), _encode(info))

    async def remove(self, info: InstanceInfo) -> None:
        with contextlib.suppress(KeyNotFoundError):
            await self._kv.purge(self._key(info))

    async def list(self, function: str) -> list[InstanceInfo]:
        """The function's live instances, oldest first (one watch over its keys: the server
        filters by subject, and the initial values carry the entries themselves)."""
        infos = []
        watcher = await self._kv.watch(f"{function}.>", ignore_deletes=True)
        try:
            while True:
                entry = await watcher.updates(timeout=5)  # type: ignore[no-untyped-call]  # nats-py: unannotated
                if entry is None:  # the current values have all arrived
                    break
                if entry.value:
                    with contextlib.suppress(msgspec.DecodeError):
                        infos.append(_decode_instance(entry.value))
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
        return sorted(infos, key=lambda i: (i.created_time_ms, i.instance_id))
