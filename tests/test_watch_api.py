"""The live watch API: a task's transitions as Server-Sent Events, in order, resumable by
Last-Event-ID (also across a gateway restart), and a function's stream of task changes."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from httpx_sse import EventSource, aconnect_sse

from shared.acs3 import sign_request
from shared.devstack import Stack
from tests.fc_client import API, FcClient
from tests.integration_fixtures import ACCESS_KEY_ID, ACCESS_KEY_SECRET, HANDLERS
from taskmode_cli.api import TaskmodeApi
from taskmode_cli.profile import Profile

pytestmark = pytest.mark.timeout(90)

TERMINAL = {"Succeeded", "Failed", "Stopped", "Expired", "Invalid"}


def signed_headers(base_url: str, path: str, *, last_event_id: int | None = None) -> dict[str, str]:
    headers = {"host": base_url.split("://", 1)[1], "Accept": "text/event-stream", "Cache-Control": "no-store"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    headers.update(sign_request(method="GET", path=path, query={}, headers=headers, body=b"",
                                access_key_id=ACCESS_KEY_ID, access_key_secret=ACCESS_KEY_SECRET))
    return headers


@asynccontextmanager
async def stream(base_url: str, path: str, *, last_event_id: int | None = None) -> AsyncIterator[EventSource]:
    full = API + path
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(10, read=30)) as http:
        async with aconnect_sse(http, "GET", full, headers=signed_headers(base_url, full, last_event_id=last_event_id)) as source:
            yield source


async def collect(source: EventSource, *, deadline_s: float = 30) -> list[tuple[str, str, dict[str, Any]]]:
    """(event, id, data) of every message until the stream ends, within the deadline."""
    found: list[tuple[str, str, dict[str, Any]]] = []

    async def read() -> None:
        async for message in source.aiter_sse():
            found.append((message.event, message.id, json.loads(message.data)))

    await asyncio.wait_for(read(), deadline_s)
    return found


async def make_function(fc: FcClient, name: str, handler: str, *, retries: int = 3) -> None:
    assert (await fc.create_function(name, code={"index.py": HANDLERS}, handler=handler)).status_code == 200
    assert (await fc.put_async_config(name, asyncTask=True, maxAsyncRetryAttempts=retries)).status_code == 200


def base_url(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.gateway_port}"


async def test_a_task_stream_has_every_transition_in_order_then_ends(fc: FcClient, shared_stack: Stack, fn_name: str) -> None:
    await make_function(fc, fn_name, "index.fail_then_succeed")
    assert (await fc.invoke_async(fn_name, b"2", task_id="t1", delay_s=1)).status_code == 202
    async with stream(base_url(shared_stack), f"/functions/{fn_name}/async-tasks/t1/events") as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        messages = await collect(source)

    transitions = [(eid, data) for event, eid, data in messages if event == "transition"]
    assert [d["status"] for _, d in transitions] == [
        "Enqueued", "Processed", "Running", "Retrying", "Running", "Retrying", "Running", "Succeeded"]
    assert [d["eventId"] for _, d in transitions] == list(range(1, 9))
    sequences = [int(eid) for eid, _ in transitions]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    assert all(d["taskId"] == "t1" and d["functionName"] == fn_name for _, d in transitions)
    assert json.loads(transitions[3][1]["eventDetail"])["error"].startswith("RuntimeError")
    assert messages[-1][0] == "end" and messages[-1][2] == {"taskId": "t1", "status": "Succeeded"}
    # The same transitions GetAsyncTask reports.
    task = (await fc.get_task(fn_name, "t1")).json()
    assert [(e["eventId"], e["status"], e["timestamp"]) for e in task["events"]] == [
        (d["eventId"], d["status"], d["timestamp"]) for _, d in transitions]


async def test_last_event_id_resumes_after_it(fc: FcClient, shared_stack: Stack, fn_name: str) -> None:
    await make_function(fc, fn_name, "index.handler")
    assert (await fc.invoke_async(fn_name, b"x", task_id="t1")).status_code == 202
    await fc.wait_for(fn_name, "t1", {"Succeeded"})
    path = f"/functions/{fn_name}/async-tasks/t1/events"
    async with stream(base_url(shared_stack), path) as source:
        everything = await collect(source)
    ids = [int(eid) for event, eid, _ in everything if event == "transition"]
    assert len(ids) == 4

    async with stream(base_url(shared_stack), path, last_event_id=ids[1]) as source:
        rest = await collect(source)
    assert [int(eid) for event, eid, _ in rest if event == "transition"] == ids[2:]
    assert rest[-1][0] == "end"

    async with stream(base_url(shared_stack), path, last_event_id=ids[-1]) as source:
        nothing_new = await collect(source)
    assert [event for event, _, _ in nothing_new] == ["end"]


async def test_unknown_task_unsigned_request_and_bad_cursor_are_refused(fc: FcClient, shared_stack: Stack, fn_name: str) -> None:
    response = await fc.request("GET", f"/functions/{fn_name}/async-tasks/nope/events")
    assert response.status_code == 404 and response.json()["Code"] == "AsyncTaskNotFound"
    response = await fc.request("GET", f"/functions/{fn_name}/async-tasks/nope/events", query={"after": "x1"})
    assert response.status_code == 400 and response.json()["Code"] == "InvalidArgument"
    async with httpx.AsyncClient() as http:
        unsigned = await http.get(f"{base_url(shared_stack)}{API}/functions/{fn_name}/async-task-events")
    assert unsigned.status_code in (400, 403)


async def test_the_function_stream_carries_every_task_change(fc: FcClient, shared_stack: Stack, fn_name: str) -> None:
    await make_function(fc, fn_name, "index.handler")
    async with stream(base_url(shared_stack), f"/functions/{fn_name}/async-task-events") as source:
        seen: list[tuple[str, str]] = []

        async def read_until_both_done() -> None:
            async for message in source.aiter_sse():
                data = json.loads(message.data)
                seen.append((data["taskId"], data["status"]))
                if {("a", "Succeeded"), ("b", "Succeeded")} <= set(seen):
                    return

        reader = asyncio.create_task(read_until_both_done())
        # The stream starts at the request, so nothing submitted after it is missed.
        assert (await fc.invoke_async(fn_name, b"1", task_id="a")).status_code == 202
        assert (await fc.invoke_async(fn_name, b"2", task_id="b")).status_code == 202
        await asyncio.wait_for(reader, 30)
    for task_id in ("a", "b"):
        assert [s for t, s in seen if t == task_id] == ["Enqueued", "Processed", "Running", "Succeeded"]


def test_a_watch_survives_a_gateway_restart(own_stack: Stack) -> None:
    async def setup() -> None:
        client = FcClient(base_url(own_stack), access_key_id=ACCESS_KEY_ID, access_key_secret=ACCESS_KEY_SECRET)
        try:
            await make_function(client, "slow", "index.sleep")
            assert (await client.invoke_async("slow", b"6", task_id="across")).status_code == 202
        finally:
            await client.close()

    asyncio.run(setup())
    api = TaskmodeApi(Profile(endpoint=base_url(own_stack), access_key_id=ACCESS_KEY_ID,
                              access_key_secret=ACCESS_KEY_SECRET))
    seen: list[tuple[int, str]] = []
    running = threading.Event()
    failure: list[BaseException] = []

    def watch() -> None:
        try:
            for item in api.watch_task("slow", "across"):
                seen.append((item.seq, item.status))
                if item.status == "Running":
                    running.set()
        except BaseException as err:  # noqa: BLE001 - reported by the test thread below
            failure.append(err)
            running.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert running.wait(30), "the task never started"
    began = time.monotonic()
    assert own_stack.services["gateway"].stop() == 0
    stop_s = time.monotonic() - began
    own_stack.start_service("gateway")
    watcher.join(45)
    api.close()
    assert not watcher.is_alive() and not failure, failure
    # Open streams end at once on shutdown instead of holding the gateway for its grace period.
    assert stop_s < 5, f"the gateway took {stop_s:.1f} s to stop"
    assert [status for _, status in seen] == ["Enqueued", "Processed", "Running", "Succeeded"]
    assert [seq for seq, _ in seen] == sorted({seq for seq, _ in seen})
