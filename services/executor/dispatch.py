"""The executor's intake: one dispatch queue per function, fetched as far as the function has room.

A function's queue is a durable consumer over its Processed and Retrying events, shared by every
executor. Each executor takes from a queue no more than the function can start here (its
instance limit times its instanceConcurrency, within its reservedConcurrency, plus a small
prefetch) and no more than its own free slots
(`TASKMODE_EXECUTOR_CONCURRENCY`), and nothing while the function is paused or blocked: the
rest waits in the function's own consumer, in order, holding nothing, so a flooded function's
backlog never stands in front of another function's task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Final

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from services.executor.pool import InstancePool, tasks_per_instance
from services.executor.runner import TaskRunner
from services.executor.settings import ExecutorSettings
from shared import wire
from shared.bus import decoded, settle
from shared.catalog import Catalog
from shared.function_queues import FunctionQueues, QueueSpec, durables_with_prefix, queue_start_time
from shared.transitions import Status

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None]], None]
SYNC_EVERY_S: Final = 0.25  # how soon a new function's queue is pulled
LEFTOVERS_EVERY_S: Final = 3.0  # how often deleted functions' queues are looked for
PREFETCH_PER_FUNCTION: Final = 2  # dispatches taken beyond what can start at once (ready when one ends)
# Unacked dispatches per function queue over every executor: running, waiting for an instance or
# a running slot, or handed back until a retry is due. High enough never to be the limit.
UNCAPPED: Final = 100_000


class Dispatcher:
    def __init__(self, js: JetStreamContext, *, catalog: Catalog, pool: InstancePool, runner: TaskRunner,
                 settings: ExecutorSettings, blocked: Callable[[str], str | None], spawn: Spawn,
                 cap: Callable[[str], int | None] = lambda _function: None) -> None:
        self._js = js
        self._catalog = catalog
        self._pool = pool
        self._runner = runner
        self._settings = settings
        self._blocked = blocked
        self._spawn = spawn
        self._cap = cap  # the function's reservedConcurrency (None: uncapped)
        self._held: dict[str, int] = {}
        self._total = 0
        self.queues = FunctionQueues(js, durable_of=lambda function: f"{wire.DISPATCH_DURABLE_PREFIX}{function}",
                                     room=self.room, on_batch=self.on_batch)

    def room(self, function: str) -> int:
        """How many more of the function's dispatches this executor takes now."""
        if self._blocked(function) is not None:
            return 0
        # Each instance runs up to instanceConcurrency tasks at once; reservedConcurrency caps
        # the function's running tasks however many instances could take them.
        can_run = self._pool.max_instances(function) * tasks_per_instance(self._catalog.cached_function(function))
        cap = self._cap(function)
        limit = (can_run if cap is None else min(can_run, cap)) + PREFETCH_PER_FUNCTION
        return max(0, min(self._settings.concurrency - self._total, limit - self._held.get(function, 0)))

    async def on_batch(self, function: str, msgs: list[Msg]) -> None:
        for msg in msgs:
            self._held[function] = self._held.get(function, 0) + 1
            self._total += 1
            self._spawn(self._one(function, msg))

    async def _one(self, function: str, msg: Msg) -> None:
        try:
            await settle(msg, decoded(self._runner.handle))
        finally:
            was_full = self._total >= self._settings.concurrency
            self._held[function] -= 1
            self._total -= 1
            self.queues.wake(None if was_full else function)

    def _spec(self, function: str, created_time: str) -> QueueSpec:
        return QueueSpec(filter_subjects=(wire.function_status_subjects(function, Status.PROCESSED),
                                          wire.function_status_subjects(function, Status.RETRYING)),
                         max_ack_pending=UNCAPPED, ack_wait_s=self._settings.ack_wait_s,
                         start_time=queue_start_time(created_time))

    async def run(self, stop: asyncio.Event) -> None:
        """Keep a queue per function (and per deleted function with work left) until `stop`."""
        loop = asyncio.get_running_loop()
        next_leftovers = 0.0
        try:
            while not stop.is_set():
                try:
                    functions = await self._catalog.known_functions()
                    await self.queues.ensure_all({name: self._spec(name, record.created_time)
                                                  for name, record in functions.items()})
                    if loop.time() >= next_leftovers:
                        next_leftovers = loop.time() + LEFTOVERS_EVERY_S
                        await self._leftovers(set(functions))
                except Exception as err:  # noqa: BLE001 - the bus is away: the queues pulled so far go on
                    log.warning("function queue sync failed", extra={"error": repr(err)})
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), SYNC_EVERY_S)
        finally:
            await self.queues.close()

    async def _leftovers(self, known: set[str]) -> None:
        """Queues of deleted functions: pulled while they hold dispatches (which end Invalid),
        then deleted."""
        for durable in await durables_with_prefix(self._js, wire.DISPATCH_DURABLE_PREFIX):
            name = durable.removeprefix(wire.DISPATCH_DURABLE_PREFIX)
            if name in known:
                continue
            info = await self.queues.info(name)
            if info is None:
                continue
            if int(info.num_pending or 0) + int(info.num_ack_pending or 0) > 0:
                await self.queues.attach(name)
            elif await self._catalog.find_function(name) is None:  # not one created meanwhile
                await self.queues.delete(name)
