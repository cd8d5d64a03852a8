"""The projection folds a task's later events onto the documents it wrote itself, without reading
them back, and the result is what folding from the store gives (real nats-server and store)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Collection, Iterable, Iterator
from pathlib import Path

import nats
import pytest
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from services.projection.handlers import Projector, WrittenDocuments
from services.projection.metrics import ProjectionMetrics
from shared import wire
from shared.devstack import ChildProcess, start_nats
from shared.events import TaskEnqueued, TaskProcessed, TaskStarted, TaskSucceeded
from shared.eventstore import EventStore, StoredEvent, ensure_stream, follow, now_ms
from shared.metrics_registry import new_registry
from shared.settings import CommonSettings
from shared.taskstore import TaskStore
from shared.taskview import TaskDocument, document_id

FUNCTION = "cachefn"


class CountingStore:
    """The real task store, counting which documents were read back."""

    def __init__(self, store: TaskStore) -> None:
        self._store = store
        self.read: list[str] = []

    async def load_many(self, ids: Iterable[str]) -> dict[str, TaskDocument]:
        wanted = list(ids)
        self.read += wanted
        return await self._store.load_many(wanted)

    async def save_many(self, docs: list[TaskDocument], *, new: Collection[str] = ()) -> None:
        await self._store.save_many(docs, new=new)


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChildProcess]:
    server = start_nats(Path(tmp_path_factory.mktemp("nats")))
    yield server
    server.stop()


@pytest.fixture
async def js(nats_server: ChildProcess) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(nats_server.url)
    context = nc.jetstream()
    await ensure_stream(context)
    yield context
    await nc.close()


def projector(store: CountingStore, events: EventStore) -> Projector:
    settings = CommonSettings.from_env(metrics_port_var="TASKMODE_TEST_UNUSED_PORT", metrics_port_default=0)
    return Projector(store=store, events=events,  # type: ignore[arg-type]  # the counting wrapper
                     metrics=ProjectionMetrics.build(new_registry()), settings=settings)


async def project_new_events(js: JetStreamContext, durable: str, projection: Projector,
                             written: WrittenDocuments | None) -> None:
    """Fetch what the consumer has not delivered yet and project it as one batch."""
    sub = await js.pull_subscribe_bind(durable=durable, stream=wire.EVENT_STREAM)
    msgs = await sub.fetch(100, timeout=5)
    await projection.handle_batch(msgs, written=written)
    await msgs[-1].ack_sync()
    await sub.unsubscribe()


async def test_later_events_fold_onto_written_documents_without_a_read(
        js: JetStreamContext, task_store: TaskStore) -> None:
    events = EventStore(js, partitions=4)
    task_id = f"t{uuid.uuid4().hex[:8]}"
    durable = f"cache{uuid.uuid4().hex[:8]}"
    await js.add_consumer(wire.EVENT_STREAM, ConsumerConfig(
        durable_name=durable, filter_subject=f"taskmode.events.*.{FUNCTION}.{task_id}.*", ack_policy=AckPolicy.ALL))
    store = CountingStore(task_store)
    projection = projector(store, events)
    written = WrittenDocuments()

    enqueued = TaskEnqueued(task_id=task_id, function=FUNCTION, version=1, at_ms=now_ms(), payload=b"{}")
    last = StoredEvent(await events.append(enqueued, expected_seq=0), enqueued)
    await project_new_events(js, durable, projection, written)
    for status, fields in ((TaskProcessed, {}), (TaskStarted, {"instance_id": "i-1", "attempt": 0}),
                           (TaskSucceeded, {"result": b"42", "instance_id": "i-1", "attempt": 0})):
        event = follow(last, status, **fields)  # type: ignore[arg-type]  # each status's own fields
        last = StoredEvent(await events.append(event, expected_seq=last.seq), event)
    await project_new_events(js, durable, projection, written)

    doc_id = document_id(FUNCTION, task_id)
    assert doc_id not in store.read  # folded onto what was written, not read back
    stored = (await task_store.load_many([doc_id]))[doc_id]
    assert stored["status"] == "Succeeded" and stored["version"] == 4
    # The same as a projection that reads the document back before folding.
    await task_store.delete_all()
    reading = projector(CountingStore(task_store), events)
    await js.delete_consumer(wire.EVENT_STREAM, durable)
    await js.add_consumer(wire.EVENT_STREAM, ConsumerConfig(
        durable_name=durable, filter_subject=f"taskmode.events.*.{FUNCTION}.{task_id}.Enqueued",
        ack_policy=AckPolicy.ALL))
    await project_new_events(js, durable, reading, None)
    await js.delete_consumer(wire.EVENT_STREAM, durable)
    await js.add_consumer(wire.EVENT_STREAM, ConsumerConfig(
        durable_name=durable, filter_subjects=[f"taskmode.events.*.{FUNCTION}.{task_id}.{status}"
                                               for status in ("Processed", "Running", "Succeeded")],
        ack_policy=AckPolicy.ALL))
    await project_new_events(js, durable, reading, None)
    folded_from_the_store = (await task_store.load_many([doc_id]))[doc_id]
    assert folded_from_the_store == stored


def test_old_entries_are_not_trusted_and_the_oldest_go_first() -> None:
    doc: TaskDocument = {"_id": "f/a", "version": 1}  # type: ignore[typeddict-item]  # only identity matters
    stale = WrittenDocuments(max_age_s=0.0)
    stale.remember({"f/a": doc})
    assert stale.get("f/a") is None
    bounded = WrittenDocuments(size=2)
    bounded.remember({"f/a": doc, "f/b": doc})
    bounded.remember({"f/a": doc})  # written again: now the newest
    bounded.remember({"f/c": doc})
    assert bounded.get("f/b") is None
    assert bounded.get("f/a") is doc and bounded.get("f/c") is doc
