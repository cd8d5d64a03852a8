"""Flow control on the running system: pause and resume, concurrency caps, fair dispatch
between functions, instance scaling, and the metrics that show every wait.

One stack for the module (each test uses functions of its own), with a short idle timeout so
instances scale down within a test, and metrics ports open.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from shared.devstack import Stack, free_port
from tests.fc_client import FcClient
from tests.integration_fixtures import StackFactory, client_for, new_stack
from tests.test_api_errors import assert_fc_error
from tests.test_lifecycle import make_function, statuses
from tests.test_metrics import scrape_until, value
from tests.test_recovery import wait_until

pytestmark = pytest.mark.timeout(180)

TERMINAL = {"Succeeded", "Failed", "Stopped", "Expired", "Invalid"}


@pytest.fixture(scope="module")
def flow_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = new_stack(tmp_path_factory.mktemp("flow"), extra_env={
        "TASKMODE_EXECUTOR_IDLE_TIMEOUT_S": "2",
        "TASKMODE_EXECUTOR_METRICS_PORT": str(free_port()),
        "TASKMODE_SCHEDULER_METRICS_PORT": str(free_port()),
    })
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
async def fc(flow_stack: Stack) -> AsyncIterator[FcClient]:
    client = client_for(flow_stack)
    try:
        yield client
    finally:
        await client.close()


def metrics_url(stack: Stack, service: str) -> str:
    return f"http://127.0.0.1:{stack.service_env[f'TASKMODE_{service.upper()}_METRICS_PORT']}/metrics"


def fresh(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


async def put_json(fc: FcClient, path: str, body: Any, method: str = "PUT") -> httpx.Response:
    return await fc.request(method, path, json=body)


async def disable(fc: FcClient, name: str, **body: Any) -> None:
    response = await put_json(fc, f"/functions/{name}/invoke/disable", body, method="POST")
    assert (response.status_code, response.json()) == (200, {"success": True}), response.text


async def enable(fc: FcClient, name: str) -> None:
    response = await fc.request("POST", f"/functions/{name}/invoke/enable")
    assert (response.status_code, response.json()) == (200, {"success": True}), response.text


async def submit_all(fc: FcClient, name: str, ids: list[str], payload: bytes = b"") -> None:
    async def one(task_id: str) -> None:
        response = await fc.invoke_async(name, payload, task_id=task_id)
        assert response.status_code == 202, response.text

    for start in range(0, len(ids), 50):
        await asyncio.gather(*(one(task_id) for task_id in ids[start:start + 50]))


async def tasks_of(fc: FcClient, name: str, ids: list[str]) -> list[dict[str, Any]]:
    return [(await fc.get_task(name, task_id)).json() for task_id in ids]


async def all_reach(fc: FcClient, name: str, ids: list[str], wanted: set[str], *, deadline_s: float = 60) -> list[dict[str, Any]]:
    for task_id in ids:
        await fc.wait_for(name, task_id, wanted, deadline_s=deadline_s)
    return await tasks_of(fc, name, ids)


def event_time(task: dict[str, Any], status: str) -> int:
    return next(e["timestamp"] for e in task["events"] if e["status"] == status)


def running_intervals(tasks: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """[Running, end) of every attempt, from the tasks' own event timestamps."""
    intervals = []
    for task in tasks:
        start: int | None = None
        for event in task["events"]:
            if event["status"] == "Running":
                start = event["timestamp"]
            elif start is not None and event["status"] in TERMINAL | {"Retrying", "Stopping"}:
                intervals.append((start, event["timestamp"]))
                start = None
    return intervals


def most_at_once(intervals: list[tuple[int, int]]) -> int:
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in edges:  # an end sorts before a start at the same millisecond: half-open intervals
        running += step
        peak = max(peak, running)
    return peak


async def witness(fc: FcClient) -> None:
    """Another function's task runs to the end: the system is live, so what waits is held, not slow."""
    name = fresh("witness")
    await make_function(fc, name)
    await fc.invoke_async(name, b"", task_id="alive")
    await fc.wait_for(name, "alive", {"Succeeded"}, deadline_s=60)


# --- pause and resume -------------------------------------------------------------------------


async def test_pause_holds_a_backlog_and_resume_drains_it_in_submission_order(fc: FcClient, flow_stack: Stack) -> None:
    name = fresh("paused")
    await make_function(fc, name, handler="index.info")
    # One at a time, so the order in which the backlog runs is visible.
    assert (await put_json(fc, f"/functions/{name}/concurrency", {"reservedConcurrency": 1})).status_code == 200
    await disable(fc, name, reason="maintenance")
    restriction = (await fc.request("GET", f"/functions/{name}")).json()["invocationRestriction"]
    assert restriction["disable"] is True and restriction["reason"] == "maintenance" and restriction["lastModifiedTime"]
    sync = await fc.request("POST", f"/functions/{name}/invocations", body=b"now")
    assert_fc_error(sync, 403, "FunctionDisabled", name, "maintenance")

    ids = [f"p{i:02d}" for i in range(12)]
    for task_id in ids:  # one by one: the submission order is the order to keep
        assert (await fc.invoke_async(name, task_id.encode(), task_id=task_id)).status_code == 202
    await witness(fc)
    for task in await tasks_of(fc, name, ids):
        assert statuses(task) == ["Enqueued"], task
    scheduler = await scrape_until(metrics_url(flow_stack, "scheduler"), lambda f: value(
        f, "taskmode_flow_held_tasks", function=name, reason="paused") == len(ids))
    assert value(scheduler, "taskmode_flow_held_tasks", function=name, reason="paused") == len(ids)

    await enable(fc, name)
    assert (await fc.request("GET", f"/functions/{name}")).json()["invocationRestriction"]["disable"] is False
    done = await all_reach(fc, name, ids, {"Succeeded"})
    assert all(statuses(task) == ["Enqueued", "Processed", "Running", "Succeeded"] for task in done)
    started = [event_time(task, "Running") for task in done]
    assert started == sorted(started), "the backlog ran out of submission order"
    assert [task["taskId"] for task in sorted(done, key=lambda t: event_time(t, "Processed"))] == ids


async def test_disable_with_abort_stops_running_tasks(fc: FcClient) -> None:
    name = fresh("aborted")
    await make_function(fc, name, handler="index.sleep")
    await fc.invoke_async(name, b"60", task_id="long")
    await fc.wait_for(name, "long", {"Running"})
    await disable(fc, name, reason="incident", abortOngoingRequest=True)
    task = await fc.wait_for(name, "long", {"Stopped"}, deadline_s=30)
    assert statuses(task) == ["Enqueued", "Processed", "Running", "Stopping", "Stopped"]
    assert "abortOngoingRequest" in task["events"][3]["eventDetail"]
    await enable(fc, name)


# --- throttling -------------------------------------------------------------------------------


async def test_reserved_concurrency_is_never_exceeded_across_executors(stack_with: StackFactory) -> None:
    stack, fc = stack_with({})
    stack.start_service("executor", name="executor2")
    name = "capped"
    await make_function(fc, name, handler="index.sleep")
    assert (await put_json(fc, f"/functions/{name}/concurrency", {"reservedConcurrency": 2})).status_code == 200
    ids = [f"c{i:02d}" for i in range(10)]
    await submit_all(fc, name, ids, b"0.4")
    done = await all_reach(fc, name, ids, {"Succeeded"}, deadline_s=90)
    assert most_at_once(running_intervals(done)) == 2


async def test_reserved_concurrency_zero_blocks_until_the_config_is_deleted(fc: FcClient, flow_stack: Stack) -> None:
    name = fresh("blocked")
    await make_function(fc, name)
    assert (await put_json(fc, f"/functions/{name}/concurrency", {"reservedConcurrency": 0})).status_code == 200
    got = (await fc.request("GET", f"/functions/{name}/concurrency")).json()
    assert got == {"functionArn": got["functionArn"], "reservedConcurrency": 0} and got["functionArn"].endswith(name)
    await fc.invoke_async(name, b"", task_id="held")
    sync = await fc.request("POST", f"/functions/{name}/invocations", body=b"now")
    assert_fc_error(sync, 429, "ResourceExhausted", name)
    await witness(fc)
    assert statuses((await fc.get_task(name, "held")).json()) == ["Enqueued"]  # throttled: waits
    scheduler = await scrape_until(metrics_url(flow_stack, "scheduler"), lambda f: value(
        f, "taskmode_flow_held_tasks", function=name, reason="blocked") == 1)
    assert value(scheduler, "taskmode_flow_held_tasks", function=name, reason="blocked") == 1
    assert (await fc.request("DELETE", f"/functions/{name}/concurrency")).status_code == 204
    await fc.wait_for(name, "held", {"Succeeded"})
    assert_fc_error(await fc.request("GET", f"/functions/{name}/concurrency"), 404, "ConcurrencyConfigNotFound")


async def test_the_account_cap_limits_all_functions_together_across_executors(stack_with: StackFactory) -> None:
    port = free_port()
    stack, fc = stack_with({"TASKMODE_ACCOUNT_CONCURRENCY": "2", "TASKMODE_EXECUTOR_METRICS_PORT": str(port)})
    stack.start_service("executor", name="executor2", env={"TASKMODE_EXECUTOR_METRICS_PORT": str(free_port())})
    names = ["first", "second"]
    for name in names:
        await make_function(fc, name, handler="index.sleep")
    ids = [f"a{i:02d}" for i in range(8)]
    await asyncio.gather(*(submit_all(fc, name, ids, b"0.5") for name in names))
    # The wait shows, told apart from a function's own cap (neither function has one).
    executor = await scrape_until(f"http://127.0.0.1:{port}/metrics", lambda f: any(
        value(f, "taskmode_throttled_tasks", function=name, cap="account") >= 1 for name in names), deadline_s=60)
    assert any(value(executor, "taskmode_throttled_tasks", function=name, cap="account") >= 1 for name in names)
    done = [task for name in names for task in await all_reach(fc, name, ids, {"Succeeded"}, deadline_s=90)]
    assert len(done) == 16 and all(statuses(task)[-1] == "Succeeded" for task in done)  # waited, never failed
    assert most_at_once(running_intervals(done)) == 2


async def test_a_start_rate_spaces_a_functions_dispatches(fc: FcClient, flow_stack: Stack) -> None:
    name = fresh("paced")
    await make_function(fc, name)
    put = await put_json(fc, f"/functions/{name}/concurrency", {"startRatePerSecond": 5})
    assert put.status_code == 200, put.text
    got = (await fc.request("GET", f"/functions/{name}/concurrency")).json()
    assert got["startRatePerSecond"] == 5 and got["reservedConcurrency"] is None, got
    listed = (await fc.request("GET", "/concurrency-configs", query={"functionName": name})).json()["configs"]
    assert [c.get("startRatePerSecond") for c in listed] == [5], listed
    ids = [f"r{i:02d}" for i in range(20)]
    await submit_all(fc, name, ids)
    done = await all_reach(fc, name, ids, {"Succeeded"}, deadline_s=90)
    processed = sorted(event_time(task, "Processed") for task in done)
    # 20 starts at 5 a second: 19 intervals of 200 ms (3.8 s; slack for a loaded machine's late
    # wake-ups), and never a burst: no second holds much more than the rate (20 at once without it).
    assert processed[-1] - processed[0] >= 3_000, processed
    assert max(sum(1 for t in processed if start <= t < start + 1000) for start in processed) <= 8, processed
    scheduler = await scrape_until(metrics_url(flow_stack, "scheduler"), lambda f: value(
        f, "taskmode_flow_holds_total", function=name, reason="rate") > 0)
    assert value(scheduler, "taskmode_flow_holds_total", function=name, reason="rate") > 0
    # Deleting the config lifts the rate.
    assert (await fc.request("DELETE", f"/functions/{name}/concurrency")).status_code == 204
    await submit_all(fc, name, ["free"])
    await fc.wait_for(name, "free", {"Succeeded"})


async def test_a_flooded_function_does_not_hold_up_another(fc: FcClient) -> None:
    flood, neighbour = fresh("flood"), fresh("neighbour")
    await make_function(fc, flood, handler="index.sleep")
    await make_function(fc, neighbour)
    scaling = {"horizontalScalingPolicies": [{"maxInstances": 2}]}
    assert (await put_json(fc, f"/functions/{flood}/scaling-config", scaling)).status_code == 200
    backlog = [f"f{i:03d}" for i in range(200)]
    await submit_all(fc, flood, backlog, b"0.5")  # 50 s of work for its two instances
    await fc.invoke_async(neighbour, b"", task_id="next_door")
    mine = await fc.wait_for(neighbour, "next_door", {"Succeeded"}, deadline_s=60)
    waiting = [t for t in await tasks_of(fc, flood, backlog) if t["status"] in ("Enqueued", "Processed")]
    # The neighbour ran while most of the flood had not even started.
    assert len(waiting) >= 100, (len(waiting), mine)
    await disable(fc, flood, abortOngoingRequest=True)  # the rest of the module need not share with it


# --- instances --------------------------------------------------------------------------------


async def test_instances_scale_up_with_a_backlog_and_down_when_idle(fc: FcClient, flow_stack: Stack) -> None:
    name = fresh("scaled")
    await make_function(fc, name, handler="index.sleep")
    config = {"minInstances": 1, "horizontalScalingPolicies": [{"maxInstances": 3}]}
    put = await put_json(fc, f"/functions/{name}/scaling-config", config)
    assert put.status_code == 200 and put.json()["minInstances"] == 1, put.text
    seen: list[int] = []

    async def instances() -> list[dict[str, Any]]:
        listed = (await fc.request("GET", f"/functions/{name}/instances")).json()["instances"]
        seen.append(len(listed))
        return listed

    await wait_until(lambda: _count_is(instances, 1), deadline_s=30, what="the minimum warm before any task")
    ids = [f"s{i}" for i in range(9)]
    await submit_all(fc, name, ids, b"1")
    await wait_until(lambda: _count_is(instances, 3), deadline_s=30, what="scaled up to the maximum")
    listed = await instances()
    assert {i["status"] for i in listed} == {"Running"} and all(i["functionName"] == name for i in listed)
    await all_reach(fc, name, ids, {"Succeeded"})
    await wait_until(lambda: _count_is(instances, 1), deadline_s=30, what="scaled down to the minimum when idle")
    assert max(seen) == 3
    status = (await fc.request("GET", f"/functions/{name}/scaling-config")).json()
    assert (status["minInstances"], status["currentInstances"]) == (1, 1)
    executor = await scrape_until(metrics_url(flow_stack, "executor"), lambda f: value(
        f, "taskmode_scaling_events_total", function=name, direction="down") >= 2)
    assert value(executor, "taskmode_scaling_events_total", function=name, direction="up") == 3  # 1 warm + 2
    assert value(executor, "taskmode_scaling_events_total", function=name, direction="down") == 2
    assert value(executor, "taskmode_cold_start_seconds_count", function=name) == 3
    assert "scaled down" in flow_stack.services["executor"].log_text()


async def _count_is(probe: Any, count: int) -> bool:
    return len(await probe()) == count


# Holds each task until four run at once in its instance (or a deadline passes), so the
# overlap does not depend on timing; what each task prints names it.
CONCURRENT_HANDLER = '''
import threading, time

lock = threading.Lock()
seen = {"running": 0, "peak": 0}

def handler(event, context):
    with lock:
        seen["running"] += 1
        seen["peak"] = max(seen["peak"], seen["running"])
    try:
        print("begin", context.task_id)
        deadline = time.monotonic() + 20
        while seen["peak"] < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        print("done", context.task_id)
        return {"task": context.task_id, "payload": event.decode(), "peak": seen["peak"]}
    finally:
        with lock:
            seen["running"] -= 1
'''


async def test_instance_concurrency_runs_that_many_tasks_at_once_in_one_instance(fc: FcClient) -> None:
    name = fresh("shared")
    created = await fc.create_function(name, code={"index.py": CONCURRENT_HANDLER}, instanceConcurrency=4)
    assert created.status_code == 200 and created.json()["instanceConcurrency"] == 4, created.text
    assert (await fc.put_async_config(name, asyncTask=True)).status_code == 200
    scaling = {"horizontalScalingPolicies": [{"maxInstances": 1}]}
    assert (await put_json(fc, f"/functions/{name}/scaling-config", scaling)).status_code == 200
    ids = [f"c{i}" for i in range(6)]
    for task_id in ids:  # a payload of its own each, so results cannot be mixed up unnoticed
        assert (await fc.invoke_async(name, f"payload-{task_id}".encode(), task_id=task_id)).status_code == 202
    tasks = await all_reach(fc, name, ids, {"Succeeded"})
    # Four ran at once, all in the one instance; the handlers saw four at once and never more
    # (the events may show a fifth Running before the end of one whose instance slot it took:
    # an outcome is recorded after its invocation has given the slot back).
    assert most_at_once(running_intervals(tasks)) >= 4, running_intervals(tasks)
    assert len({task["instanceId"] for task in tasks}) == 1
    for task in tasks:
        task_id = task["taskId"]
        result = json.loads(task["returnPayload"])
        assert result == {"task": task_id, "payload": f"payload-{task_id}", "peak": 4}, result
        logs = (await fc.request("GET", f"/functions/{name}/async-tasks/{task_id}/logs")).json()["logs"]
        content = logs[0]["content"]
        own = [line for line in content.splitlines() if line.startswith(("begin", "done"))]
        assert own == [f"begin {task_id}", f"done {task_id}"], content
        assert logs[0]["instanceId"] == task["instanceId"]


# --- bad input --------------------------------------------------------------------------------


async def test_bad_flow_control_input_is_refused_and_changes_nothing(fc: FcClient) -> None:
    name = fresh("strict")
    await make_function(fc, name)
    for body, mention in [({"reservedConcurrency": -1}, "reservedConcurrency"),
                          ({"reservedConcurrency": 10_001}, "reservedConcurrency"),
                          ({"reservedConcurrency": "2"}, "reservedConcurrency"),
                          ({}, "reservedConcurrency"),
                          ({"startRatePerSecond": -1}, "startRatePerSecond"),
                          ({"startRatePerSecond": 0}, "startRatePerSecond"),
                          ({"startRatePerSecond": "fast"}, "startRatePerSecond"),
                          ({"reservedConcurrency": 2, "startRatePerSecond": [5]}, "startRatePerSecond")]:
        assert_fc_error(await put_json(fc, f"/functions/{name}/concurrency", body), 400, "InvalidArgument", mention)
    assert_fc_error(await fc.request("GET", f"/functions/{name}/concurrency"), 404, "ConcurrencyConfigNotFound")
    assert_fc_error(await put_json(fc, "/functions/nobody/concurrency", {"reservedConcurrency": 1}),
                    404, "FunctionNotFound")
    for body, mention in [({"minInstances": -1}, "minInstances"),
                          ({"minInstances": 3, "horizontalScalingPolicies": [{"maxInstances": 2}]}, "maxInstances"),
                          ({"horizontalScalingPolicies": [{"maxInstances": 0}]}, "maxInstances")]:
        assert_fc_error(await put_json(fc, f"/functions/{name}/scaling-config", body), 400, "InvalidArgument", mention)
    assert_fc_error(await fc.request("GET", f"/functions/{name}/scaling-config"), 404, "ScalingConfigNotFound")
    assert_fc_error(await put_json(fc, f"/functions/{name}/invoke/disable", {"reason": 5}, method="POST"),
                    400, "InvalidArgument", "reason")
    assert (await fc.request("GET", f"/functions/{name}")).json()["invocationRestriction"] is None
    for headers, mention in [({"x-fc-async-delay": "604801"}, "x-fc-async-delay"),
                             ({"x-taskmode-execution-time": "tomorrow at noon"}, "x-taskmode-execution-time"),
                             ({"x-taskmode-execution-time": "2020-01-01T00:00:00Z"}, "x-taskmode-execution-time"),
                             ({"x-taskmode-execution-time": "2026-01-01T00:00:00"}, "time zone"),
                             ({"x-fc-async-delay": "5", "x-taskmode-execution-time": str(int(time.time() * 1000))},
                              "not both")]:
        response = await fc.invoke_async(name, b"", task_id="never", headers=headers)
        assert_fc_error(response, 400, "InvalidArgument", mention)
    assert_fc_error(await fc.get_task(name, "never"), 404, "AsyncTaskNotFound")


# --- the official SDK ------------------------------------------------------------------------


def test_flow_control_through_the_official_sdk(flow_stack: Stack) -> None:
    from alibabacloud_fc20230330 import models as m

    from tests.fc_client import zip_code
    from tests.integration_fixtures import HANDLERS
    from tests.test_sdk import sdk_client

    client = sdk_client(flow_stack)
    name = fresh("sdk_flow")
    client.create_function(m.CreateFunctionRequest(body=m.CreateFunctionInput(
        function_name=name, runtime="python3.10", handler="index.handler", timeout=30,
        code=m.InputCodeLocation(zip_file=zip_code({"index.py": HANDLERS})))))
    disabled = client.disable_function_invocation(name, m.DisableFunctionInvocationRequest(reason="sdk says"))
    assert disabled.body.success is True
    restriction = client.get_function(name, m.GetFunctionRequest()).body.invocation_restriction
    assert (restriction.disable, restriction.reason) == (True, "sdk says") and restriction.last_modified_time
    assert client.enable_function_invocation(name).body.success is True
    assert client.get_function(name, m.GetFunctionRequest()).body.invocation_restriction.disable is False

    put = client.put_concurrency_config(name, m.PutConcurrencyConfigRequest(
        body=m.PutConcurrencyInput(reserved_concurrency=3))).body
    assert put.reserved_concurrency == 3 and put.function_arn.endswith(f"functions/{name}")
    assert client.get_concurrency_config(name).body.reserved_concurrency == 3
    listed = client.list_concurrency_configs(m.ListConcurrencyConfigsRequest(function_name=name)).body
    assert [c.reserved_concurrency for c in listed.configs] == [3]

    status = client.put_scaling_config(name, m.PutScalingConfigRequest(body=m.PutScalingConfigInput(
        min_instances=1, horizontal_scaling_policies=[m.ScalingPolicy(max_instances=2)]))).body
    assert status.min_instances == 1 and status.horizontal_scaling_policies[0].max_instances == 2
    end = time.monotonic() + 30
    while not (instances := client.list_instances(name, m.ListInstancesRequest()).body.instances):
        assert time.monotonic() < end, "the warm minimum never showed in ListInstances"
        time.sleep(0.1)
    assert len(instances) == 1 and instances[0].instance_id.startswith(name) and instances[0].created_time_ms > 0
    client.delete_scaling_config(name, m.DeleteScalingConfigRequest())
    client.delete_concurrency_config(name)
