from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram


@dataclass(frozen=True)
class DelivererMetrics:
    registry: CollectorRegistry
    succeeded: Counter
    errors: Counter
    attempts: Counter
    attempt_seconds: Histogram

    @classmethod
    def build(cls, registry: CollectorRegistry) -> DelivererMetrics:
        return cls(
            registry=registry,
            # FC's FunctionDestinationSucceeded / FunctionDestinationErrors.
            succeeded=Counter("taskmode_destination_succeeded", "Destination records delivered",
                              ["function", "condition"], registry=registry),
            errors=Counter("taskmode_destination_errors", "Destination records given up on after every attempt",
                           ["function", "condition"], registry=registry),
            attempts=Counter("taskmode_destination_attempts", "Delivery attempts, by destination kind and outcome",
                             ["kind", "outcome"], registry=registry),
            attempt_seconds=Histogram("taskmode_destination_attempt_seconds", "Time one delivery attempt took",
                                      ["kind"], registry=registry),
        )
