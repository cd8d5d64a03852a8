"""FC 3.0 fidelity through the official SDK: versions, aliases, qualifiers, function identity,
every Function field, GetFunctionCode, Node.js, per-invocation logs (one shared stack)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
import uuid
import zipfile
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import httpx
import pytest
from alibabacloud_fc20230330 import models as fc
from alibabacloud_fc20230330.client import Client
from alibabacloud_tea_util.models import RuntimeOptions
from Tea.exceptions import TeaException

from shared.devstack import Stack
from shared.function_fields import crc64
from tests.fc_client import FcClient, zip_code
from tests.integration_fixtures import HANDLERS, client_for
from tests.test_sdk import sdk_client

pytestmark = pytest.mark.timeout(180)

T = TypeVar("T")

VERSIONED = '''
import os
def handler(event, context):
    return os.environ["V"]
'''

NODE = '''
exports.handler = async (event, context) => {
  console.log("hello from node", context.requestId);
  return "node:" + event.toString();
};
exports.callback = (event, context, callback) => {
  callback(null, {got: event.toString(), task: context.taskId});
};
exports.fail = async (event) => {
  throw new TypeError("bad node " + event.toString());
};
'''

PRINTING = '''
import logging
def handler(event, context):
    print("printed", event.decode())
    logging.getLogger("user").warning("logged %s", context.request_id)
    return "done"
def fail(event, context):
    print("about to fail")
    raise ValueError("python boom")
'''


@pytest.fixture
async def raw(shared_stack: Stack) -> AsyncIterator[FcClient]:
    """A raw signed HTTP client (named so as not to shadow the SDK's models, `fc`)."""
    client = client_for(shared_stack)
    try:
        yield client
    finally:
        await client.close()


def eventually(probe: Callable[[], T | None], *, deadline_s: float = 60, what: str = "condition") -> T:
    """Poll `probe` until it returns something, or fail at the deadline (the machine is shared)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        found = probe()
        if found is not None:
            return found
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached in {deadline_s}s")


def task_in(client: Client, name: str, task_id: str, statuses: set[str], **query: Any) -> fc.AsyncTask:
    def probe() -> fc.AsyncTask | None:
        task = client.get_async_task(name, task_id, fc.GetAsyncTaskRequest(**query)).body
        return task if task.status in statuses else None
    return eventually(probe, what=f"{task_id} in {statuses}")


def create(client: Client, name: str, files: dict[str, str], **fields: Any) -> fc.Function:
    fields.setdefault("runtime", "python3.10")
    fields.setdefault("handler", "index.handler")
    return client.create_function(fc.CreateFunctionRequest(body=fc.CreateFunctionInput(
        function_name=name, timeout=30, code=fc.InputCodeLocation(zip_file=zip_code(files)), **fields,
    ))).body


def invoke(client: Client, name: str, payload: bytes, *, qualifier: str | None = None, task_id: str | None = None,
           log_tail: bool = False, delay_s: int | None = None) -> Any:
    headers = fc.InvokeFunctionHeaders(
        x_fc_invocation_type="Async" if task_id else "Sync", x_fc_async_task_id=task_id,
        x_fc_log_type="Tail" if log_tail else None,
        common_headers={"x-fc-async-delay": str(delay_s)} if delay_s is not None else {},
    )
    return client.invoke_function_with_options(
        name, fc.InvokeFunctionRequest(body=payload, qualifier=qualifier), headers, RuntimeOptions())


def fc_error(call: Callable[[], object]) -> TeaException:
    with pytest.raises(TeaException) as caught:
        call()
    return caught.value


def new_name() -> str:
    return f"fid_{uuid.uuid4().hex[:10]}"


def test_versions_and_a_weighted_alias(shared_stack: Stack) -> None:
    client = sdk_client(shared_stack)
    name = new_name()
    create(client, name, {"index.py": VERSIONED}, environment_variables={"V": "one"})
    v1 = client.publish_function_version(name, fc.PublishFunctionVersionRequest(
        body=fc.PublishVersionInput(description="first"))).body
    client.update_function(name, fc.UpdateFunctionRequest(body=fc.UpdateFunctionInput(environment_variables={"V": "two"})))
    v2 = client.publish_function_version(name, fc.PublishFunctionVersionRequest(body=fc.PublishVersionInput())).body
    assert (v1.version_id, v1.description, v2.version_id) == ("1", "first", "2")
    client.update_function(name, fc.UpdateFunctionRequest(body=fc.UpdateFunctionInput(environment_variables={"V": "latest"})))

    listed = client.list_function_versions(name, fc.ListFunctionVersionsRequest()).body
    assert [v.version_id for v in listed.versions] == ["2", "1"]  # FC's default: newest first
    # A version is a snapshot: its configuration is what it was when published.
    assert client.get_function(name, fc.GetFunctionRequest(qualifier="1")).body.environment_variables == {"V": "one"}
    assert invoke(client, name, b"", qualifier="2").body.read() == b"two"
    assert invoke(client, name, b"").body.read() == b"latest"

    alias = client.create_alias(name, fc.CreateAliasRequest(body=fc.CreateAliasInput(
        alias_name="prod", version_id="1", description="canary", additional_version_weight={"2": 0.3}))).body
    assert (alias.alias_name, alias.version_id, alias.additional_version_weight) == ("prod", "1", {"2": 0.3})

    # 200 calls with 30% to version 2: binomial sd 6.5 calls, so 4 sd either side is 0.17-0.43.
    calls = 200
    to_two = sum(invoke(client, name, b"", qualifier="prod").body.read() == b"two" for _ in range(calls))
    assert 0.17 <= to_two / calls <= 0.43, to_two

    # Deleting a version an alias routes to is refused, and nothing changes.
    refused = fc_error(lambda: client.delete_function_version(name, "2"))
    assert (refused.status_code, refused.code) == (409, "VersionInUse")
    client.update_alias(name, "prod", fc.UpdateAliasRequest(body=fc.UpdateAliasInput(
        version_id="2", additional_version_weight={})))
    assert client.get_alias(name, "prod").body.version_id == "2"
    client.delete_function_version(name, "1")
    assert [v.version_id for v in client.list_function_versions(name, fc.ListFunctionVersionsRequest()).body.versions] == ["2"]
    assert [a.alias_name for a in client.list_aliases(name, fc.ListAliasesRequest()).body.aliases] == ["prod"]

    # An async task by alias records its qualifier and the version that ran it.
    invoke(client, name, b"", qualifier="prod", task_id="by_alias")
    task = task_in(client, name, "by_alias", {"Succeeded"})
    assert (task.qualifier, task.return_payload) == ("prod", "two")
    raw = client.get_async_task_with_options(name, "by_alias", fc.GetAsyncTaskRequest(), {}, RuntimeOptions())
    assert raw.body.to_map()["qualifier"] == "prod"
    assert json.loads(next(e.event_detail for e in task.events if e.status == "Running"))["functionVersion"] == "2"

    # Unknown qualifiers are 404s in FC's format, wherever they appear.
    for call in (lambda: invoke(client, name, b"", qualifier="staging"),
                 lambda: invoke(client, name, b"", qualifier="9", task_id="never"),
                 lambda: client.list_async_tasks(name, fc.ListAsyncTasksRequest(qualifier="staging")),
                 lambda: client.get_async_invoke_config(name, fc.GetAsyncInvokeConfigRequest(qualifier="9"))):
        error = fc_error(call)
        assert error.status_code == 404 and error.code in ("AliasNotFound", "VersionNotFound")
    client.delete_alias(name, "prod")
    client.delete_function(name)


def test_async_config_is_kept_per_qualifier(shared_stack: Stack) -> None:
    client = sdk_client(shared_stack)
    name = new_name()
    create(client, name, {"index.py": HANDLERS})
    client.publish_function_version(name, fc.PublishFunctionVersionRequest(body=fc.PublishVersionInput()))
    client.create_alias(name, fc.CreateAliasRequest(body=fc.CreateAliasInput(alias_name="prod", version_id="1")))
    client.put_async_invoke_config(name, fc.PutAsyncInvokeConfigRequest(
        qualifier="prod", body=fc.PutAsyncInvokeConfigInput(max_async_retry_attempts=0, async_task=True)))
    client.put_async_invoke_config(name, fc.PutAsyncInvokeConfigRequest(
        body=fc.PutAsyncInvokeConfigInput(max_async_retry_attempts=5)))

    prod = client.get_async_invoke_config(name, fc.GetAsyncInvokeConfigRequest(qualifier="prod")).body
    latest = client.get_async_invoke_config(name, fc.GetAsyncInvokeConfigRequest()).body
    assert (prod.max_async_retry_attempts, latest.max_async_retry_attempts) == (0, 5)
    assert prod.function_arn.endswith(f"functions/{name}:prod") and latest.function_arn.endswith(f"functions/{name}")
    configs = client.list_async_invoke_configs(fc.ListAsyncInvokeConfigsRequest(function_name=name)).body.configs
    assert sorted(c.max_async_retry_attempts for c in configs) == [0, 5]

    # Each task takes the config of its own qualifier (its Enqueued event records the budget).
    invoke(client, name, b"", qualifier="prod", task_id="on_prod", delay_s=600)
    invoke(client, name, b"", task_id="on_latest", delay_s=600)
    budgets = {}
    for task_id in ("on_prod", "on_latest"):
        task = client.get_async_task(name, task_id, fc.GetAsyncTaskRequest()).body
        budgets[task_id] = json.loads(task.events[0].event_detail)["maxRetries"]
    assert budgets == {"on_prod": 0, "on_latest": 5}

    def listed(qualifier: str | None) -> list[str] | None:
        tasks = client.list_async_tasks(name, fc.ListAsyncTasksRequest(qualifier=qualifier)).body.tasks
        ids = sorted(t.task_id for t in tasks)
        return ids if len(ids) == (2 if qualifier is None else 1) else None
    assert eventually(lambda: listed("prod"), what="prod listing") == ["on_prod"]
    assert eventually(lambda: listed("LATEST"), what="LATEST listing") == ["on_latest"]
    assert eventually(lambda: listed(None), what="full listing") == ["on_latest", "on_prod"]
    assert fc_error(lambda: client.get_async_task(name, "on_latest", fc.GetAsyncTaskRequest(qualifier="prod"))).code == "AsyncTaskNotFound"
    client.stop_async_task(name, "on_prod", fc.StopAsyncTaskRequest(qualifier="prod"))

    client.delete_async_invoke_config(name, fc.DeleteAsyncInvokeConfigRequest(qualifier="prod"))
    assert fc_error(lambda: client.get_async_invoke_config(name, fc.GetAsyncInvokeConfigRequest(qualifier="prod"))).code == "AsyncConfigNotFound"
    assert client.get_async_invoke_config(name, fc.GetAsyncInvokeConfigRequest()).body.max_async_retry_attempts == 5
    client.delete_function(name)


def test_a_pending_task_of_a_deleted_function_ends_invalid_after_recreate(shared_stack: Stack) -> None:
    client = sdk_client(shared_stack)
    name = new_name()
    create(client, name, {"index.py": HANDLERS})
    invoke(client, name, b"old", task_id="pending", delay_s=3)
    client.delete_function(name)
    assert fc_error(lambda: client.get_async_task(name, "pending", fc.GetAsyncTaskRequest())).code == "FunctionNotFound"
    assert fc_error(lambda: client.list_async_tasks(name, fc.ListAsyncTasksRequest())).code == "FunctionNotFound"
    create(client, name, {"index.py": HANDLERS})  # same name, a new function

    task = task_in(client, name, "pending", {"Invalid", "Succeeded", "Failed"})
    assert task.status == "Invalid", task.task_error_message
    assert "created since" in (task.task_error_message or "")
    # Its id stays taken for the retention period, also for the new function.
    assert fc_error(lambda: invoke(client, name, b"", task_id="pending")).code == "TaskAlreadyExists"
    client.delete_function(name)


def test_get_function_code_downloads_the_uploaded_zip(shared_stack: Stack) -> None:
    client = sdk_client(shared_stack)
    name = new_name()
    code = zip_code({"index.py": HANDLERS, "data/readme.txt": "x" * 1000})
    client.create_function(fc.CreateFunctionRequest(body=fc.CreateFunctionInput(
        function_name=name, runtime="python3.12", handler="index.handler", code=fc.InputCodeLocation(zip_file=code))))
    uploaded = base64.b64decode(code)

    answer = client.get_function_code(name, fc.GetFunctionCodeRequest()).body
    assert answer.checksum == crc64(uploaded) == client.get_function(name, fc.GetFunctionRequest()).body.code_checksum
    downloaded = httpx.get(answer.url, timeout=30)
    assert downloaded.status_code == 200 and downloaded.content == uploaded

    tampered = httpx.get(answer.url.replace("signature=", "signature=0"), timeout=30)
    assert tampered.status_code == 403 and tampered.json()["Code"] == "AccessDenied"
    expired = httpx.get(answer.url.replace("expires=", "expires=1"), timeout=30)
    assert expired.status_code == 403
    for garbled in (answer.url.replace("expires=", "expires=%C2%B9"), answer.url.replace("signature=", "signature=%C3%A9")):
        refused = httpx.get(garbled, timeout=30)  # non-ASCII: refused like any bad signature, never a 500
        assert refused.status_code == 403 and refused.json()["Code"] == "AccessDenied", refused.text
    client.delete_function(name)


def test_every_function_field_round_trips(shared_stack: Stack) -> None:
    client = sdk_client(shared_stack)
    name = new_name()
    vpc = fc.VPCConfig(vpc_id="vpc-1", v_switch_ids=["vsw-1", "vsw-2"], security_group_id="sg-1")
    logs = fc.LogConfig(project="proj", logstore="store", enable_request_metrics=True, log_begin_rule="DefaultRegex")
    tags = [fc.Tag(key="team", value="search"), fc.Tag(key="env", value="test")]
    created = create(client, name, {"index.py": HANDLERS}, vpc_config=vpc, log_config=logs, tags=tags,
                     role="acs:ram::1:role/fc", layers=["acs:fc:local:1:layers/numpy/versions/1"],
                     internet_access=False, disk_size=512, instance_isolation_mode="SHARE",
                     nas_config=fc.NASConfig(group_id=1, user_id=1, mount_points=[]))
    for function in (created, client.get_function(name, fc.GetFunctionRequest()).body):
        assert function.vpc_config.to_map() == vpc.to_map()
        assert function.log_config.to_map() == logs.to_map()
        assert [t.to_map() for t in function.tags] == [t.to_map() for t in tags]
        assert (function.role, function.internet_access) == ("acs:ram::1:role/fc", False)
        assert [layer.arn for layer in function.layers] == ["acs:fc:local:1:layers/numpy/versions/1"]
        assert function.instance_isolation_mode == "SHARE" and function.nas_config.group_id == 1

    # An update changes what it names and keeps the rest.
    updated = client.update_function(name, fc.UpdateFunctionRequest(body=fc.UpdateFunctionInput(
        log_config=fc.LogConfig(project="other", logstore="store")))).body
    assert updated.log_config.project == "other" and updated.vpc_config.to_map() == vpc.to_map()

    def names(**filters: Any) -> list[str]:
        return [f.function_name for f in client.list_functions(fc.ListFunctionsRequest(prefix="fid_", limit=100, **filters)).body.functions]
    assert name in names(tags=[fc.Tag(key="team", value="search")])
    assert name not in names(tags=[fc.Tag(key="team", value="ads")])
    assert name in names(runtime="python3.10") and name not in names(runtime="nodejs20")

    error = fc_error(lambda: create(client, new_name(), {"index.py": HANDLERS}, runtime="custom-container"))
    assert error.status_code == 400 and "container" in error.message
    missing = new_name()
    error = fc_error(lambda: create(client, missing, {"index.py": HANDLERS}, handler="main.handler"))
    assert error.status_code == 400 and "main.py" in error.message
    assert fc_error(lambda: client.get_function(missing, fc.GetFunctionRequest())).code == "FunctionNotFound"
    client.delete_function(name)


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed (see README: Node.js runtimes)")
def test_nodejs_functions_run_sync_and_async_with_logs(shared_stack: Stack) -> None:
    client = sdk_client(shared_stack)
    name = new_name()
    create(client, name, {"index.js": NODE}, runtime="nodejs20")

    sync = invoke(client, name, b"sync", log_tail=True)
    assert sync.body.read() == b"node:sync"
    tail = base64.b64decode(sync.headers["x-fc-log-result"]).decode()
    assert "hello from node" in tail and "FC Invoke End RequestId" in tail

    invoke(client, name, b"later", task_id="node_async")
    task = task_in(client, name, "node_async", {"Succeeded", "Failed"})
    assert (task.status, task.return_payload) == ("Succeeded", "node:later")

    client.update_function(name, fc.UpdateFunctionRequest(body=fc.UpdateFunctionInput(handler="index.callback", runtime="nodejs18")))
    assert json.loads(invoke(client, name, b"cb").body.read()) == {"got": "cb", "task": ""}

    client.update_function(name, fc.UpdateFunctionRequest(body=fc.UpdateFunctionInput(handler="index.fail")))
    # An executor sees the update through its watch of the catalog, a moment later.
    deadline = time.monotonic() + 30
    failed = invoke(client, name, b"x")
    while "x-fc-error-type" not in failed.headers and time.monotonic() < deadline:
        time.sleep(0.1)  # polling for the update to reach the executor, with a deadline
        failed = invoke(client, name, b"x")
    assert failed.headers["x-fc-error-type"] == "UnhandledInvocationError"
    error = json.loads(failed.body.read())
    assert (error["errorType"], error["errorMessage"]) == ("TypeError", "bad node x")
    assert error["stackTrace"] and all("/code/index.js" in frame for frame in error["stackTrace"])
    assert "node_worker" not in json.dumps(error)

    refused = fc_error(lambda: client.update_function(name, fc.UpdateFunctionRequest(
        body=fc.UpdateFunctionInput(handler="main.handler"))))
    assert refused.status_code == 400 and "main.js" in refused.message
    client.delete_function(name)


async def test_python_logs_tail_task_logs_and_user_only_stack_traces(shared_stack: Stack, raw: FcClient) -> None:
    client = sdk_client(shared_stack)
    name = new_name()
    create(client, name, {"index.py": PRINTING})

    sync = invoke(client, name, b"sync-call", log_tail=True)
    tail = base64.b64decode(sync.headers["x-fc-log-result"]).decode()
    request_id = sync.headers["x-fc-request-id"]
    assert "printed sync-call" in tail and f"logged {request_id}" in tail
    assert tail.startswith(f"FC Invoke Start RequestId: {request_id}")

    invoke(client, name, b"async-call", task_id="logged")
    task_in(client, name, "logged", {"Succeeded"})
    logs = (await raw.request("GET", f"/functions/{name}/async-tasks/logged/logs")).json()
    assert logs["taskId"] == "logged" and [entry["attempt"] for entry in logs["logs"]] == [0]
    assert "printed async-call" in logs["logs"][0]["content"] and logs["logs"][0]["requestId"]

    client.update_function(name, fc.UpdateFunctionRequest(body=fc.UpdateFunctionInput(handler="index.fail")))
    client.put_async_invoke_config(name, fc.PutAsyncInvokeConfigRequest(
        body=fc.PutAsyncInvokeConfigInput(max_async_retry_attempts=1)))
    invoke(client, name, b"", task_id="fails")
    task_in(client, name, "fails", {"Failed"})
    attempts = (await raw.request("GET", f"/functions/{name}/async-tasks/fails/logs")).json()["logs"]
    assert [entry["attempt"] for entry in attempts] == [0, 1]
    assert all("about to fail" in entry["content"] and "python boom" in entry["content"] for entry in attempts)
    assert "services/executor" not in json.dumps(attempts)

    error = json.loads(invoke(client, name, b"").body.read())
    assert error["stackTrace"] and all(frame.lstrip().startswith('File "/code/index.py"') for frame in error["stackTrace"])
    assert "services/executor" not in json.dumps(error)

    missing = await raw.request("GET", f"/functions/{name}/async-tasks/nope/logs")
    assert missing.status_code == 404 and missing.json()["Code"] == "AsyncTaskNotFound"
    client.delete_function(name)


async def test_request_ids_and_fc2_task_id_header(raw: FcClient, fn_name: str) -> None:
    assert (await raw.create_function(fn_name, code={"index.py": HANDLERS})).status_code == 200
    request_id = str(uuid.uuid4()).replace("a", "1", 1)
    request_id = "7" + request_id[1:]  # a UUID that starts with a digit
    accepted = await raw.invoke_async(fn_name, b"x", headers={"x-fc-request-id": request_id, "x-fc-async-delay": "600"})
    assert accepted.status_code == 202, accepted.text
    assert accepted.headers["x-fc-async-task-id"] == "_" + request_id
    assert accepted.headers["x-fc-request-id"] == request_id

    fc2 = await raw.invoke_async(fn_name, b"y", headers={"x-fc-stateful-async-invocation-id": "fc2_task",
                                                          "x-fc-async-delay": "600"})
    assert fc2.status_code == 202
    assert fc2.headers["x-fc-async-task-id"] == fc2.headers["x-fc-stateful-async-invocation-id"] == "fc2_task"
    assert (await raw.get_task(fn_name, "fc2_task")).json()["taskId"] == "fc2_task"
    bad = await raw.invoke_async(fn_name, b"z", headers={"x-fc-stateful-async-invocation-id": "9bad"})
    assert bad.status_code == 400 and "x-fc-stateful-async-invocation-id" in bad.json()["Message"]


async def test_bad_input_on_the_new_endpoints_gets_fc_errors_and_writes_nothing(raw: FcClient, fn_name: str) -> None:
    assert (await raw.create_function(fn_name, code={"index.py": HANDLERS})).status_code == 200

    async def expect(method: str, path: str, status: int, code: str, **kwargs: Any) -> None:
        response = await raw.request(method, path, **kwargs)
        assert response.status_code == status, (path, response.text)
        body = response.json()
        assert body["Code"] == code and body["Message"] and body["RequestId"], body

    base = f"/functions/{fn_name}"
    await expect("POST", "/functions/nobody_here/versions", 404, "FunctionNotFound", json={})
    await expect("POST", f"{base}/versions", 400, "InvalidArgument", json={"description": 5})
    await expect("GET", f"{base}/versions", 400, "InvalidArgument", query={"direction": "SIDEWAYS"})
    await expect("GET", f"{base}/versions", 400, "InvalidNextToken", query={"nextToken": "garbage!"})
    await expect("DELETE", f"{base}/versions/1", 404, "VersionNotFound")
    await expect("DELETE", f"{base}/versions/abc", 404, "VersionNotFound")
    await expect("POST", f"{base}/aliases", 404, "VersionNotFound", json={"aliasName": "prod", "versionId": "1"})
    assert (await raw.request("POST", f"{base}/versions", json={})).status_code == 200
    await expect("POST", f"{base}/aliases", 400, "InvalidArgument", json={"aliasName": "1abc", "versionId": "1"})
    await expect("POST", f"{base}/aliases", 400, "InvalidArgument", json={"aliasName": "LATEST", "versionId": "1"})
    await expect("POST", f"{base}/aliases", 400, "InvalidArgument", json={"aliasName": "prod"})
    await expect("POST", f"{base}/aliases", 400, "InvalidArgument",
                 json={"aliasName": "prod", "versionId": "1", "additionalVersionWeight": {"2": 1.5}})
    await expect("POST", f"{base}/aliases", 404, "VersionNotFound",
                 json={"aliasName": "prod", "versionId": "1", "additionalVersionWeight": {"7": 0.5}})
    await expect("GET", f"{base}/aliases/prod", 404, "AliasNotFound")  # none of the above was written
    assert (await raw.request("POST", f"{base}/aliases", json={"aliasName": "prod", "versionId": "1"})).status_code == 200
    await expect("POST", f"{base}/aliases", 409, "AliasAlreadyExists", json={"aliasName": "prod", "versionId": "1"})
    await expect("PUT", f"{base}/aliases/prod", 404, "VersionNotFound", json={"versionId": "3"})
    await expect("PUT", f"{base}/aliases/nope", 404, "AliasNotFound", json={"versionId": "1"})
    await expect("DELETE", f"{base}/aliases/nope", 404, "AliasNotFound")
    assert (await raw.request("GET", f"{base}/aliases/prod")).json()["versionId"] == "1"
    await expect("GET", f"{base}/code", 404, "AliasNotFound", query={"qualifier": "staging"})
    await expect("GET", f"{base}/code", 400, "InvalidArgument", query={"qualifier": "a b"})
    await expect("PUT", f"{base}/async-invoke-config", 404, "VersionNotFound", json={}, query={"qualifier": "4"})
    await expect("GET", f"{base}/async-tasks/t1/logs", 404, "AsyncTaskNotFound")
    await expect("GET", "/functions/nobody_here/async-tasks/t1/logs", 404, "FunctionNotFound")
    await expect("GET", "/functions", 400, "InvalidArgument", query={"tags": "not json"})
    await expect("POST", "/functions", 400, "InvalidArgument", json={
        "functionName": "gpu_fn", "runtime": "python3.10", "handler": "index.handler",
        "code": {"zipFile": zip_code({"index.py": HANDLERS})}, "gpuConfig": {"gpuType": "fc.gpu.tesla.1"}})
    await expect("POST", "/functions", 400, "InvalidArgument", json={
        "functionName": "sum_fn", "runtime": "python3.10", "handler": "index.handler",
        "code": {"zipFile": zip_code({"index.py": HANDLERS}), "checksum": "123"}})
    for never_written in ("gpu_fn", "sum_fn"):
        await expect("GET", f"/functions/{never_written}", 404, "FunctionNotFound")


def test_crc64_matches_the_ecma_182_check_value() -> None:
    # CRC-64/XZ's published check value (the CRC of "123456789"); OSS and FC use this CRC.
    assert crc64(b"123456789") == str(0x995DC9BBDF1939FA)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a", "b")
    assert crc64(buf.getvalue()).isdigit()


def test_the_end_of_invocation_mark_is_the_same_on_both_sides() -> None:
    # The workers import nothing of ours, so the mark is spelled three times; keep them equal.
    from pathlib import Path

    from services.executor import instance, node_instance, python_worker

    assert instance.END_OF_INVOCATION.decode() == python_worker.END_OF_INVOCATION
    worker_js = node_instance.WORKER_FILE.read_text()
    assert "const END_OF_INVOCATION = '\\x1etaskmode-invocation-end\\x1e';" in worker_js
    assert instance.END_OF_INVOCATION == b"\x1etaskmode-invocation-end\x1e"


async def test_version_listing_pages_both_ways_and_dies_with_its_function(raw: FcClient, fn_name: str) -> None:
    assert (await raw.create_function(fn_name, code={"index.py": HANDLERS})).status_code == 200
    for description in ("a", "b", "c"):
        assert (await raw.request("POST", f"/functions/{fn_name}/versions", json={"description": description})).status_code == 200

    async def ids(**query: str) -> tuple[list[str], str]:
        page = (await raw.request("GET", f"/functions/{fn_name}/versions", query=query)).json()
        return [v["versionId"] for v in page["versions"]], page["nextToken"]

    first, token = await ids(limit="2")
    assert first == ["3", "2"] and token
    assert await ids(limit="2", nextToken=token) == (["1"], "")
    first, token = await ids(limit="2", direction="FORWARD")
    assert first == ["1", "2"]
    assert await ids(limit="2", direction="FORWARD", nextToken=token) == (["3"], "")

    assert (await raw.request("DELETE", f"/functions/{fn_name}")).status_code == 204
    assert (await raw.create_function(fn_name, code={"index.py": HANDLERS})).status_code == 200
    assert await ids() == ([], "")  # a new function: no versions, and ids start again at 1
    published = await raw.request("POST", f"/functions/{fn_name}/versions", json={})
    assert published.json()["versionId"] == "1"
