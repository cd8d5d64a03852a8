"""The monitoring configuration checked by the real tools: alert rules (promtool unit tests),
Prometheus and Alertmanager configuration, and every dashboard query parsed by a real Prometheus."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.tools import (
    DEPLOY,
    alertmanager_config_with_webhook,
    amtool,
    load_yaml,
    promtool,
    start_prometheus,
)

pytestmark = pytest.mark.timeout(60)
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "taskmode-function.json"
# Grafana's variables, as a dashboard query would get them.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "$function": "some_function"}
JOBS = {"taskmode-gateway", "taskmode-scheduler", "taskmode-executor", "taskmode-projection", "taskmode-triggers",
        "taskmode-deliverer"}


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_alert_rules_are_valid_and_pass_their_unit_tests() -> None:
    check = run([promtool(), "check", "rules", str(DEPLOY / "prometheus" / "rules.yml")])
    assert check.returncode == 0, check.stdout + check.stderr
    tests = sorted((DEPLOY / "prometheus" / "tests").glob("*.test.yml"))
    assert tests
    unit = run([promtool(), "test", "rules", *map(str, tests)])
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_every_alert_has_a_severity_and_every_severity_is_routed() -> None:
    rules = [rule for group in load_yaml(DEPLOY / "prometheus" / "rules.yml")["groups"] for rule in group["rules"]]
    severities = {rule["alert"]: rule["labels"]["severity"] for rule in rules}
    assert severities["TaskmodeFunctionBacklog"] == "medium"  # as in the product document
    assert set(severities.values()) <= {"critical", "high", "medium", "low"}
    for rule in rules:
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    config = load_yaml(DEPLOY / "alertmanager" / "alertmanager.yml")
    assert config["route"]["receiver"] == "taskmode-webhook"  # whatever no sub-route takes, too


@pytest.mark.parametrize("config_name", ["prometheus.yml", "prometheus-k8s.yml"])
def test_prometheus_configuration_is_valid(tmp_path: Path, config_name: str) -> None:
    config: dict[str, Any] = load_yaml(DEPLOY / "prometheus" / config_name)
    assert {job["job_name"] for job in config["scrape_configs"]} == JOBS
    # The container paths of the rule file, pointed at the repository's copy.
    config["rule_files"] = [str(DEPLOY / "prometheus" / "rules.yml")]
    checked = tmp_path / config_name
    checked.write_text(json.dumps(config))
    result = run([promtool(), "check", "config", str(checked)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_configuration_is_valid_and_reads_the_webhook_url_from_a_file(tmp_path: Path) -> None:
    deployed = (DEPLOY / "alertmanager" / "alertmanager.yml").read_text()
    assert "url_file: /run/secrets/alert-webhook-url" in deployed
    assert not re.search(r"^\s*-?\s*url:", deployed, re.MULTILINE)  # no URL (nor token) in the file
    checked = tmp_path / "alertmanager.yml"
    checked.write_text(json.dumps(alertmanager_config_with_webhook("http://127.0.0.1:1/hook")))
    result = run([amtool(), "check-config", str(checked)])
    assert result.returncode == 0, result.stdout + result.stderr


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel."""
    return [(panel["title"], target["expr"]) for panel in dashboard()["panels"] for target in panel.get("targets", [])]


def as_prometheus_sees_it(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def test_dashboard_is_the_monitoring_tab_of_one_function() -> None:
    board = dashboard()
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["function"]["type"] == "query" and not variables["function"]["multi"]
    datasource_uid = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]["uid"]
    queries = panel_queries()
    assert len(queries) >= 20
    for title, expr in queries:
        per_function = "taskmode_projection" not in expr and "up{" not in expr
        assert not per_function or 'function="$function"' in expr, f"{title}: {expr} ignores the function variable"
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == datasource_uid, panel["title"]
    expressions = " ".join(expr for _, expr in queries)
    for metric in ("taskmode_async_enqueued_total", "taskmode_async_dequeued_total", "taskmode_async_backlog",
                   "taskmode_async_in_process", "taskmode_async_queue_wait_seconds_bucket",
                   "taskmode_task_run_seconds_bucket", "taskmode_async_end_to_end_seconds_bucket",
                   "taskmode_task_outcomes_total", "taskmode_instance_cpu_seconds_total",
                   "taskmode_instance_memory_bytes", "taskmode_projection_lag_seconds"):
        assert metric in expressions, f"the dashboard shows no {metric}"
    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "taskmode.yml")["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


@pytest.fixture(scope="module")
def empty_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    child, url = start_prometheus(tmp_path_factory.mktemp("prometheus"), {"global": {"scrape_interval": "15s"}})
    try:
        yield url
    finally:
        child.stop()


@pytest.mark.parametrize(("title", "expr"), panel_queries())
def test_every_dashboard_query_parses(empty_prometheus: str, title: str, expr: str) -> None:
    answer = httpx.get(f"{empty_prometheus}/api/v1/query", params={"query": as_prometheus_sees_it(expr)}, timeout=10)
    assert answer.status_code == 200 and answer.json()["status"] == "success", f"{title}: {answer.text}"


def test_the_function_variable_query_parses(empty_prometheus: str) -> None:
    definition = dashboard()["templating"]["list"][0]["definition"]
    metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", definition).groups()  # type: ignore[union-attr]
    answer = httpx.get(f"{empty_prometheus}/api/v1/label/{label}/values", params={"match[]": metric}, timeout=10)
    assert answer.json()["status"] == "success"
