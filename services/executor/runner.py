"""Runs dispatched tasks (Processed, or Retrying once due) on instances and records outcomes.

Every append names the sequence of the event it acted on, so a stop racing a completion, or a
redelivery racing a slow first delivery, resolves in the stream: the loser reloads and adapts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from nats.aio.msg import Msg

from services.executor.code_cache import CodeCache
from services.executor.instance import Instance, InvocationResult, InvokeContext
from services.executor.pool import InstancePool, tasks_per_instance
from services.executor.metrics import ExecutorMetrics
from services.executor.settings import ExecutorSettings
from services.executor.slots import ClusterSlots
from services.executor.specs import function_spec
from shared import wire
from shared.errors import AliasNotFound, ConcurrentUpdateError, FunctionNotFound, VersionNotFound
from shared.bus import ACK, BUS_TROUBLE, Nak, Term, Verdict
from shared.events import (
    AnyTaskEvent,
    Submission,
    TaskEnqueued,
    TaskEvent,
    TaskFailed,
    TaskInvalid,
    TaskProcessed,
    TaskRetrying,
    TaskStarted,
    TaskStopped,
    TaskSucceeded,
    submission_of,
)
from shared.eventstore import StoredEvent, follow, now_ms
from shared.ports import EventLog, FunctionCatalog
from shared.object_chunks import CorruptObject
from shared.qualifiers import Resolved, resolve
from shared.task_logs import AttemptLog
from shared.taskview import RETURN_PAYLOAD_PREVIEW_BYTES
from shared.transitions import Status

log = logging.getLogger(__name__)

TaskKey = tuple[str, str]
# Keeps one attempt's log: (function, task id, log) -> stored (shared.task_logs.store_attempt_log).
LogSink = Callable[[str, str, AttemptLog], Awaitable[None]]
# How long an outcome append keeps retrying through bus trouble before giving up.
OUTCOME_APPEND_PATIENCE_S = 300.0
# A dispatch whose code could not be fetched (the bus slow or away) is looked at again after this.
CODE_FETCH_RETRY_S = 1.0


@dataclass
class RunningTask:
    instance: Instance
    stop_requested: bool = False


class TaskRunner:
    def __init__(
        self,
        *,
        events: EventLog,
        catalog: FunctionCatalog,
        code: CodeCache,
        pool: InstancePool,
        metrics: ExecutorMetrics,
        settings: ExecutorSettings,
        logs: LogSink | None = None,
        blocked: Callable[[str], str | None] | None = None,
        slots: ClusterSlots | None = None,
        cap: Callable[[str], int | None] | None = None,
    ) -> None:
        self._slots = slots
        self._cap = cap or (lambda _function: None)
        self._logs = logs
        self._blocked = blocked  # why a function's dispatches may not start now (None: they may)
        self._events = events
        self._catalog = catalog
        self._code = code
        self._pool = pool
        self._metrics = metrics
        self._settings = settings
        self._running: dict[TaskKey, RunningTask] = {}
        self._handling: set[TaskKey] = set()  # dispatches this process holds, running or not
        self._started: set[TaskKey] = set()  # ... of which Running was recorded
        self._parked = 0  # ... of which wait for a busy function without holding a fetch slot
        self._holding: dict[str, int] = {}  # ... per function, those holding a fetch slot

    async def handle(self, event: AnyTaskEvent, msg: Msg, *, release_slot: Callable[[], None] = lambda: None) -> Verdict:
        """Run one dispatch and give its verdict (the consumer policy in shared/bus settles it).

        `release_slot` gives up this dispatch's fetch slot while it waits for a busy function.
        """
        if not isinstance(event, TaskProcessed | TaskRetrying):
            return Term(f"not a dispatch: {type(event).__name__}")
        if isinstance(event, TaskRetrying) and now_ms() < event.retry_at_ms:
            return Nak((event.retry_at_ms - now_ms()) / 1000)
        key = (event.function, event.task_id)
        if key in self._handling:
            # Redelivered while this executor still works on it: the holder acks it when done.
            return Nak(self._settings.ack_wait_s)
        current = StoredEvent(msg.metadata.sequence.stream, event)
        if msg.metadata.num_delivered > 1:
            # Recovery first: a dead executor's Running or Stopping task must not wait behind
            # a busy function's backlog.
            last = await self._events.last(event.function, event.task_id)
            if last is None or last.seq != current.seq:
                await self._recover(last, current)
                return ACK
        blocked = self._blocked(event.function) if self._blocked is not None else None
        if blocked is not None:
            # Dispatched before a DisableFunctionInvocation (or a reservedConcurrency of 0) was
            # seen: it must not start now; it stays Processed and is looked at again later.
            self._metrics.flow_held.labels(event.function, blocked).inc()
            return Nak(self._settings.saturated_retry_s)
        parked = False
        holding = self._holding.get(event.function, 0)
        can_run = self._settings.max_instances_per_function * tasks_per_instance(
            self._catalog.cached_function(event.function))
        if holding >= can_run + self._settings.max_queued_per_function:
            # Its instances are all busy and enough dispatches already wait for them with a slot
            # each: wait without one (up to max_parked), so other functions' tasks get fetched;
            # past that, hand it back for a while.
            if self._parked >= self._settings.max_parked:
                return Nak(self._settings.saturated_retry_s)
            release_slot()
            parked = True
            self._parked += 1
        else:  # counted before any await, so concurrent dispatches cannot all slip past the check
            self._holding[event.function] = holding + 1
        self._handling.add(key)
        keep_alive = asyncio.create_task(self._keep_alive(msg, key))
        try:
            verdict = await self._run(current)
        except asyncio.CancelledError:
            if key not in self._started:  # shutting down before it ran: give it straight back
                with contextlib.suppress(Exception):
                    await msg.nak()
            raise
        finally:
            if parked:
                self._parked -= 1
            else:
                self._holding[event.function] -= 1
            self._handling.discard(key)
            self._started.discard(key)
            keep_alive.cancel()
            await asyncio.gather(keep_alive, return_exceptions=True)
        return verdict

    async def stop_requested(self, function: str, task_id: str) -> None:
        """A task went Stopping: if it runs here, end its instance now."""
        running = self._running.get((function, task_id))
        if running is None or running.stop_requested:
            return
        running.stop_requested = True
        log.info("killing instance for stop", extra={"task_id": task_id, "function": function, "status": str(Status.STOPPING)})
        await running.instance.kill()

    @property
    def running_count(self) -> int:
        return len(self._running)

    async def _run(self, current: StoredEvent) -> Verdict:
        """Run the dispatched task, or end it (Invalid) when it cannot run."""
        event = current.event
        assert isinstance(event, TaskProcessed | TaskRetrying), "only dispatches are run"
        fields = {"task_id": event.task_id, "function": event.function}
        submission = await self._submission(event)
        if submission is None:
            await self._invalid(current, "the task's submission is no longer in the event store")
            return ACK
        resolved = await self._resolve(current, submission)
        if resolved is None:
            return ACK
        function = resolved.function
        attempt = event.attempt + 1 if isinstance(event, TaskRetrying) else 0
        try:
            spec = await function_spec(function, self._code, version=resolved.version_id)
        except BUS_TROUBLE as err:  # the code could not be fetched now: the task waits, still Processed
            log.warning("code fetch failed; dispatch handed back", extra={**fields, "error": repr(err)})
            return Nak(CODE_FETCH_RETRY_S)
        except (OSError, zipfile.BadZipFile, CorruptObject, FunctionNotFound) as err:
            await self._invalid(current, f"the function's code cannot be unpacked: {err}")
            return ACK
        # reservedConcurrency: a running slot from before Running until after the outcome.
        async with self._slot(event.function, event.task_id):
            async with self._pool.lease(spec) as instance:
                started = follow(current, TaskStarted, instance_id=instance.instance_id, attempt=attempt,
                                 function_version=resolved.version_id)
                try:
                    started_seq = await self._events.append(started, expected_seq=current.seq)
                except ConcurrentUpdateError:
                    await self._recover(await self._events.last(event.function, event.task_id), current)
                    return ACK
                self._started.add((event.function, event.task_id))
                due_ms = event.retry_at_ms if isinstance(event, TaskRetrying) else submission.due_at_ms
                self._metrics.submit_to_start.labels(event.function).observe(max(0, started.at_ms - due_ms) / 1000)
                log.info("task Running", extra={**fields, "status": str(Status.RUNNING), "instance_id": instance.instance_id,
                                                "attempt": attempt, "qualifier": submission.qualifier})
                running = RunningTask(instance)
                self._running[(event.function, event.task_id)] = running
                self._metrics.in_process.inc()
                try:
                    context = InvokeContext(request_id=submission.request_id, task_id=event.task_id, attempt=attempt)
                    result = await instance.invoke(submission.payload, context)
                finally:
                    del self._running[(event.function, event.task_id)]
                    self._metrics.in_process.dec()
            self._metrics.run_seconds.labels(event.function).observe(result.duration_ms / 1000)
            await self._keep_log(started, result, request_id=submission.request_id)
            await self._finish(StoredEvent(started_seq, started), result, submission.max_retries, running,
                               qualifier=submission.qualifier)
        return ACK

    def _slot(self, function: str, task_id: str) -> AbstractAsyncContextManager[None]:
        if self._slots is None:
            return contextlib.nullcontext()
        return self._slots_of(self._slots, function, task_id)

    @contextlib.asynccontextmanager
    async def _slots_of(self, slots: ClusterSlots, function: str, task_id: str) -> AsyncIterator[None]:
        """The function's running slot (reservedConcurrency), then the account's
        (TASKMODE_ACCOUNT_CONCURRENCY): given back in the reverse order."""
        account = self._settings.account_concurrency or None
        async with slots.slot(function, task_id, lambda: self._cap(function)):
            async with slots.slot(function, task_id, lambda: account, key=wire.RUNNING_ACCOUNT_KEY):
                yield

    async def _submission(self, event: TaskProcessed | TaskRetrying) -> Submission | None:
        """What the task was submitted with: carried in the dispatch, else read from its Enqueued event."""
        if isinstance(event, TaskProcessed) and event.submission is not None:
            return event.submission
        enqueued = await self._events.last_with_status(event.function, event.task_id, Status.ENQUEUED)
        if enqueued is None or not isinstance(enqueued.event, TaskEnqueued):
            return None
        return submission_of(enqueued.event)

    async def _resolve(self, current: StoredEvent, submission: Submission) -> Resolved | None:
        """What runs the task: its function as the qualifier it was submitted with names it now.

        None (after ending the task Invalid) when the function it was submitted to is gone: also
        when a new function of the same name exists, which is another function (another id).
        """
        name = current.event.function
        try:
            resolved = await resolve(self._catalog, name, submission.qualifier)
        except FunctionNotFound:
            await self._invalid(current, f"function {name} was deleted")
            return None
        except (VersionNotFound, AliasNotFound) as err:
            await self._invalid(current, f"qualifier {submission.qualifier} no longer resolves: {err.message}")
            return None
        if submission.function_id and resolved.function.function_id != submission.function_id:
            await self._invalid(current, f"function {name} was deleted (a function of that name was created since)")
            return None
        return resolved

    async def _keep_log(self, started: TaskStarted, result: InvocationResult, *, request_id: str) -> None:
        """Store the attempt's log; losing a log never fails the task.

        An attempt that wrote nothing stores nothing (the logs endpoint shows its framing from
        the task's events), so a quiet handler costs no extra message per task.
        """
        if self._logs is None or result.output_bytes == 0:
            return
        log_entry = AttemptLog(
            attempt=started.attempt, request_id=request_id, instance_id=started.instance_id,
            function_version=started.function_version, start_time=started.at_ms, end_time=now_ms(),
            truncated=result.logs_truncated, content=result.logs.decode(errors="replace"),
        )
        try:
            await self._logs(started.function, started.task_id, log_entry)
        except Exception as err:  # noqa: BLE001 - a lost log is reported, the outcome still counts
            log.warning("task log not stored", extra={"task_id": started.task_id, "function": started.function,
                                                      "error": repr(err)})

    async def _invalid(self, current: StoredEvent, reason: str) -> None:
        await self._append_or_log(follow(current, TaskInvalid, reason=reason), expected_seq=current.seq)

    async def _finish(
        self, started: StoredEvent, result: InvocationResult, max_retries: int, running: RunningTask,
        *, qualifier: str = "",
    ) -> None:
        if running.stop_requested and await self._finish_stopping(started, result):
            return
        outcome = self._outcome(started, result, max_retries)
        try:
            await self._append_durably(outcome, expected_seq=started.seq)
        except ConcurrentUpdateError:
            # Only a stop can come between Running and our outcome.
            if not await self._finish_stopping(started, result):
                log.warning("outcome superseded", extra={"task_id": outcome.task_id, "function": outcome.function,
                                                         "status": str(outcome.status)})
            return
        self._record(outcome, duration_ms=result.duration_ms, qualifier=qualifier)

    async def _finish_stopping(self, started: StoredEvent, result: InvocationResult) -> bool:
        last = await self._events.last(started.event.function, started.event.task_id)
        if last is None or last.event.status != Status.STOPPING:
            return False
        outcome: TaskEvent = (
            follow(last, TaskSucceeded, result=_preview(result), instance_id=_instance(started), attempt=_attempt(started))
            if result.ok
            else follow(last, TaskStopped, reason="stopped by user while running")
        )
        await self._append_or_log(outcome, expected_seq=last.seq)
        return True

    def _outcome(self, started: StoredEvent, result: InvocationResult, max_retries: int) -> TaskEvent:
        attempt = _attempt(started)
        if result.ok:
            return follow(started, TaskSucceeded, result=_preview(result), instance_id=_instance(started), attempt=attempt)
        error = result.error_message or "function error"
        if attempt < max_retries:
            return follow(started, TaskRetrying, error=error, attempt=attempt,
                          retry_at_ms=now_ms() + self._settings.backoff_ms(attempt))
        return follow(started, TaskFailed, error=error, instance_id=_instance(started), attempt=attempt)

    async def _recover(self, last: StoredEvent | None, dispatch: StoredEvent) -> None:
        """The dispatch is not the task's latest event: finish what a dead executor left behind."""
        if last is None or (last.event.function, last.event.task_id) in self._running:
            return
        task = last.event
        if last.event.status == Status.STOPPING:
            await self._append_or_log(follow(last, TaskStopped, reason="stopped by user"), expected_seq=last.seq)
        elif last.event.status == Status.RUNNING and task.version == dispatch.event.version + 1:
            enqueued = await self._events.last_with_status(task.function, task.task_id, Status.ENQUEUED)
            if enqueued is None or not isinstance(enqueued.event, TaskEnqueued):
                return
            lost = InvocationResult(ok=False, payload=b"", error_message="instance lost: its executor stopped")
            outcome = self._outcome(last, lost, enqueued.event.max_retries)
            if await self._append_or_log(outcome, expected_seq=last.seq):
                self._record(outcome)

    async def _append_durably(self, event: TaskEvent, *, expected_seq: int) -> int:
        """Append an outcome, riding out a bus that is briefly unavailable.

        The dispatch stays held (the keep-alive runs) meanwhile; giving up would make the
        outcome look like a lost instance and run the task again. Only a lost race
        (`ConcurrentUpdateError`) or a long outage ends the attempts.
        """
        delay_s = 0.1
        deadline = asyncio.get_running_loop().time() + OUTCOME_APPEND_PATIENCE_S
        while True:
            try:
                return await self._events.append(event, expected_seq=expected_seq)
            except ConcurrentUpdateError:
                raise
            except Exception as err:  # noqa: BLE001 - transient bus trouble, retried below
                if asyncio.get_running_loop().time() > deadline:
                    raise
                log.warning("append failed; retrying", extra={"task_id": event.task_id, "function": event.function,
                                                              "status": str(event.status), "error": repr(err)})
                await asyncio.sleep(delay_s)
                delay_s = min(2.0, delay_s * 2)

    async def _append_or_log(self, event: TaskEvent, *, expected_seq: int) -> bool:
        try:
            await self._append_durably(event, expected_seq=expected_seq)
        except ConcurrentUpdateError:
            log.info("transition superseded", extra={"task_id": event.task_id, "function": event.function,
                                                     "status": str(event.status)})
            return False
        log.info("task %s", event.status, extra={"task_id": event.task_id, "function": event.function,
                                                 "status": str(event.status)})
        return True

    def _record(self, outcome: TaskEvent, *, duration_ms: float | None = None, qualifier: str = "") -> None:
        self._metrics.outcomes.labels(outcome.function, str(outcome.status)).inc()
        fields: dict[str, object] = {"task_id": outcome.task_id, "function": outcome.function,
                                     "status": str(outcome.status), "attempt": getattr(outcome, "attempt", None)}
        if duration_ms is not None:
            fields["duration_ms"] = round(duration_ms, 1)
        if qualifier:
            fields["qualifier"] = qualifier
        log.info("task %s", outcome.status, extra=fields)

    async def _keep_alive(self, msg: Msg, key: TaskKey) -> None:
        """Hold the dispatch while the task runs, and notice a stop we were not told about."""
        # Every second (the stop backstop, for a running task); the dispatch itself is renewed
        # only every third of its ack wait, which keeps many parked dispatches cheap.
        renew_every = max(1, round(self._settings.ack_wait_s / 3))
        tick = 0
        while True:
            await asyncio.sleep(1.0)
            tick += 1
            try:
                if tick % renew_every == 0:
                    await msg.in_progress()
                running = self._running.get(key)
                if running is not None and not running.stop_requested:
                    last = await self._events.last(*key)
                    if last is not None and last.event.status == Status.STOPPING:
                        await self.stop_requested(*key)
            except Exception as err:  # noqa: BLE001 - must keep holding the dispatch regardless
                log.warning("keep-alive step failed", extra={"task_id": key[1], "function": key[0], "error": repr(err)})


def _preview(result: InvocationResult) -> bytes:
    # GetAsyncTask shows at most this much of a result (FC: returnPayload is a 1 MB preview), so
    # the event keeps no more: events stay small whatever a handler returns.
    return result.payload[:RETURN_PAYLOAD_PREVIEW_BYTES]


def _attempt(started: StoredEvent) -> int:
    return int(getattr(started.event, "attempt", 0))


def _instance(started: StoredEvent) -> str:
    return str(getattr(started.event, "instance_id", ""))
