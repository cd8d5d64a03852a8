"""The instance pool: warm instances per function, leased one invocation at a time.

`InstancePool` reuses an idle instance of the same code version, bounds the instances of a
function and reaps the idle ones; `new_instance` picks the instance class for a runtime.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from services.executor.custom_runtime import RELAY_FILE, CustomRuntimeInstance
from services.executor.instance import FunctionSpec, Instance
from services.executor.node_instance import WORKER_FILE as NODE_WORKER_FILE
from services.executor.node_instance import NodeInstance
from services.executor.python_instance import WORKER_FILE, PythonInstance
from services.executor.sandbox import Sandbox, SandboxSettings
from services.executor.template import TEMPLATE_FILE, Templates
from shared.errors import InvalidArgument, ServiceUnavailable

logger = logging.getLogger(__name__)


def new_instance(spec: FunctionSpec, *, work_dir: Path, sandbox: Sandbox, templates: Templates | None = None) -> Instance:
    """An instance of the class that serves `spec.runtime` (not started yet); Python instances
    are forked from `templates` when given."""
    if spec.runtime.startswith("python3"):
        return PythonInstance(spec, work_dir=work_dir, sandbox=sandbox, templates=templates)
    if spec.runtime.startswith("nodejs"):
        return NodeInstance(spec, work_dir=work_dir, sandbox=sandbox)
    if spec.runtime.startswith("custom"):
        return CustomRuntimeInstance(spec, work_dir=work_dir, sandbox=sandbox)
    raise InvalidArgument(f"unsupported runtime {spec.runtime!r}")


def new_sandbox(settings: SandboxSettings, *, work_dir: Path) -> Sandbox:
    """The sandbox instances of this pool run in, with the worker scripts every runtime needs."""
    return Sandbox(settings, support_dir=work_dir / ".sandbox",
                   worker_files={path.name: path for path in (WORKER_FILE, TEMPLATE_FILE, NODE_WORKER_FILE, RELAY_FILE)})


@dataclass
class _Slots:
    """The instances of one function: idle ones (most recent last), how many are leased."""

    current: FunctionSpec | None = None  # the newest spec leased; other versions are not kept
    idle: list[Instance] = field(default_factory=list)
    busy: int = 0
    waiters: collections.deque[asyncio.Future[None]] = field(default_factory=collections.deque)

    def wake_one(self) -> None:
        """Hand a freed instance slot to the longest waiter (FIFO).

        Only one: waking every waiter for each freed slot made a backlog of N waiting
        dispatches cost O(N) per completed task, which dominated the executor's CPU.
        """
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def wake_all(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


# Scaling events as the pool reports them: (function, "up" | "down", cold start seconds or 0).
ScaleObserver = Callable[[str, str, float], None]
# How often a dispatch waiting for an instance looks again at its function's limit (a raised
# scaling or concurrency config lets it start without waiting for a busy instance to free up).
LIMIT_RECHECK_S = 0.5


class InstancePool:
    """Warm instances per function version, at most `max_instances_per_function` of them at a time.

    Per function, `limits(name)` may lower that maximum (the scaling config's maxInstances, the
    concurrency config's reservedConcurrency) and `minimum(name)` keeps that many from being
    reaped when idle (the scaling config's minInstances); both are read on every check.
    """

    def __init__(
        self, *, work_dir: Path, max_instances_per_function: int = 4, idle_timeout_s: float = 120.0,
        start_timeout_s: float = 30.0, sandbox: Sandbox | None = None,
        limits: Callable[[str], int | None] | None = None, minimum: Callable[[str], int] | None = None,
        observer: ScaleObserver | None = None,
    ) -> None:
        self._work_dir = work_dir
        self.sandbox = sandbox or new_sandbox(SandboxSettings(), work_dir=work_dir)
        # A cold start is bounded by max(function timeout, start_timeout_s): like FC, a short invocation
        # timeout must not make a slow-booting runtime unusable.
        self._start_timeout_s = start_timeout_s
        self._max = max_instances_per_function
        self._idle_timeout_s = idle_timeout_s
        self._functions: dict[tuple[str, str], _Slots] = {}
        self._live: set[Instance] = set()  # started (or starting) and not yet discarded
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False
        self._limits = limits or (lambda _name: None)
        self._minimum = minimum or (lambda _name: 0)
        self._observer = observer or (lambda _name, _direction, _cold_s: None)
        # Python instances fork from a template per function spec; it outlives its last instance
        # by the idle timeout, so a function that scales to zero and back still starts by fork.
        self.templates = Templates(self.sandbox, work_dir=work_dir, instances_per_template=max_instances_per_function)

    def max_instances(self, function: str) -> int:
        """How many instances of `function` may be leased at once now."""
        limit = self._limits(function)
        return self._max if limit is None else max(0, min(self._max, limit))

    @asynccontextmanager
    async def lease(self, spec: FunctionSpec) -> AsyncIterator[Instance]:
        """An instance for `spec`, exclusively; reused when idle and of the same spec."""
        # Per version: a canary alias alternates between two, which must not evict each other.
        slots = self._functions.setdefault((spec.name, spec.version), _Slots())
        while slots.busy >= self.max_instances(spec.name) and not self._closed:
            waiter = asyncio.get_running_loop().create_future()
            slots.waiters.append(waiter)
            try:
                await asyncio.wait_for(asyncio.shield(waiter), LIMIT_RECHECK_S)
            except asyncio.TimeoutError:
                waiter.cancel()  # wake_one skips it; the limit is looked at again
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    slots.wake_one()  # the slot handed to us goes to the next in line
                raise
        if self._closed:
            raise ServiceUnavailable("the instance pool is closed")
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_forever())
        slots.busy += 1
        try:
            instance = await self._acquire(slots, spec)
        except BaseException:
            slots.busy -= 1
            slots.wake_one()
            raise
        try:
            yield instance
        finally:
            await self._give_back(slots, instance)

    async def keep_warm(self, spec: FunctionSpec, count: int) -> int:
        """Start idle instances of `spec` until the function has `count` (minInstances, within
        its maximum); how many were started."""
        slots = self._functions.setdefault((spec.name, spec.version), _Slots())
        started = 0
        while (not self._closed and slots.busy + sum(1 for i in slots.idle if i.alive) < min(count, self.max_instances(spec.name))):
            if self._reaper is None:
                self._reaper = asyncio.create_task(self._reap_forever())
            slots.busy += 1  # counted while it starts, so a concurrent lease does not overshoot
            try:
                instance = await self._acquire(slots, spec, reuse_idle=False)
            finally:
                slots.busy -= 1
            instance.idle_since = time.monotonic()
            slots.idle.insert(0, instance)  # the idle least recently used end: leased last
            slots.wake_one()
            started += 1
        return started

    def instances(self) -> list[Instance]:
        """Live instances, idle or leased, for metrics."""
        return [instance for instance in self._live if instance.alive]

    async def close(self) -> None:
        """Kill every instance; leases in flight see their invocations end as killed."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with suppress(asyncio.CancelledError):
                await self._reaper
        for slots in self._functions.values():
            slots.idle.clear()
            slots.wake_all()
        doomed, self._live = list(self._live), set()
        await asyncio.gather(*(instance.kill() for instance in doomed))
        await self.templates.close()

    async def _acquire(self, slots: _Slots, spec: FunctionSpec, *, reuse_idle: bool = True) -> Instance:
        slots.current = spec
        stale = [i for i in slots.idle if i.spec != spec or not i.alive]
        slots.idle = [i for i in slots.idle if i not in stale]
        await asyncio.gather(*(self._discard(instance) for instance in stale))
        if slots.idle and reuse_idle:
            return slots.idle.pop()
        instance = new_instance(spec, work_dir=self._work_dir, sandbox=self.sandbox, templates=self.templates)
        self._live.add(instance)
        began = time.monotonic()
        try:
            await instance.start(timeout_s=max(spec.timeout_s, self._start_timeout_s))
        except BaseException:
            await self._discard(instance)
            raise
        cold_s = time.monotonic() - began
        self._observer(spec.name, "up", cold_s)
        logger.info("scaled up", extra={"function": spec.name, "instance_id": instance.instance_id,
                                        "cold_start_ms": round(cold_s * 1000, 1), "busy": slots.busy,
                                        "idle": len(slots.idle)})
        return instance

    async def _give_back(self, slots: _Slots, instance: Instance) -> None:
        try:
            if instance.alive and not self._closed and instance.spec == slots.current:
                instance.idle_since = time.monotonic()
                slots.idle.append(instance)
            else:
                await self._discard(instance)
        finally:
            slots.busy -= 1
            slots.wake_one()

    async def _discard(self, instance: Instance) -> None:
        # Forgotten only once gone, so that close() still awaits a discard it interrupted.
        await instance.kill()
        self._live.discard(instance)

    async def _reap_forever(self) -> None:
        interval_s = min(max(self._idle_timeout_s / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(interval_s)
            cutoff = time.monotonic() - self._idle_timeout_s
            expired: list[Instance] = []
            for (name, _), slots in self._functions.items():
                dead = [i for i in slots.idle if not i.alive]
                # Idle the longest first; minInstances of the function's instances stay warm.
                spare = max(0, slots.busy + len(slots.idle) - len(dead) - self._minimum(name))
                idle = sorted((i for i in slots.idle if i.alive and i.idle_since <= cutoff), key=lambda i: i.idle_since)
                doomed = dead + idle[:spare]
                for instance in idle[:spare]:
                    self._observer(name, "down", 0.0)
                    logger.info("scaled down", extra={"function": name, "instance_id": instance.instance_id,
                                                      "reason": "idle"})
                expired += doomed
                slots.idle = [i for i in slots.idle if i not in doomed]
            for outcome in await asyncio.gather(*map(self._discard, expired), return_exceptions=True):
                if isinstance(outcome, Exception):
                    logger.error("reaping an idle instance failed", exc_info=outcome)
            try:
                await self.templates.reap(self._idle_timeout_s)
            except Exception:
                logger.exception("reaping idle templates failed")
