"""Prometheus metrics of every service, scraped over HTTP from a running stack."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from nats.errors import NoRespondersError
from prometheus_client.parser import text_string_to_metric_families

from shared.devstack import free_port
from tests.integration_fixtures import StackFactory, publisher
from tests.test_lifecycle import make_function
from tests.test_recovery import wait_until

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
            try:
                found = samples((await http.get(url)).text)
            except httpx.ConnectError:  # the service is still starting: its port is not open yet
                if time.monotonic() > end:
                    raise
                await asyncio.sleep(0.2)
                continue
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

    scheduler = await scrape_until(f"http://127.0.0.1:{ports['SCHEDULER']}/metrics",
                                   lambda f: value(f, "taskmode_scheduler_dispatched_total", function="metered") >= 1)
    assert value(scheduler, "taskmode_scheduler_dispatched_total", function="metered") == 1

    projection = await scrape_until(
        f"http://127.0.0.1:{ports['PROJECTION']}/metrics",
        lambda f: value(f, "taskmode_projection_events_applied_total") >= 4,
    )
    assert value(projection, "taskmode_projection_events_applied_total") >= 4
    # Per-function figures with FC's meanings, derived from the folded events.
    assert value(projection, "taskmode_async_enqueued_total", function="metered", qualifier="LATEST") == 1
    assert value(projection, "taskmode_async_dequeued_total", function="metered", qualifier="LATEST") == 1
    assert value(projection, "taskmode_async_backlog", function="metered", qualifier="LATEST") == 0
    assert value(projection, "taskmode_async_in_process", function="metered", qualifier="LATEST") == 0
    assert value(projection, "taskmode_async_end_to_end_seconds_count", function="metered") == 1

    async with httpx.AsyncClient() as http:  # /metrics is served unsigned, for Prometheus
        gateway = samples((await http.get(f"http://127.0.0.1:{stack.gateway_port}/metrics")).text)
    assert value(gateway, "taskmode_gateway_task_submissions_total", outcome="enqueued") == 1


async def test_backlog_counts_due_tasks_wherever_they_wait_and_drops_stopped_ones(stack_with: StackFactory) -> None:
    port = free_port()
    stack, fc = stack_with({"TASKMODE_PROJECTION_METRICS_PORT": str(port), "TASKMODE_EXECUTOR_MAX_INSTANCES": "1"})
    url = f"http://127.0.0.1:{port}/metrics"
    await make_function(fc, "queued", handler="index.sleep")
    # One instance: the first task runs 5 s, the next four wait inside the executor (Processed).
    for i in range(5):
        assert (await fc.invoke_async("queued", b"5" if i == 0 else b"0", task_id=f"q{i}")).status_code == 202
    assert (await fc.invoke_async("queued", b"0", task_id="later", delay_s=600)).status_code == 202
    await fc.wait_for("queued", "q0", {"Running"})

    def figures(found: dict) -> tuple[float, float]:  # type: ignore[type-arg]
        return (value(found, "taskmode_async_backlog", function="queued", qualifier="LATEST"),
                value(found, "taskmode_async_in_process", function="queued", qualifier="LATEST"))

    # The delayed task is not due, so it is not backlog.
    found = await scrape_until(url, lambda f: figures(f) == (4, 1))
    assert figures(found) == (4, 1)
    for task_id in ("q1", "q2", "later"):
        assert (await fc.stop_task("queued", task_id)).status_code == 200
    found = await scrape_until(url, lambda f: figures(f) == (2, 1))
    assert figures(found) == (2, 1)
    for task_id in ("q0", "q3", "q4"):
        await fc.wait_for("queued", task_id, {"Succeeded"}, deadline_s=60)
    found = await scrape_until(url, lambda f: figures(f) == (0, 0))
    assert figures(found) == (0, 0)


async def test_the_figures_match_the_api_with_two_executors_and_two_schedulers(stack_with: StackFactory) -> None:
    ports = {label: free_port() for label in ("projection", "projection2")}
    stack, fc = stack_with({"TASKMODE_LEASE_S": "2", "TASKMODE_PROJECTION_METRICS_PORT": str(ports["projection"])})
    for service in ("executor", "scheduler"):
        stack.start_service(service, name=f"{service}2")
    stack.start_service("projection", name="projection2",
                        env={"TASKMODE_PROJECTION_METRICS_PORT": str(ports["projection2"])})
    await make_function(fc, "counted", handler="index.fail_then_succeed", retries=2)
    ids = [f"c{i:02d}" for i in range(24)]
    for i, task_id in enumerate(ids):  # every third task fails once first, so it is retried
        assert (await fc.invoke_async("counted", b"1" if i % 3 == 0 else b"0", task_id=task_id)).status_code == 202
    tasks = [await fc.wait_for("counted", task_id, {"Succeeded"}, deadline_s=90) for task_id in ids]
    retried = sum(task["alreadyRetriedTimes"] for task in tasks)
    assert retried == 8

    async def summed(name: str, **labels: str) -> float:
        total = 0.0
        for port in ports.values():
            found = await scrape_until(f"http://127.0.0.1:{port}/metrics", lambda f: True)
            total += value(found, name, **labels)
        return total

    async def settled() -> bool:
        return (await summed("taskmode_async_end_to_end_seconds_count", function="counted")) == len(ids)

    end = time.monotonic() + 60
    while not await settled():  # the projections fold the last events a moment after the API shows them
        assert time.monotonic() < end, "the projections did not count every task"
        await asyncio.sleep(0.2)
    # Each task was counted once, whichever projection holds its partition.
    assert await summed("taskmode_async_enqueued_total", function="counted", qualifier="LATEST") == len(ids)
    assert await summed("taskmode_async_dequeued_total", function="counted", qualifier="LATEST") == len(ids)
    assert await summed("taskmode_async_retries_total", function="counted") == retried
    assert await summed("taskmode_async_backlog", function="counted", qualifier="LATEST") == 0


async def test_trigger_events_and_destination_outcomes_are_counted(stack_with: StackFactory) -> None:
    """FC's "Asynchronous Invocation Trigger Events" per function and trigger (nats, http,
    timer), and the destination figures (FunctionDestinationSucceeded / Errors, attempts)."""
    ports = {service: free_port() for service in ("TRIGGERS", "DELIVERER")}
    stack, fc = stack_with({**{f"TASKMODE_{s}_METRICS_PORT": str(p) for s, p in ports.items()},
                            "TASKMODE_DELIVERY_MAX_ATTEMPTS": "1"})
    await make_function(fc, "counted")  # echoes its event: every trigger's task succeeds
    assert (await fc.put_async_config("counted", asyncTask=True, destinationConfig={
        "onSuccess": {"destination": "nats:results.counted"}})).status_code == 200
    await make_function(fc, "broken", handler="index.fail")
    nobody = f"http://127.0.0.1:{free_port()}/hook"  # refused: the one attempt fails
    assert (await fc.put_async_config("broken", asyncTask=True, maxAsyncRetryAttempts=0, destinationConfig={
        "onFailure": {"destination": nobody}})).status_code == 200
    urls = {}
    for name, trigger_type, config in [("intake", "nats", {"subject": "counted.in"}),
                                       ("web", "http", {"authType": "anonymous", "methods": ["POST"]}),
                                       ("tick", "timer", {"cronExpression": "@every 1s", "payload": "0"})]:
        created = await fc.request("POST", "/functions/counted/triggers", json={
            "triggerName": name, "triggerType": trigger_type, "triggerConfig": json.dumps(config)})
        assert created.status_code == 200, created.text
        urls[name] = created.json().get("httpTrigger", {}).get("urlInternet", "")

    nc = await publisher(stack)
    try:
        async def ask(task_id: str) -> dict[str, object]:
            reply = await nc.request("counted.in", b"0", timeout=10, headers={"x-fc-async-task-id": task_id})
            return dict(json.loads(reply.data))

        async def subscribed() -> bool:
            try:
                return "taskId" in await ask("warmup")
            except NoRespondersError:
                return False

        await wait_until(subscribed, deadline_s=30, what="trigger subscribed")
        assert await ask("ok_1") == {"taskId": "ok_1"}
        assert (await ask("ok_1"))["HttpStatus"] == 409
        assert (await ask("9bad"))["HttpStatus"] == 400
    finally:
        await nc.close()
    async with httpx.AsyncClient(timeout=60) as http:
        assert (await http.post(urls["web"], content=b"0")).status_code == 200
        assert (await http.post(urls["web"], content=b"0", headers={"x-fc-invocation-type": "Async",
                                                           "x-fc-async-task-id": "web_1"})).status_code == 202
        gateway = samples((await http.get(f"http://127.0.0.1:{stack.gateway_port}/metrics")).text)
    labels = {"function": "counted", "trigger": "web", "trigger_type": "http"}
    assert value(gateway, "taskmode_trigger_events_total", **labels, outcome="invoked") == 1
    assert value(gateway, "taskmode_trigger_events_total", **labels, outcome="submitted") == 1

    nats_labels = {"function": "counted", "trigger": "intake", "trigger_type": "nats"}
    timer_labels = {"function": "counted", "trigger": "tick", "trigger_type": "timer"}
    triggers = await scrape_until(
        f"http://127.0.0.1:{ports['TRIGGERS']}/metrics",
        lambda f: value(f, "taskmode_trigger_events_total", **nats_labels, outcome="rejected") >= 1
        and value(f, "taskmode_trigger_events_total", **timer_labels, outcome="submitted") >= 1)
    assert value(triggers, "taskmode_trigger_events_total", **nats_labels, outcome="submitted") == 2  # warmup, ok_1
    assert value(triggers, "taskmode_trigger_events_total", **nats_labels, outcome="duplicate") == 1
    assert value(triggers, "taskmode_trigger_events_total", **nats_labels, outcome="rejected") == 1
    assert value(triggers, "taskmode_trigger_events_total", **timer_labels, outcome="submitted") >= 1

    assert (await fc.invoke_async("broken", b"x", task_id="fails_1")).status_code == 202
    await fc.wait_for("broken", "fails_1", {"Failed"}, deadline_s=60)
    deliverer = await scrape_until(
        f"http://127.0.0.1:{ports['DELIVERER']}/metrics",
        lambda f: value(f, "taskmode_destination_succeeded_total", function="counted", condition="Success") >= 1
        and value(f, "taskmode_destination_errors_total", function="broken", condition="RetriesExhausted") >= 1,
        deadline_s=60)
    assert value(deliverer, "taskmode_destination_errors_total", function="broken", condition="RetriesExhausted") == 1
    assert value(deliverer, "taskmode_destination_attempts_total", kind="webhook", outcome="failed") == 1
    assert value(deliverer, "taskmode_destination_attempts_total", kind="nats", outcome="delivered") >= 1
    assert value(deliverer, "taskmode_destination_errors_total", function="counted", condition="Success") == 0

    async def given_up() -> bool:
        return bool((await fc.get_task("broken", "fails_1")).json().get("destinationStatus") == "DeliveryFailed")

    await wait_until(given_up, deadline_s=30, what="destinationStatus DeliveryFailed")
