"""The registry services build their metrics against: process metrics, no `_created` series."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, generate_latest

from shared.metrics_registry import new_registry


def test_the_registry_has_process_metrics_and_no_created_series() -> None:
    registry = new_registry()
    Counter("taskmode_example_things", "Things", ["function"], registry=registry).labels("f").inc()
    Histogram("taskmode_example_seconds", "Durations", registry=registry).observe(0.2)
    text = generate_latest(registry).decode()
    assert 'taskmode_example_things_total{function="f"} 1.0' in text
    assert "process_resident_memory_bytes" in text and "process_cpu_seconds_total" in text
    assert "_created" not in text
