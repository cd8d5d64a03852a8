"""The instance pool: warm instances per function, each leased to up to its concurrency callers.

`InstancePool` reuses an idle instance of the same code version, bounds the instances of a
function and reaps the idle ones; `new_instance` picks the instance class for a runtime.

An instance runs up to `Instance.concurrency` invocations at once (the function's
instanceConcurrency, as far as its runtime can). As on FC, a lease joins an instance that is
already busy but has room (the fullest such, so the rest stay idle and can be reaped), or one
that is still starting; it takes an idle one, or starts a new one, only when every instance is
full; and it waits when the function is at its instance limit.
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
from shared.catalog import FunctionRecord
from shared.errors import InvalidArgument, ServiceUnavailable

logger = logging.getLogger(__name__)


def instance_class(runtime: str) -> type[Instance]:
    """The class of the instances that serve `runtime`."""
    if runtime.startswith("python3"):
        return PythonInstance
    if runtime.startswith("nodejs"):
        return NodeInstance
    if runtime.startswith("custom"):
        return CustomRuntimeInstance
    raise InvalidArgument(f"unsupported runtime {runtime!r}")


def new_instance(spec: FunctionSpec, *, work_dir: Path, sandbox: Sandbox, templates: Templates | None = None) -> Instance:
    """An instance of the class that serves `spec.runtime` (not started yet); Python instances
    are forked from `templates` when given."""
    if spec.runtime.startswith("python3"):
        return PythonInstance(spec, work_dir=work_dir, sandbox=sandbox, templates=templates)
    return instance_class(spec.runtime)(spec, work_dir=work_dir, sandbox=sandbox)


def tasks_per_instance(function: FunctionRecord | None) -> int:
    """How many invocations of `function` one instance runs at once: its instanceConcurrency, as
    far as its runtime can (1 for a function not known here)."""
    if function is None:
        return 1
    try:
        runtime_most = instance_class(function.runtime).max_concurrency
    except InvalidArgument:
        return 1
    return max(1, min(function.instance_concurrency, runtime_most))


def new_sandbox(settings: SandboxSettings, *, work_dir: Path) -> Sandbox:
    """The sandbox instances of this pool run in, with the worker scripts every runtime needs."""
    return Sandbox(settings, support_dir=work_dir / ".sandbox",
                   worker_files={path.name: path for path in (WORKER_FILE, TEMPLATE_FILE, NODE_WORKER_FILE, RELAY_FILE)})


@dataclass(eq=False)
class _Leased:
    """An instance leased to `load` callers; `ready` while it starts (shared by whoever joins)."""

    instance: Instance
    load: int = 1
    ready: asyncio.Future[None] | None = None

    def joinable(self, spec: FunctionSpec) -> bool:
        starting = self.ready is not None and not self.ready.done()
        return (self.load < self.instance.concurrency and self.instance.spec == spec
                and (starting or self.instance.alive))


@dataclass
class _Slots:
    """The instances of one function: idle ones (most recent last), leased ones (starting ones
    included) with their callers, and those keep_warm is starting."""

    current: FunctionSpec | None = None  # the newest spec leased; other versions are not kept
    idle: list[Instance] = field(default_factory=list)
    leased: dict[Instance, _Leased] = field(default_factory=dict)
    warming: int = 0
    waiters: collections.deque[asyncio.Future[None]] = field(default_factory=collections.deque)

    @property
    def busy(self) -> int:
        """Instances counted against the function's limit: leased or starting."""
        return len(self.leased) + self.warming

    def join(self, spec: FunctionSpec) -> _Leased | None:
        """The fullest running instance of `spec` with room for one more caller, else the fullest
        starting one with room, if any."""
        room = [leased for leased in self.leased.values() if leased.joinable(spec)]
        return max(room, key=lambda leased: (leased.ready is None or leased.ready.done(), leased.load), default=None)

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
        """An instance for `spec`, shared with at most `concurrency - 1` other callers (exclusive at
        an instanceConcurrency of 1); a busy one with room first, else an idle one of the same
        spec, else a new one."""
        # Per version: a canary alias alternates between two, which must not evict each other.
        slots = self._functions.setdefault((spec.name, spec.version), _Slots())
        while (slots.join(spec) is None and slots.busy >= self.max_instances(spec.name)
               and not self._closed):
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
        leased = slots.join(spec)
        if leased is not None:
            leased.load += 1
        else:
            leased = self._claim(slots, spec)
        try:
            if leased.ready is not None:
                await asyncio.shield(leased.ready)  # the start, whoever began it
        except BaseException:
            await self._give_back(slots, leased, cancel_start=True)
            raise
        try:
            yield leased.instance
        finally:
            await self._give_back(slots, leased)

    async def keep_warm(self, spec: FunctionSpec, count: int) -> int:
        """Start idle instances of `spec` until the function has `count` (minInstances, within
        its maximum); how many were started."""
        slots = self._functions.setdefault((spec.name, spec.version), _Slots())
        started = 0
        while (not self._closed and slots.busy + sum(1 for i in slots.idle if i.alive) < min(count, self.max_instances(spec.name))):
            if self._reaper is None:
                self._reaper = asyncio.create_task(self._reap_forever())
            slots.warming += 1  # counted while it starts, so a concurrent lease does not overshoot
            try:
                instance = new_instance(spec, work_dir=self._work_dir, sandbox=self.sandbox, templates=self.templates)
                await self._start(slots, spec, instance, self._forget_stale(slots, spec))
            finally:
                slots.warming -= 1
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

    def _forget_stale(self, slots: _Slots, spec: FunctionSpec) -> list[Instance]:
        """`spec` is the function's newest: idle instances of other specs (or dead) are taken out
        of the pool, to be discarded by the caller."""
        slots.current = spec
        stale = [i for i in slots.idle if i.spec != spec or not i.alive]
        slots.idle = [i for i in slots.idle if i not in stale]
        return stale

    def _claim(self, slots: _Slots, spec: FunctionSpec) -> _Leased:
        """An instance for a caller no busy instance has room for: an idle one, else a new one
        (started by `ready`). No await: the limit checked by the caller still holds."""
        stale = self._forget_stale(slots, spec)
        if slots.idle:
            leased = _Leased(slots.idle.pop())
            if stale:
                leased.ready = asyncio.ensure_future(self._discard_all(stale))
        else:
            instance = new_instance(spec, work_dir=self._work_dir, sandbox=self.sandbox, templates=self.templates)
            leased = _Leased(instance)
            leased.ready = asyncio.ensure_future(self._start(slots, spec, instance, stale))
        slots.leased[leased.instance] = leased
        return leased

    async def _discard_all(self, instances: list[Instance]) -> None:
        await asyncio.gather(*(self._discard(instance) for instance in instances))

    async def _start(self, slots: _Slots, spec: FunctionSpec, instance: Instance, stale: list[Instance]) -> None:
        await self._discard_all(stale)
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

    async def _give_back(self, slots: _Slots, leased: _Leased, *, cancel_start: bool = False) -> None:
        """One caller is done with `leased`; the last one out makes it idle (or discards it).
        `cancel_start`: the caller gave up while it started (a start nobody waits for is stopped)."""
        leased.load -= 1
        try:
            if leased.load > 0:
                return
            del slots.leased[leased.instance]
            instance = leased.instance
            if leased.ready is not None and not leased.ready.done() and cancel_start:
                leased.ready.cancel()
                with suppress(BaseException):
                    await leased.ready
            started = leased.ready is None or (leased.ready.done() and not leased.ready.cancelled()
                                               and leased.ready.exception() is None)
            if started and instance.alive and not self._closed and instance.spec == slots.current:
                instance.idle_since = time.monotonic()
                slots.idle.append(instance)
            else:
                await self._discard(instance)
        finally:
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
