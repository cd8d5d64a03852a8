"""ACS3-HMAC-SHA256: the fc-notes test vector, interop with the real SDK signer, typed failures."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
import yarl
from alibabacloud_fc20230330 import models as fc_models
from alibabacloud_fc20230330.client import Client as FcClient
from alibabacloud_tea_openapi import utils_models as openapi_models
from alibabacloud_tea_openapi.utils import Utils
from darabonba.core import DaraCore
from darabonba.exceptions import UnretryableException
from darabonba.request import DaraRequest
from darabonba.runtime import RuntimeOptions
from requests import PreparedRequest

from shared.acs3 import canonical_query, sign_request, verify_request
from shared.errors import (
    InvalidAccessKeyID,
    MissingRequiredHeader,
    RequestTimeTooSkewed,
    SignatureNotMatch,
)

AK, SECRET = "testAK", "testSecret"
SECRETS = {AK: SECRET, "otherAK": "otherSecret"}
EMPTY_SHA = hashlib.sha256(b"").hexdigest()
VECTOR_PATH = "/2023-03-30/functions/my-func/async-tasks"
VECTOR_QUERY = {"limit": "20", "includePayload": "True", "prefix": "job a"}
VECTOR_HEADERS = {
    "host": "fcv3.cn-hangzhou.aliyuncs.com",
    "x-acs-version": "2023-03-30",
    "x-acs-action": "ListAsyncTasks",
    "x-acs-date": "2024-01-01T00:00:00Z",
    "x-acs-signature-nonce": "nonce123",
    "accept": "application/json",
    "user-agent": "ua",
    "x-acs-content-sha256": EMPTY_SHA,
}
VECTOR_AUTH = (
    "ACS3-HMAC-SHA256 Credential=testAK,SignedHeaders=accept;host;user-agent;x-acs-action;"
    "x-acs-content-sha256;x-acs-date;x-acs-signature-nonce;x-acs-version,"
    "Signature=b8b9a2f7154962ce5f659e32d7c989cf2ae1d8ce2ec04ad03cad3b52386d0535"
)
VECTOR_NOW = datetime(2024, 1, 1, 0, 5, tzinfo=timezone.utc)


@dataclass
class Wire:
    """A request as the server sees it."""

    method: str
    raw_path: str
    raw_query: str
    headers: dict[str, str]
    body: bytes = b""
    extra: dict[str, str] = field(default_factory=dict)

    def verify(self, now: datetime, secrets: dict[str, str] = SECRETS) -> str:
        return verify_request(
            method=self.method,
            raw_path=self.raw_path,
            raw_query=self.raw_query,
            headers={**self.headers, **self.extra},
            body=self.body,
            secrets=secrets,
            now=now,
        )


def _vector_wire() -> Wire:
    headers = dict(VECTOR_HEADERS, Authorization=VECTOR_AUTH)
    return Wire("GET", VECTOR_PATH, urlencode(VECTOR_QUERY), headers)


def _body_bytes(body: Any) -> bytes:
    if body is None:
        return b""
    return body.encode("utf-8") if isinstance(body, str) else bytes(body)


def _wire_sync(req: DaraRequest) -> Wire:
    """What the SDK's sync transport (`DaraCore.do_action`, i.e. requests) puts on the wire."""
    prepared = PreparedRequest()
    prepared.prepare(method=req.method.upper(), url=DaraCore.compose_url(req), headers=req.headers)
    parts = urlsplit(prepared.url or "")
    headers = {k: str(v) for k, v in prepared.headers.items()}
    return Wire(prepared.method or "", parts.path, parts.query, headers, _body_bytes(req.body))


def _wire_async(req: DaraRequest) -> Wire:
    """What the async transport (aiohttp, which normalizes the URL with yarl) sends."""
    url = yarl.URL(DaraCore.compose_url(req))
    headers = {k: str(v) for k, v in req.headers.items()}
    return Wire(req.method.upper(), url.raw_path, url.raw_query_string, headers, _body_bytes(req.body))


# --- the fc-notes §1.12 test vector --------------------------------------------------------------


def test_vector_canonical_query() -> None:
    assert canonical_query(VECTOR_QUERY.items()) == "includePayload=True&limit=20&prefix=job%20a"


def test_vector_reproduced_by_sign_request() -> None:
    given = {k: v for k, v in VECTOR_HEADERS.items() if k != "x-acs-content-sha256"}
    added = sign_request(
        method="GET",
        path=VECTOR_PATH,
        query=VECTOR_QUERY,
        headers=given,
        body=b"",
        access_key_id=AK,
        access_key_secret=SECRET,
    )
    assert added == {"x-acs-content-sha256": EMPTY_SHA, "Authorization": VECTOR_AUTH}


def test_vector_matches_installed_sdk() -> None:
    req = DaraRequest()
    req.method, req.pathname = "GET", VECTOR_PATH
    req.query, req.headers = dict(VECTOR_QUERY), dict(VECTOR_HEADERS)
    assert Utils.get_authorization(req, "ACS3-HMAC-SHA256", EMPTY_SHA, AK, SECRET) == VECTOR_AUTH


def test_vector_accepted_by_verify_request() -> None:
    assert _vector_wire().verify(VECTOR_NOW) == AK


def test_sign_request_fills_date_and_nonce_and_round_trips() -> None:
    now = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
    body = b'{"a": 1}'
    headers = {"Host": "localhost:8080", "Content-Type": "application/json"}
    query = {"qualifier": "LATEST", "note": "a b/c+d~é", "blank": ""}
    added = sign_request(
        method="post",
        path="/2023-03-30/functions/f/invocations",
        query=query,
        headers=headers,
        body=body,
        access_key_id=AK,
        access_key_secret=SECRET,
        now=now,
    )
    assert added["x-acs-date"] == "2024-05-06T07:08:09Z"
    assert len(added["x-acs-signature-nonce"]) == 32
    assert "SignedHeaders=content-type;host;x-acs-content-sha256;x-acs-date;" in added["Authorization"]
    wire = Wire("POST", "/2023-03-30/functions/f/invocations", urlencode(query), {**headers, **added}, body)
    assert wire.verify(now + timedelta(seconds=30)) == AK


# --- requests signed by the real SDK -------------------------------------------------------------


def _sdk_signed_request() -> DaraRequest:
    """A request built and signed exactly like `Client.do_request` does, via the SDK's own signer."""
    body = json.dumps({"payload": "hello world", "n": [1, 2]}).encode("utf-8")
    req = DaraRequest()
    req.protocol, req.method, req.port = "HTTP", "POST", 80
    req.pathname = "/2023-03-30/functions/" + "my%20func" + "/invocations"
    req.query = Utils.query({"qualifier": "LATEST", "prefix": "job a+b/c", "includePayload": True})
    req.headers = {
        "host": "127.0.0.1:9000",
        "x-acs-version": "2023-03-30",
        "x-acs-action": "InvokeFunction",
        "user-agent": Utils.get_user_agent(None),
        "x-acs-date": Utils.get_timestamp(),
        "x-acs-signature-nonce": Utils.get_nonce(),
        "accept": "application/json",
        "x-fc-invocation-type": "Async",
        "x-fc-async-task-id": "task-001",
        "x-fc-async-delay": "5 ",  # trailing blanks: signed trimmed
        "content-type": "application/json; charset=utf-8",
    }
    req.body = body
    digest = Utils.hash(body, "ACS3-HMAC-SHA256").hex()
    req.headers["x-acs-content-sha256"] = digest
    req.headers["Authorization"] = Utils.get_authorization(req, "ACS3-HMAC-SHA256", digest, AK, SECRET)
    return req


@pytest.mark.parametrize("transport", [_wire_sync, _wire_async], ids=["requests", "aiohttp"])
def test_sdk_signer_accepted(transport: Any) -> None:
    wire = transport(_sdk_signed_request())
    assert "prefix=job+a%2Bb" in wire.raw_query  # sent form-encoded, signed as %20
    assert "includePayload=True" in wire.raw_query
    wire.extra = {"accept-encoding": "gzip, deflate", "content-length": str(len(wire.body))}
    assert wire.verify(datetime.now(timezone.utc)) == AK


class Captured(Exception):
    """Raised by the stubbed transport once the SDK has signed the request."""


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[DaraRequest]]:
    """Stop the real FC client at the transport and keep the signed request it would send."""
    seen: list[DaraRequest] = []

    def fake_do_action(request: DaraRequest, runtime_option: Any = None) -> Any:
        seen.append(request)
        raise Captured()

    monkeypatch.setattr(DaraCore, "do_action", staticmethod(fake_do_action))
    yield seen


def _fc_client() -> FcClient:
    config = openapi_models.Config(
        access_key_id=AK, access_key_secret=SECRET, endpoint="127.0.0.1:9000", protocol="HTTP"
    )
    return FcClient(config)


def _call(fn: Any, *args: Any) -> None:
    # The SDK wraps transport errors in UnretryableException; the original is kept as `inner_exception`.
    with pytest.raises(UnretryableException) as info:
        fn(*args)
    assert isinstance(info.value.inner_exception, Captured)


def test_fc_client_list_async_tasks(captured: list[DaraRequest]) -> None:
    request = fc_models.ListAsyncTasksRequest(
        include_payload=True, limit=20, prefix="job a", status="Running"
    )
    _call(_fc_client().list_async_tasks_with_options, "my-func", request, {}, RuntimeOptions())
    wire = _wire_sync(captured[-1])
    assert wire.raw_path == VECTOR_PATH
    assert "prefix=job+a" in wire.raw_query
    assert wire.verify(datetime.now(timezone.utc)) == AK


def test_fc_client_invoke_async_with_fc_headers(captured: list[DaraRequest]) -> None:
    headers = fc_models.InvokeFunctionHeaders(
        x_fc_invocation_type="Async", x_fc_async_task_id="job-42", common_headers={"x-fc-async-delay": "10"}
    )
    request = fc_models.InvokeFunctionRequest(body=b'{"k": "v v"}', qualifier="LATEST")
    _call(_fc_client().invoke_function_with_options, "my-func", request, headers, RuntimeOptions())
    wire = _wire_sync(captured[-1])
    assert "x-fc-async-task-id" in wire.headers["Authorization"]
    assert wire.body == b'{"k": "v v"}'
    assert wire.verify(datetime.now(timezone.utc)) == AK


def test_fc_client_json_body(captured: list[DaraRequest]) -> None:
    request = fc_models.PutAsyncInvokeConfigRequest(
        body=fc_models.PutAsyncInvokeConfigInput(max_async_retry_attempts=2, async_task=True),
        qualifier="LATEST",
    )
    _call(_fc_client().put_async_invoke_config_with_options, "my-func", request, {}, RuntimeOptions())
    wire = _wire_sync(captured[-1])
    assert wire.headers["content-type"].startswith("application/json")
    assert json.loads(wire.body)["asyncTask"] is True
    assert wire.verify(datetime.now(timezone.utc)) == AK


# --- failures ------------------------------------------------------------------------------------


def test_tampered_body() -> None:
    wire = _vector_wire()
    wire.body = b"x"
    with pytest.raises(SignatureNotMatch, match="x-acs-content-sha256"):
        wire.verify(VECTOR_NOW)


def test_tampered_body_and_hash_header() -> None:
    wire = _vector_wire()
    wire.body = b"x"
    wire.headers["x-acs-content-sha256"] = hashlib.sha256(b"x").hexdigest()
    with pytest.raises(SignatureNotMatch, match="string to sign"):
        wire.verify(VECTOR_NOW)


def test_tampered_signed_header() -> None:
    wire = _vector_wire()
    wire.headers["x-acs-action"] = "StopAsyncTask"
    with pytest.raises(SignatureNotMatch) as info:
        wire.verify(VECTOR_NOW)
    assert "x-acs-action:StopAsyncTask" in info.value.message
    assert info.value.http_status == 403


def test_tampered_query() -> None:
    wire = _vector_wire()
    wire.raw_query = wire.raw_query.replace("limit=20", "limit=100")
    with pytest.raises(SignatureNotMatch):
        wire.verify(VECTOR_NOW)


def test_wrong_secret() -> None:
    with pytest.raises(SignatureNotMatch):
        _vector_wire().verify(VECTOR_NOW, secrets={AK: "nope"})


def test_unknown_key_id() -> None:
    with pytest.raises(InvalidAccessKeyID, match="testAK"):
        _vector_wire().verify(VECTOR_NOW, secrets={"otherAK": "x"})


def test_missing_authorization() -> None:
    wire = _vector_wire()
    del wire.headers["Authorization"]
    with pytest.raises(InvalidAccessKeyID):
        wire.verify(VECTOR_NOW)


@pytest.mark.parametrize(
    "value",
    ["Bearer abc", "ACS3-HMAC-SHA256 Credential=testAK", "ACS3-HMAC-SM3 " + VECTOR_AUTH.split(" ", 1)[1]],
)
def test_malformed_authorization(value: str) -> None:
    wire = _vector_wire()
    wire.headers["Authorization"] = value
    with pytest.raises(InvalidAccessKeyID):
        wire.verify(VECTOR_NOW)


@pytest.mark.parametrize("delta", [timedelta(minutes=16), -timedelta(minutes=16)])
def test_skewed_date(delta: timedelta) -> None:
    with pytest.raises(RequestTimeTooSkewed):
        _vector_wire().verify(datetime(2024, 1, 1, tzinfo=timezone.utc) + delta)


@pytest.mark.parametrize("value", [None, "yesterday"])
def test_missing_or_bad_date(value: str | None) -> None:
    wire = _vector_wire()
    if value is None:
        del wire.headers["x-acs-date"]
    else:
        wire.headers["x-acs-date"] = value
    with pytest.raises(RequestTimeTooSkewed):
        wire.verify(VECTOR_NOW)


def test_missing_content_sha256() -> None:
    wire = _vector_wire()
    del wire.headers["x-acs-content-sha256"]
    with pytest.raises(MissingRequiredHeader):
        wire.verify(VECTOR_NOW)


def test_unsigned_extra_headers_and_case_are_ignored() -> None:
    wire = _vector_wire()
    wire.headers = {k.title(): v for k, v in wire.headers.items()}
    wire.extra = {"accept-encoding": "gzip", "X-Forwarded-For": "10.0.0.1", "connection": "keep-alive"}
    assert wire.verify(VECTOR_NOW) == AK


def test_query_encoding_variants_accepted() -> None:
    wire = _vector_wire()
    wire.raw_query = "prefix=job%20a&limit=20&includePayload=True"
    assert wire.verify(VECTOR_NOW) == AK


def test_naive_now_is_utc() -> None:
    assert _vector_wire().verify(VECTOR_NOW.replace(tzinfo=None)) == AK
