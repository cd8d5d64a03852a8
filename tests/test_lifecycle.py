"""The task lifecycle end to end, through the HTTP API, on real servers and service processes."""

from __future__ import annotations

import asyncio

import pytest

from tests.fc_client import FcClient
from tests.integration_fixtures import HANDLERS

pytestmark = pytest.mark.timeout(90)


def statuses(task: dict) -> list[str]:
    return [event["status"] for event in task["events"]]


async def make_function(fc: FcClient, name: str, *, handler: str = "index.handler", timeout: int = 30,
                        retries: int | None = None, max_age_s: int | None = None, env: dict | None = None) -> None:
    response = await fc.create_function(name, code={"index.py": HANDLERS}, handler=handler, timeout=timeout,
                                        environmentVariables=env or {})
    assert response.status_code == 200, response.text
    config: dict = {"asyncTask": True}
    if retries is not None:
        config["maxAsyncRetryAttempts"] = retries
    if max_age_s is not None:
        config["maxAsyncEventAgeInSeconds"] = max_age_s
    response = await fc.put_async_config(name, **config)
    assert response.status_code == 200, response.text


async def test_task_succeeds_with_every_transition_recorded_in_order(fc: FcClient, fn_name: str) -> None:
    await make_function(fc, fn_name, handler="index.info")
    response = await fc.invoke_async(fn_name, b"hello", task_id="job_1")
    assert response.status_code == 202, response.text
    assert response.headers["x-fc-async-task-id"] == "job_1"
    assert response.headers["x-fc-request-id"]

    task = await fc.wait_for(fn_name, "job_1", {"Succeeded"})

    assert statuses(task) == ["Enqueued", "Processed", "Running", "Succeeded"]
    stamps = [event["timestamp"] for event in task["events"]]
    assert stamps == sorted(stamps) and stamps[0] == task["submitTime"]
    running = next(e["timestamp"] for e in task["events"] if e["status"] == "Running")
    assert task["startedTime"] == running and task["durationMs"] == task["endTime"] - running
    assert [event["eventId"] for event in task["events"]] == [1, 2, 3, 4]
    assert task["endTime"] == stamps[-1]
    assert task["durationMs"] == task["endTime"] - task["startedTime"]
    assert task["taskPayload"] == "hello"
    assert task["instanceId"]
    assert task["alreadyRetriedTimes"] == 0
    assert task["functionArn"].endswith(f":functions/{fn_name}")
    result = __import__("json").loads(task["returnPayload"])
    assert result["task_id"] == "job_1"
    assert result["function_name"] == fn_name
    assert result["request_id"] == response.headers["x-fc-request-id"]


async def test_get_right_after_submit_never_404s(fc: FcClient, fn_name: str) -> None:
    await make_function(fc, fn_name)
    for i in range(20):
        response = await fc.invoke_async(fn_name, b"x", task_id=f"ryw_{i}")
        assert response.status_code == 202
        got = await fc.get_task(fn_name, f"ryw_{i}")
        assert got.status_code == 200, got.text
        assert got.json()["taskId"] == f"ryw_{i}"
        assert got.json()["events"][0]["status"] == "Enqueued"


async def test_duplicate_task_id_is_refused_while_queued_and_after_completion(fc: FcClient, fn_name: str) -> None:
    await make_function(fc, fn_name)
    assert (await fc.invoke_async(fn_name, b"1", task_id="dup")).status_code == 202
    second = await fc.invoke_async(fn_name, b"2", task_id="dup")
    assert second.status_code == 409
    assert second.json()["Code"] == "TaskAlreadyExists"
    assert "dup" in second.json()["Message"]
    await fc.wait_for(fn_name, "dup", {"Succeeded"})
    third = await fc.invoke_async(fn_name, b"3", task_id="dup")
    assert third.status_code == 409
    task = (await fc.get_task(fn_name, "dup")).json()
    assert task["taskPayload"] == "1"
    assert statuses(task).count("Enqueued") == 1


async def test_request_id_becomes_task_id_and_ids_are_generated(fc: FcClient, fn_name: str) -> None:
    await make_function(fc, fn_name)
    response = await fc.invoke_async(fn_name, b"", headers={"x-fc-request-id": "req_abc"})
    assert response.headers["x-fc-async-task-id"] == "req_abc"
    generated = await fc.invoke_async(fn_name, b"")
    task_id = generated.headers["x-fc-async-task-id"]
    assert task_id and task_id != "req_abc"
    await fc.wait_for(fn_name, task_id, {"Succeeded"})


async def test_handler_error_retries_with_backoff_then_fails(fc: FcClient, fn_name: str) -> None:
    await make_function(fc, fn_name, handler="index.fail", retries=2)
    await fc.invoke_async(fn_name, b"bad", task_id="always_fails")
    task = await fc.wait_for(fn_name, "always_fails", {"Failed"})
    assert statuses(task) == [
        "Enqueued", "Processed", "Running", "Retrying", "Running", "Retrying", "Running", "Failed",
    ]
    assert task["alreadyRetriedTimes"] == 2
    assert "boom: bad" in task["taskErrorMessage"]
    stamps = {e["eventId"]: e["timestamp"] for e in task["events"]}
    # The second backoff is twice the first (100 ms base in tests, doubling).
    assert stamps[5] - stamps[4] >= 100 and stamps[7] - stamps[6] >= 200


async def test_retry_can_succeed(fc: FcClient, fn_name: str) -> None:
    await make_function(fc, fn_name, handler="index.fail_then_succeed", retries=3)
    await fc.invoke_async(fn_name, b"2", task_id="flaky")
    task = await fc.wait_for(fn_name, "flaky", {"Succeeded", "Failed"})
    assert task["status"] == "Succeeded"
    assert task["alreadyRetriedTimes"] == 2
    assert task["returnPayload"] == "ok after 2"


async def test_timeout_ends_handler_and_counts_as_failure(fc: FcClient, fn_name: str) -> None:
    await make_function(fc, fn_name, handler="index.sleep", timeout=1, retries=0)
    await fc.invoke_async(fn_name, b"30", task_id="too_slow")
    task = await fc.wait_for(fn_name, "too_slow", {"Failed"}, deadline_s=20)
    assert "timed out" in task["taskErrorMessage"]
    running = next(e for e in task["events"] if e["status"] == "Running")
    assert task["endTime"] - running["timestamp"] < 5000


async def test_delay_keeps_task_enqueued_until_due(fc: FcClient, fn_name: str) -> None:
    await make_function(fc, fn_name)
    await fc.invoke_async(fn_name, b"later", task_id="delayed", delay_s=2)
    early = (await fc.get_task(fn_name, "delayed")).json()
    assert early["status"] == "Enqueued"
    task = await fc.wait_for(fn_name, "delayed", {"Succeeded"}, deadline_s=20)
    processed = next(e for e in task["events"] if e["status"] == "Processed")
    assert processed["timestamp"] - task["submitTime"] >= 2000


async def test_invalid_after_function_deleted(fc: FcClient, fn_name: str) -> None:
    await make_function(fc, fn_name)
    await fc.invoke_async(fn_name, b"", task_id="orphan", delay_s=2)
    deleted = await fc.request("DELETE", f"/functions/{fn_name}")
    assert deleted.status_code in (200, 204), deleted.text
    # The tasks of a function that does not exist cannot be read (404 FunctionNotFound): read
    # them once a function of that name exists again (a new one, which they do not belong to).
    assert (await fc.get_task(fn_name, "orphan")).json()["Code"] == "FunctionNotFound"
    await make_function(fc, fn_name)
    task = await fc.wait_for(fn_name, "orphan", {"Invalid"}, deadline_s=60)
    assert statuses(task) == ["Enqueued", "Invalid"]
    assert "deleted" in task["taskErrorMessage"]


async def test_stop_enqueued_task_never_runs(fc: FcClient, fn_name: str) -> None:
    await make_function(fc, fn_name)
    await fc.invoke_async(fn_name, b"", task_id="stop_me", delay_s=2)
    response = await fc.stop_task(fn_name, "stop_me")
    assert response.status_code == 200, response.text
    task = (await fc.get_task(fn_name, "stop_me")).json()
    assert statuses(task) == ["Enqueued", "Stopped"]
    # A witness submitted after it, with the same delay, is due later: once the witness ran,
    # the stopped task's due time has passed too, and it must still not have run.
    await fc.invoke_async(fn_name, b"", task_id="witness", delay_s=2)
    await fc.wait_for(fn_name, "witness", {"Succeeded"}, deadline_s=20)
    task = (await fc.get_task(fn_name, "stop_me")).json()
    assert statuses(task) == ["Enqueued", "Stopped"]


async def test_stop_running_task_kills_handler_that_ignores_sigterm(fc: FcClient, fn_name: str) -> None:
    import time

    from tests.integration_fixtures import function_processes

    await make_function(fc, fn_name, handler="index.stubborn")
    await fc.invoke_async(fn_name, b"", task_id="stubborn_1")
    await fc.wait_for(fn_name, "stubborn_1", {"Running"})
    end = time.monotonic() + 10
    while not (handlers := function_processes(fn_name)) and time.monotonic() < end:
        await asyncio.sleep(0.05)
    assert handlers, "the handler's processes were not found"
    stopped_at = time.monotonic()
    response = await fc.stop_task(fn_name, "stubborn_1")
    assert response.status_code == 200, response.text
    task = await fc.wait_for(fn_name, "stubborn_1", {"Stopped"}, deadline_s=10)
    while function_processes(fn_name):
        assert time.monotonic() - stopped_at < 2.0, "handler still alive 2 s after stop"
        await asyncio.sleep(0.02)
    assert statuses(task)[-2:] == ["Stopping", "Stopped"]


async def test_stopping_a_finished_task_is_a_conflict(fc: FcClient, fn_name: str) -> None:
    await make_function(fc, fn_name)
    await fc.invoke_async(fn_name, b"", task_id="done")
    await fc.wait_for(fn_name, "done", {"Succeeded"})
    response = await fc.stop_task(fn_name, "done")
    assert response.status_code == 409
    assert response.json()["Code"] == "TaskAlreadyFinished"
    missing = await fc.stop_task(fn_name, "never_submitted")
    assert missing.status_code == 404
    assert missing.json()["Code"] == "AsyncTaskNotFound"


async def test_sync_invocation_returns_result_and_flags_errors(fc: FcClient, fn_name: str) -> None:
    await make_function(fc, fn_name)
    ok = await fc.request("POST", f"/functions/{fn_name}/invocations", body=b"ping")
    assert ok.status_code == 200, ok.text
    assert ok.content == b"ping"
    assert "x-fc-error-type" not in ok.headers
    failing = fn_name + "_f"
    await make_function(fc, failing, handler="index.fail")
    bad = await fc.request("POST", f"/functions/{failing}/invocations", body=b"x")
    assert bad.status_code == 200
    assert bad.headers["x-fc-error-type"] == "UnhandledInvocationError"
    assert "boom: x" in bad.text


async def test_stop_processed_task_whose_dispatch_is_in_flight(fc: FcClient, fn_name: str) -> None:
    # Occupy every instance the function may have (2, by its scaling config), so the next task
    # is dispatched (Processed) and waits, in flight, for an instance.
    await make_function(fc, fn_name, handler="index.sleep")
    scaling = {"horizontalScalingPolicies": [{"maxInstances": 2}]}
    assert (await fc.request("PUT", f"/functions/{fn_name}/scaling-config", json=scaling)).status_code == 200
    busy = [f"busy_{i}" for i in range(2)]
    for task_id in busy:
        await fc.invoke_async(fn_name, b"3", task_id=task_id)
    for task_id in busy:
        await fc.wait_for(fn_name, task_id, {"Running"})
    await fc.invoke_async(fn_name, b"0", task_id="waiting")
    await fc.wait_for(fn_name, "waiting", {"Processed"})
    assert (await fc.stop_task(fn_name, "waiting")).status_code == 200
    for task_id in busy:  # the instances free up: the waiting dispatch reaches an instance now
        await fc.wait_for(fn_name, task_id, {"Succeeded"})
    witness = "after_busy"
    await fc.invoke_async(fn_name, b"0", task_id=witness)
    await fc.wait_for(fn_name, witness, {"Succeeded"})
    task = (await fc.get_task(fn_name, "waiting")).json()
    assert statuses(task) == ["Enqueued", "Processed", "Stopped"]


async def test_custom_runtime_runs_a_command_that_serves_post_invoke(fc: FcClient, fn_name: str) -> None:
    server = '''
import os
from http.server import BaseHTTPRequestHandler, HTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        reply = b"custom:" + body + b":" + self.headers.get("x-fc-async-task-id", "").encode()
        self.send_response(200)
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", int(os.environ["FC_SERVER_PORT"])), Handler).serve_forever()
'''
    import sys

    response = await fc.create_function(
        fn_name, code={"server.py": server}, runtime="custom.debian12", handler="index.handler",
        customRuntimeConfig={"command": [sys.executable], "args": ["server.py"], "port": 9000},
    )
    assert response.status_code == 200, response.text
    await fc.invoke_async(fn_name, b"hi", task_id="custom_1")
    task = await fc.wait_for(fn_name, "custom_1", {"Succeeded", "Failed"})
    assert task["status"] == "Succeeded", task
    assert task["returnPayload"] == "custom:hi:custom_1"


async def test_updated_code_is_what_later_tasks_run(fc: FcClient, fn_name: str) -> None:
    await make_function(fc, fn_name)
    await fc.invoke_async(fn_name, b"v1", task_id="before")
    assert (await fc.wait_for(fn_name, "before", {"Succeeded"}))["returnPayload"] == "v1"
    from tests.fc_client import zip_code

    updated = await fc.request("PUT", f"/functions/{fn_name}", json={
        "code": {"zipFile": zip_code({"index.py": "def handler(event, context):\n    return b'new:' + event\n"})},
    })
    assert updated.status_code == 200, updated.text
    await fc.invoke_async(fn_name, b"v2", task_id="after")
    assert (await fc.wait_for(fn_name, "after", {"Succeeded"}))["returnPayload"] == "new:v2"


async def test_function_code_does_not_see_the_services_configuration(fc: FcClient, fn_name: str) -> None:
    source = "import json, os\ndef handler(event, context):\n    return json.dumps(sorted(os.environ))\n"
    response = await fc.create_function(fn_name, code={"index.py": source},
                                        environmentVariables={"MY_SETTING": "mine"})
    assert response.status_code == 200, response.text
    await fc.invoke_async(fn_name, b"", task_id="env")
    names = __import__("json").loads((await fc.wait_for(fn_name, "env", {"Succeeded"}))["returnPayload"])
    assert "MY_SETTING" in names and "FC_FUNCTION_NAME" in names
    leaked = [n for n in names if n.startswith(("TASKMODE_", "NATS_", "MONGODB_"))]
    assert leaked == []


async def test_large_result_is_kept_as_a_one_megabyte_preview(fc: FcClient, fn_name: str) -> None:
    source = "def handler(event, context):\n    return b'x' * (3 * 1024 * 1024)\n"
    response = await fc.create_function(fn_name, code={"index.py": source})
    assert response.status_code == 200, response.text
    await fc.invoke_async(fn_name, b"", task_id="big")
    task = await fc.wait_for(fn_name, "big", {"Succeeded", "Failed"})
    assert task["status"] == "Succeeded"
    assert len(task["returnPayload"]) == 1024 * 1024
