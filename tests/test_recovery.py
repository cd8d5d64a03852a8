"""Crashes and restarts: kill -9 of each service loses no task and no transition."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.devstack import Stack
from shared.transitions import Status, is_allowed
from tests.fc_client import FcClient
from tests.integration_fixtures import StackFactory
from tests.test_lifecycle import make_function, statuses

pytestmark = pytest.mark.timeout(150)


def assert_valid_chain(task: dict) -> None:
    """Event ids are 1..n without gaps and every step is an edge of the transition table."""
    assert [e["eventId"] for e in task["events"]] == list(range(1, len(task["events"]) + 1)), task
    previous = None
    for event in task["events"]:
        status = Status(event["status"])
        assert is_allowed(previous, status), f"{previous} -> {status} in {statuses(task)}"
        previous = status
    assert task["status"] == task["events"][-1]["status"]


async def list_all(fc, name: str) -> dict[str, dict]:
    tasks: dict[str, dict] = {}
    token = ""
    while True:
        query = {"limit": "100", "includePayload": "True"}
        if token:
            query["nextToken"] = token
        page = (await fc.list_tasks(name, **query)).json()
        tasks.update({t["taskId"]: t for t in page["tasks"]})
        token = page["nextToken"]
        if not token:
            return tasks


async def wait_until(predicate, *, deadline_s: float, what: str):  # type: ignore[no-untyped-def]
    end = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < end:
        last = await predicate()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} not reached within {deadline_s}s (last: {last})")


async def test_kill_9_of_every_service_mid_flow_loses_nothing(own_stack: Stack, own_fc: FcClient) -> None:
    name = "crashy"
    await make_function(own_fc, name, handler="index.sleep", retries=3)
    ids = [f"t{i:03d}" for i in range(40)]
    for task_id in ids[:20]:
        assert (await own_fc.invoke_async(name, b"0.3", task_id=task_id)).status_code == 202
    await own_fc.wait_for(name, ids[0], {"Running", "Succeeded"})
    for service in ("executor", "scheduler", "projection", "gateway"):
        own_stack.kill_service(service)
        own_stack.start_service(service)
    for task_id in ids[20:]:
        assert (await own_fc.invoke_async(name, b"0.1", task_id=task_id)).status_code == 202
    own_stack.kill_service("executor")
    own_stack.start_service("executor")

    async def all_succeeded() -> bool:
        for task_id in ids:
            task = (await own_fc.get_task(name, task_id)).json()
            if task.get("status") != "Succeeded":
                return False
        return True

    await wait_until(all_succeeded, deadline_s=90, what="every task Succeeded")
    for task_id in ids:
        assert_valid_chain((await own_fc.get_task(name, task_id)).json())

    async def read_model_converged() -> bool:
        listed = await list_all(own_fc, name)
        return set(listed) == set(ids) and all(t["status"] == "Succeeded" for t in listed.values())

    await wait_until(read_model_converged, deadline_s=30, what="read model converged")
    listed = await list_all(own_fc, name)
    for task_id in ids:
        direct = (await own_fc.get_task(name, task_id)).json()
        assert listed[task_id]["events"] == direct["events"]


async def test_dedup_survives_restart_of_every_service(own_stack: Stack, own_fc: FcClient) -> None:
    await make_function(own_fc, "dedup_fn")
    assert (await own_fc.invoke_async("dedup_fn", b"", task_id="once")).status_code == 202
    await own_fc.wait_for("dedup_fn", "once", {"Succeeded"})
    for service in ("gateway", "scheduler", "executor", "projection"):
        own_stack.services[service].stop()
        own_stack.start_service(service)
    again = await own_fc.invoke_async("dedup_fn", b"", task_id="once")
    assert again.status_code == 409
    assert again.json()["Code"] == "TaskAlreadyExists"


async def test_task_not_dispatched_within_max_age_expires(own_stack: Stack, own_fc: FcClient) -> None:
    await make_function(own_fc, "ttl_fn", max_age_s=1)
    own_stack.services["scheduler"].stop()  # nothing dispatches: the queue just waits
    submitted = time.monotonic()
    assert (await own_fc.invoke_async("ttl_fn", b"", task_id="stale", delay_s=1)).status_code == 202
    assert (await own_fc.get_task("ttl_fn", "stale")).json()["status"] == "Enqueued"
    while time.monotonic() - submitted < 2.2:  # past its due time plus its 1 s budget
        await asyncio.sleep(0.05)
    own_stack.start_service("scheduler")
    task = await own_fc.wait_for("ttl_fn", "stale", {"Expired"}, deadline_s=20)
    assert statuses(task) == ["Enqueued", "Expired"]
    assert "maxAsyncEventAgeInSeconds" in task["taskErrorMessage"]


async def test_projection_rebuild_restores_the_read_model(own_stack: Stack, own_fc: FcClient) -> None:
    await make_function(own_fc, "rebuild_fn")
    ids = [f"r{i}" for i in range(10)]
    for task_id in ids:
        await own_fc.invoke_async("rebuild_fn", b"", task_id=task_id)
    for task_id in ids:
        await own_fc.wait_for("rebuild_fn", task_id, {"Succeeded"})
    before = await wait_until(
        lambda: _listed_if_complete(own_fc, ids), deadline_s=30, what="read model complete before rebuild"
    )
    # As under `make run`: the projection keeps running, loses its position to the rebuild,
    # exits, and its supervisor (here: the test) starts it again.
    env = own_stack.env_for("projection")
    subprocess.run([sys.executable, "-m", "services.projection", "rebuild"], env={**os.environ, **env},
                   check=True, timeout=60)
    projection = own_stack.services["projection"].process
    end = time.monotonic() + 20
    while projection.poll() is None:
        assert time.monotonic() < end, "projection kept running without its consumer"
        await asyncio.sleep(0.1)
    assert (await own_fc.list_tasks("rebuild_fn")).json()["tasks"] == []
    own_stack.start_service("projection")
    after = await wait_until(lambda: _listed_if_complete(own_fc, ids), deadline_s=30, what="read model rebuilt")
    assert after == before


async def _listed_if_complete(fc, ids: list[str]) -> dict | None:  # type: ignore[no-untyped-def]
    listed = await list_all(fc, "rebuild_fn")
    if set(listed) == set(ids) and all(t["status"] == "Succeeded" for t in listed.values()):
        return listed
    return None


async def test_stop_during_retry_backoff(stack_with: StackFactory) -> None:
    # A long backoff, so the Retrying phase lasts long enough to be stopped.
    _, fc = stack_with({"TASKMODE_RETRY_BASE_MS": "5000"})
    await make_function(fc, "retry_stop", handler="index.fail", retries=3)
    await fc.invoke_async("retry_stop", b"x", task_id="backing_off")
    await fc.wait_for("retry_stop", "backing_off", {"Retrying"})
    assert (await fc.stop_task("retry_stop", "backing_off")).status_code == 200
    task = (await fc.get_task("retry_stop", "backing_off")).json()
    assert statuses(task) == ["Enqueued", "Processed", "Running", "Retrying", "Stopped"]


async def test_nats_server_restart_mid_flow_loses_nothing(own_stack: Stack, own_fc: FcClient) -> None:
    from tests.fc_client import zip_code

    await make_function(own_fc, "bus_restart", handler="index.sleep")
    before = [f"b{i}" for i in range(10)]
    for task_id in before:
        await own_fc.invoke_async("bus_restart", b"0.2", task_id=task_id)
    await own_fc.wait_for("bus_restart", before[0], {"Running", "Succeeded"})
    own_stack.restart_nats()

    async def submitted(task_id: str, payload: bytes) -> bool:
        response = await own_fc.invoke_async("bus_restart", payload, task_id=task_id)
        return response.status_code in (202, 409)  # 409: an earlier try landed before its reply

    after = [f"a{i}" for i in range(10)]
    for task_id in after:
        await wait_until(lambda: submitted(task_id, b"0"), deadline_s=30, what=f"{task_id} accepted")
    for task_id in before + after:
        task = await own_fc.wait_for("bus_restart", task_id, {"Succeeded", "Failed"}, deadline_s=60)
        assert_valid_chain(task)
        assert task["status"] == "Succeeded", task
    # Catalog changes made after the restart reach the services' mirrors (a watch cut by the
    # restart is noticed and renewed within seconds).
    updated = await own_fc.request("PUT", "/functions/bus_restart", json={
        "code": {"zipFile": zip_code({"index.py": "def sleep(event, context):\n    return 'v2'\n"})}})
    assert updated.status_code == 200, updated.text
    attempt = 0

    async def runs_new_code() -> bool:
        nonlocal attempt
        attempt += 1
        await own_fc.invoke_async("bus_restart", b"", task_id=f"after_update_{attempt}")
        task = await own_fc.wait_for("bus_restart", f"after_update_{attempt}", {"Succeeded"}, deadline_s=30)
        return task["returnPayload"] == "v2"

    await wait_until(runs_new_code, deadline_s=30, what="updated code in use")


async def test_a_busy_function_does_not_hold_up_other_functions(stack_with: StackFactory) -> None:
    # Few dispatch slots, and a function with a backlog longer than its instances can take.
    _, fc = stack_with({"TASKMODE_EXECUTOR_CONCURRENCY": "8", "TASKMODE_EXECUTOR_MAX_QUEUED_PER_FUNCTION": "2",
                        "TASKMODE_EXECUTOR_MAX_INSTANCES": "4"})
    await make_function(fc, "backlogged", handler="index.sleep")
    await make_function(fc, "quick")
    busy = [f"slow{i}" for i in range(10)]
    # 4 s each: room for the quick function's first instance to start on a loaded machine (its
    # template's cold start), while a quick task held behind the backlog would still end after them.
    for task_id in busy:
        await fc.invoke_async("backlogged", b"4", task_id=task_id)
    await fc.wait_for("backlogged", busy[0], {"Running"})
    await fc.invoke_async("quick", b"", task_id="fast")
    fast = await fc.wait_for("quick", "fast", {"Succeeded"}, deadline_s=20)
    slow_ends = [(await fc.wait_for("backlogged", task_id, {"Succeeded"}, deadline_s=30))["endTime"]
                 for task_id in busy[:4]]
    first_slow_end = min(slow_ends)
    assert fast["endTime"] < first_slow_end, "the quick task waited behind the backlog"


async def test_processes_an_instance_started_die_with_its_executor(own_stack: Stack, own_fc: FcClient) -> None:
    from tests.integration_fixtures import function_processes

    # A custom runtime whose server forks a helper in a session of its own: the helper is not
    # the executor's child, and only the sandbox's PID namespace ends it with the executor.
    server = '''
import os, subprocess, time
from http.server import BaseHTTPRequestHandler, HTTPServer
helper = subprocess.Popen(["sleep", "300"], start_new_session=True)

class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        time.sleep(60)

HTTPServer(("127.0.0.1", int(os.environ["FC_SERVER_PORT"])), Handler).serve_forever()
'''
    response = await own_fc.create_function("forking", code={"server.py": server}, runtime="custom.debian12",
                                        customRuntimeConfig={"command": [sys.executable, "server.py"]})
    assert response.status_code == 200, response.text
    await own_fc.invoke_async("forking", b"", task_id="long")
    await own_fc.wait_for("forking", "long", {"Running"})
    async def helper_running() -> bool:
        return bool(function_processes("forking", argv0="sleep"))

    async def helper_gone() -> bool:
        return not function_processes("forking", argv0="sleep")

    await wait_until(helper_running, deadline_s=20, what="the helper running")
    own_stack.kill_service("executor")
    await wait_until(helper_gone, deadline_s=20, what="the orphaned helper gone")
    own_stack.start_service("executor")


async def test_read_model_outage_keeps_tasks_running_and_readable(own_stack: Stack, own_fc: FcClient) -> None:
    await make_function(own_fc, "mongo_outage")
    own_stack.stop_mongo_wire()
    await own_fc.invoke_async("mongo_outage", b"during", task_id="during_outage")
    # Tasks run and GetAsyncTask answers from the event stream while the read model is down.
    task = await own_fc.wait_for("mongo_outage", "during_outage", {"Succeeded"}, deadline_s=30)
    assert statuses(task) == ["Enqueued", "Processed", "Running", "Succeeded"]
    listed = await own_fc.list_tasks("mongo_outage")
    assert listed.status_code == 503 and listed.json()["Code"] == "ServiceUnavailable"

    own_stack.start_mongo_wire_again()

    async def listed_again() -> bool:
        if own_stack.services["projection"].process.poll() is not None:  # as a supervisor would
            own_stack.start_service("projection")
        response = await own_fc.list_tasks("mongo_outage")
        if response.status_code != 200:
            return False
        return [t["status"] for t in response.json()["tasks"]] == ["Succeeded"]

    await wait_until(listed_again, deadline_s=60, what="read model caught up after the outage")
