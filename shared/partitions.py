"""Splitting a partitioned service's work between its running instances, with leases in NATS KV.

Tasks hash into a fixed number of partitions (`wire.partition_of`), and each partition has its
own durable consumer. An instance consumes only partitions whose lease it holds, so each
partition, and therefore each task, is handled by one instance at a time, in stream order.

Every instance keeps a member entry alive and aims at its fair share, ceil(partitions /
members): it claims free or expired leases below its share and hands back leases above it.
A lease names its holder and an expiry; an instance that dies (kill -9) stops renewing, and its
partitions move to the others once their leases run out. Expiry is judged by the local clock,
so the hosts' clocks must agree to well within a lease (NTP does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shared import wire

log = logging.getLogger(__name__)


class Lease(msgspec.Struct):
    holder: str
    until_ms: int


class Members(msgspec.Struct):
    until_ms: dict[str, int] = {}


def _now_ms() -> int:
    return int(time.time() * 1000)


async def open_leases(js: JetStreamContext, *, replicas: int = 1) -> KeyValue:
    try:
        return await js.key_value(wire.LEASES_BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(KeyValueConfig(bucket=wire.LEASES_BUCKET, history=1, replicas=replicas))


class PartitionLeases:
    """The leases one instance of `group` holds; `tick()` renews, claims and releases them."""

    def __init__(self, kv: KeyValue, *, group: str, partitions: int, lease_s: float, member: str = "") -> None:
        self._kv = kv
        self._group = group
        self._partitions = partitions
        self._lease_ms = int(lease_s * 1000)
        self.member = member or uuid.uuid4().hex[:12]
        self._held: dict[int, int] = {}  # partition -> revision of our lease entry

    @property
    def held(self) -> set[int]:
        return set(self._held)

    def _key(self, partition: int) -> str:
        return f"{self._group}.p{partition}"

    def _value(self) -> bytes:
        return msgspec.json.encode(Lease(holder=self.member, until_ms=_now_ms() + self._lease_ms))

    async def tick(self) -> tuple[set[int], set[int], set[int]]:
        """Renew what is held, then move toward the fair share.

        Returns (gained, lost, surplus): the caller starts consuming `gained`, stops consuming
        `lost` (someone else holds it now) and stops consuming `surplus`, then `release`s it.
        """
        members = await self._heartbeat()
        lost = await self._renew()
        share = math.ceil(self._partitions / max(1, members))
        gained: set[int] = set()
        surplus: set[int] = set()
        if len(self._held) > share:
            surplus = set(sorted(self._held)[share:])
        elif len(self._held) < share:
            for partition in self._claim_order():
                if len(self._held) >= share:
                    break
                if await self._claim(partition):
                    gained.add(partition)
        return gained, lost, surplus

    def _claim_order(self) -> list[int]:
        # Start at a member-specific offset, so that instances starting together do not all
        # race for partition 0 first.
        start = int(self.member, 16) % self._partitions if self.member.isalnum() else 0
        order = [(start + i) % self._partitions for i in range(self._partitions)]
        return [p for p in order if p not in self._held]

    async def _heartbeat(self) -> int:
        """Keep our member entry alive; the number of live members."""
        key = f"{self._group}.members"
        for _ in range(5):
            now = _now_ms()
            try:
                entry = await self._kv.get(key)
                members = msgspec.json.decode(entry.value or b"{}", type=Members)
                revision: int | None = entry.revision
            except KeyNotFoundError:
                members, revision = Members(), None
            live = {m: until for m, until in members.until_ms.items() if until > now}
            live[self.member] = now + self._lease_ms
            data = msgspec.json.encode(Members(until_ms=live))
            try:
                if revision is None:
                    await self._kv.create(key, data)
                else:
                    await self._kv.update(key, data, last=revision)
                return len(live)
            except KeyWrongLastSequenceError:
                continue  # another member wrote at the same moment: read again
        return 1

    async def _renew(self) -> set[int]:
        lost: set[int] = set()
        for partition, revision in list(self._held.items()):
            try:
                self._held[partition] = await self._kv.update(self._key(partition), self._value(), last=revision)
            except KeyWrongLastSequenceError:
                log.warning("partition lease lost", extra={"group": self._group, "partition": partition})
                del self._held[partition]
                lost.add(partition)
        return lost

    async def _claim(self, partition: int) -> bool:
        key = self._key(partition)
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            entry = None
        try:
            if entry is None or not entry.value:
                revision = await self._kv.create(key, self._value())
            else:
                lease = msgspec.json.decode(entry.value, type=Lease)
                if lease.holder != self.member and lease.until_ms > _now_ms():
                    return False
                assert entry.revision is not None
                revision = await self._kv.update(key, self._value(), last=entry.revision)
        except KeyWrongLastSequenceError:
            return False
        self._held[partition] = revision
        log.info("partition claimed", extra={"group": self._group, "partition": partition, "member": self.member})
        return True

    async def release(self, partition: int) -> None:
        revision = self._held.pop(partition, None)
        if revision is None:
            return
        with contextlib.suppress(Exception):  # it expires anyway
            await self._kv.delete(self._key(partition), last=revision)
        log.info("partition released", extra={"group": self._group, "partition": partition, "member": self.member})

    async def release_all(self) -> None:
        for partition in list(self._held):
            await self.release(partition)


ConsumePartition = Callable[[int, asyncio.Event], Coroutine[Any, Any, None]]


async def run_partitioned(leases: PartitionLeases, consume: ConsumePartition, *, stop: asyncio.Event,
                          lease_s: float) -> None:
    """Run `consume(partition, partition_stop)` for every partition this instance holds.

    A partition whose lease is lost or handed back is stopped (its current batch finishes)
    before anyone else may claim it; on `stop` every partition is stopped and its lease freed.
    """
    running: dict[int, tuple[asyncio.Event, asyncio.Task[None]]] = {}

    async def stop_partition(partition: int) -> None:
        if partition in running:
            partition_stop, task = running.pop(partition)
            partition_stop.set()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task

    try:
        while not stop.is_set():
            try:
                gained, lost, surplus = await leases.tick()
            except Exception as err:  # noqa: BLE001 - the bus is away: keep what we run until it returns
                log.warning("lease renewal failed", extra={"error": repr(err)})
                gained, lost, surplus = set(), set(), set()
            for partition in lost | surplus:
                await stop_partition(partition)
            for partition in surplus:
                await leases.release(partition)
            for partition in gained:
                partition_stop = asyncio.Event()
                running[partition] = (partition_stop, asyncio.create_task(consume(partition, partition_stop)))
            for partition, (_, task) in list(running.items()):
                if task.done():  # a consumer that ended on its own (e.g. ConsumerGone) ends us
                    running.pop(partition)
                    await leases.release(partition)
                    task.result()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), lease_s / 3)
    finally:
        for partition in list(running):
            await stop_partition(partition)
        with contextlib.suppress(Exception):
            await leases.release_all()
