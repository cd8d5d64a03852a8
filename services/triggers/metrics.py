from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram


@dataclass(frozen=True)
class TriggersMetrics:
    registry: CollectorRegistry
    trigger_events: Counter
    batch_tasks: Histogram

    @classmethod
    def build(cls, registry: CollectorRegistry) -> TriggersMetrics:
        return cls(
            registry=registry,
            # FC's "Asynchronous Invocation Trigger Events"; the gateway exports the same series
            # for http triggers.
            trigger_events=Counter(
                "taskmode_trigger_events_total",
                "Messages and ticks that arrived through a trigger, by function, trigger, type and outcome.",
                ["function", "trigger", "trigger_type", "outcome"],
                registry=registry,
            ),
            batch_tasks=Histogram(
                "taskmode_trigger_batch_tasks", "Tasks appended per atomic batch from nats triggers",
                buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500), registry=registry,
            ),
        )
