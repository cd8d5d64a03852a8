"""reservedConcurrency across every executor: a counting semaphore per function in JetStream KV.

A function with a cap N has one key in `taskmode_running`: the holders of its running slots
(holder -> lease expiry, epoch ms). Taking a slot is a compare-and-set of that key (the update
names the revision it read), so of two executors racing for the last slot exactly one wins, and
N+1 tasks never run at once however many executors there are. A slot is taken before the task's
Running append and given back after its outcome's append, so the tasks' own event timestamps
never show more than N running.

Leases are refreshed while held (every LEASE_S / 3); a dead executor's slots expire after
LEASE_S, by which time its tasks are being retried (the dispatch redelivered after the ack wait).
Within one executor only the first waiter of a function polls the key (an asyncio.Lock queues the
rest in arrival order), so a throttled backlog costs one read per POLL_S per executor; a slot
given back here wakes it at once.

The account-wide cap (TASKMODE_ACCOUNT_CONCURRENCY) is one more key, `wire.RUNNING_ACCOUNT_KEY`
(a dot, which no function name has), taken the same way after the function's own slot (so a
task waiting for its function's cap holds no account slot) and given back with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shared import wire
from shared.catalog import open_bucket

log = logging.getLogger(__name__)

LEASE_S: Final = 15.0
POLL_S: Final = 0.025
_CAS_ATTEMPTS: Final = 50

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(dict[str, int]).decode


def _now_ms() -> int:
    return int(time.time() * 1000)


class ClusterSlots:
    """Running slots per capped function, shared by every executor through one KV bucket."""

    def __init__(self, kv: KeyValue, *, owner: str, on_wait: Callable[[str, str, int], None] | None = None) -> None:
        self._kv = kv
        self._owner = owner
        self._held: dict[str, set[str]] = {}
        self._lines: dict[str, asyncio.Lock] = {}
        self._waiting: dict[tuple[str, str], int] = {}  # (function, key) -> dispatches waiting here
        self._freed: dict[str, asyncio.Event] = {}  # set when a slot of ours is given back
        self._known: dict[str, tuple[dict[str, int], int]] = {}  # our last write per function, and its revision
        self._on_wait = on_wait or (lambda _function, _key, _count: None)

    @classmethod
    async def open(cls, js: JetStreamContext, *, owner: str, replicas: int = 1,
                   on_wait: Callable[[str, str, int], None] | None = None) -> ClusterSlots:
        return cls(await open_bucket(js, wire.RUNNING_BUCKET, replicas=replicas), owner=owner, on_wait=on_wait)

    @asynccontextmanager
    async def slot(self, function: str, task_id: str, cap: Callable[[], int | None], *,
                   key: str | None = None) -> AsyncIterator[None]:
        """Hold one of `function`'s running slots for the block (none needed while `cap()` is None);
        with `key`, one of that key's slots instead (the account's), on behalf of `function`."""
        waiter = function
        function = key or function
        holder = f"{self._owner}/{task_id}" if key is None else f"{self._owner}/{waiter}/{task_id}"
        taken = False
        if cap() is not None:
            self._count_waiting(waiter, function, +1)
            try:
                async with self._lines.setdefault(function, asyncio.Lock()):  # FIFO within this executor
                    while (limit := cap()) is not None:
                        if await self._change(function, lambda slots: _with(slots, holder, limit)):
                            taken = True
                            break
                        freed = self._freed.setdefault(function, asyncio.Event())
                        freed.clear()
                        with contextlib.suppress(asyncio.TimeoutError):  # another executor's may free up too
                            await asyncio.wait_for(freed.wait(), POLL_S)
            finally:
                self._count_waiting(waiter, function, -1)
        if taken:
            self._held.setdefault(function, set()).add(holder)
        try:
            yield
        finally:
            if taken:
                self._held[function].discard(holder)
                with contextlib.suppress(Exception):  # left to expire otherwise
                    await self._change(function, lambda slots: _without(slots, holder))
                self._freed.setdefault(function, asyncio.Event()).set()  # our next in line tries at once

    async def refresh(self) -> None:
        """Extend the leases of every slot this executor holds (run every LEASE_S / 3)."""
        for function, holders in list(self._held.items()):
            if holders:
                mine = set(holders)
                await self._change(function, lambda slots: _renewed(slots, mine))

    def _count_waiting(self, function: str, key: str, step: int) -> None:
        count = self._waiting[function, key] = self._waiting.get((function, key), 0) + step
        self._on_wait(function, key, count)

    async def _change(self, function: str, change: Callable[[dict[str, int]], dict[str, int] | None]) -> bool:
        """Compare-and-set the function's slots with `change` (None: no change possible); whether
        it was applied. The first try uses what our own last write left (no read); a conflict,
        or a refusal on that possibly stale view, reads the key afresh."""
        known = self._known.pop(function, None)
        for attempt in range(_CAS_ATTEMPTS):
            slots, revision = known if known is not None and attempt == 0 else await self._read(function)
            updated = change(slots)
            if updated is None:
                if known is not None and attempt == 0:
                    continue  # refused on our cached view: look at the real one
                return False
            try:
                revision = await self._kv.update(function, _encode(updated), last=revision)
            except KeyWrongLastSequenceError:
                continue  # another executor changed it meanwhile: read again
            self._known[function] = (updated, revision)
            return True
        log.warning("running slots kept changing", extra={"function": function})
        return False

    async def _read(self, function: str) -> tuple[dict[str, int], int]:
        try:
            entry = await self._kv.get(function)
        except KeyNotFoundError:
            return {}, 0
        except KeyDeletedError as err:
            return {}, int(err.entry.revision or 0) if err.entry is not None else 0
        now = _now_ms()
        slots = {k: v for k, v in _decode(entry.value).items() if v > now} if entry.value else {}
        return slots, int(entry.revision or 0)


def _with(slots: dict[str, int], holder: str, limit: int) -> dict[str, int] | None:
    if holder not in slots and len(slots) >= limit:
        return None
    return {**slots, holder: _now_ms() + int(LEASE_S * 1000)}


def _without(slots: dict[str, int], holder: str) -> dict[str, int]:
    return {k: v for k, v in slots.items() if k != holder}


def _renewed(slots: dict[str, int], mine: set[str]) -> dict[str, int]:
    expiry = _now_ms() + int(LEASE_S * 1000)
    return {**slots, **{holder: expiry for holder in mine}}
