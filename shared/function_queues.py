"""One queue per function: a durable pull consumer each, and one puller per consumer.

Per-function queues are what keep one function's flood from delaying every other function: a
backlog of 100,000 sits in its own consumer while every other function's queue is fetched
independently, and a function that may not start more work now (paused, at its instance limit)
is simply not fetched, its work waiting in the stream in order.

The owner (the scheduler over a function's Enqueued events, the executor over its dispatches)
says how each function's consumer is configured (`QueueSpec`), how many messages it may take
right now (`room`) and what to do with a batch; `wake(function)` tells a waiting puller that its
room may have grown. A puller long-polls one message when idle and hands it over at once, then
takes whatever has arrived since, as long as work keeps coming: a lone task is handled the
moment it is published, a burst in batches.

A consumer starts a second before its function was created (`queue_start_time`): its function's
tasks are all later, and a deleted namesake's leftovers are earlier, so a new consumer never
replays the history of the stream (events are kept for 14 days).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy
from nats.js.errors import NotFoundError

from shared import wire
from shared.bus import ConsumerGone, fetch

log = logging.getLogger(__name__)

# How long an idle puller's pull request waits on the server before it is renewed.
LONG_POLL_S: Final = 5.0
# How long a busy puller lingers for more messages that are already on their way.
DRAIN_WAIT_S: Final = 0.002
# How often a puller whose room is 0 looks again without being woken (a safety net).
RECHECK_S: Final = 1.0


@dataclass(frozen=True)
class QueueSpec:
    """A function's consumer: its filter, the cap on unacked messages, the ack wait, its start."""

    filter_subjects: tuple[str, ...]
    max_ack_pending: int
    ack_wait_s: float
    start_time: datetime.datetime


Room = Callable[[str], int]
BatchHandler = Callable[[str, list[Msg]], Awaitable[None]]


class FunctionQueues:
    """The per-function consumers of one role (named by `durable_of`), and their pullers here."""

    def __init__(self, js: JetStreamContext, *, durable_of: Callable[[str], str], room: Room,
                 on_batch: BatchHandler, long_poll_s: float = LONG_POLL_S) -> None:
        self._js = js
        self.durable = durable_of
        self._room = room
        self._on_batch = on_batch
        self._long_poll_s = long_poll_s
        self._specs: dict[str, QueueSpec] = {}
        self._pullers: dict[str, asyncio.Task[None]] = {}
        self._wakers: dict[str, asyncio.Event] = {}

    @property
    def functions(self) -> set[str]:
        """Functions whose queue is being pulled here."""
        return set(self._pullers)

    async def ensure(self, function: str, spec: QueueSpec) -> None:
        """Create the function's consumer if it is missing (or bring its cap and ack wait in
        line when `spec` changed), and pull from it."""
        if self._specs.get(function) != spec:
            await ensure_queue(self._js, self.durable(function), spec)
            self._specs[function] = spec
        self._start(function)

    async def ensure_all(self, specs: dict[str, QueueSpec]) -> set[str]:
        """`ensure` each function's queue; one queue's trouble (logged) never keeps the others
        from being pulled. Returns the functions whose queue is pulled here now."""
        for function, spec in specs.items():
            try:
                await self.ensure(function, spec)
            except Exception as err:  # noqa: BLE001 - tried again on the owner's next sync
                log.warning("function queue sync failed", extra={"function": function, "error": repr(err)})
        return {function for function in specs if function in self._pullers}

    async def attach(self, function: str) -> bool:
        """Pull from the function's consumer as it is (a deleted function's leftover work);
        whether it exists."""
        if await self.info(function) is None:
            return False
        self._start(function)
        return True

    def _start(self, function: str) -> None:
        task = self._pullers.get(function)
        if task is None or task.done():
            self._wakers[function] = asyncio.Event()
            self._pullers[function] = asyncio.create_task(self._pull(function), name=f"pull {self.durable(function)}")

    def wake(self, function: str | None = None) -> None:
        """The room of `function` (None: of every function) may have grown: look again now."""
        if function is None:
            for event in self._wakers.values():
                event.set()
        elif function in self._wakers:
            self._wakers[function].set()

    async def release(self, function: str) -> None:
        """Stop pulling the function's queue here (its consumer stays, with its position)."""
        task = self._pullers.pop(function, None)
        self._wakers.pop(function, None)
        self._specs.pop(function, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def delete(self, function: str) -> None:
        """Stop pulling and delete the function's consumer (its function is gone and drained)."""
        await self.release(function)
        with contextlib.suppress(NotFoundError):
            await self._js.delete_consumer(wire.EVENT_STREAM, self.durable(function))
        log.info("function queue deleted", extra={"function": function, "durable": self.durable(function)})

    async def info(self, function: str) -> ConsumerInfo | None:
        """The server's view of the function's consumer (pending, ack pending), or None."""
        try:
            info: ConsumerInfo = await self._js.consumer_info(wire.EVENT_STREAM, self.durable(function))
            return info
        except NotFoundError:
            return None

    async def close(self) -> None:
        for function in list(self._pullers):
            await self.release(function)

    async def _pull(self, function: str) -> None:
        durable = self.durable(function)
        sub = await self._js.pull_subscribe_bind(durable=durable, stream=wire.EVENT_STREAM)
        waker = self._wakers[function]
        idle = True
        try:
            while True:
                room = self._room(function)
                if room <= 0:
                    waker.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(waker.wait(), RECHECK_S)
                    continue
                # Idle: long-poll one message and hand it over at once (a lone task waits for
                # nothing). Busy: take what is there, lingering at most DRAIN_WAIT_S. Never a
                # long pull for many: the server holds what did arrive until the pull is full or
                # expires (it was 0.5 s: a task behind a burst waited that out).
                if idle:
                    msgs = await fetch(self._js, sub, stream=wire.EVENT_STREAM, durable=durable,
                                       batch=1, wait_s=self._long_poll_s)
                else:
                    msgs = await fetch(self._js, sub, stream=wire.EVENT_STREAM, durable=durable,
                                       batch=room, wait_s=DRAIN_WAIT_S)
                idle = not msgs
                if msgs:
                    await self._on_batch(function, msgs)
        except ConsumerGone:
            log.info("function queue gone", extra={"function": function, "durable": durable})
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a puller must not die silently; the owner restarts it
            log.exception("function queue puller failed", extra={"function": function, "durable": durable})
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


async def ensure_queue(js: JetStreamContext, durable: str, spec: QueueSpec) -> None:
    """Create the consumer `durable` as `spec` says, or bring an existing one's cap, ack wait and
    filters in line (where it starts cannot change, and must not: its position is its progress)."""
    try:
        existing: ConsumerInfo = await js.consumer_info(wire.EVENT_STREAM, durable)
    except NotFoundError:
        await js.add_consumer(wire.EVENT_STREAM, ConsumerConfig(
            durable_name=durable,
            deliver_policy=DeliverPolicy.BY_START_TIME,
            opt_start_time=spec.start_time,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=spec.ack_wait_s,
            max_deliver=-1,  # handlers park not-yet-ready work with a delayed nak
            max_ack_pending=spec.max_ack_pending,
            filter_subjects=list(spec.filter_subjects),
        ))
        log.info("function queue created", extra={"durable": durable})
        return
    config = existing.config
    filters = sorted(config.filter_subjects or ([config.filter_subject] if config.filter_subject else []))
    if (config.max_ack_pending, config.ack_wait, filters) != (spec.max_ack_pending, spec.ack_wait_s,
                                                                sorted(spec.filter_subjects)):
        config.max_ack_pending = spec.max_ack_pending
        config.ack_wait = spec.ack_wait_s
        config.filter_subject = None
        config.filter_subjects = list(spec.filter_subjects)
        await js.add_consumer(wire.EVENT_STREAM, config)


async def durables_with_prefix(js: JetStreamContext, prefix: str) -> list[str]:
    """Names of the event stream's consumers that start with `prefix`."""
    found: list[str] = []
    offset = 0
    while True:
        page = await js.consumers_info(wire.EVENT_STREAM, offset=offset)
        found += [str(info.name) for info in page if str(info.name).startswith(prefix)]
        if len(page) < 256:
            return found
        offset += len(page)


def queue_start_time(created_time: str) -> datetime.datetime:
    """Where a function's new queue starts: a second before the function was created (its
    `createdTime`); now, less a minute, for a record whose time cannot be read."""
    try:
        created = datetime.datetime.strptime(created_time, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        created = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=59)
    return created - datetime.timedelta(seconds=1)
