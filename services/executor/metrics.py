from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True)
class ExecutorMetrics:
    registry: CollectorRegistry
    outcomes: Counter
    run_seconds: Histogram
    submit_to_start: Histogram
    in_process: Gauge
    instances: Gauge
    instance_cpu: Gauge
    instance_rss: Gauge
    instance_requests: Gauge
    scaling: Counter
    cold_start: Histogram
    flow_held: Counter
    throttled: Gauge

    def observe_scaling(self, function: str, direction: str, cold_s: float) -> None:
        self.scaling.labels(function, direction).inc()
        if direction == "up":
            self.cold_start.labels(function).observe(cold_s)

    @classmethod
    def build(cls, registry: CollectorRegistry) -> ExecutorMetrics:
        return cls(
            registry=registry,
            outcomes=Counter("taskmode_task_outcomes", "Attempts by outcome", ["function", "status"], registry=registry),
            run_seconds=Histogram("taskmode_task_run_seconds", "Handler run time", ["function"], registry=registry),
            submit_to_start=Histogram(
                "taskmode_task_start_latency_seconds",
                "From submission (or retry due time) to Running",
                ["function"],
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                registry=registry,
            ),
            in_process=Gauge("taskmode_executor_running", "Tasks this executor runs now", registry=registry),
            instances=Gauge("taskmode_instances", "Live instances", ["function"], registry=registry),
            # A gauge set from the process's own CPU counter: it only grows, so rate() applies.
            instance_cpu=Gauge(
                "taskmode_instance_cpu_seconds_total", "CPU time of an instance", ["function", "instance_id"],
                registry=registry,
            ),
            instance_requests=Gauge(
                "taskmode_instance_concurrent_requests", "Invocations an instance is running now",
                ["function", "instance_id"], registry=registry,
            ),
            scaling=Counter("taskmode_scaling_events", "Instances started (up) and reaped when idle (down)",
                            ["function", "direction"], registry=registry),
            cold_start=Histogram("taskmode_cold_start_seconds", "From starting an instance to its being ready",
                                 ["function"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5),
                                 registry=registry),
            flow_held=Counter("taskmode_executor_flow_held", "Dispatches handed back because their function was "
                              "disabled or blocked (reservedConcurrency 0) when they arrived", ["function", "reason"],
                              registry=registry),
            throttled=Gauge("taskmode_throttled_tasks", "Dispatches waiting for a running slot: cap=function "
                            "(its reservedConcurrency reached) or cap=account (TASKMODE_ACCOUNT_CONCURRENCY reached)",
                            ["function", "cap"], registry=registry),
            instance_rss=Gauge(
                "taskmode_instance_memory_bytes", "Resident memory of an instance", ["function", "instance_id"],
                registry=registry,
            ),
        )
