"""Gateway request validation, plus the app's error shapes and auth against in-memory fakes.

Nothing here needs a server: the helpers are pure, and the app tests drive the ASGI app through
httpx with a fake catalog and event store standing in for NATS.
"""

from __future__ import annotations

import base64
import io
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from services.gateway import function_records, params, schemas
from tests.fc_client import zip_code
from services.gateway.app import create_app
from services.gateway.deps import Resources
from services.gateway.settings import GatewaySettings, parse_access_keys
from shared.acs3 import sign_request
from shared.catalog import AsyncConfigRecord, CustomRuntimeConfig, FunctionRecord
from shared.errors import (
    ConcurrentUpdateError,
    EntityTooLarge,
    FunctionNotFound,
    InvalidArgument,
    InvalidNextToken,
    ServiceUnavailable,
)
from shared.events import TaskEvent
from shared.settings import CommonSettings
from shared.transitions import Status


def zip_b64(files: dict[str, str] | None = None) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, text in (files or {"index.py": "def handler(event, context):\n    return event\n"}).items():
            archive.writestr(name, text)
    return base64.b64encode(buf.getvalue()).decode()


# --- names, ids, headers ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["f", "_f", "my-func_1", "A" * 64])
def test_function_name_accepted(name: str) -> None:
    assert params.check_function_name(name) == name


@pytest.mark.parametrize("name", ["", "1abc", "-a", "a b", "a.b", "a*", "a>", "A" * 65, "é"])
def test_function_name_refused(name: str) -> None:
    with pytest.raises(InvalidArgument):
        params.check_function_name(name)


def test_task_id_from_header_wins_over_request_id() -> None:
    assert params.choose_task_id(task_id_header="job-1", request_id_header="req_1") == "job-1"


def test_task_id_falls_back_to_request_id() -> None:
    assert params.choose_task_id(task_id_header=None, request_id_header="req_1") == "req_1"
    assert params.choose_task_id(task_id_header="", request_id_header="req_2") == "req_2"


def test_a_request_id_that_is_no_task_id_still_gives_one() -> None:
    # A UUID starts with a digit 60% of the time: it gets a leading "_", deterministically.
    uuid_like = "3f2a9c1e-7b4d-4e8a-9c2f-1a2b3c4d5e6f"
    assert params.choose_task_id(task_id_header=None, request_id_header=uuid_like) == "_" + uuid_like
    assert params.choose_task_id(task_id_header=None, request_id_header="1-abc") == "_1-abc"
    # Characters a task id cannot hold (request ids may have '.' and ':'): a generated id.
    generated = params.choose_task_id(task_id_header=None, request_id_header="a.b:c")
    assert generated.startswith("task-") and params.TASK_ID_RE.fullmatch(generated)
    assert params.choose_task_id(task_id_header=None, request_id_header="9" * 128).startswith("task-")


def test_the_task_id_rule_still_applies_to_the_task_id_headers() -> None:
    with pytest.raises(InvalidArgument, match="x-fc-stateful-async-invocation-id"):
        params.choose_task_id(task_id_header="1-abc", request_id_header=None,
                              source="x-fc-stateful-async-invocation-id")


@pytest.mark.parametrize("task_id", ["1abc", "a.b", "a b", "a" * 129, "-x", "a*"])
def test_bad_task_ids_refused(task_id: str) -> None:
    with pytest.raises(InvalidArgument):
        params.choose_task_id(task_id_header=task_id, request_id_header=None)


def test_generated_task_ids_follow_the_rule_and_differ() -> None:
    ids = {params.choose_task_id(task_id_header=None, request_id_header=None) for _ in range(50)}
    assert len(ids) == 50
    assert all(params.TASK_ID_RE.fullmatch(task_id) for task_id in ids)


def test_longest_task_id_accepted() -> None:
    task_id = "a" + "b" * 127
    assert params.check_task_id(task_id) == task_id


@pytest.mark.parametrize(("given", "expected"), [(None, "Sync"), ("", "Sync"), ("sync", "Sync"), ("ASYNC", "Async"), ("Async", "Async")])
def test_invocation_type(given: str | None, expected: str) -> None:
    assert params.parse_invocation_type(given) == expected


def test_invocation_type_refused() -> None:
    with pytest.raises(InvalidArgument):
        params.parse_invocation_type("Later")


@pytest.mark.parametrize(("given", "expected"),
                         [(None, 0), ("", 0), ("0", 0), ("5", 5), (" 3600 ", 3600), ("3601", 3601), ("604800", 604800)])
def test_delay_accepted(given: str | None, expected: int) -> None:
    # FC documents up to 3,600 s; taskmode takes delays up to the 7-day retention.
    assert params.parse_delay(given) == expected


@pytest.mark.parametrize("given", ["604801", "-1", "1.5", "abc", "١٢"])
def test_delay_refused(given: str) -> None:
    with pytest.raises(InvalidArgument):
        params.parse_delay(given)


NOW_MS = 1_780_000_000_000  # 2026-05-28T20:26:40Z


@pytest.mark.parametrize(("given", "expected"), [
    (None, None),
    (str(NOW_MS + 5000), NOW_MS + 5000),
    ("2026-05-28T20:27:00Z", NOW_MS + 20_000),
    ("2026-05-28T22:27:00.5+02:00", NOW_MS + 20_500),
    (str(NOW_MS - 60_000), NOW_MS),  # already past: due now
])
def test_execution_time_accepted(given: str | None, expected: int | None) -> None:
    assert params.parse_execution_time(given, now_ms=NOW_MS) == expected


@pytest.mark.parametrize("given", [
    "tomorrow", "2026-05-28 20:27", "2026-05-28T20:27:00",  # no time zone
    str(NOW_MS // 1000),  # seconds, not milliseconds: decades ago
    str(NOW_MS + 604_801_000),  # past the retention period
    "2026-13-01T00:00:00Z",
])
def test_execution_time_refused(given: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        params.parse_execution_time(given, now_ms=NOW_MS)
    assert "x-taskmode-execution-time" in raised.value.message


def test_delay_and_execution_time_together_are_refused() -> None:
    with pytest.raises(InvalidArgument):
        params.due_time(delay_header="5", execution_time_header=str(NOW_MS), now_ms=NOW_MS)
    assert params.due_time(delay_header="5", execution_time_header=None, now_ms=NOW_MS) == NOW_MS + 5000


def test_payload_limit() -> None:
    params.check_payload_size(b"x" * params.MAX_ASYNC_PAYLOAD_BYTES, limit=params.MAX_ASYNC_PAYLOAD_BYTES)
    with pytest.raises(EntityTooLarge):
        params.check_payload_size(b"x" * (params.MAX_ASYNC_PAYLOAD_BYTES + 1), limit=params.MAX_ASYNC_PAYLOAD_BYTES)


def test_qualifier_defaults_to_latest() -> None:
    assert params.check_qualifier(None) == "LATEST"
    assert params.check_qualifier("") == "LATEST"
    assert params.check_qualifier("prod") == "prod"
    assert params.check_qualifier("12") == "12"
    for bad in ("a b", "0", "a.b", "x" * 200):
        with pytest.raises(InvalidArgument):
            params.check_qualifier(bad)


@pytest.mark.parametrize(("given", "expected"), [(None, False), ("", False), ("None", False), ("Tail", True), ("tail", True)])
def test_log_type(given: str | None, expected: bool) -> None:
    assert params.parse_log_type(given) is expected


def test_log_type_refused() -> None:
    with pytest.raises(InvalidArgument, match="x-fc-log-type"):
        params.parse_log_type("Head")


# --- query parameters -------------------------------------------------------------------------


@pytest.mark.parametrize(("given", "expected"), [(None, False), ("True", True), ("true", True), ("FALSE", False)])
def test_bool_query_is_case_insensitive(given: str | None, expected: bool) -> None:
    assert params.parse_bool("includePayload", given, default=False) is expected


@pytest.mark.parametrize("given", ["yes", "1", "on", "t"])
def test_bool_query_refuses_anything_else(given: str) -> None:
    with pytest.raises(InvalidArgument):
        params.parse_bool("includePayload", given, default=False)


def test_limit() -> None:
    assert params.parse_limit(None) == 20
    assert params.parse_limit("1") == 1
    assert params.parse_limit("100") == 100
    for bad in ("0", "101", "x", "-5", "2.5"):
        with pytest.raises(InvalidArgument):
            params.parse_limit(bad)


def test_time_bounds() -> None:
    assert params.parse_time_ms("startedTimeBegin", None) is None
    assert params.parse_time_ms("startedTimeBegin", "1700000000000") == 1700000000000
    with pytest.raises(InvalidArgument):
        params.parse_time_ms("startedTimeBegin", "yesterday")


def test_sort_order() -> None:
    assert params.parse_sort_order(None) is False
    assert params.parse_sort_order("asc") is False
    assert params.parse_sort_order("desc") is True
    with pytest.raises(InvalidArgument):
        params.parse_sort_order("random")


def test_status_filter_accepts_dequeued_for_processed() -> None:
    assert params.parse_status_filter("Dequeued") is Status.PROCESSED
    assert params.parse_status_filter("Processed") is Status.PROCESSED
    assert params.parse_status_filter("Running") is Status.RUNNING
    assert params.parse_status_filter(None) is None
    with pytest.raises(InvalidArgument):
        params.parse_status_filter("Bogus")


def test_name_pagination_round_trip() -> None:
    names = [f"f{i}" for i in range(5)]
    page, token = params.paginate(names, after=None, limit=2)
    assert page == ["f0", "f1"] and token
    page, token = params.paginate(names, after=params.decode_token(token), limit=2)
    assert page == ["f2", "f3"] and token
    page, token = params.paginate(names, after=params.decode_token(token), limit=2)
    assert page == ["f4"] and token == ""
    assert params.paginate(names, after=None, limit=5) == (names, "")


@pytest.mark.parametrize("token", ["%%%", "!!", base64.urlsafe_b64encode(b"a b").decode()])
def test_bad_name_token(token: str) -> None:
    with pytest.raises(InvalidNextToken):
        params.decode_token(token)


# --- bodies -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "runtime", ["python3", "python3.9", "python3.10", "python3.12", "custom", "custom.debian10", "custom.debian12"]
)
def test_runtimes_accepted(runtime: str) -> None:
    assert params.check_runtime(runtime) == runtime


@pytest.mark.parametrize("runtime", ["python2.7", "python3.", "nodejs16", "custom.debian9", "custom-container", "", "python3.x"])
def test_runtimes_refused(runtime: str) -> None:
    with pytest.raises(InvalidArgument):
        params.check_runtime(runtime)


@pytest.mark.parametrize(
    "body",
    [b"", b"   ", b"{not json", b"[]", b'{"functionName": 5}', b'{"runtime": "python3"}'],
)
def test_create_function_body_refused(body: bytes) -> None:
    with pytest.raises(InvalidArgument):
        schemas.decode_json(body, schemas.CreateFunctionInput)


@pytest.mark.parametrize(
    "field",
    [{"timeout": 0}, {"timeout": 86401}, {"timeout": "3"}, {"memorySize": 64}, {"memorySize": 32769},
     {"instanceConcurrency": 0}, {"instanceConcurrency": 201}, {"environmentVariables": {"A": 1}}],
)
def test_function_field_ranges(field: dict[str, Any]) -> None:
    body = msgspec.json.encode({"functionName": "f", "runtime": "python3", "handler": "index.handler", **field})
    with pytest.raises(InvalidArgument):
        schemas.decode_json(body, schemas.CreateFunctionInput)


def test_unknown_fields_ignored() -> None:
    body = schemas.decode_json(b'{"functionName": "f", "vpcConfig": {"vpcId": "x"}}', schemas.CreateFunctionInput)
    assert body.function_name == "f"


def test_code_decoding() -> None:
    archive = function_records.decode_code(schemas.InputCode(zip_file=zip_b64()), required=True)
    assert archive is not None and len(archive.checksum) == 64 and archive.data[:2] == b"PK"
    assert function_records.decode_code(None, required=False) is None
    for bad in (schemas.InputCode(zip_file="not base64!"), schemas.InputCode(zip_file=base64.b64encode(b"hello").decode())):
        with pytest.raises(InvalidArgument):
            function_records.decode_code(bad, required=True)
    with pytest.raises(InvalidArgument, match="required"):
        function_records.decode_code(None, required=True)
    with pytest.raises(InvalidArgument, match="OSS"):
        function_records.decode_code(schemas.InputCode(oss_bucket_name="b", oss_object_name="o"), required=True)


def _create(**fields: Any) -> schemas.CreateFunctionInput:
    body = {"functionName": "f", "runtime": "python3.10", "handler": "index.handler", "code": {"zipFile": zip_b64()}, **fields}
    return schemas.decode_json(msgspec.json.encode(body), schemas.CreateFunctionInput)


def _build(body: schemas.CreateFunctionInput) -> FunctionRecord:
    code = function_records.decode_code(body.code, required=True)
    assert code is not None
    return function_records.build_function(body, function_id="id", arn="arn", code=code, now="2024-01-01T00:00:00Z")


def test_build_function_defaults() -> None:
    record = _build(_create())
    assert (record.timeout, record.memory_size, record.instance_concurrency) == (3, 128, 1)
    assert record.created_time == record.last_modified_time == "2024-01-01T00:00:00Z"
    assert record.code_size > 0 and len(record.code_object) == 64
    assert record.code_checksum.isdigit()  # FC's: CRC-64 as a decimal string


def test_custom_runtime_needs_a_command() -> None:
    with pytest.raises(InvalidArgument, match="command"):
        _build(_create(runtime="custom.debian11"))
    with pytest.raises(InvalidArgument, match="command"):
        _build(_create(runtime="custom", customRuntimeConfig={"command": []}))
    record = _build(_create(runtime="custom", customRuntimeConfig={"command": ["./server"], "port": 8080}))
    assert record.custom_runtime_config == CustomRuntimeConfig(command=["./server"], args=[], port=8080)


def test_apply_update_is_partial_and_pure() -> None:
    record = _build(_create(description="old", environmentVariables={"A": "1"}))
    body = schemas.decode_json(b'{"timeout": 60, "description": "new"}', schemas.UpdateFunctionInput)
    updated = function_records.apply_update(record, body, code=None, now="2024-02-02T00:00:00Z")
    assert (updated.timeout, updated.description, updated.environment_variables) == (60, "new", {"A": "1"})
    assert updated.last_modified_time == "2024-02-02T00:00:00Z"
    assert updated.created_time == record.created_time
    assert (record.timeout, record.description) == (3, "old")


def test_apply_update_checks_the_result_as_a_whole() -> None:
    record = _build(_create())
    with pytest.raises(InvalidArgument, match="command"):
        function_records.apply_update(record, schemas.UpdateFunctionInput(runtime="custom"), code=None, now="t")


@pytest.mark.parametrize(
    "body", [b'{"maxAsyncRetryAttempts": 9}', b'{"maxAsyncRetryAttempts": -1}', b'{"maxAsyncEventAgeInSeconds": 0}',
             b'{"maxAsyncEventAgeInSeconds": 604801}', b'{"asyncTask": "yes"}']
)
def test_async_config_ranges(body: bytes) -> None:
    with pytest.raises(InvalidArgument):
        schemas.decode_json(body, schemas.PutAsyncInvokeConfigInput)


def test_access_keys() -> None:
    assert parse_access_keys("a:b, c:d:e ,") == {"a": "b", "c": "d:e"}
    assert parse_access_keys("") == {}
    with pytest.raises(InvalidArgument):
        parse_access_keys("nocolon")


# --- the app against in-memory fakes ----------------------------------------------------------


class FakeCatalog:
    def __init__(self) -> None:
        self.functions: dict[str, FunctionRecord] = {}

    async def find_function(self, name: str) -> FunctionRecord | None:
        return self.functions.get(name)

    async def get_function(self, name: str) -> FunctionRecord:
        if name not in self.functions:
            raise FunctionNotFound(f"function {name} does not exist")
        return self.functions[name]

    versions = None

    async def find_async_config(self, name: str, qualifier: str = "LATEST") -> AsyncConfigRecord | None:
        return None


class FakeEvents:
    def __init__(self) -> None:
        self.appended: list[TaskEvent] = []

    async def append(self, event: TaskEvent, *, expected_seq: int) -> int:
        if expected_seq == 0 and any(e.task_id == event.task_id for e in self.appended):
            raise ConcurrentUpdateError("taken")
        self.appended.append(event)
        return len(self.appended)


class FakeNats:
    is_connected = True


KEY_ID, SECRET = "ak", "sk"


def _settings(*, auth_disabled: bool) -> GatewaySettings:
    common = CommonSettings(
        nats_url="nats://unused", mongodb_url="mongodb://unused", data_dir=Path("."),
        region="local", account_id="0", metrics_port=0,
    )
    return GatewaySettings(common=common, access_keys={KEY_ID: SECRET}, auth_disabled=auth_disabled)


@pytest.fixture
def fakes() -> tuple[FakeCatalog, FakeEvents]:
    catalog = FakeCatalog()
    catalog.functions["f"] = _build(_create())
    return catalog, FakeEvents()


async def _client(fakes: tuple[FakeCatalog, FakeEvents], *, auth_disabled: bool) -> httpx.AsyncClient:
    catalog, events = fakes
    resources = Resources(nc=FakeNats(), catalog=catalog, events=events, tasks=None)  # type: ignore[arg-type]
    app = create_app(_settings(auth_disabled=auth_disabled), resources=resources)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


@pytest.fixture
async def open_client(fakes: tuple[FakeCatalog, FakeEvents]) -> AsyncIterator[httpx.AsyncClient]:
    async with await _client(fakes, auth_disabled=True) as client:
        yield client


@pytest.fixture
async def signed_client(fakes: tuple[FakeCatalog, FakeEvents]) -> AsyncIterator[httpx.AsyncClient]:
    async with await _client(fakes, auth_disabled=False) as client:
        yield client


def _signed(method: str, path: str, body: bytes = b"", *, secret: str = SECRET) -> dict[str, str]:
    headers = {"host": "gw", "x-acs-version": "2023-03-30"}
    headers.update(sign_request(method=method, path=path, query={}, headers=headers, body=body,
                                access_key_id=KEY_ID, access_key_secret=secret))
    return headers


async def test_unknown_path_is_fc_error_with_request_id(open_client: httpx.AsyncClient) -> None:
    response = await open_client.get("/2023-03-30/nowhere", headers={"x-fc-request-id": "my-req"})
    assert response.status_code == 404
    assert response.headers["x-fc-request-id"] == "my-req"
    assert response.json() == {"Code": "PathNotSupported", "Message": "GET /2023-03-30/nowhere is not supported",
                               "RequestId": "my-req"}


async def test_malformed_json_is_invalid_argument(open_client: httpx.AsyncClient) -> None:
    response = await open_client.post("/2023-03-30/functions", content=b"{oops")
    assert response.status_code == 400
    body = response.json()
    assert body["Code"] == "InvalidArgument" and body["RequestId"] == response.headers["x-fc-request-id"]


async def test_async_submit_then_duplicate(open_client: httpx.AsyncClient, fakes: tuple[FakeCatalog, FakeEvents]) -> None:
    headers = {"x-fc-invocation-type": "Async", "x-fc-async-task-id": "job-1", "x-fc-async-delay": "7"}
    first = await open_client.post("/2023-03-30/functions/f/invocations", content=b"hi", headers=headers)
    assert first.status_code == 202 and first.content == b""
    assert first.headers["x-fc-async-task-id"] == "job-1"
    (event,) = fakes[1].appended
    assert event.version == 1 and event.due_at_ms == event.at_ms + 7000  # type: ignore[attr-defined]
    again = await open_client.post("/2023-03-30/functions/f/invocations", content=b"hi", headers=headers)
    assert again.status_code == 409
    assert again.json()["Code"] == "TaskAlreadyExists" and again.json()["TaskId"] == "job-1"


async def test_nothing_enqueued_for_bad_or_missing(open_client: httpx.AsyncClient, fakes: tuple[FakeCatalog, FakeEvents]) -> None:
    cases = [
        ("/2023-03-30/functions/nope/invocations", {"x-fc-invocation-type": "Async"}, b"", 404, "FunctionNotFound"),
        ("/2023-03-30/functions/f/invocations", {"x-fc-invocation-type": "Async", "x-fc-async-task-id": "9x"}, b"", 400, "InvalidArgument"),
        ("/2023-03-30/functions/f/invocations", {"x-fc-invocation-type": "Async", "x-fc-async-delay": "604801"}, b"", 400, "InvalidArgument"),
        ("/2023-03-30/functions/f/invocations", {"x-fc-invocation-type": "Async"}, b"x" * (128 * 1024 + 1), 400, "EntityTooLarge"),
    ]
    for path, headers, body, status, code in cases:
        response = await open_client.post(path, content=body, headers=headers)
        assert (response.status_code, response.json()["Code"]) == (status, code)
    assert fakes[1].appended == []


async def test_signature_required(signed_client: httpx.AsyncClient) -> None:
    unsigned = await signed_client.get("/2023-03-30/functions/f")
    assert unsigned.status_code == 403 and unsigned.json()["Code"] == "InvalidAccessKeyID"
    wrong = await signed_client.get("/2023-03-30/functions/f", headers=_signed("GET", "/2023-03-30/functions/f", secret="bad"))
    assert wrong.status_code == 403 and wrong.json()["Code"] == "SignatureNotMatch"
    good = await signed_client.get("/2023-03-30/functions/f", headers=_signed("GET", "/2023-03-30/functions/f"))
    assert good.status_code == 200 and good.json()["functionName"] == "f"
    missing = await signed_client.get("/2023-03-30/functions/g", headers=_signed("GET", "/2023-03-30/functions/g"))
    assert missing.status_code == 404 and missing.json()["Code"] == "FunctionNotFound"


async def test_health_and_metrics_are_unsigned(signed_client: httpx.AsyncClient) -> None:
    assert (await signed_client.get("/healthz")).json() == {"status": "ok"}
    await signed_client.get("/2023-03-30/functions/f")
    metrics = await signed_client.get("/metrics")
    assert metrics.status_code == 200
    assert 'taskmode_gateway_requests_total{method="GET",route="/functions/{function_name}",status="403"} 1.0' in metrics.text


class BrokenCatalog(FakeCatalog):
    async def get_function(self, name: str) -> FunctionRecord:
        raise RuntimeError("disk on fire")

    async def find_function(self, name: str) -> FunctionRecord | None:
        raise RuntimeError("disk on fire")


async def test_unexpected_error_is_a_clean_500(fakes: tuple[FakeCatalog, FakeEvents]) -> None:
    async with await _client((BrokenCatalog(), fakes[1]), auth_disabled=True) as client:
        response = await client.get("/2023-03-30/functions/f", headers={"x-fc-request-id": "r-500"})
    assert response.status_code == 500
    assert response.json() == {"Code": "InternalServerError", "Message": "internal server error", "RequestId": "r-500"}


class FakeTaskStore:
    def __init__(self) -> None:
        self.queries: list[Any] = []

    def check_query(self, query: Any) -> None:
        pass  # every token is good here: what is checked is that the route passes it on

    def believed_reachable(self) -> bool:
        return True

    async def list_tasks(self, query: Any) -> Any:
        from shared.taskstore import TaskPage

        self.queries.append(query)
        return TaskPage(tasks=[{"taskId": "a", "status": "Enqueued", "taskPayload": "p"}], next_token="tok")


async def test_list_tasks_query_is_parsed(fakes: tuple[FakeCatalog, FakeEvents]) -> None:
    store = FakeTaskStore()
    resources = Resources(nc=FakeNats(), catalog=fakes[0], events=fakes[1], tasks=store)  # type: ignore[arg-type]
    app = create_app(_settings(auth_disabled=True), resources=resources)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        response = await client.get(
            "/2023-03-30/functions/f/async-tasks",
            params={"status": "Dequeued", "prefix": "jo", "limit": "5", "sortOrderByTime": "desc",
                    "includePayload": "True", "startedTimeBegin": "10", "startedTimeEnd": "20", "nextToken": "t1"},
        )
        assert response.status_code == 200
        assert response.json() == {"nextToken": "tok", "tasks": [{"taskId": "a", "status": "Enqueued", "taskPayload": "p"}]}
        (query,) = store.queries
        assert (query.function, query.status, query.prefix, query.limit, query.descending) == ("f", "Processed", "jo", 5, True)
        assert (query.include_payload, query.started_time_begin, query.started_time_end, query.next_token) == (True, 10, 20, "t1")
        for bad in ({"status": "Nope"}, {"includePayload": "yes"}, {"limit": "101"}, {"sortOrderByTime": "up"}):
            response = await client.get("/2023-03-30/functions/f/async-tasks", params=bad)
            assert response.status_code == 400 and response.json()["Code"] == "InvalidArgument"
    assert len(store.queries) == 1


class StreamEvents:
    """A one-task event store with the real store's optimistic check on the last sequence."""

    def __init__(self, events: list[TaskEvent], *, interloper: TaskEvent | None = None) -> None:
        self.events = list(events)
        self.interloper = interloper  # appended by "another service" just before our first append

    async def last(self, function: str, task_id: str) -> Any:
        from shared.eventstore import StoredEvent

        return StoredEvent(len(self.events), self.events[-1]) if self.events else None  # type: ignore[arg-type]

    async def append(self, event: TaskEvent, *, expected_seq: int) -> int:
        if self.interloper is not None:
            self.events.append(self.interloper)
            self.interloper = None
        if expected_seq != len(self.events):
            raise ConcurrentUpdateError("moved on")
        self.events.append(event)
        return len(self.events)


def _chain(*kinds: str) -> list[TaskEvent]:
    from shared import events as ev

    made: list[TaskEvent] = []
    for version, kind in enumerate(kinds, start=1):
        base = {"task_id": "t", "function": "f", "version": version, "at_ms": version}
        if kind == "Enqueued":
            made.append(ev.TaskEnqueued(**base))
        elif kind == "Processed":
            made.append(ev.TaskProcessed(**base))
        elif kind == "Running":
            made.append(ev.TaskStarted(instance_id="i", **base))
        elif kind == "Stopping":
            made.append(ev.TaskStopping(**base))
        elif kind == "Succeeded":
            made.append(ev.TaskSucceeded(**base))
    return made


async def _stop(events: StreamEvents, fakes: tuple[FakeCatalog, FakeEvents]) -> httpx.Response:
    resources = Resources(nc=FakeNats(), catalog=fakes[0], events=events, tasks=None)  # type: ignore[arg-type]
    app = create_app(_settings(auth_disabled=True), resources=resources)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        return await client.put("/2023-03-30/functions/f/async-tasks/t/stop")


@pytest.mark.parametrize(
    ("chain", "expected"),
    [
        (["Enqueued"], "Stopped"),
        (["Enqueued", "Processed"], "Stopped"),
        (["Enqueued", "Processed", "Running"], "Stopping"),
        (["Enqueued", "Processed", "Running", "Stopping"], "Stopping"),
    ],
)
async def test_stop_moves_the_task(chain: list[str], expected: str, fakes: tuple[FakeCatalog, FakeEvents]) -> None:
    events = StreamEvents(_chain(*chain))
    response = await _stop(events, fakes)
    assert (response.status_code, response.json()) == (200, {})
    assert str(events.events[-1].status) == expected
    assert [e.version for e in events.events] == list(range(1, len(events.events) + 1))


async def test_stop_of_finished_task_is_409(fakes: tuple[FakeCatalog, FakeEvents]) -> None:
    response = await _stop(StreamEvents(_chain("Enqueued", "Processed", "Running", "Succeeded")), fakes)
    assert response.status_code == 409
    assert response.json()["Code"] == "TaskAlreadyFinished" and "Succeeded" in response.json()["Message"]


async def test_stop_retries_after_losing_a_race(fakes: tuple[FakeCatalog, FakeEvents]) -> None:
    started = _chain("Enqueued", "Processed", "Running")[-1]
    events = StreamEvents(_chain("Enqueued", "Processed"), interloper=started)
    response = await _stop(events, fakes)
    assert response.status_code == 200
    assert [str(e.status) for e in events.events] == ["Enqueued", "Processed", "Running", "Stopping"]


async def test_stop_of_unknown_task_is_404(fakes: tuple[FakeCatalog, FakeEvents]) -> None:
    response = await _stop(StreamEvents([]), fakes)
    assert response.status_code == 404 and response.json()["Code"] == "AsyncTaskNotFound"


def test_code_that_cannot_be_unpacked_is_refused_up_front() -> None:
    clash = zip_code({"lib": "a file", "lib/mod.py": "x = 1\n"})
    with pytest.raises(InvalidArgument, match="both as a file and as a folder"):
        function_records.decode_code(schemas.InputCode(zip_file=clash), required=True)
    good = base64.b64decode(zip_code({"index.py": "def handler(e, c):\n    return e\n" * 50}))
    corrupt = bytearray(good)
    start = good.index(b"def handler")  # flip a byte of the stored (uncompressed) member's data
    corrupt[start] ^= 0xFF
    with pytest.raises(InvalidArgument, match="corrupt"):
        function_records.decode_code(schemas.InputCode(zip_file=base64.b64encode(bytes(corrupt)).decode()), required=True)


class TimingOutEvents(FakeEvents):
    """The bus took the append but did not acknowledge it in time: it may still land."""

    async def append(self, event: TaskEvent, *, expected_seq: int) -> int:
        self.appended.append(event)
        raise ServiceUnavailable("event store did not acknowledge the append")

    async def append_together(self, first: TaskEvent, second: TaskEvent, *, expected_seq: int) -> int:
        self.appended += [first, second]
        raise ServiceUnavailable("event store did not acknowledge the append")


@pytest.mark.parametrize("delay", [None, "5"])
async def test_a_failed_append_answers_with_the_task_id(fakes: tuple[FakeCatalog, FakeEvents], delay: str | None) -> None:
    """A 503 whose append may still land carries the id the gateway chose, so a retry with it dedups."""
    events = TimingOutEvents()
    async with await _client((fakes[0], events), auth_disabled=True) as client:
        headers = {"x-fc-invocation-type": "Async", **({"x-fc-async-delay": delay} if delay else {})}
        response = await client.post("/2023-03-30/functions/f/invocations", content=b"x", headers=headers)
    assert response.status_code == 503
    chosen = events.appended[0].task_id
    assert chosen.startswith("task-")
    assert response.headers["x-fc-async-task-id"] == chosen
    assert response.json()["TaskId"] == chosen and response.json()["Code"] == "ServiceUnavailable"
