"""The task read model in MongoDB: one whole document per task, written by the projection.

The projection folds a task's events into its FC `AsyncTask` JSON (camelCase) plus a few
internal fields (`_id`, `functionName`, `version`, `expireAt`) and saves whole documents in
bulk; the gateway serves GetAsyncTask and ListAsyncTasks from here. Every query shape used in
this module (equality, `$in`, ranges on ints and strings, several range operators on one field,
sort + limit, exclusion projections) has been checked against the embedded nx-27017 server as
well as MongoDB. Avoid `$exists` (nx-27017 treats a null-valued field as missing), `$push` and
aggregation here: the embedded server gets them wrong; `$or` works there but is slow.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Final, Self, cast

import msgspec
import pymongo
from bson.codec_options import CodecOptions
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, IndexModel, InsertOne, ReplaceOne, uri_parser
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, PyMongoError

from shared.errors import InvalidArgument, InvalidNextToken, ServiceUnavailable
from shared import wire
from shared.transitions import TERMINAL, Status
from shared.taskview import INTERNAL_FIELDS, TaskDocument, document_id
from shared.wire import MONGO_DATABASE, TASKS_COLLECTION

log = logging.getLogger(__name__)

Document = dict[str, Any]

# What the embedded server (nx-27017) names itself in `buildInfo`; a MongoDB names no process there.
EMBEDDED_SERVER_PROCESS: Final = "nx_27017"
# MongoDB's error code for a unique index (here `_id`) refusing a second document.
DUPLICATE_KEY: Final = 11000


def _replace(doc_id: str, doc: TaskDocument) -> ReplaceOne[Document]:
    return ReplaceOne({"_id": doc_id}, cast(Document, doc), upsert=True)


# Our tokens are a few hundred characters at most (task ids are at most 128); refuse far longer.
_MAX_TOKEN_CHARS: Final = 4096
_TOKEN_VERSION: Final = 2  # 1: positions in the startedTime field, which now means first run
# Tasks are listed in submission order: a task that has not run yet has no startedTime.
ORDER_FIELD: Final = "submitTime"
# Each connect attempt is bounded so a dead server is retried (and logged) instead of hanging.
_PING_TIMEOUT_S: Final = 2.0
_MAX_BACKOFF_S: Final = 2.0


SERVER_SELECTION_TIMEOUT_MS: Final = 5000
HEARTBEAT_MS: Final = 1000


def prefix_upper_bound(prefix: str) -> str | None:
    """The smallest string greater than every string that starts with `prefix`, if any.

    MongoDB orders strings by their UTF-8 bytes, which is code-point order, so incrementing the
    last code point gives an exclusive upper bound and the prefix filter becomes an index-friendly
    range (`>= prefix`, `< bound`). Returns None when no bound exists (all maximal code points).
    """
    chars = list(prefix)
    while chars:
        code = ord(chars.pop()) + 1
        if 0xD800 <= code <= 0xDFFF:  # surrogates cannot be encoded; skip to the next scalar
            code = 0xE000
        if code <= 0x10FFFF:
            return "".join(chars) + chr(code)
    return None


@dataclass(frozen=True)
class TaskQuery:
    """One ListAsyncTasks request, already validated and normalized by the caller.

    `started_time_begin`/`started_time_end` are inclusive epoch milliseconds of submission
    (`submitTime`, the listing's order); `qualifier` selects tasks submitted with it; `descending` is
    `sortOrderByTime=desc`. `limit` and `include_payload` may change between pages; every other
    field is bound into the next token and must stay the same.
    """

    function: str
    status: str | None = None
    prefix: str | None = None
    qualifier: str | None = None
    started_time_begin: int | None = None
    started_time_end: int | None = None
    limit: int = 20
    descending: bool = False
    next_token: str | None = None
    include_payload: bool = False


@dataclass(frozen=True)
class TaskPage:
    """One page of tasks in FC `AsyncTask` shape; `next_token` is "" on the last page."""

    tasks: list[Document]
    next_token: str


class _Cursor(msgspec.Struct, array_like=True, frozen=True):
    """The decoded next token: the last task served and the filters it was served for."""

    version: int
    submit_time: int
    task_id: str
    fingerprint: str


_encode_cursor = msgspec.json.Encoder().encode
_decode_cursor = msgspec.json.Decoder(_Cursor).decode


def _fingerprint(query: TaskQuery) -> str:
    """A short digest of the filters that define the result set and its order."""
    key = [
        query.function,
        query.status or None,
        query.prefix or None,
        query.qualifier or None,
        query.started_time_begin,
        query.started_time_end,
        "desc" if query.descending else "asc",
    ]
    return hashlib.sha256(msgspec.json.encode(key)).hexdigest()[:16]


def _encode_token(query: TaskQuery, last: Document) -> str:
    cursor = _Cursor(_TOKEN_VERSION, int(last[ORDER_FIELD]), str(last["taskId"]), _fingerprint(query))
    return base64.urlsafe_b64encode(_encode_cursor(cursor)).rstrip(b"=").decode("ascii")


def _decode_token(query: TaskQuery, token: str) -> _Cursor:
    """The position in `token`, or InvalidNextToken if it is not ours or was made for other filters."""
    if len(token) > _MAX_TOKEN_CHARS:
        raise InvalidNextToken("nextToken is malformed")
    try:
        raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
        cursor = _decode_cursor(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError) as exc:
        raise InvalidNextToken("nextToken is malformed") from exc
    if cursor.version != _TOKEN_VERSION:
        raise InvalidNextToken("nextToken is malformed")
    if cursor.fingerprint != _fingerprint(query):
        raise InvalidNextToken("nextToken was issued for a different query")
    return cursor


def check_next_token(query: TaskQuery) -> None:
    """Raise InvalidNextToken now if `query.next_token` is not ours or was made for other filters
    (so a caller can refuse bad input before doing anything else)."""
    if query.next_token:
        _decode_token(query, query.next_token)


def list_filters(query: TaskQuery) -> list[Document]:
    """The find filters whose concatenated results, in order, are `query`'s next tasks (after
    its `next_token`, which must be valid: InvalidNextToken otherwise).

    Without a token that is one filter. After a token at (submitTime s, taskId t) it is two,
    both plain index range scans: the rest of the tie at s (taskId beyond t), then every later
    submitTime. This replaces the textbook `$or` keyset, which nx-27017 evaluates about three
    times slower than the two queries together; on MongoDB both are tight scans of the listing
    index. A token positioned outside the time range yields no tie query.

    Equalities are written `{"$eq": v}`: the same match on MongoDB, but the embedded server
    turns a bare `field: v` into an array-aware subquery that no index serves (it scanned every
    task of every function), while `$eq` becomes a plain range of the listing index.
    """
    first: Document = {"functionName": {"$eq": query.function}}
    if query.status:
        first["status"] = {"$eq": query.status}
    if query.qualifier:
        first["qualifier"] = {"$eq": query.qualifier}
    task_range: Document = {}
    if query.prefix:
        task_range["$gte"] = query.prefix
        upper = prefix_upper_bound(query.prefix)
        if upper is not None:
            task_range["$lt"] = upper
        first["taskId"] = task_range
    started_range: Document = {}
    if query.started_time_begin is not None:
        started_range["$gte"] = query.started_time_begin
    if query.started_time_end is not None:
        started_range["$lte"] = query.started_time_end
    if started_range:
        first[ORDER_FIELD] = started_range
    if not query.next_token:
        return [first]

    after = _decode_token(query, query.next_token)

    at, task_id = after.submit_time, after.task_id
    # Several operators on one field AND together (MongoDB semantics, verified on nx-27017).
    beyond = "$lt" if query.descending else "$gt"
    rest = {**first, ORDER_FIELD: {**started_range, beyond: at}}
    in_range = (query.started_time_begin is None or at >= query.started_time_begin) and (
        query.started_time_end is None or at <= query.started_time_end
    )
    if not in_range:
        return [rest]
    tie = {**first, ORDER_FIELD: {"$eq": at}, "taskId": {**task_range, beyond: task_id}}
    return [tie, rest]


def _public_projection(*, include_payload: bool) -> Document:
    projection: Document = dict.fromkeys(INTERNAL_FIELDS, 0)
    if not include_payload:
        projection["taskPayload"] = 0
    return projection


def _redact(url: str) -> str:
    """`url` without credentials, for logs."""
    return re.sub(r"//[^@/]*@", "//***@", url)


def _attempt_timeout_s(deadline: float) -> float:
    """How long one connection attempt may take: 2 s, or what is left before `deadline`."""
    return max(0.05, min(_PING_TIMEOUT_S, deadline - asyncio.get_running_loop().time()))


def _probe_addresses(url: str) -> list[tuple[str, int]]:
    """The seed (host, port) pairs a plain TCP probe can reach; empty when it cannot help."""
    if url.startswith("mongodb+srv://"):  # seeds come from DNS; parsing would resolve them
        return []
    try:
        nodes: list[tuple[str, int]] = uri_parser.parse_uri(url)["nodelist"]
    except PyMongoError:
        return []  # the client constructor reports the bad URL
    return [] if any(host.endswith(".sock") for host, _ in nodes) else nodes


async def _tcp_probe(seeds: Sequence[tuple[str, int]], *, deadline: float) -> None:
    """Return once one seed accepts a TCP connection; raise the last OSError otherwise."""
    error: OSError = ConnectionError("no seed hosts")
    for host, port in seeds:
        try:
            async with asyncio.timeout(_attempt_timeout_s(deadline)):
                _, writer = await asyncio.open_connection(host, port)
        except OSError as exc:  # includes TimeoutError
            error = exc
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
    raise error


async def _retry(attempt: Callable[[], Awaitable[None]], *, deadline: float, what: str) -> int:
    """Await `attempt()` until it succeeds; returns the number of attempts made.

    Connection failures (OSError, PyMongoError) are logged and retried with exponential backoff
    until `deadline` (event-loop time), then turned into ServiceUnavailable.
    """
    loop = asyncio.get_running_loop()
    backoff_s = 0.1
    attempts = 0
    while True:
        attempts += 1
        try:
            await attempt()
            return attempts
        except (OSError, PyMongoError) as exc:
            remaining_s = deadline - loop.time()
            if remaining_s <= 0:
                raise ServiceUnavailable(f"{what} did not answer after {attempts} attempt(s)") from exc
            delay_s = min(backoff_s, remaining_s)
            log.warning("%s not answering (attempt %d): %s; retrying in %.2fs", what, attempts, exc, delay_s)
            await asyncio.sleep(delay_s)
            backoff_s = min(backoff_s * 2, _MAX_BACKOFF_S)


# The keys of the unique index of earlier releases; `_id` already keeps a task unique.
REDUNDANT_UNIQUE_KEYS = [("functionName", 1), ("taskId", 1)]
# The index on the function alone that earlier releases made on the embedded server, whose
# listings could not use the listing index then (`list_filters` says why they can now): one
# more index to write on every save, for nothing.
FUNCTION_ONLY_KEYS = [("functionName", 1)]


class TaskStore:
    """Typed access to the task read model (`TASKS_COLLECTION`) over PyMongo's async API.

    The store owns its client: `close()` closes it. Datetimes come back timezone-aware (UTC)
    whatever the client's own codec options are.
    """

    def __init__(self, client: AsyncMongoClient[Document], *, database: str = MONGO_DATABASE) -> None:
        self._client = client
        codec: CodecOptions[Document] = CodecOptions(document_class=dict, tz_aware=True, tzinfo=timezone.utc)
        self._tasks: AsyncCollection[Document] = client[database].get_collection(
            TASKS_COLLECTION, codec_options=codec
        )

    def believed_reachable(self) -> bool:
        """False while the driver's monitor finds no server to read from: a reader with another
        way to answer (the event stream) can take it at once instead of waiting out server
        selection. Costs no round trip."""
        return bool(self._client.topology_description.has_readable_server())

    @property
    def collection(self) -> AsyncCollection[Document]:
        """The underlying collection, for diagnostics and tests; writes go through the methods."""
        return self._tasks

    @classmethod
    async def connect(cls, url: str, *, database: str = MONGO_DATABASE, timeout_s: float = 10) -> Self:
        """Connect to `url` once the server answers, retrying for at most `timeout_s`.

        First waits for a seed host to accept TCP (skipped for `mongodb+srv` and socket-file
        URLs), then creates the client and pings it; failed attempts are logged and retried with
        exponential backoff capped at 2 s. Past the deadline raises ServiceUnavailable. A
        malformed URL fails at once with pymongo's ConfigurationError. The TCP wait matters:
        closing an AsyncMongoClient while its monitor is mid-connect leaks a socket (pymongo
        4.20), so no client is created before the port is known to be open.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        where = f"MongoDB at {_redact(url)}"
        seeds = _probe_addresses(url)
        attempts = 0
        if seeds:
            attempts += await _retry(lambda: _tcp_probe(seeds, deadline=deadline), deadline=deadline, what=where)
        client: AsyncMongoClient[Document] = AsyncMongoClient(
            url, tz_aware=True, appname="taskmode",
            # Fail within seconds while the server is away: readers can answer otherwise, and a
            # writer's supervisor restarts it, rather than requests hanging for pymongo's 30 s.
            serverSelectionTimeoutMS=SERVER_SELECTION_TIMEOUT_MS,
            # Notice an outage (and the recovery) within a couple of seconds: `believed_reachable` reads it.
            heartbeatFrequencyMS=HEARTBEAT_MS,
        )

        async def ping() -> None:
            with pymongo.timeout(_attempt_timeout_s(deadline)):
                await client.admin.command("ping")

        try:
            attempts += await _retry(ping, deadline=deadline, what=where)
        except BaseException:
            await client.close()
            raise
        log.info("connected to %s (database %s) after %d attempt(s)", where, database, attempts)
        return cls(client, database=database)

    async def ensure_indexes(self, *, ttl_index: bool = True) -> None:
        """Create the listing and TTL indexes; a no-op when they already exist.

        (functionName, submitTime, taskId) serves ListAsyncTasks' filter, sort and keyset in
        both directions. `expireAt` with expireAfterSeconds=0 lets MongoDB delete tasks past
        retention. Without `ttl_index` the caller sweeps with `purge_expired` instead: the
        embedded MongoDB-wire server scans the whole collection on every read while a TTL index
        exists.

        A task is unique per (functionName, taskId) through `_id`, which is derived from them
        (`save_many` refuses any other). The unique index on the pair that stores before
        2026-12 have is dropped: it kept nothing out that `_id` does not, and it made every
        write of the embedded server about a quarter dearer (`python -m bench.store_bench`).
        """
        models = [
            IndexModel(
                [("functionName", ASCENDING), (ORDER_FIELD, ASCENDING), ("taskId", ASCENDING)],
                name="functionName_submitTime_taskId",
            ),
        ]
        if ttl_index:
            models.append(IndexModel([("expireAt", ASCENDING)], name="expireAt_ttl", expireAfterSeconds=0))
        embedded = await self.is_embedded_server()
        async for index in await self._tasks.list_indexes():
            # By its keys: the embedded server names indexes its own way.
            keys = list(index["key"].items())
            if keys == REDUNDANT_UNIQUE_KEYS or (embedded and keys == FUNCTION_ONLY_KEYS):
                await self._tasks.drop_index(index["name"])
        await self._tasks.create_indexes(models)

    async def is_embedded_server(self) -> bool:
        """Whether the server is the embedded MongoDB-wire server (nx-27017), not a MongoDB."""
        info = await self._client.admin.command("buildInfo")
        return bool(info.get("process") == EMBEDDED_SERVER_PROCESS)

    async def purge_expired(self, now: datetime) -> int:
        """Delete tasks whose `expireAt` has passed (the sweep that replaces a TTL index)."""
        result = await self._tasks.delete_many({"expireAt": {"$lt": now}})
        return int(result.deleted_count)

    async def load_many(self, ids: Iterable[str]) -> dict[str, TaskDocument]:
        """Whole stored documents (internal fields included) by `_id`, in one `$in` query.

        Ids that are not stored are absent from the result; duplicates are queried once.
        """
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return {}
        found: dict[str, TaskDocument] = {}
        async for doc in self._tasks.find({"_id": {"$in": wanted}}):
            # Only save_many writes this collection, and only whole TaskDocuments.
            found[doc["_id"]] = cast(TaskDocument, doc)
        return found

    async def save_many(self, docs: Sequence[TaskDocument], *, new: Collection[str] = ()) -> None:
        """Replace (or insert) whole documents, in one unordered bulk write.

        Every document needs `_id == taskview.document_id(functionName, taskId)`. If a batch
        holds the same `_id` twice only the last one is written, because an unordered bulk write
        does not promise to apply operations in order. Documents whose `_id` is in `new` are
        inserted plainly, which costs the embedded server a fifth less than an upsert; one that
        turns out to exist already is replaced after all.
        """
        latest: dict[str, TaskDocument] = {}
        for doc in docs:
            try:
                doc_id = doc["_id"]
                expected = document_id(doc["functionName"], doc["taskId"])
            except KeyError as exc:
                raise ValueError(f"task document lacks {exc.args[0]!r}") from exc
            if doc_id != expected:
                raise ValueError(f"task document _id {doc_id!r} should be {expected!r}")
            latest[doc_id] = doc
        if not latest:
            return
        ids = list(latest)
        # A TaskDocument is a dict at run time; the driver's stubs only want the collection's type.
        writes: list[InsertOne[Document] | ReplaceOne[Document]] = [
            InsertOne(cast(Document, latest[doc_id])) if doc_id in new else _replace(doc_id, latest[doc_id])
            for doc_id in ids
        ]
        try:
            await self._tasks.bulk_write(writes, ordered=False)
        except BulkWriteError as err:
            failed = err.details.get("writeErrors", [])
            if not failed or any(e.get("code") != DUPLICATE_KEY or ids[e["index"]] not in new for e in failed):
                raise
            # Believed new, yet there: written before a crash, say. The newer fold wins.
            await self._tasks.bulk_write([_replace(ids[e["index"]], latest[ids[e["index"]]]) for e in failed],
                                         ordered=False)

    async def get(self, function: str, task_id: str) -> Document | None:
        """One task in FC `AsyncTask` shape (with `taskPayload`, without internal fields), or None."""
        return await self._tasks.find_one(
            {"_id": document_id(function, task_id)}, _public_projection(include_payload=True)
        )

    def check_query(self, query: TaskQuery) -> None:
        """Refuse (InvalidNextToken) a query whose token is not ours or was made for other filters."""
        check_next_token(query)

    async def list_tasks(self, query: TaskQuery) -> TaskPage:
        """One page of a function's tasks, ordered by (submitTime, taskId), keyset-paginated.

        Raises InvalidNextToken for a token that is not ours or was issued for other filters, and
        InvalidArgument for a limit below 1. Fetches `limit + 1` documents to learn whether
        another page exists.
        """
        if query.limit < 1:
            raise InvalidArgument(f"limit must be at least 1, got {query.limit}")
        filters = list_filters(query)
        direction = DESCENDING if query.descending else ASCENDING
        projection = _public_projection(include_payload=query.include_payload)
        sort = [(ORDER_FIELD, direction), ("taskId", direction)]
        fetch = query.limit + 1
        # The parts run concurrently; gather (not a TaskGroup) so a failure surfaces as the
        # driver's own error, which callers handle, rather than wrapped in an ExceptionGroup.
        parts = await asyncio.gather(
            *(self._tasks.find(flt, projection).sort(sort).limit(fetch).to_list() for flt in filters)
        )
        docs = [doc for part in parts for doc in part]
        if len(docs) <= query.limit:
            return TaskPage(tasks=docs, next_token="")
        page = docs[: query.limit]
        return TaskPage(tasks=page, next_token=_encode_token(query, page[-1]))

    async def count_with_status(self, function: str, status: str) -> int:
        """How many of `function`'s tasks are in `status` now (bounded to 2 s of server time)."""
        return int(await self._tasks.count_documents(
            {"functionName": {"$eq": function}, "status": {"$eq": status}}, maxTimeMS=2000))

    async def reachable(self, *, timeout_s: float = 1.0) -> bool:
        """Whether the server answers a ping within `timeout_s` (for readiness probes)."""
        try:
            await asyncio.wait_for(self._client.admin.command("ping"), timeout_s)
        except Exception:  # noqa: BLE001 - any failure means not reachable now
            return False
        return True

    async def unfinished(self, partition: int, *, partitions: int) -> list[Document]:
        """The tasks of one partition that have not reached a final status (a scan, at claim time)."""
        open_statuses = [str(status) for status in Status if status not in TERMINAL]
        fields = {"_id": 0, "functionName": 1, "taskId": 1, "status": 1, "qualifier": 1, "startedTime": 1,
                  "submitTime": 1, "dueTime": 1}
        return [
            doc async for doc in self._tasks.find({"status": {"$in": open_statuses}}, fields)
            if wire.partition_of(doc.get("functionName", ""), doc.get("taskId", ""), partitions) == partition
        ]

    async def delete_partition(self, partition: int, *, partitions: int) -> int:
        """Remove the documents of one partition's tasks (see `wire.partition_of`); how many.

        A scan, not an index lookup: it runs only when a partition is projected from scratch.
        """
        doomed = [
            doc["_id"]
            async for doc in self._tasks.find({}, {"_id": 1, "functionName": 1, "taskId": 1})
            if wire.partition_of(doc.get("functionName", ""), doc.get("taskId", ""), partitions) == partition
        ]
        removed = 0
        for start in range(0, len(doomed), 500):
            result = await self._tasks.delete_many({"_id": {"$in": doomed[start:start + 500]}})
            removed += result.deleted_count
        return removed

    async def delete_all(self) -> None:
        """Remove every task document, keeping the indexes (to rebuild the read model)."""
        await self._tasks.delete_many({})

    async def close(self) -> None:
        """Close the underlying client."""
        await self._client.close()
