from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True)
class SchedulerMetrics:
    registry: CollectorRegistry
    dispatched: Counter
    expired: Counter
    invalid: Counter
    dispatch_latency: Histogram
    backlog: Gauge

    @classmethod
    def build(cls, registry: CollectorRegistry) -> SchedulerMetrics:
        return cls(
            registry=registry,
            dispatched=Counter("taskmode_async_dequeue", "Tasks moved Enqueued -> Processed", ["function"], registry=registry),
            expired=Counter("taskmode_async_expired_dropped", "Tasks expired before they ran", ["function"], registry=registry),
            invalid=Counter("taskmode_async_invalid", "Tasks invalid (function gone)", ["function"], registry=registry),
            dispatch_latency=Histogram(
                "taskmode_async_message_latency_seconds",
                "From due time to dispatch",
                ["function"],
                buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                registry=registry,
            ),
            backlog=Gauge("taskmode_async_backlog", "Enqueued tasks not yet dispatched", registry=registry),
        )
