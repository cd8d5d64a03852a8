"""A real Prometheus scraping a running stack with the deployed alert rules, and a real
Alertmanager, with the deployed routing, delivering alerts to a webhook in this test.

Two things are scaled down so the test takes seconds, not minutes: every rule's `for:` (2 s) and
Alertmanager's waits (1 s). The expressions, labels and routes are the deployed ones; the hold
times themselves are checked by the promtool unit tests (deploy/prometheus/tests).

Metrics that the services do not export yet (the per-function metrics work in progress) are
listed in AWAITED_METRICS: a dashboard query that needs one of them is an expected failure
until it lands, then an unexpected pass. Any other missing series fails.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.devstack import Stack, free_port
from tests.fc_client import FcClient
from tests.integration_fixtures import client_for, new_stack
from tests.test_lifecycle import make_function
from tests.test_monitoring_config import as_prometheus_sees_it, panel_queries
from tests.tools import DEPLOY, alertmanager_config_with_webhook, load_yaml, start_alertmanager, start_prometheus

pytestmark = pytest.mark.timeout(120)

FUNCTION = "watched"
# Exported once the services' per-function metrics land (the issue's metric list); absent or
# shaped differently (no function label) in the services today.
AWAITED_METRICS = {
    # Counters that appear once something happens that this module's traffic never does.
    "taskmode_async_retries_total",  # a retry (the traffic's function has no retries)
    "taskmode_async_expired_dropped_total",  # a task that expired
}
# Labels that do not filter by function: these series exist once per service.
SYSTEM_METRICS = {"taskmode_projection_lag_events", "taskmode_projection_lag_seconds", "up"}


@dataclass
class Monitored:
    stack: Stack
    prometheus: str
    alerts: list[dict[str, Any]] = field(default_factory=list)  # what the webhook received

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def wait_for_alert(self, alertname: str, *, deadline_s: float = 60, **labels: str) -> dict[str, Any]:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            for delivery in list(self.alerts):
                for alert in delivery["alerts"]:
                    wanted = {"alertname": alertname, **labels}
                    if alert["status"] == "firing" and wanted.items() <= alert["labels"].items():
                        return alert
            time.sleep(0.2)
        firing = self.query("ALERTS")
        raise AssertionError(f"no {alertname} {labels} delivered; firing in Prometheus: {firing}; "
                             f"delivered: {self.alerts}")


def webhook_receiver(received: list[dict[str, Any]]) -> tuple[ThreadingHTTPServer, str]:
    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}/alerts"


def rules_with_short_holds(work: Path) -> Path:
    rules = load_yaml(DEPLOY / "prometheus" / "rules.yml")
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "2s"
    path = work / "rules.yml"
    path.write_text(json.dumps(rules))
    return path


def alertmanager_config_with_short_waits(url: str) -> dict[str, Any]:
    config = alertmanager_config_with_webhook(url)
    for route in [config["route"], *config["route"].get("routes", [])]:
        route.update(group_wait="1s", group_interval="1s")
    return config


def prometheus_config(stack: Stack, *, ports: dict[str, int], rules: Path, alertmanager: str) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml's jobs, pointed at this stack's loopback ports."""
    deployed = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    targets = {"taskmode-gateway": stack.gateway_port, **{f"taskmode-{s}": p for s, p in ports.items()}}
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager.removeprefix("http://")]}]}]},
        "scrape_configs": [{"job_name": job["job_name"],
                            "static_configs": [{"targets": [f"127.0.0.1:{targets[job['job_name']]}"]}]}
                           for job in deployed["scrape_configs"]],
    }


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Monitored]:
    work = tmp_path_factory.mktemp("monitored")
    ports = {service: free_port() for service in ("scheduler", "executor", "projection", "triggers", "deliverer")}
    stack = new_stack(work / "stack", extra_env={
        **{f"TASKMODE_{service.upper()}_METRICS_PORT": str(port) for service, port in ports.items()},
        "TASKMODE_EXECUTOR_MAX_INSTANCES": "1",  # so a few slow tasks make a backlog
    })
    received: list[dict[str, Any]] = []
    webhook, webhook_url = webhook_receiver(received)
    alertmanager, alertmanager_url = start_alertmanager(work / "alertmanager", alertmanager_config_with_short_waits(webhook_url))
    prometheus, prometheus_url = start_prometheus(
        work / "prometheus", prometheus_config(stack, ports=ports, rules=rules_with_short_holds(work),
                                               alertmanager=alertmanager_url))
    try:
        yield Monitored(stack=stack, prometheus=prometheus_url, alerts=received)
    finally:
        prometheus.stop()
        alertmanager.stop()
        webhook.shutdown()
        webhook.server_close()
        stack.stop()


@pytest.fixture
async def fc(monitored: Monitored) -> AsyncIterator[FcClient]:
    client = client_for(monitored.stack)
    try:
        yield client
    finally:
        await client.close()


def wait_until(condition: Any, *, deadline_s: float = 30, what: str) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_prometheus_scrapes_every_service(monitored: Monitored) -> None:
    def all_up() -> bool:
        return {(s["metric"]["job"], s["value"][1]) for s in monitored.query('up{job=~"taskmode-.+"}')} == {
            (job, "1") for job in ("taskmode-gateway", "taskmode-scheduler", "taskmode-executor", "taskmode-projection",
                                   "taskmode-triggers", "taskmode-deliverer")}
    wait_until(all_up, what="every service up in Prometheus")


async def test_the_openapi_document_is_served(monitored: Monitored) -> None:
    async with httpx.AsyncClient() as http:
        answer = await http.get(f"http://127.0.0.1:{monitored.stack.gateway_port}/openapi.json")
    assert answer.status_code == 200
    paths = answer.json()["paths"]
    assert "/2023-03-30/functions" in paths
    assert any(path.startswith("/2023-03-30/functions/") and path.endswith("/async-tasks") for path in paths)


async def test_every_service_answers_health_and_readiness(monitored: Monitored) -> None:
    stack = monitored.stack
    async with httpx.AsyncClient() as http:
        bases = [f"http://127.0.0.1:{stack.gateway_port}"] + [
            f"http://127.0.0.1:{stack.service_env[f'TASKMODE_{s}_METRICS_PORT']}" for s in ("SCHEDULER", "EXECUTOR", "PROJECTION", "TRIGGERS", "DELIVERER")]
        for base in bases:
            assert (await http.get(f"{base}/healthz")).status_code == 200
            ready = await http.get(f"{base}/readyz")
            assert ready.status_code == 200 and "taskmode_" not in ready.text, base  # not just the metrics page


def metrics_in(expr: str) -> set[str]:
    names = set(re.findall(r"\b(taskmode_[a-z_]+|up)\b(?=\s*[{\[)]|\s*$)", expr))
    # Histogram queries name their _bucket/_sum/_count series; the family is what is awaited.
    return {re.sub(r"_(bucket|sum|count)$", "", name) for name in names}


@pytest.fixture(scope="module")
def traffic(monitored: Monitored) -> None:
    """Some succeeded and some failed tasks of FUNCTION, scraped at least twice since."""

    async def submit() -> None:
        client = client_for(monitored.stack)
        try:
            await make_function(client, FUNCTION, handler="index.fail_then_succeed", retries=0)
            for number in range(6):
                await client.invoke_async(FUNCTION, b"1" if number % 3 else b"0", task_id=f"t{number}")
            for number in range(6):
                await client.wait_for(FUNCTION, f"t{number}", {"Succeeded", "Failed"})
        finally:
            await client.close()

    asyncio.run(submit())
    wait_until(lambda: monitored.query(f'taskmode_task_outcomes_total{{function="{FUNCTION}"}}'),
               what="outcomes in Prometheus")
    time.sleep(3)  # a few more scrapes, so rates have two samples


@pytest.mark.parametrize(("title", "expr"), panel_queries())
def test_every_dashboard_query_returns_series(monitored: Monitored, traffic: None, title: str, expr: str) -> None:
    expr = as_prometheus_sees_it(expr).replace('function="some_function"', f'function="{FUNCTION}"')
    missing = set()
    for metric in metrics_in(expr):
        selector = "" if metric in SYSTEM_METRICS else f',function="{FUNCTION}"'
        if not monitored.query(f'count({{__name__=~"{metric}(_bucket|_total)?"{selector}}})'):
            missing.add(metric)
    if missing - AWAITED_METRICS:
        pytest.fail(f"{title}: {sorted(missing - AWAITED_METRICS)} missing from the services' metrics")
    if missing:
        pytest.xfail(f"awaits {', '.join(sorted(missing))} (the services' metrics work)")
    assert monitored.query(expr), f"{title}: {expr} returned no series"


def test_a_service_down_alert_reaches_the_webhook(monitored: Monitored) -> None:
    stack = monitored.stack
    stack.kill_service("scheduler")
    try:
        alert = monitored.wait_for_alert("TaskmodeServiceDown", job="taskmode-scheduler")
        assert alert["labels"]["severity"] == "critical"
        assert alert["annotations"]["summary"].startswith("taskmode-scheduler at 127.0.0.1:")
    finally:
        stack.start_service("scheduler")


async def test_a_function_backlog_alert_reaches_the_webhook(monitored: Monitored, fc: FcClient) -> None:
    slow = "backlogged"
    await make_function(fc, slow, handler="index.sleep")
    for number in range(8):  # one instance at a time, 2 s each: most of them wait
        await fc.invoke_async(slow, b"2", task_id=f"b{number}")
    backlog: list[dict[str, Any]] = []
    end = time.monotonic() + 15
    while not backlog and time.monotonic() < end:
        backlog = monitored.query(f'taskmode_async_backlog{{function="{slow}"}}')
        await asyncio.sleep(0.5)
    assert backlog, "no taskmode_async_backlog series with a function label"
    alert = await asyncio.to_thread(monitored.wait_for_alert, "TaskmodeFunctionBacklog", function=slow)
    assert alert["labels"]["severity"] == "medium"
