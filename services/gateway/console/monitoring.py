"""Monitoring charts from the figures the services' /metrics export, sampled every few seconds.

A sampler in the gateway scrapes the gateway's own registry and the scheduler's, executor's and
projection's /metrics endpoints, keeps the last hour of the figures the charts need in memory,
and turns consecutive samples into rates and interval averages per function. It runs only while
someone looks: the first chart request starts it, and it stops after a few idle minutes.

The scheduler exports one backlog figure for all functions; the per-function backlog (FC's
"Asynchronous Requests Backlogs": tasks Enqueued and not yet dispatched) is counted in the read
model at each sample, for the functions being viewed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import httpx
from prometheus_client.parser import text_string_to_metric_families
from shared.transitions import Status

log = logging.getLogger(__name__)

KEEP_S: Final = 3600.0
IDLE_STOP_S: Final = 600.0
SCRAPE_TIMEOUT_S: Final = 2.0
# The metric samples the charts use; everything else a scrape returns is dropped at once.
CHARTED: Final = frozenset({
    "taskmode_async_backlog",
    "taskmode_async_dequeue_total",
    "taskmode_async_expired_dropped_total",
    "taskmode_task_outcomes_total",
    "taskmode_async_message_latency_seconds_sum",
    "taskmode_async_message_latency_seconds_count",
    "taskmode_task_start_latency_seconds_sum",
    "taskmode_task_start_latency_seconds_count",
    "taskmode_task_run_seconds_sum",
    "taskmode_task_run_seconds_count",
    "taskmode_instances",
    "taskmode_instance_memory_bytes",
})
OUTCOME_STATUSES: Final = (Status.SUCCEEDED, Status.FAILED, Status.RETRYING, Status.STOPPED)

SeriesKey = tuple[str, frozenset[tuple[str, str]]]


@dataclass
class Sample:
    at_s: float
    values: dict[SeriesKey, float]
    backlogs: dict[str, int] = field(default_factory=dict)  # per function, from the read model


def parse_metrics(text: str) -> dict[SeriesKey, float]:
    """The charted samples of a Prometheus text exposition, keyed by name and labels."""
    found: dict[SeriesKey, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in CHARTED:
                found[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
    return found


def _total(values: dict[SeriesKey, float], name: str, **labels: str) -> float | None:
    """Sum of the samples of `name` whose labels include `labels` (None when there are none)."""
    wanted = set(labels.items())
    matching = [v for (n, l), v in values.items() if n == name and wanted <= l]
    return sum(matching) if matching else None


def _rate(before: Sample, after: Sample, name: str, **labels: str) -> float | None:
    first, second = _total(before.values, name, **labels), _total(after.values, name, **labels)
    elapsed = after.at_s - before.at_s
    if second is None or elapsed <= 0:
        return None
    delta = second - (first or 0.0)
    return round(delta / elapsed, 3) if delta >= 0 else None  # negative: a service restarted


def _mean_ms(before: Sample, after: Sample, histogram: str, function: str) -> float | None:
    """The histogram's average over the interval, in milliseconds (None when nothing was observed)."""
    sums = [_total(s.values, f"{histogram}_sum", function=function) for s in (before, after)]
    counts = [_total(s.values, f"{histogram}_count", function=function) for s in (before, after)]
    if sums[1] is None or counts[1] is None:
        return None
    observed = counts[1] - (counts[0] or 0.0)
    if observed <= 0:
        return None
    return round((sums[1] - (sums[0] or 0.0)) / observed * 1000, 2)


def chart_data(samples: list[Sample], function: str) -> dict[str, Any]:
    """Per-function series for the monitoring charts: one point per pair of consecutive samples."""
    pairs = list(zip(samples, samples[1:]))
    times = [after.at_s for _, after in pairs]
    throughput = {"dispatched/s": [_rate(a, b, "taskmode_async_dequeue_total", function=function) for a, b in pairs]}
    for status in OUTCOME_STATUSES:
        throughput[f"{status}/s"] = [
            _rate(a, b, "taskmode_task_outcomes_total", function=function, status=status) for a, b in pairs
        ]
    latency = {
        label: [_mean_ms(a, b, histogram, function) for a, b in pairs]
        for label, histogram in (
            ("due → dispatched", "taskmode_async_message_latency_seconds"),
            ("due → running", "taskmode_task_start_latency_seconds"),
            ("handler run", "taskmode_task_run_seconds"),
        )
    }
    backlog = {
        "this function (Enqueued)": [b.backlogs.get(function) for _, b in pairs],
        "all functions (scheduler)": [_total(b.values, "taskmode_async_backlog") for _, b in pairs],
    }
    memory = [_total(b.values, "taskmode_instance_memory_bytes", function=function) for _, b in pairs]
    instances = {
        "instances": [_total(b.values, "taskmode_instances", function=function) for _, b in pairs],
        "memory (MB)": [round(m / 2**20, 1) if m is not None else None for m in memory],
    }
    return {
        "t": times,
        "charts": {
            "backlog": {"title": "Backlog (tasks)", "series": backlog},
            "throughput": {"title": "Throughput (tasks/s)", "series": throughput},
            "latency": {"title": "Latency (ms, interval average)", "series": latency},
            "instances": {"title": "Instances", "series": instances},
        },
    }


BacklogCounter = Callable[[str], Awaitable[int]]


class MetricsSampler:
    """Scrapes every `every_s` while charts are being looked at; keeps the last `KEEP_S` seconds."""

    def __init__(self, *, urls: tuple[str, ...], own_metrics: Callable[[], bytes], count_backlog: BacklogCounter,
                 every_s: float) -> None:
        self._urls = urls
        self._own_metrics = own_metrics
        self._count_backlog = count_backlog
        self._every_s = every_s
        self._samples: deque[Sample] = deque(maxlen=int(KEEP_S / every_s) + 1)
        self._viewed: dict[str, float] = {}  # function -> when its charts were last asked for
        self._task: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None

    async def series(self, function: str) -> dict[str, Any]:
        """The chart data for `function`, starting the sampler if it was idle."""
        self._viewed[function] = time.monotonic()
        if self._task is None or self._task.done():
            await self._sample()  # a first point now, so the next one already draws a line
            self._task = asyncio.create_task(self._run(), name="console-metrics-sampler")
        return chart_data(list(self._samples), function)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._http is not None:
            await self._http.aclose()

    async def _run(self) -> None:
        while time.monotonic() - max(self._viewed.values(), default=0.0) < IDLE_STOP_S:
            await asyncio.sleep(self._every_s)
            try:
                await self._sample()
            except Exception as err:  # noqa: BLE001 - a failed sample is a gap in the chart, not an outage
                log.warning("metrics sample failed", extra={"error": repr(err)})
        log.info("metrics sampler idle; stopped")

    async def _scrape(self, url: str) -> dict[SeriesKey, float]:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=SCRAPE_TIMEOUT_S, trust_env=False)
        try:
            response = await self._http.get(url)
            response.raise_for_status()
        except httpx.HTTPError as err:
            log.debug("metrics scrape failed", extra={"url": url, "error": repr(err)})
            return {}
        return parse_metrics(response.text)

    async def _sample(self) -> None:
        values = parse_metrics(self._own_metrics().decode())
        for scraped in await asyncio.gather(*(self._scrape(url) for url in self._urls)):
            for key, value in scraped.items():
                values[key] = values.get(key, 0.0) + value  # several executors add up
        now = time.monotonic()
        watched = [f for f, seen in self._viewed.items() if now - seen < IDLE_STOP_S]
        backlogs: dict[str, int] = {}
        for function in watched:
            with contextlib.suppress(Exception):  # the read model may be away; the rest still charts
                backlogs[function] = await self._count_backlog(function)
        self._samples.append(Sample(at_s=time.time(), values=values, backlogs=backlogs))
