"""Prometheus metrics of every service, scraped over HTTP from a running stack."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.devstack import free_port
from tests.integration_fixtures import StackFactory
from tests.test_lifecycle import make_function

pytestmark = pytest.mark.timeout(90)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape_until(url: str, predicate, *, deadline_s: float = 20):  # type: ignore[no-untyped-def]
    end = time.monotonic() + deadline_s
    async with httpx.AsyncClient() as http:
        while True:
            found = samples((await http.get(url)).text)
            if predicate(found) or time.monotonic() > end:
                return found
            await asyncio.sleep(0.2)


def value(found: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return found.get((name, frozenset(labels.items())), 0.0)


async def test_each_service_exports_its_metrics(stack_with: StackFactory) -> None:
    ports = {service: free_port() for service in ("SCHEDULER", "EXECUTOR", "PROJECTION")}
    stack, fc = stack_with({f"TASKMODE_{s}_METRICS_PORT": str(p) for s, p in ports.items()})
    await make_function(fc, "metered", handler="index.sleep")
    await fc.invoke_async("metered", b"0.2", task_id="m1")
    await fc.wait_for("metered", "m1", {"Succeeded"})

    executor = await scrape_until(
        f"http://127.0.0.1:{ports['EXECUTOR']}/metrics",
        lambda f: any(name == "taskmode_instance_memory_bytes" for name, _ in f),
    )
    assert value(executor, "taskmode_task_outcomes_total", function="metered", status="Succeeded") == 1
    memory = [v for (name, labels), v in executor.items()
              if name == "taskmode_instance_memory_bytes" and ("function", "metered") in labels]
    assert memory and all(v > 1_000_000 for v in memory)
    assert value(executor, "taskmode_instances", function="metered") >= 1

    # Due at once, so the gateway dispatched it; the scheduler dispatches only delayed tasks.
    await fc.invoke_async("metered", b"0.1", task_id="m2", delay_s=1)
    scheduler = await scrape_until(f"http://127.0.0.1:{ports['SCHEDULER']}/metrics",
                                   lambda f: value(f, "taskmode_async_dequeue_total", function="metered") >= 1)
    assert value(scheduler, "taskmode_async_dequeue_total", function="metered") == 1

    projection = await scrape_until(
        f"http://127.0.0.1:{ports['PROJECTION']}/metrics",
        lambda f: value(f, "taskmode_projection_events_applied_total") >= 4,
    )
    assert value(projection, "taskmode_projection_events_applied_total") >= 4

    async with httpx.AsyncClient() as http:  # /metrics is served unsigned, for Prometheus
        gateway = samples((await http.get(f"http://127.0.0.1:{stack.gateway_port}/metrics")).text)
    assert value(gateway, "taskmode_gateway_task_submissions_total", outcome="enqueued") == 2
    assert value(gateway, "taskmode_async_dequeue_total", function="metered") == 1
