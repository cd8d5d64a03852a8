"""Contract tests for the task read model (shared/taskstore.py).

`TestTaskStoreContract` uses only the `task_store` fixture, so it runs unchanged against the
embedded nx-27017 server and, with `MONGODB_URL` set, against a real MongoDB.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from shared.devstack import free_port, start_mongo_wire
from shared.errors import InvalidArgument, InvalidNextToken, ServiceUnavailable
from shared.taskstore import (
    FUNCTION_ONLY_KEYS,
    REDUNDANT_UNIQUE_KEYS,
    TaskQuery,
    TaskStore,
    list_filters,
    prefix_upper_bound,
)
from shared.taskview import INTERNAL_FIELDS, document_id, expire_at
from shared.wire import RETENTION_S

Doc = dict[str, Any]

# Whole seconds, "now": documents older than RETENTION_S would be expired (and purged) by TTL.
T0 = int(time.time()) * 1000
FN = "image-resize"
STATUSES = ("Enqueued", "Running", "Succeeded", "Failed")


def make_task(
    task_id: str,
    *,
    function: str = FN,
    started: int = T0,
    status: str = "Succeeded",
    payload: str | None = '{"k": 1}',
    version: int = 3,
    qualifier: str = "LATEST",
) -> Doc:
    """A read-model document shaped like the projection's output."""
    finished = status in ("Succeeded", "Failed")
    events = [
        {"eventId": 1, "status": "Enqueued", "timestamp": started, "eventDetail": ""},
        {"eventId": 2, "status": "Running", "timestamp": started + 5, "eventDetail": '{"instanceId": "i-1"}'},
    ]
    if finished:
        events.append({"eventId": 3, "status": status, "timestamp": started + 50, "eventDetail": "done"})
    return {
        "_id": document_id(function, task_id),
        "functionName": function,
        "version": version,
        "expireAt": expire_at(started),
        "taskId": task_id,
        "status": status,
        "events": events,
        "taskPayload": payload,
        "returnPayload": "ok" if status == "Succeeded" else None,
        "taskErrorMessage": "boom" if status == "Failed" else None,
        "alreadyRetriedTimes": 0,
        "submitTime": started,
        "startedTime": started + 5,
        "endTime": started + 50 if finished else None,
        "durationMs": 45 if finished else None,
        "executedVersion": "LATEST",
        "requestId": f"req-{task_id}",
        "instanceId": "i-1",
        "functionArn": f"acs:fc:local:0:functions/{function}",
        "qualifier": qualifier,
        "destinationStatus": "",
    }


def public(doc: Doc, *, include_payload: bool) -> Doc:
    """What ListAsyncTasks / GetAsyncTask should show for a stored document."""
    shown = {k: v for k, v in doc.items() if k not in INTERNAL_FIELDS}
    if not include_payload:
        shown.pop("taskPayload")
    return shown


def key(doc: Doc) -> tuple[int, str]:
    return (doc["submitTime"], doc["taskId"])


async def list_all(store: TaskStore, query: TaskQuery) -> tuple[list[Doc], list[int]]:
    """Every task of `query`, following next tokens; also returns the page sizes."""
    tasks: list[Doc] = []
    sizes: list[int] = []
    token: str | None = None
    for _ in range(1000):
        page = await store.list_tasks(replace(query, next_token=token))
        tasks.extend(page.tasks)
        sizes.append(len(page.tasks))
        if not page.next_token:
            return tasks, sizes
        token = page.next_token
    raise AssertionError("pagination did not end")


def dataset() -> list[Doc]:
    """60 tasks of FN with clustered start times and mixed prefixes/statuses, plus neighbours."""
    rnd = random.Random(7)
    docs = []
    for i in range(60):
        prefix = ("job-", "job_", "jobs", "ab", "Ab")[i % 5]
        docs.append(
            make_task(
                f"{prefix}{i:03d}",
                started=T0 + (i // 4) * 1000,  # four tasks per millisecond value
                status=STATUSES[i % len(STATUSES)],
            )
        )
    # Same task ids and times under other functions, including one whose name extends FN.
    for other in (f"{FN}-v2", "other"):
        docs.extend(make_task(d["taskId"], function=other, started=d["submitTime"]) for d in docs[:20])
    rnd.shuffle(docs)
    return docs


FILTERS: dict[str, tuple[dict[str, Any], Callable[[Doc], bool]]] = {
    "status": ({"status": "Running"}, lambda d: d["status"] == "Running"),
    "prefix": ({"prefix": "job-"}, lambda d: d["taskId"].startswith("job-")),
    "prefix-short": ({"prefix": "job"}, lambda d: d["taskId"].startswith("job")),
    "prefix-case": ({"prefix": "Ab"}, lambda d: d["taskId"].startswith("Ab")),
    "prefix-none": ({"prefix": "zzz"}, lambda d: False),
    "begin": ({"started_time_begin": T0 + 5000}, lambda d: d["submitTime"] >= T0 + 5000),
    "end": ({"started_time_end": T0 + 5000}, lambda d: d["submitTime"] <= T0 + 5000),
    "range": (
        {"started_time_begin": T0 + 3000, "started_time_end": T0 + 9000},
        lambda d: T0 + 3000 <= d["submitTime"] <= T0 + 9000,
    ),
    "status+prefix": (
        {"status": "Succeeded", "prefix": "job"},
        lambda d: d["status"] == "Succeeded" and d["taskId"].startswith("job"),
    ),
    "all": (
        {"status": "Failed", "prefix": "j", "started_time_begin": T0 + 2000, "started_time_end": T0 + 12000},
        lambda d: d["status"] == "Failed"
        and d["taskId"].startswith("j")
        and T0 + 2000 <= d["submitTime"] <= T0 + 12000,
    ),
}


class TestTaskStoreContract:
    """The behaviour every TaskStore backend must have."""

    async def test_save_load_round_trip(self, task_store: TaskStore) -> None:
        docs = [make_task("a1"), make_task("a2", status="Running", payload=None), make_task("a3", status="Failed")]
        await task_store.save_many(docs)

        loaded = await task_store.load_many([d["_id"] for d in docs] + ["nope/missing", docs[0]["_id"]])

        assert loaded == {d["_id"]: d for d in docs}
        assert loaded[docs[0]["_id"]]["events"][1] == {
            "eventId": 2, "status": "Running", "timestamp": T0 + 5, "eventDetail": '{"instanceId": "i-1"}'
        }
        assert await task_store.load_many([]) == {}

    async def test_replace_overwrites_whole_document(self, task_store: TaskStore) -> None:
        first = make_task("t1", status="Failed", version=3)
        first["extra"] = "only in the first version"
        await task_store.save_many([first])
        second = make_task("t1", status="Succeeded", version=4)

        await task_store.save_many([second])

        assert await task_store.load_many([second["_id"]]) == {second["_id"]: second}

    async def test_documents_believed_new_are_inserted_and_replace_one_that_exists(self, task_store: TaskStore) -> None:
        stored = make_task("t1", status="Running", version=3)
        await task_store.save_many([stored])
        fresh = make_task("t2", status="Enqueued", version=1)
        newer = make_task("t1", status="Succeeded", version=4)  # believed new, yet stored already

        await task_store.save_many([fresh, newer], new={fresh["_id"], newer["_id"]})

        assert await task_store.load_many([fresh["_id"], newer["_id"]]) == {fresh["_id"]: fresh, newer["_id"]: newer}

    async def test_save_many_keeps_last_duplicate_in_a_batch(self, task_store: TaskStore) -> None:
        docs = [make_task("t1", status="Running", version=v) for v in (2, 3, 4)]

        await task_store.save_many(docs)

        assert (await task_store.load_many([docs[0]["_id"]]))[docs[0]["_id"]]["version"] == 4

    async def test_save_many_rejects_inconsistent_id(self, task_store: TaskStore) -> None:
        doc = make_task("t1")
        doc["_id"] = "elsewhere/t1"
        with pytest.raises(ValueError):
            await task_store.save_many([doc])
        await task_store.save_many([])  # nothing to write is not an error

    async def test_get(self, task_store: TaskStore) -> None:
        doc = make_task("t1")
        await task_store.save_many([doc, make_task("t1", function="other", status="Failed")])

        assert await task_store.get(FN, "t1") == public(doc, include_payload=True)
        assert await task_store.get(FN, "missing") is None
        assert await task_store.get("nobody", "t1") is None

    async def test_qualifier_filter_keeps_submission_order(self, task_store: TaskStore) -> None:
        await task_store.save_many([
            make_task(f"t{i}", started=T0 + i, qualifier="prod" if i % 2 else "LATEST") for i in range(9)
        ])
        prod, sizes = await list_all(task_store, TaskQuery(FN, qualifier="prod", limit=2))
        assert [d["taskId"] for d in prod] == ["t1", "t3", "t5", "t7"]
        assert sizes == [2, 2]
        latest, _ = await list_all(task_store, TaskQuery(FN, qualifier="LATEST", limit=3, descending=True))
        assert [d["taskId"] for d in latest] == ["t8", "t6", "t4", "t2", "t0"]

    async def test_expire_at_round_trips_as_aware_datetime(self, task_store: TaskStore) -> None:
        started = T0 + 123
        doc = make_task("t1", started=started)
        await task_store.save_many([doc])

        stored = (await task_store.load_many([doc["_id"]]))[doc["_id"]]["expireAt"]

        assert isinstance(stored, datetime)
        assert stored.utcoffset() == timedelta(0)
        expected = datetime.fromtimestamp(T0 // 1000, tz=timezone.utc) + timedelta(milliseconds=123, seconds=RETENTION_S)
        assert stored == expected == doc["expireAt"]

    async def test_indexes(self, task_store: TaskStore) -> None:
        await task_store.ensure_indexes()  # idempotent
        indexes = [ix async for ix in await task_store.collection.list_indexes()]
        by_key = {tuple(ix["key"].items()): ix for ix in indexes}

        ttl = by_key[(("expireAt", 1),)]
        assert ttl["expireAfterSeconds"] == 0
        assert (("functionName", 1), ("submitTime", 1), ("taskId", 1)) in by_key
        assert (("functionName", 1), ("taskId", 1)) not in by_key  # `_id` keeps a task unique

    @pytest.mark.parametrize("with_token", [False, True], ids=["first-page", "next-page"])
    async def test_a_listing_page_is_an_ordered_range_of_the_listing_index(
            self, task_store: TaskStore, with_token: bool) -> None:
        # Many tasks of another function: a listing that scanned the collection would read them all.
        await task_store.save_many([make_task(f"o-{i:04d}", function="other") for i in range(300)])
        await task_store.save_many([make_task(f"t-{i:02d}", started=T0 + i, status=STATUSES[i % 4])
                                    for i in range(30)])
        query = TaskQuery(function=FN, limit=5, status="Running", qualifier="LATEST")
        if with_token:
            query = replace(query, next_token=(await task_store.list_tasks(query)).next_token)
            assert query.next_token
        for flt in list_filters(query):
            plan = str(await task_store.collection.find(flt).sort(
                [("submitTime", 1), ("taskId", 1)]).limit(6).explain())
            assert "functionName_submitTime_taskId" in plan, plan

    async def test_no_index_on_the_function_alone(self, task_store: TaskStore) -> None:
        # Earlier releases made one on the embedded server; listings use the listing index now.
        await task_store.collection.create_index(FUNCTION_ONLY_KEYS, name="functionName")
        await task_store.ensure_indexes()
        assert ((("functionName", 1),) in await self._keys(task_store)) != await task_store.is_embedded_server()

    async def test_the_unique_index_of_older_stores_is_dropped(self, task_store: TaskStore) -> None:
        await task_store.collection.create_index(REDUNDANT_UNIQUE_KEYS, unique=True, name="functionName_taskId_unique")
        assert await self._keys(task_store) >= {tuple(REDUNDANT_UNIQUE_KEYS)}
        await task_store.ensure_indexes()
        keys = await self._keys(task_store)
        assert tuple(REDUNDANT_UNIQUE_KEYS) not in keys
        assert (("functionName", 1), ("submitTime", 1), ("taskId", 1)) in keys

    @staticmethod
    async def _keys(task_store: TaskStore) -> set[tuple[tuple[str, int], ...]]:
        return {tuple(ix["key"].items()) async for ix in await task_store.collection.list_indexes()}

    @pytest.mark.parametrize("descending", [False, True], ids=["asc", "desc"])
    async def test_order_breaks_ties_by_task_id(self, task_store: TaskStore, descending: bool) -> None:
        ids_and_times = [("b", T0), ("a", T0), ("c", T0 - 1), ("A", T0), ("_z", T0 + 1), ("a-", T0), ("a0", T0)]
        docs = [make_task(t, started=s) for t, s in ids_and_times]
        await task_store.save_many(docs)

        page = await task_store.list_tasks(TaskQuery(FN, descending=descending))

        expected = sorted(docs, key=key, reverse=descending)
        assert [key(t) for t in page.tasks] == [key(d) for d in expected]
        assert [t["taskId"] for t in page.tasks][:6] == (
            ["_z", "b", "a0", "a-", "a", "A"] if descending else ["c", "A", "a", "a-", "a0", "b"]
        )
        assert page.next_token == ""

    @pytest.mark.parametrize("descending", [False, True], ids=["asc", "desc"])
    async def test_pagination_serves_every_task_once(self, task_store: TaskStore, descending: bool) -> None:
        # Start times collide in groups of three, so page boundaries fall inside ties.
        docs = [make_task(f"task-{i:02d}", started=T0 + (i // 3)) for i in random.Random(1).sample(range(45), 45)]
        await task_store.save_many(docs)

        tasks, sizes = await list_all(task_store, TaskQuery(FN, limit=10, descending=descending))

        assert sizes == [10, 10, 10, 10, 5]
        assert [key(t) for t in tasks] == sorted(map(key, docs), reverse=descending)

    async def test_last_full_page_has_empty_token(self, task_store: TaskStore) -> None:
        await task_store.save_many([make_task(f"t{i:02d}", started=T0 + i) for i in range(20)])

        first = await task_store.list_tasks(TaskQuery(FN, limit=10))
        second = await task_store.list_tasks(TaskQuery(FN, limit=10, next_token=first.next_token))

        assert first.next_token != "" and second.next_token == ""
        assert len(second.tasks) == 10

    async def test_page_size_may_change_between_pages(self, task_store: TaskStore) -> None:
        docs = [make_task(f"t{i:02d}", started=T0 + i) for i in range(12)]
        await task_store.save_many(docs)

        first = await task_store.list_tasks(TaskQuery(FN, limit=5))
        rest = await task_store.list_tasks(TaskQuery(FN, limit=100, next_token=first.next_token, include_payload=True))

        assert [t["taskId"] for t in first.tasks + rest.tasks] == [d["taskId"] for d in docs]
        assert rest.next_token == ""

    @pytest.mark.parametrize("name", list(FILTERS))
    @pytest.mark.parametrize("descending", [False, True], ids=["asc", "desc"])
    async def test_filters(self, task_store: TaskStore, name: str, descending: bool) -> None:
        docs = dataset()
        await task_store.save_many(docs)
        kwargs, predicate = FILTERS[name]
        expected = sorted((d for d in docs if d["functionName"] == FN and predicate(d)), key=key, reverse=descending)

        single = await task_store.list_tasks(TaskQuery(FN, limit=100, descending=descending, **kwargs))
        paged, _ = await list_all(task_store, TaskQuery(FN, limit=3, descending=descending, **kwargs))

        want = [public(d, include_payload=False) for d in expected]
        assert single.tasks == want
        assert single.next_token == ""
        assert paged == want

    async def test_other_functions_never_leak(self, task_store: TaskStore) -> None:
        docs = dataset()
        await task_store.save_many(docs)

        for function in (FN, f"{FN}-v2", "other", "image", "nobody"):
            tasks, _ = await list_all(task_store, TaskQuery(function, limit=7, include_payload=True))
            expected = sorted((d for d in docs if d["functionName"] == function), key=key)
            assert tasks == [public(d, include_payload=True) for d in expected]

    async def test_include_payload(self, task_store: TaskStore) -> None:
        await task_store.save_many([make_task("t1", payload="secret"), make_task("t2", started=T0 + 1, payload=None)])

        hidden = await task_store.list_tasks(TaskQuery(FN))
        shown = await task_store.list_tasks(TaskQuery(FN, include_payload=True))

        assert all("taskPayload" not in t for t in hidden.tasks)
        assert [t["taskPayload"] for t in shown.tasks] == ["secret", None]
        for task in hidden.tasks + shown.tasks:
            assert not set(INTERNAL_FIELDS) & task.keys()

    @pytest.mark.parametrize(
        "change",
        [
            {"function": "other"},
            {"status": "Running"},
            {"prefix": "t"},
            {"qualifier": "prod"},
            {"started_time_begin": T0},
            {"started_time_end": T0 + 100},
            {"descending": True},
        ],
        ids=lambda c: next(iter(c)),
    )
    async def test_token_replayed_with_other_filters_is_rejected(
        self, task_store: TaskStore, change: dict[str, Any]
    ) -> None:
        await task_store.save_many([make_task(f"t{i}", started=T0 + i) for i in range(5)])
        page = await task_store.list_tasks(TaskQuery(FN, limit=2))

        with pytest.raises(InvalidNextToken):
            await task_store.list_tasks(replace(TaskQuery(FN, limit=2), **change, next_token=page.next_token))

    @pytest.mark.parametrize(
        "token",
        [
            "garbage",
            "!!!!",
            "x" * 5000,
            "=" * 4,
            base64.urlsafe_b64encode(b"not json").decode(),
            base64.urlsafe_b64encode(b'{"startedTime": 1}').decode(),
            base64.urlsafe_b64encode(json.dumps([1, True, "t", "0" * 16]).encode()).decode(),
            base64.urlsafe_b64encode(json.dumps([1, 1, "t", "0" * 16]).encode()).decode(),
        ],
        ids=["word", "symbols", "long", "padding-only", "not-json", "wrong-shape", "bool-time", "other-version"],
    )
    async def test_garbage_token_is_rejected(self, task_store: TaskStore, token: str) -> None:
        with pytest.raises(InvalidNextToken):
            await task_store.list_tasks(TaskQuery(FN, next_token=token))

    async def test_truncated_and_forged_tokens_are_rejected(self, task_store: TaskStore) -> None:
        await task_store.save_many([make_task(f"t{i}", started=T0 + i) for i in range(5)])
        token = (await task_store.list_tasks(TaskQuery(FN, limit=2))).next_token
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        raw[-1] = "0" * len(raw[-1])
        forged = base64.urlsafe_b64encode(json.dumps(raw).encode()).decode()

        for bad in (token[:-3], forged):
            with pytest.raises(InvalidNextToken):
                await task_store.list_tasks(TaskQuery(FN, limit=2, next_token=bad))

    async def test_limit_below_one_is_rejected(self, task_store: TaskStore) -> None:
        with pytest.raises(InvalidArgument):
            await task_store.list_tasks(TaskQuery(FN, limit=0))

    async def test_delete_all(self, task_store: TaskStore) -> None:
        docs = dataset()
        await task_store.save_many(docs)

        await task_store.delete_all()

        assert await task_store.load_many(d["_id"] for d in docs) == {}
        assert (await task_store.list_tasks(TaskQuery(FN))).tasks == []


async def test_connect_pings_the_server(mongo_url: str) -> None:
    store = await TaskStore.connect(mongo_url, database="taskmode_test_connect", timeout_s=10)
    try:
        assert await store.get(FN, "absent") is None
    finally:
        await store.close()


async def test_connect_gives_up_after_timeout() -> None:
    with pytest.raises(ServiceUnavailable):
        await TaskStore.connect(f"mongodb://127.0.0.1:{free_port()}", timeout_s=0.5)


async def test_connect_waits_for_a_late_server(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    connecting = asyncio.create_task(TaskStore.connect(f"mongodb://127.0.0.1:{port}", timeout_s=60))
    server = await asyncio.to_thread(start_mongo_wire, tmp_path, port=port)
    try:
        store = await connecting
        try:
            assert await store.get(FN, "absent") is None
        finally:
            await store.close()
    finally:
        server.stop()
    assert "not answering" in caplog.text  # the wait was retried and logged


@pytest.mark.parametrize(
    ("prefix", "upper"),
    [("job-", "job."), ("a", "b"), ("a_", "a`"), ("Z", "["), ("x\U0010ffff", "y"), ("\U0010ffff", None), ("\ud7ff", "\ue000")],
)
def test_prefix_upper_bound(prefix: str, upper: str | None) -> None:
    assert prefix_upper_bound(prefix) == upper


async def test_purge_expired_sweeps_what_a_ttl_index_would(mongo_url: str) -> None:
    """Where no TTL index is created (the embedded server), the sweep removes expired tasks."""
    import datetime as dt
    import uuid

    from pymongo import AsyncMongoClient

    database = f"taskmode_test_{uuid.uuid4().hex}"
    client: AsyncMongoClient = AsyncMongoClient(mongo_url, tz_aware=True)  # type: ignore[type-arg]
    store = TaskStore(client, database=database)
    try:
        await store.ensure_indexes(ttl_index=False)
        old = {**make_task("old", function="f"), "expireAt": dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)}
        fresh = make_task("fresh", function="f")
        await store.save_many([old, fresh])
        assert await store.purge_expired(dt.datetime.now(dt.UTC)) == 1
        assert await store.get("f", "old") is None
        assert await store.get("f", "fresh") is not None
        keys = [tuple(info["key"]) for info in (await store.collection.index_information()).values()]
        assert (("expireAt", 1),) not in keys
    finally:
        await client.drop_database(database)
        await store.close()
