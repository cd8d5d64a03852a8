from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True)
class ProjectionMetrics:
    registry: CollectorRegistry
    applied: Counter
    skipped: Counter
    refused: Counter
    batch_seconds: Histogram
    lag: Gauge
    lag_seconds: Gauge

    @classmethod
    def build(cls, registry: CollectorRegistry) -> ProjectionMetrics:
        return cls(
            registry=registry,
            applied=Counter("taskmode_projection_events_applied", "Events folded into the read model", registry=registry),
            skipped=Counter("taskmode_projection_events_replayed", "Events already applied (replays)", registry=registry),
            refused=Counter(
                "taskmode_projection_events_refused", "Events the transition table refused", ["reason"], registry=registry
            ),
            batch_seconds=Histogram("taskmode_projection_batch_seconds", "Time to apply one batch", registry=registry),
            lag=Gauge("taskmode_projection_lag_events", "Events in the stream not yet projected", registry=registry),
            lag_seconds=Gauge("taskmode_projection_lag_seconds", "Age of the oldest event not yet projected",
                              registry=registry),
        )
