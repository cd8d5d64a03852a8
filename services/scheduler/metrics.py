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
    held: Gauge
    holds: Counter
    scheduled: Counter

    @classmethod
    def build(cls, registry: CollectorRegistry) -> SchedulerMetrics:
        return cls(
            registry=registry,
            dispatched=Counter("taskmode_scheduler_dispatched", "Tasks this scheduler moved Enqueued -> Processed", ["function"], registry=registry),
            expired=Counter("taskmode_scheduler_expired", "Tasks this scheduler expired before they ran", ["function"], registry=registry),
            invalid=Counter("taskmode_scheduler_invalid", "Tasks this scheduler ended Invalid (function gone)", ["function"], registry=registry),
            dispatch_latency=Histogram(
                "taskmode_async_message_latency_seconds",
                "From due time to dispatch",
                ["function"],
                buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                registry=registry,
            ),
            backlog=Gauge("taskmode_scheduler_parked", "Enqueued events this scheduler holds or has yet to read", registry=registry),
            held=Gauge("taskmode_flow_held_tasks", "Due tasks held Enqueued by flow control (paused: disabled; "
                       "blocked: reservedConcurrency 0; rate: waiting in process for its startRatePerSecond turn)", ["function", "reason"], registry=registry),
            holds=Counter("taskmode_flow_holds", "Times a due task was held back by flow control (reason rate: "
                          "by its function's startRatePerSecond)",
                          ["function", "reason"], registry=registry),
            scheduled=Counter("taskmode_scheduler_scheduled", "Delayed tasks filed as nats-server message schedules "
                              "(they come back as due ticks at their due time)", ["function"], registry=registry),
        )
