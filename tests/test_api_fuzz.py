"""Property-based fuzzing of the API (schemathesis, from the OpenAPI document the gateway serves).

Every generated request is signed as a client would sign it (so it gets past the guard and
reaches the routes' own checks) and sent to a real gateway of a real system. Whatever it holds,
the answer must not be a 5xx: bad input is a 4xx.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from shared.acs3 import sign_request
from shared.devstack import Stack
from tests.fc_client import API, zip_code
from tests.integration_fixtures import ACCESS_KEY_ID, ACCESS_KEY_SECRET, new_stack

pytestmark = pytest.mark.timeout(600)

# `make test` keeps to a few examples per operation (CI's time limit); `make fuzz` runs many more.
EXAMPLES_PER_OPERATION = int(os.environ.get("TASKMODE_FUZZ_EXAMPLES", "12"))
EXISTING = "fuzzed"
SIGNATURE_REFUSALS: list[str] = []


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = new_stack(tmp_path_factory.mktemp("fuzz"))
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def served_schema(fuzz_stack: Stack) -> Any:
    return schemathesis.openapi.from_url(f"http://127.0.0.1:{fuzz_stack.gateway_port}/openapi.json")


@pytest.fixture(scope="module")
def http(fuzz_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{fuzz_stack.gateway_port}", timeout=60) as client:
        yield client


def _body(kwargs: dict[str, Any]) -> bytes:
    if "json" in kwargs:
        return json.dumps(kwargs.pop("json")).encode()
    data = kwargs.pop("data", None)
    if data is None:
        return b""
    return data if isinstance(data, bytes) else str(data).encode()


def send_signed(http: httpx.Client, case: schemathesis.Case) -> httpx.Response:
    kwargs = case.as_transport_kwargs(base_url=str(http.base_url))
    body = _body(kwargs)
    url = urlsplit(kwargs["url"])
    params = {str(k): str(v) for k, v in (kwargs.get("params") or {}).items() if not isinstance(v, list)}
    headers = {str(k): str(v) for k, v in (kwargs.get("headers") or {}).items()
               if k.lower() not in ("authorization", "host", "content-length")}
    headers["host"] = url.netloc
    headers.update(sign_request(method=kwargs["method"], path=url.path, query=params, headers=headers, body=body,
                                access_key_id=ACCESS_KEY_ID, access_key_secret=ACCESS_KEY_SECRET))
    request = http.build_request(kwargs["method"], url.path, params=params, headers=headers, content=body)
    request.url = request.url.copy_with(raw_path=(url.path + ("?" + request.url.query.decode() if request.url.query else "")).encode())
    response = http.send(request, stream=True)
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        response.close()  # a watch (server-sent events) runs until its task ends: its status is the answer
    else:
        response.read()
    return response


def _signed(http: httpx.Client, method: str, path: str, body: bytes = b"") -> httpx.Response:
    headers = {"host": http.base_url.netloc.decode(), "content-type": "application/json"}
    headers.update(sign_request(method=method, path=path, query={}, headers=headers, body=body,
                                access_key_id=ACCESS_KEY_ID, access_key_secret=ACCESS_KEY_SECRET))
    return http.request(method, path, headers=headers, content=body)


def test_no_request_gets_a_server_error(served_schema: Any, http: httpx.Client) -> None:
    # One function that exists, so that generated requests also reach the code past "not found".
    create = {"functionName": EXISTING, "runtime": "python3.10", "handler": "index.handler", "timeout": 5,
              "code": {"zipFile": zip_code({"index.py": "def handler(event, context):\n    return event\n"})}}
    assert _signed(http, "POST", f"{API}/functions", json.dumps(create).encode()).status_code == 200
    tried: dict[str, int] = {}
    for result in served_schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        variants: list[tuple[GenerationMode, dict[str, str]]] = [(GenerationMode.POSITIVE, {}),
                                                                 (GenerationMode.NEGATIVE, {})]
        if "{function_name}" in operation.path:
            variants.append((GenerationMode.POSITIVE, {"function_name": EXISTING}))
        for mode, pinned in variants:

            @given(case=operation.as_strategy(mode, path_parameters=pinned or None))
            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def no_server_error(case: schemathesis.Case) -> None:
                response = send_signed(http, case)
                tried[label] = tried.get(label, 0) + 1
                assert response.status_code < 500, \
                    f"{case.method} {case.formatted_path} {case.query}: {response.status_code} {response.text[:300]}"
                if response.status_code == 403 and "SignatureNotMatch" in response.text:
                    SIGNATURE_REFUSALS.append(f"{label}: {case.formatted_path} {case.query}")

            try:
                no_server_error()
            except Unsatisfiable:
                if mode is not GenerationMode.NEGATIVE:
                    raise  # (an operation without parameters has nothing to make invalid)
    assert len(tried) >= 10, tried  # every route of the API was exercised
    # The fuzzing reached the routes: few requests were lost to a signing mismatch.
    assert len(SIGNATURE_REFUSALS) <= sum(tried.values()) // 10, SIGNATURE_REFUSALS[:5]
