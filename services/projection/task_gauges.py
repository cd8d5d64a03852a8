"""Per-function queue figures with FC's meanings, derived from the events the projection folds.

The projection sees every transition of the partitions it holds, once and in order, so it can
say at any moment how many of a function's tasks wait and how many run, wherever they wait (the
stream, the scheduler, an executor's queue) and however many executors and schedulers there
are. Each projection instance exports its partitions' share; Prometheus adds them up
(`sum by (function, qualifier)`). When a partition is claimed, its unfinished tasks are read
from the read model first, so the figures survive restarts and moves.

- backlog (FC FunctionAsyncMessagesBacklog): due and not yet running: Enqueued past its due
  time, Processed, Retrying past its retry time. Computed at scrape time, so a delayed task
  joins the backlog the moment it is due.
- in process (FC FunctionAsyncMessagesInProcess): Running or Stopping.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shared import wire
from shared.events import AnyTaskEvent, TaskEnqueued, TaskRetrying
from shared.transitions import TERMINAL, Status

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_IN_PROCESS = frozenset({Status.RUNNING, Status.STOPPING})


@dataclass
class _Open:
    """An unfinished task: where it is and since when it may run."""

    function: str
    qualifier: str
    status: Status
    due_ms: int  # when it may run (submission plus delay, or its retry time)
    submitted_ms: int


class TaskGauges(Collector):
    def __init__(self, registry: CollectorRegistry, *, partitions: int) -> None:
        self._partitions = partitions
        self._open: dict[int, dict[tuple[str, str], _Open]] = defaultdict(dict)
        self._reported: set[tuple[str, str]] = set()
        labels = ["function", "qualifier"]
        self.enqueued = Counter("taskmode_async_enqueued", "Tasks accepted (FC FunctionEnqueueCount)", labels,
                                registry=registry)
        self.dequeued = Counter("taskmode_async_dequeued", "Tasks taken for processing (FC FunctionDequeueCount)",
                                labels, registry=registry)
        self.retries = Counter("taskmode_async_retries", "Attempts that failed and will be retried", ["function"],
                               registry=registry)
        self.expired = Counter("taskmode_async_expired_dropped",
                               "Tasks dropped unrun past maxAsyncEventAgeInSeconds (FC FunctionAsyncEventExpiredDropped)",
                               ["function"], registry=registry)
        self.queue_wait = Histogram("taskmode_async_queue_wait_seconds", "From due (or retry) time to Running",
                                    ["function"], buckets=_LATENCY_BUCKETS_S, registry=registry)
        self.end_to_end = Histogram("taskmode_async_end_to_end_seconds", "From submission to a final status",
                                    ["function"], buckets=_LATENCY_BUCKETS_S, registry=registry)
        registry.register(self)

    def seed(self, partition: int, documents: Iterable[dict[str, object]]) -> None:
        """The unfinished tasks of a newly held partition, as the read model has them."""
        tasks = self._open[partition]
        tasks.clear()
        for doc in documents:
            status = Status(str(doc.get("status")))
            if status in TERMINAL:
                continue
            submitted = int(str(doc.get("submitTime") or doc.get("startedTime") or 0))
            due = int(str(doc.get("dueTime") or submitted))
            key = (str(doc["functionName"]), str(doc["taskId"]))
            tasks[key] = _Open(function=key[0], qualifier=str(doc.get("qualifier") or "LATEST"), status=status,
                               due_ms=due, submitted_ms=submitted)

    def forget(self, partition: int) -> None:
        """A partition this instance no longer holds: its new holder reports it."""
        self._open.pop(partition, None)

    def on_event(self, event: AnyTaskEvent) -> None:
        """One event folded into the read model (replays are not passed here)."""
        key = (event.function, event.task_id)
        tasks = self._open[wire.partition_of(event.function, event.task_id, self._partitions)]
        if isinstance(event, TaskEnqueued):
            # Every function seen keeps its series (at 0 when idle), so an alert on it resolves.
            self._reported.add((event.function, event.qualifier))
        status = event.status
        if isinstance(event, TaskEnqueued):
            task = tasks[key] = _Open(function=event.function, qualifier=event.qualifier, status=status,
                                      due_ms=event.due_at_ms, submitted_ms=event.at_ms)
            self.enqueued.labels(event.function, event.qualifier).inc()
            return
        task = tasks.get(key) or _Open(function=event.function, qualifier="LATEST", status=status,
                                       due_ms=event.at_ms, submitted_ms=event.at_ms)
        tasks[key] = task
        if status == Status.PROCESSED:
            self.dequeued.labels(event.function, task.qualifier).inc()
        elif status == Status.RUNNING:
            self.queue_wait.labels(event.function).observe(max(0, event.at_ms - task.due_ms) / 1000)
        elif isinstance(event, TaskRetrying):
            task.due_ms = event.retry_at_ms
            self.retries.labels(event.function).inc()
        task.status = status
        if status in TERMINAL:
            del tasks[key]
            self.end_to_end.labels(event.function).observe(max(0, event.at_ms - task.submitted_ms) / 1000)
            if status == Status.EXPIRED:
                self.expired.labels(event.function).inc()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = int(time.time() * 1000)
        backlog: dict[tuple[str, str], int] = defaultdict(int)
        in_process: dict[tuple[str, str], int] = defaultdict(int)
        seen: set[tuple[str, str]] = set()
        for tasks in list(self._open.values()):
            for task in list(tasks.values()):
                labels = (task.function, task.qualifier)
                seen.add(labels)
                if task.status in _IN_PROCESS:
                    in_process[labels] += 1
                elif task.status == Status.PROCESSED or task.due_ms <= now:
                    backlog[labels] += 1
        backlog_family = GaugeMetricFamily(
            "taskmode_async_backlog", "Tasks due and not yet running, wherever they wait (FC FunctionAsyncMessagesBacklog)",
            labels=["function", "qualifier"])
        in_process_family = GaugeMetricFamily(
            "taskmode_async_in_process", "Tasks running now (FC FunctionAsyncMessagesInProcess)",
            labels=["function", "qualifier"])
        for labels in sorted(seen | self._reported):
            backlog_family.add_metric(list(labels), backlog.get(labels, 0))
            in_process_family.add_metric(list(labels), in_process.get(labels, 0))
        self._reported |= seen
        yield backlog_family
        yield in_process_family
