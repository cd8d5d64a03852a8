"""Bad input to the HTTP API, on the real running system: every refusal is a clear FC error.

Each refusal must be `{"Code", "Message", "RequestId"}` with the right HTTP status, a message that
names what was wrong, and the request id the `x-fc-request-id` header carries; and a refused
request must leave nothing behind (no function, no changed function, no config, no task).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import httpx
import pytest

from shared.acs3 import sign_request
from shared.devstack import Stack
from tests.fc_client import API, FcClient, zip_code
from tests.integration_fixtures import ACCESS_KEY_ID, ACCESS_KEY_SECRET, HANDLERS

pytestmark = pytest.mark.timeout(120)

REQUEST_ID_HEADER = "x-fc-request-id"
JSON_HEADERS = {"content-type": "application/json"}
MAX_ASYNC_PAYLOAD = 128 * 1024
DROP = object()  # a create-body override that removes the field

T = TypeVar("T")


# --- helpers ----------------------------------------------------------------------------------


def assert_fc_error(response: httpx.Response, status: int, code: str, *mentions: str) -> dict[str, Any]:
    """The response is an FC error with `status` and `code` whose message names every `mentions`."""
    assert response.status_code == status, f"{response.status_code} {response.text}"
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body: dict[str, Any] = response.json()
    assert set(body) == {"Code", "Message", "RequestId"}, body
    assert body["Code"] == code, body
    assert isinstance(body["Message"], str) and body["Message"].strip(), body
    assert body["RequestId"], body
    assert body["RequestId"] == response.headers[REQUEST_ID_HEADER], (body, dict(response.headers))
    for text in mentions:
        assert text in body["Message"], f"{text!r} not in message {body['Message']!r}"
    return body


async def poll(probe: Callable[[], Awaitable[T | None]], *, what: str, deadline_s: float = 15) -> T:
    """Call `probe` until it returns something other than None, or fail at the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        result = await probe()
        if result is not None:
            return result
        if time.monotonic() >= end:
            raise AssertionError(f"{what} did not happen within {deadline_s}s")
        await asyncio.sleep(0.05)


def create_body(name: str, **overrides: Any) -> dict[str, Any]:
    """A valid CreateFunction body for `name`, with fields replaced (or removed with DROP)."""
    body: dict[str, Any] = {
        "functionName": name,
        "runtime": "python3.10",
        "handler": "index.handler",
        "timeout": 30,
        "code": {"zipFile": zip_code({"index.py": HANDLERS})},
    }
    for key, value in overrides.items():
        if value is DROP:
            body.pop(key, None)
        else:
            body[key] = value
    return body


async def make_function(fc: FcClient, name: str, **overrides: Any) -> dict[str, Any]:
    response = await fc.request("POST", "/functions", json=create_body(name, **overrides))
    assert response.status_code == 200, response.text
    record: dict[str, Any] = response.json()
    return record


async def get_function(fc: FcClient, name: str) -> dict[str, Any]:
    response = await fc.request("GET", f"/functions/{name}")
    assert response.status_code == 200, response.text
    record: dict[str, Any] = response.json()
    return record


async def listed_function_names(fc: FcClient, prefix: str) -> list[str]:
    response = await fc.request("GET", "/functions", query={"prefix": prefix, "limit": "100"})
    assert response.status_code == 200, response.text
    return [f["functionName"] for f in response.json()["functions"]]


async def assert_function_absent(fc: FcClient, name: str) -> None:
    assert_fc_error(await fc.request("GET", f"/functions/{name}"), 404, "FunctionNotFound", name)
    assert name not in await listed_function_names(fc, name)


async def assert_no_task(fc: FcClient, name: str, task_id: str) -> None:
    assert_fc_error(await fc.get_task(name, task_id), 404, "AsyncTaskNotFound")


async def listed_task_ids(fc: FcClient, name: str, **query: str) -> list[str]:
    response = await fc.list_tasks(name, limit="100", **query)
    assert response.status_code == 200, response.text
    return [t["taskId"] for t in response.json()["tasks"]]


async def assert_only_witness_enqueued(fc: FcClient, name: str) -> None:
    """Submit a witness task after the refused ones; once it is listed, it must be all there is.

    Appends to one function's tasks are projected in order, so anything a refused request had
    enqueued before the witness would be listed by the time the witness is.
    """
    response = await fc.invoke_async(name, b"witness", task_id="witness")
    assert response.status_code == 202, response.text

    async def witness_listed() -> list[str] | None:
        ids = await listed_task_ids(fc, name)
        return ids if "witness" in ids else None

    assert await poll(witness_listed, what="the witness task being listed") == ["witness"]


def other_client(stack: Stack, *, key_id: str = ACCESS_KEY_ID, secret: str = ACCESS_KEY_SECRET) -> FcClient:
    return FcClient(f"http://127.0.0.1:{stack.gateway_port}", access_key_id=key_id, access_key_secret=secret)


# --- CreateFunction ---------------------------------------------------------------------------


def _raw(text: str) -> Callable[[str], bytes]:
    return lambda name: text.replace("NAME", name).encode()


def _with(**overrides: Any) -> Callable[[str], dict[str, Any]]:
    return lambda name: create_body(name, **overrides)


NOT_A_ZIP = base64.b64encode(b"this is plain text, not a zip archive").decode()

BAD_CREATE_BODIES = [
    pytest.param(_raw('{"functionName": "NAME", "runtime": "python3.10",'), ["not valid JSON"], id="malformed-json"),
    pytest.param(_raw('{not json'), ["not valid JSON"], id="not-json-at-all"),
    pytest.param(_raw(""), ["empty"], id="empty-body"),
    pytest.param(_raw('[{"functionName": "NAME"}]'), ["object", "array"], id="array-body"),
    pytest.param(_raw('"NAME"'), ["object"], id="string-body"),
    pytest.param(_raw("null"), ["object"], id="null-body"),
    pytest.param(_with(functionName=DROP), ["functionName"], id="missing-functionName"),
    pytest.param(_with(handler=DROP), ["handler"], id="missing-handler"),
    pytest.param(_with(runtime=DROP), ["runtime"], id="missing-runtime"),
    pytest.param(_with(code=DROP), ["code.zipFile"], id="missing-code"),
    pytest.param(_with(code={}), ["code.zipFile"], id="code-without-zipFile"),
    pytest.param(_with(runtime="java11"), ["java11"], id="unknown-runtime"),
    pytest.param(_with(runtime="custom-container"), ["container engine"], id="custom-container"),
    pytest.param(_with(runtime="nodejs20"), ["index.js"], id="nodejs-handler-module-missing"),
    pytest.param(_with(handler="main.handler"), ["main.py"], id="python-handler-module-missing"),
    pytest.param(_with(runtime=""), ["runtime"], id="empty-runtime"),
    pytest.param(_with(handler=""), ["handler"], id="empty-handler"),
    pytest.param(_with(timeout=0), ["timeout"], id="timeout-0"),
    pytest.param(_with(timeout=86401), ["timeout"], id="timeout-86401"),
    pytest.param(_with(timeout="ten"), ["timeout"], id="timeout-string"),
    pytest.param(_with(timeout=1.5), ["timeout"], id="timeout-float"),
    pytest.param(_with(memorySize=127), ["memorySize"], id="memory-127"),
    pytest.param(_with(memorySize=32769), ["memorySize"], id="memory-32769"),
    pytest.param(_with(instanceConcurrency=0), ["instanceConcurrency"], id="concurrency-0"),
    pytest.param(_with(environmentVariables=["A=1"]), ["environmentVariables"], id="env-list"),
    pytest.param(_with(environmentVariables={"A": 1}), ["environmentVariables"], id="env-non-string-value"),
    pytest.param(_with(functionName=123), ["functionName"], id="name-not-string"),
    pytest.param(_with(description="d" * 257), ["description"], id="description-257"),
    pytest.param(_with(cpu=0), ["cpu"], id="cpu-0"),
    pytest.param(_with(diskSize=511), ["diskSize"], id="disk-511"),
    pytest.param(_with(code={"zipFile": "not base64 !!"}), ["base64"], id="zip-not-base64"),
    pytest.param(_with(code={"zipFile": NOT_A_ZIP}), ["zip"], id="zip-base64-but-not-zip"),
    pytest.param(_with(runtime="custom.debian10"), ["customRuntimeConfig.command"], id="custom-without-config"),
    pytest.param(
        _with(runtime="custom", customRuntimeConfig={"port": 9000}), ["customRuntimeConfig.command"],
        id="custom-without-command",
    ),
    pytest.param(
        _with(runtime="custom", customRuntimeConfig={"command": []}), ["customRuntimeConfig.command"],
        id="custom-empty-command",
    ),
    pytest.param(
        _with(runtime="custom", customRuntimeConfig={"command": ["x"], "port": 70000}), ["customRuntimeConfig.port"],
        id="custom-port-70000",
    ),
]


@pytest.mark.parametrize(("make_body", "mentions"), BAD_CREATE_BODIES)
async def test_create_function_refuses_bad_body_and_writes_nothing(
    fc: FcClient, fn_name: str, make_body: Callable[[str], Any], mentions: list[str]
) -> None:
    body = make_body(fn_name)
    if isinstance(body, bytes):
        response = await fc.request("POST", "/functions", body=body, headers=JSON_HEADERS)
    else:
        response = await fc.request("POST", "/functions", json=body)
    assert_fc_error(response, 400, "InvalidArgument", *mentions)
    await assert_function_absent(fc, fn_name)


@pytest.mark.parametrize("name", ["1abc", "a.b", "a b", "a*", "a>", "-a", "x" * 65, "é"])
async def test_create_function_refuses_invalid_name(fc: FcClient, name: str) -> None:
    response = await fc.request("POST", "/functions", json=create_body(name))
    assert_fc_error(response, 400, "InvalidArgument", repr(name))
    # Such a name can never exist: GetFunction refuses the name itself, and nothing is listed.
    assert_fc_error(await fc.request("GET", f"/functions/{name}"), 400, "InvalidArgument", repr(name))
    assert await listed_function_names(fc, name) == []


async def test_create_function_accepts_boundary_values(fc: FcClient, fn_name: str) -> None:
    longest = fn_name + "x" * (64 - len(fn_name))
    cases: list[tuple[str, dict[str, Any]]] = [
        (longest, {}),
        (fn_name + "_lo", {"timeout": 1, "memorySize": 128}),
        (fn_name + "_hi", {"timeout": 86400, "memorySize": 32768}),
        (fn_name + "_c", {"runtime": "custom.debian12", "customRuntimeConfig": {"command": ["python3", "x.py"]}}),
    ]
    for name, overrides in cases:
        record = await make_function(fc, name, **overrides)
        assert await get_function(fc, name) == record


async def test_duplicate_create_is_a_conflict_and_keeps_the_original(fc: FcClient, fn_name: str) -> None:
    original = await make_function(fc, fn_name)
    second = create_body(fn_name, handler="index.info", timeout=5, description="impostor",
                         code={"zipFile": zip_code({"index.py": "def info(e, c):\n    return 'other'\n"})})
    response = await fc.request("POST", "/functions", json=second)
    assert_fc_error(response, 409, "FunctionAlreadyExists", fn_name)
    assert await get_function(fc, fn_name) == original
    assert await listed_function_names(fc, fn_name) == [fn_name]
    # The original code still runs.
    ran = await fc.request("POST", f"/functions/{fn_name}/invocations", body=b"still me")
    assert ran.status_code == 200, ran.text
    assert ran.content == b"still me"


async def test_concurrent_creates_of_one_name_have_exactly_one_winner(fc: FcClient, fn_name: str) -> None:
    bodies = [create_body(fn_name, description=f"contender {i}") for i in range(5)]
    responses = await asyncio.gather(*(fc.request("POST", "/functions", json=b) for b in bodies))
    winners = [r for r in responses if r.status_code == 200]
    assert len(winners) == 1, [r.status_code for r in responses]
    for loser in (r for r in responses if r.status_code != 200):
        assert_fc_error(loser, 409, "FunctionAlreadyExists", fn_name)
    assert await get_function(fc, fn_name) == winners[0].json()


# --- Get/Update/DeleteFunction ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "body"),
    [("GET", None), ("PUT", {"timeout": 10}), ("DELETE", None)],
    ids=["get", "update", "delete"],
)
async def test_unknown_function_is_not_found(fc: FcClient, fn_name: str, method: str, body: Any) -> None:
    response = await fc.request(method, f"/functions/{fn_name}", json=body)
    assert_fc_error(response, 404, "FunctionNotFound", fn_name)
    await assert_function_absent(fc, fn_name)


async def test_deleted_function_is_not_found_afterwards(fc: FcClient, fn_name: str) -> None:
    await make_function(fc, fn_name)
    deleted = await fc.request("DELETE", f"/functions/{fn_name}")
    assert deleted.status_code == 204, deleted.text
    assert_fc_error(await fc.request("DELETE", f"/functions/{fn_name}"), 404, "FunctionNotFound", fn_name)
    await assert_function_absent(fc, fn_name)


BAD_UPDATES = [
    pytest.param({"timeout": 0}, ["timeout"], id="timeout-0"),
    pytest.param({"timeout": 86401}, ["timeout"], id="timeout-86401"),
    pytest.param({"timeout": "ten"}, ["timeout"], id="timeout-string"),
    pytest.param({"memorySize": 100000}, ["memorySize"], id="memory-too-big"),
    pytest.param({"handler": ""}, ["handler"], id="empty-handler"),
    pytest.param({"runtime": "java8"}, ["java8"], id="unknown-runtime"),
    pytest.param({"runtime": "custom"}, ["customRuntimeConfig.command"], id="custom-without-command"),
    pytest.param({"environmentVariables": "A=1"}, ["environmentVariables"], id="env-string"),
    pytest.param({"code": {"zipFile": "%%%"}}, ["base64"], id="zip-not-base64"),
    pytest.param({"code": {"zipFile": NOT_A_ZIP}}, ["zip"], id="zip-not-zip"),
    pytest.param({"timeout": 10, "memorySize": 1}, ["memorySize"], id="one-good-one-bad-field"),
    pytest.param(b"{not json", ["not valid JSON"], id="malformed-json"),
    pytest.param(b"[1, 2]", ["object"], id="array-body"),
]


@pytest.mark.parametrize(("update", "mentions"), BAD_UPDATES)
async def test_invalid_update_leaves_function_unchanged(
    fc: FcClient, fn_name: str, update: Any, mentions: list[str]
) -> None:
    await make_function(fc, fn_name)
    before = await get_function(fc, fn_name)
    if isinstance(update, bytes):
        response = await fc.request("PUT", f"/functions/{fn_name}", body=update, headers=JSON_HEADERS)
    else:
        response = await fc.request("PUT", f"/functions/{fn_name}", json=update)
    assert_fc_error(response, 400, "InvalidArgument", *mentions)
    assert await get_function(fc, fn_name) == before


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_function_routes_refuse_invalid_name(fc: FcClient, method: str) -> None:
    response = await fc.request(method, "/functions/1abc", json={"timeout": 10} if method == "PUT" else None)
    assert_fc_error(response, 400, "InvalidArgument", "'1abc'")


# --- Put/GetAsyncInvokeConfig -----------------------------------------------------------------


BAD_ASYNC_CONFIGS = [
    pytest.param({"maxAsyncEventAgeInSeconds": 0}, ["maxAsyncEventAgeInSeconds"], id="age-0"),
    pytest.param({"maxAsyncEventAgeInSeconds": 604801}, ["maxAsyncEventAgeInSeconds"], id="age-604801"),
    pytest.param({"maxAsyncEventAgeInSeconds": "60"}, ["maxAsyncEventAgeInSeconds"], id="age-string"),
    pytest.param({"maxAsyncEventAgeInSeconds": 1.5}, ["maxAsyncEventAgeInSeconds"], id="age-float"),
    pytest.param({"maxAsyncRetryAttempts": -1}, ["maxAsyncRetryAttempts"], id="retries--1"),
    pytest.param({"maxAsyncRetryAttempts": 9}, ["maxAsyncRetryAttempts"], id="retries-9"),
    pytest.param({"maxAsyncRetryAttempts": "3"}, ["maxAsyncRetryAttempts"], id="retries-string"),
    pytest.param({"asyncTask": "yes"}, ["asyncTask"], id="asyncTask-string"),
    pytest.param({"asyncTask": True, "maxAsyncRetryAttempts": 9}, ["maxAsyncRetryAttempts"], id="good-and-bad"),
    pytest.param({"destinationConfig": "somewhere"}, ["destinationConfig"], id="destination-string"),
    pytest.param(b"{not json", ["not valid JSON"], id="malformed-json"),
    pytest.param(b"[]", ["object"], id="array-body"),
]


async def put_config_raw(fc: FcClient, name: str, config: Any) -> httpx.Response:
    path = f"/functions/{name}/async-invoke-config"
    if isinstance(config, bytes):
        return await fc.request("PUT", path, body=config, headers=JSON_HEADERS)
    return await fc.request("PUT", path, json=config)


async def get_config(fc: FcClient, name: str) -> httpx.Response:
    return await fc.request("GET", f"/functions/{name}/async-invoke-config")


@pytest.mark.parametrize(("config", "mentions"), BAD_ASYNC_CONFIGS)
async def test_rejected_async_config_put_creates_no_config(
    fc: FcClient, fn_name: str, config: Any, mentions: list[str]
) -> None:
    await make_function(fc, fn_name)
    assert_fc_error(await put_config_raw(fc, fn_name, config), 400, "InvalidArgument", *mentions)
    assert_fc_error(await get_config(fc, fn_name), 404, "AsyncConfigNotFound", fn_name)


@pytest.mark.parametrize(("config", "mentions"), BAD_ASYNC_CONFIGS)
async def test_rejected_async_config_put_keeps_previous_config(
    fc: FcClient, fn_name: str, config: Any, mentions: list[str]
) -> None:
    await make_function(fc, fn_name)
    good = await fc.put_async_config(fn_name, asyncTask=True, maxAsyncEventAgeInSeconds=600, maxAsyncRetryAttempts=2)
    assert good.status_code == 200, good.text
    previous = good.json()
    assert_fc_error(await put_config_raw(fc, fn_name, config), 400, "InvalidArgument", *mentions)
    current = await get_config(fc, fn_name)
    assert current.status_code == 200, current.text
    assert current.json() == previous


async def test_async_config_accepts_boundary_values(fc: FcClient, fn_name: str) -> None:
    await make_function(fc, fn_name)
    for age, retries in [(1, 0), (604800, 8)]:
        response = await fc.put_async_config(fn_name, asyncTask=True, maxAsyncEventAgeInSeconds=age,
                                             maxAsyncRetryAttempts=retries)
        assert response.status_code == 200, response.text
        got = (await get_config(fc, fn_name)).json()
        assert (got["maxAsyncEventAgeInSeconds"], got["maxAsyncRetryAttempts"]) == (age, retries)


async def test_async_config_of_unknown_function_is_not_found(fc: FcClient, fn_name: str) -> None:
    put = await fc.put_async_config(fn_name, asyncTask=True)
    assert_fc_error(put, 404, "FunctionNotFound", fn_name)
    assert_fc_error(await get_config(fc, fn_name), 404, "FunctionNotFound", fn_name)
    deleted = await fc.request("DELETE", f"/functions/{fn_name}/async-invoke-config")
    assert_fc_error(deleted, 404, "FunctionNotFound", fn_name)
    # The refused put left no config behind for a function created later under that name.
    await make_function(fc, fn_name)
    assert_fc_error(await get_config(fc, fn_name), 404, "AsyncConfigNotFound", fn_name)


# --- InvokeFunction (async) -------------------------------------------------------------------


async def test_async_invoke_of_unknown_function_enqueues_nothing(fc: FcClient, fn_name: str) -> None:
    response = await fc.invoke_async(fn_name, b"x", task_id="ghost", headers={REQUEST_ID_HEADER: "req_ghost_1"})
    body = assert_fc_error(response, 404, "FunctionNotFound", fn_name)
    assert body["RequestId"] == "req_ghost_1"  # a usable caller request id is echoed
    assert_fc_error(await fc.get_task(fn_name, "ghost"), 404, "FunctionNotFound", fn_name)
    # Not even once the function exists under that name.
    await make_function(fc, fn_name)
    await assert_no_task(fc, fn_name, "ghost")
    await assert_only_witness_enqueued(fc, fn_name)


async def test_unusable_caller_request_id_is_replaced_in_errors(fc: FcClient, fn_name: str) -> None:
    response = await fc.request("GET", f"/functions/{fn_name}", headers={REQUEST_ID_HEADER: "bad id with spaces"})
    body = assert_fc_error(response, 404, "FunctionNotFound")
    assert body["RequestId"] != "bad id with spaces"


async def test_async_payload_over_limit_is_refused_and_limit_itself_accepted(fc: FcClient, fn_name: str) -> None:
    await make_function(fc, fn_name)
    too_big = await fc.invoke_async(fn_name, b"x" * (MAX_ASYNC_PAYLOAD + 1), task_id="too_big")
    assert_fc_error(too_big, 400, "EntityTooLarge", str(MAX_ASYNC_PAYLOAD))
    await assert_no_task(fc, fn_name, "too_big")

    fits = await fc.invoke_async(fn_name, b"y" * MAX_ASYNC_PAYLOAD, task_id="just_fits")
    assert fits.status_code == 202, fits.text
    assert fits.headers["x-fc-async-task-id"] == "just_fits"
    task = await fc.wait_for(fn_name, "just_fits", {"Succeeded"})
    assert len(task["taskPayload"]) == MAX_ASYNC_PAYLOAD
    assert await listed_task_ids(fc, fn_name) == ["just_fits"]


@pytest.mark.parametrize("task_id", ["1abc", "a b", "a.b", "a" * 129, "*", ">", "a/b", "-a", "a:b"])
async def test_async_invoke_refuses_bad_task_id_and_enqueues_nothing(fc: FcClient, fn_name: str, task_id: str) -> None:
    await make_function(fc, fn_name)
    response = await fc.invoke_async(fn_name, b"x", task_id=task_id)
    assert_fc_error(response, 400, "InvalidArgument", "x-fc-async-task-id", repr(task_id))
    if "/" not in task_id:  # "a/b" would be another path
        await assert_no_task(fc, fn_name, task_id)
    await assert_only_witness_enqueued(fc, fn_name)


async def test_async_invoke_refuses_a_task_id_header_that_breaks_the_rule(fc: FcClient, fn_name: str) -> None:
    # The task-id rule applies to x-fc-async-task-id; a request id unfit as a task id is still
    # accepted (it then stands for "_<request id>" or a generated id: see test_fidelity).
    await make_function(fc, fn_name)
    response = await fc.invoke_async(fn_name, b"x", task_id="1abc")
    assert_fc_error(response, 400, "InvalidArgument", "x-fc-async-task-id", "'1abc'")
    await assert_no_task(fc, fn_name, "1abc")
    await assert_only_witness_enqueued(fc, fn_name)


@pytest.mark.parametrize("delay", ["-1", "604801", "abc", "1.5", "+5", "1e3"])
async def test_async_invoke_refuses_bad_delay(fc: FcClient, fn_name: str, delay: str) -> None:
    await make_function(fc, fn_name)
    response = await fc.invoke_async(fn_name, b"x", task_id="delayed", headers={"x-fc-async-delay": delay})
    assert_fc_error(response, 400, "InvalidArgument", "x-fc-async-delay", delay.lstrip("+-"))
    await assert_no_task(fc, fn_name, "delayed")


async def test_async_invoke_accepts_delay_bounds(fc: FcClient, fn_name: str) -> None:
    await make_function(fc, fn_name)
    for task_id, delay in [("now", "0"), ("in_an_hour", "3600"), ("in_a_week", "604800")]:
        response = await fc.invoke_async(fn_name, b"x", task_id=task_id, headers={"x-fc-async-delay": delay})
        assert response.status_code == 202, response.text
    await fc.wait_for(fn_name, "now", {"Succeeded"})
    for task_id in ("in_an_hour", "in_a_week"):
        assert (await fc.get_task(fn_name, task_id)).json()["status"] == "Enqueued"
        assert (await fc.stop_task(fn_name, task_id)).status_code == 200


@pytest.mark.parametrize("invocation_type", ["Later", "asynchronous", "Event", "1"])
async def test_invoke_refuses_bad_invocation_type(fc: FcClient, fn_name: str, invocation_type: str) -> None:
    await make_function(fc, fn_name)
    response = await fc.request("POST", f"/functions/{fn_name}/invocations", body=b"x",
                                headers={"x-fc-invocation-type": invocation_type, "x-fc-async-task-id": "typed"})
    assert_fc_error(response, 400, "InvalidArgument", "x-fc-invocation-type", invocation_type)
    await assert_no_task(fc, fn_name, "typed")


# --- Get/StopAsyncTask ------------------------------------------------------------------------


@pytest.mark.parametrize("function_exists", [True, False], ids=["known-function", "unknown-function"])
async def test_unknown_task_is_not_found(fc: FcClient, fn_name: str, function_exists: bool) -> None:
    if function_exists:
        await make_function(fc, fn_name)
    code = "AsyncTaskNotFound" if function_exists else "FunctionNotFound"
    mentions = ("nope", fn_name) if function_exists else (fn_name,)
    assert_fc_error(await fc.get_task(fn_name, "nope"), 404, code, *mentions)
    assert_fc_error(await fc.stop_task(fn_name, "nope"), 404, code, *mentions)
    # The refused stop wrote nothing: the id is still free.
    if function_exists:
        assert (await fc.invoke_async(fn_name, b"", task_id="nope")).status_code == 202
        assert (await fc.wait_for(fn_name, "nope", {"Succeeded"}))["events"][0]["status"] == "Enqueued"


@pytest.mark.parametrize("task_id", ["a.b", "*", ">", "1abc", "a" * 129])
async def test_task_ids_that_cannot_exist_are_not_found(fc: FcClient, fn_name: str, task_id: str) -> None:
    await make_function(fc, fn_name)
    assert_fc_error(await fc.get_task(fn_name, task_id), 404, "AsyncTaskNotFound", fn_name)
    assert_fc_error(await fc.stop_task(fn_name, task_id), 404, "AsyncTaskNotFound", fn_name)


# --- ListAsyncTasks ---------------------------------------------------------------------------


BAD_LIST_QUERIES = [
    pytest.param({"limit": "0"}, "InvalidArgument", ["limit"], id="limit-0"),
    pytest.param({"limit": "101"}, "InvalidArgument", ["limit"], id="limit-101"),
    pytest.param({"limit": "x"}, "InvalidArgument", ["limit", "'x'"], id="limit-x"),
    pytest.param({"limit": "-5"}, "InvalidArgument", ["limit"], id="limit-negative"),
    pytest.param({"sortOrderByTime": "up"}, "InvalidArgument", ["sortOrderByTime", "'up'"], id="sort-up"),
    pytest.param({"includePayload": "maybe"}, "InvalidArgument", ["includePayload", "'maybe'"], id="payload-maybe"),
    pytest.param({"includePayload": "1"}, "InvalidArgument", ["includePayload"], id="payload-1"),
    pytest.param({"status": "Bogus"}, "InvalidArgument", ["status", "'Bogus'"], id="status-bogus"),
    pytest.param({"startedTimeBegin": "abc"}, "InvalidArgument", ["startedTimeBegin", "'abc'"], id="begin-abc"),
    pytest.param({"startedTimeBegin": "-1"}, "InvalidArgument", ["startedTimeBegin"], id="begin-negative"),
    pytest.param({"startedTimeEnd": "yesterday"}, "InvalidArgument", ["startedTimeEnd"], id="end-word"),
    pytest.param({"nextToken": "garbage!!"}, "InvalidNextToken", ["nextToken"], id="token-not-base64"),
    pytest.param({"nextToken": "Z2FyYmFnZQ"}, "InvalidNextToken", ["nextToken"], id="token-base64-garbage"),
    pytest.param({"nextToken": "x" * 5000}, "InvalidNextToken", ["nextToken"], id="token-huge"),
    pytest.param({"qualifier": "a b"}, "InvalidArgument", ["qualifier"], id="qualifier-bad"),
]


@pytest.mark.parametrize(("query", "code", "mentions"), BAD_LIST_QUERIES)
async def test_list_async_tasks_refuses_bad_query(
    fc: FcClient, fn_name: str, query: dict[str, str], code: str, mentions: list[str]
) -> None:
    assert_fc_error(await fc.list_tasks(fn_name, **query), 400, code, *mentions)


@pytest.mark.parametrize(
    "query",
    [
        {"includePayload": "True"}, {"includePayload": "true"}, {"includePayload": "FALSE"},
        {"status": "Dequeued"}, {"status": "Processed"}, {"status": "Succeeded"},
        {"limit": "1"}, {"limit": "100"}, {"sortOrderByTime": "asc"}, {"sortOrderByTime": "desc"},
        {"startedTimeBegin": "0", "startedTimeEnd": str(2**53)}, {"prefix": "t"},
    ],
    ids=lambda q: "&".join(f"{k}={v}" for k, v in q.items()),
)
async def test_list_async_tasks_accepts_valid_query(fc: FcClient, fn_name: str, query: dict[str, str]) -> None:
    await make_function(fc, fn_name)
    response = await fc.list_tasks(fn_name, **query)
    assert response.status_code == 200, response.text
    assert response.json() == {"nextToken": "", "tasks": []}


async def test_next_token_is_bound_to_its_filters(fc: FcClient, fn_name: str) -> None:
    await make_function(fc, fn_name)
    for i in range(3):
        assert (await fc.invoke_async(fn_name, b"", task_id=f"t{i}")).status_code == 202

    async def first_page() -> dict[str, Any] | None:
        # Wait until the read model has all three, so the pages below are deterministic.
        if len(await listed_task_ids(fc, fn_name)) < 3:
            return None
        response = await fc.list_tasks(fn_name, limit="1")
        assert response.status_code == 200, response.text
        page: dict[str, Any] = response.json()
        return page if page["nextToken"] else None

    page = await poll(first_page, what="a first page with a nextToken")
    assert len(page["tasks"]) == 1
    token = page["nextToken"]
    first_id = page["tasks"][0]["taskId"]

    for changed in [{"status": "Enqueued"}, {"status": "Succeeded"}, {"prefix": "t"}, {"prefix": "t1"},
                    {"sortOrderByTime": "desc"}, {"startedTimeBegin": "0"}, {"qualifier": "LATEST"}]:
        response = await fc.list_tasks(fn_name, limit="1", nextToken=token, **changed)
        assert_fc_error(response, 400, "InvalidNextToken", "nextToken")
    # A token of another function is refused too.
    await make_function(fc, fn_name + "_other")
    assert_fc_error(await fc.list_tasks(fn_name + "_other", limit="1", nextToken=token), 400, "InvalidNextToken")

    # Replayed with the same filters it works (limit and includePayload may change between pages).
    same = await fc.list_tasks(fn_name, limit="1", nextToken=token)
    assert same.status_code == 200, same.text
    second = [t["taskId"] for t in same.json()["tasks"]]
    assert len(second) == 1 and second != [first_id]
    assert same.json()["nextToken"]
    rest = await fc.list_tasks(fn_name, limit="5", includePayload="true", nextToken=token)
    assert rest.status_code == 200, rest.text
    ids = [t["taskId"] for t in rest.json()["tasks"]]
    assert sorted([first_id, *ids]) == ["t0", "t1", "t2"]


@pytest.mark.parametrize("query", [{"limit": "1_0"}, {"limit": "\uff15"}, {"startedTimeBegin": "1_000"}],
                         ids=["limit-underscore", "limit-fullwidth-digit", "begin-underscore"])
async def test_list_async_tasks_refuses_non_plain_integers(fc: FcClient, fn_name: str, query: dict[str, str]) -> None:
    assert_fc_error(await fc.list_tasks(fn_name, **query), 400, "InvalidArgument", next(iter(query)))


# --- ListFunctions / ListAsyncInvokeConfigs --------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/functions", "/async-invoke-configs"], ids=["ListFunctions", "ListAsyncInvokeConfigs"]
)
@pytest.mark.parametrize(
    ("query", "code", "mention"),
    [
        ({"limit": "0"}, "InvalidArgument", "limit"),
        ({"limit": "101"}, "InvalidArgument", "limit"),
        ({"limit": "many"}, "InvalidArgument", "limit"),
        ({"nextToken": "garbage!!"}, "InvalidNextToken", "nextToken"),
        ({"nextToken": "MWFiYw"}, "InvalidNextToken", "nextToken"),  # base64 of "1abc", not a name
    ],
    ids=["limit-0", "limit-101", "limit-word", "token-not-base64", "token-not-a-name"],
)
async def test_list_catalog_refuses_bad_query(
    fc: FcClient, path: str, query: dict[str, str], code: str, mention: str
) -> None:
    assert_fc_error(await fc.request("GET", path, query=query), 400, code, mention)


# --- authentication ---------------------------------------------------------------------------


async def test_unsigned_request_is_refused_and_writes_nothing(shared_stack: Stack, fc: FcClient, fn_name: str) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{shared_stack.gateway_port}") as http:
        created = await http.post(f"{API}/functions", json=create_body(fn_name))
        assert_fc_error(created, 403, "InvalidAccessKeyID", "Authorization")
        listed = await http.get(f"{API}/functions")
        assert_fc_error(listed, 403, "InvalidAccessKeyID", "Authorization")
    await assert_function_absent(fc, fn_name)


async def test_healthz_needs_no_signature(shared_stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{shared_stack.gateway_port}") as http:
        response = await http.get("/healthz")
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("key_id", "secret", "code", "mention"),
    [
        (ACCESS_KEY_ID, "wrongsecret", "SignatureNotMatch", "signature"),
        ("nobody", ACCESS_KEY_SECRET, "InvalidAccessKeyID", "nobody"),
    ],
    ids=["wrong-secret", "unknown-key-id"],
)
async def test_bad_credentials_are_refused_and_write_nothing(
    shared_stack: Stack, fc: FcClient, fn_name: str, key_id: str, secret: str, code: str, mention: str
) -> None:
    intruder = other_client(shared_stack, key_id=key_id, secret=secret)
    try:
        response = await intruder.request("POST", "/functions", json=create_body(fn_name))
    finally:
        await intruder.close()
    assert_fc_error(response, 403, code, mention)
    await assert_function_absent(fc, fn_name)


@pytest.mark.parametrize("skew", [timedelta(minutes=-20), timedelta(minutes=20)], ids=["20min-old", "20min-ahead"])
async def test_request_date_outside_allowed_skew_is_refused(fc: FcClient, fn_name: str, skew: timedelta) -> None:
    stamp = (datetime.now(timezone.utc) + skew).strftime("%Y-%m-%dT%H:%M:%SZ")
    # The stale date is signed: only its age is wrong.
    response = await fc.request("POST", "/functions", json=create_body(fn_name), headers={"x-acs-date": stamp})
    assert_fc_error(response, 403, "RequestTimeTooSkewed", stamp)
    await assert_function_absent(fc, fn_name)


async def test_body_changed_after_signing_is_refused(shared_stack: Stack, fc: FcClient, fn_name: str) -> None:
    signed_body = json.dumps(create_body(fn_name + "_signed")).encode()
    sent_body = json.dumps(create_body(fn_name)).encode()
    headers = {"host": f"127.0.0.1:{shared_stack.gateway_port}", "content-type": "application/json"}
    headers.update(sign_request(method="POST", path=f"{API}/functions", query={}, headers=headers, body=signed_body,
                                access_key_id=ACCESS_KEY_ID, access_key_secret=ACCESS_KEY_SECRET))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{shared_stack.gateway_port}") as http:
        response = await http.post(f"{API}/functions", content=sent_body, headers=headers)
    assert_fc_error(response, 403, "SignatureNotMatch", "x-acs-content-sha256")
    await assert_function_absent(fc, fn_name)
    await assert_function_absent(fc, fn_name + "_signed")


# --- unknown paths ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "signed"),
    [
        ("GET", f"{API}/nope", True),
        ("GET", f"{API}/functions/f/nope", True),
        ("PATCH", f"{API}/functions", True),
        ("POST", f"{API}/functions/f", True),
        ("GET", "/nope", False),
        ("GET", f"{API}/functions/", True),
        ("GET", "/2016-08-15/services", False),
    ],
    ids=lambda v: v if isinstance(v, str) else ("signed" if v else "unsigned"),
)
async def test_unknown_path_is_path_not_supported(
    shared_stack: Stack, fc: FcClient, method: str, path: str, signed: bool
) -> None:
    if signed:
        response = await fc.request(method, path.removeprefix(API), json={} if method in ("POST", "PATCH") else None)
    else:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{shared_stack.gateway_port}") as http:
            response = await http.request(method, path)
    assert_fc_error(response, 404, "PathNotSupported", path)
