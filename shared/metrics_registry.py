"""The metrics registry every service should build its metrics against.

Two choices made once, here, rather than in four services:

- A `ProcessCollector`, so each service exports `process_cpu_seconds_total`,
  `process_resident_memory_bytes`, `process_open_fds` and `process_start_time_seconds` (Prometheus'
  standard names; the dashboard and a `changes(process_start_time_seconds[1h])` query use them).
- No `_created` series: prometheus_client adds a `<counter>_created` timestamp next to every
  counter and histogram, which doubles the series count and which nothing here reads.
  `disable_created_metrics()` is process-wide, so calling it at registry creation covers every
  metric the service builds afterwards.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, ProcessCollector, disable_created_metrics


def new_registry() -> CollectorRegistry:
    """A fresh registry with process metrics; turns `_created` series off for this process."""
    disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return registry
