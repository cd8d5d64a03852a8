"""The whole flow driven by the official FC 3.0 SDK (alibabacloud-fc20230330), signatures on."""

from __future__ import annotations

import time

import pytest
from alibabacloud_fc20230330 import models as fc_models
from alibabacloud_fc20230330.client import Client
from alibabacloud_tea_openapi import models as open_api_models
from alibabacloud_tea_util.models import RuntimeOptions
from Tea.exceptions import TeaException

from shared.devstack import Stack
from tests.fc_client import zip_code
from tests.integration_fixtures import ACCESS_KEY_ID, ACCESS_KEY_SECRET, HANDLERS

pytestmark = pytest.mark.timeout(90)


def sdk_client(stack: Stack, *, secret: str = ACCESS_KEY_SECRET) -> Client:
    return Client(open_api_models.Config(
        access_key_id=ACCESS_KEY_ID, access_key_secret=secret,
        endpoint=f"127.0.0.1:{stack.gateway_port}", protocol="http", read_timeout=30000,
    ))


def wait_status(client: Client, name: str, task_id: str, wanted: set[str], deadline_s: float = 30) -> fc_models.AsyncTask:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        task = client.get_async_task(name, task_id, fc_models.GetAsyncTaskRequest()).body
        if task.status in wanted:
            return task
        time.sleep(0.05)
    raise AssertionError(f"{task_id} never reached {wanted}")


def test_full_flow_through_the_official_sdk(shared_stack: Stack) -> None:
    client = sdk_client(shared_stack)
    name = "sdk_fn"
    created = client.create_function(fc_models.CreateFunctionRequest(body=fc_models.CreateFunctionInput(
        function_name=name, runtime="python3.10", handler="index.handler", timeout=30, memory_size=128,
        code=fc_models.InputCodeLocation(zip_file=zip_code({"index.py": HANDLERS})),
    ))).body
    assert created.function_name == name and created.code_checksum
    assert client.get_function(name, fc_models.GetFunctionRequest()).body.handler == "index.handler"
    config = client.put_async_invoke_config(name, fc_models.PutAsyncInvokeConfigRequest(
        body=fc_models.PutAsyncInvokeConfigInput(async_task=True, max_async_retry_attempts=1)
    )).body
    assert config.async_task is True and config.max_async_retry_attempts == 1

    headers = fc_models.InvokeFunctionHeaders(x_fc_invocation_type="Async", x_fc_async_task_id="sdk_task_1")
    response = client.invoke_function_with_options(
        name, fc_models.InvokeFunctionRequest(body=b"from sdk"), headers,
        RuntimeOptions(),
    )
    assert response.status_code == 202

    task = wait_status(client, name, "sdk_task_1", {"Succeeded"})
    assert [e.status for e in task.events] == ["Enqueued", "Processed", "Running", "Succeeded"]
    assert task.return_payload == "from sdk"

    # ListAsyncTasks reads the projection, which may trail GetAsyncTask by a batch.
    end = time.monotonic() + 10
    while True:
        page = client.list_async_tasks(name, fc_models.ListAsyncTasksRequest(
            include_payload=True, limit=10, status="Succeeded", sort_order_by_time="desc")).body
        if page.tasks or time.monotonic() > end:
            break
        time.sleep(0.05)
    assert [t.task_id for t in page.tasks] == ["sdk_task_1"]
    assert page.tasks[0].task_payload == "from sdk"

    # The SDK has no field for the delay header: it goes as a common header.
    slow = fc_models.InvokeFunctionHeaders(x_fc_invocation_type="Async", x_fc_async_task_id="sdk_task_2",
                                           common_headers={"x-fc-async-delay": "60"})
    client.invoke_function_with_options(
        name, fc_models.InvokeFunctionRequest(body=b"later"), slow,
        RuntimeOptions(),
    )
    client.stop_async_task(name, "sdk_task_2", fc_models.StopAsyncTaskRequest())
    assert wait_status(client, name, "sdk_task_2", {"Stopped"}).status == "Stopped"

    with pytest.raises(TeaException) as duplicate:
        client.invoke_function_with_options(
            name, fc_models.InvokeFunctionRequest(body=b"again"),
            fc_models.InvokeFunctionHeaders(x_fc_invocation_type="Async", x_fc_async_task_id="sdk_task_1"),
            RuntimeOptions(),
        )
    assert duplicate.value.code == "TaskAlreadyExists"

    configs = client.list_async_invoke_configs(fc_models.ListAsyncInvokeConfigsRequest(function_name=name)).body
    assert [c.function_arn.rsplit("/", 1)[-1] for c in configs.configs] == [name]
    client.delete_function(name)
    with pytest.raises(TeaException) as gone:
        client.get_function(name, fc_models.GetFunctionRequest())
    assert gone.value.code == "FunctionNotFound"


def test_wrong_secret_is_refused_by_signature_check(shared_stack: Stack) -> None:
    client = sdk_client(shared_stack, secret="not-the-secret")
    with pytest.raises(TeaException) as refused:
        client.list_functions(fc_models.ListFunctionsRequest())
    assert refused.value.code == "SignatureNotMatch"
    assert refused.value.status_code == 403
