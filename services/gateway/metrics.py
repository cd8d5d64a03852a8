"""Gateway metrics, built against a registry the app factory owns (never the global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from shared.metrics_registry import new_registry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    """Requests by route and status, request latency, task submissions, stops and sync calls."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or new_registry()
        self.requests = Counter(
            "taskmode_gateway_requests_total",
            "HTTP requests handled, by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "taskmode_gateway_request_duration_seconds",
            "Time to answer an HTTP request, by method and route template.",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.submissions = Counter(
            "taskmode_gateway_task_submissions_total",
            "Async task submissions, by outcome (enqueued, duplicate, rejected).",
            ["outcome"],
            registry=self.registry,
        )
        self.stops = Counter(
            "taskmode_gateway_task_stops_total",
            "StopAsyncTask calls, by outcome (stopped, stopping, already_stopping, finished).",
            ["outcome"],
            registry=self.registry,
        )
        self.sync_invocations = Counter(
            "taskmode_gateway_sync_invocations_total",
            "Synchronous invocations, by outcome (ok, handler_error, system_error, no_responders, timeout).",
            ["outcome"],
            registry=self.registry,
        )
        # FC's "Asynchronous Invocation Trigger Events"; the triggers service exports the same
        # series for nats and timer triggers.
        self.trigger_events = Counter(
            "taskmode_trigger_events_total",
            "Requests that arrived through a trigger, by function, trigger, type and outcome.",
            ["function", "trigger", "trigger_type", "outcome"],
            registry=self.registry,
        )
        self.read_fallbacks = Counter(
            "taskmode_gateway_task_read_fallbacks_total",
            "GetAsyncTask answers folded from the event stream because the read model lagged.",
            registry=self.registry,
        )
        self.read_model_skipped = Counter(
            "taskmode_gateway_read_model_skipped_total",
            "GetAsyncTask answers that did not ask MongoDB at all: it was known to be down.",
            registry=self.registry,
        )

    def observe_request(self, method: str, route: str, status: int, duration_s: float) -> None:
        self.requests.labels(method=method, route=route, status=str(status)).inc()
        self.latency.labels(method=method, route=route).observe(duration_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
