from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge


@dataclass(frozen=True)
class TriggersMetrics:
    registry: CollectorRegistry
    trigger_events: Counter
    appends_in_flight: Gauge

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
            appends_in_flight=Gauge(
                "taskmode_trigger_appends_in_flight",
                "Tasks from nats triggers whose first event awaits the stream's acknowledgement.",
                registry=registry,
            ),
        )
