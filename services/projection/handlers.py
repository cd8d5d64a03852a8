"""Folds batches of task events into read-model documents: one write per task per batch."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, defaultdict

import msgspec
from nats.aio.msg import Msg

from services.projection.metrics import ProjectionMetrics
from services.projection.task_gauges import TaskGauges
from shared import wire
from shared.catalog import function_arn
from shared.deliveries import DeliveryRecorded, decode_delivery, with_delivery
from shared.errors import TransitionNotAllowed, VersionGap
from shared.events import AnyTaskEvent, decode_event
from shared.ports import EventLog, TaskReadModel
from shared.settings import CommonSettings
from shared.taskview import TaskDocument, document_id, evolve, fold

log = logging.getLogger(__name__)


class WrittenDocuments:
    """The documents a projection wrote lately for one partition it holds, as written.

    The projection is the only writer of its partition's documents while it holds the
    partition, so what it wrote is what the store holds: a task's later events fold onto this
    copy instead of a read of the store (on the embedded server a read costs as much as a
    write). A fresh copy is made whenever a partition is taken, so another owner's writes in
    between are never missed. Entries older than `max_age_s` are not trusted (the expiry sweep
    may have removed the document since); at most `size` are kept, the least recently written
    going first.
    """

    def __init__(self, *, size: int = 10_000, max_age_s: float = 300.0) -> None:
        self._size = size
        self._max_age_s = max_age_s
        self._entries: OrderedDict[str, tuple[float, TaskDocument]] = OrderedDict()

    def get(self, doc_id: str) -> TaskDocument | None:
        entry = self._entries.get(doc_id)
        if entry is None or time.monotonic() - entry[0] >= self._max_age_s:
            return None
        return entry[1]

    def remember(self, docs: dict[str, TaskDocument]) -> None:
        now = time.monotonic()
        for doc_id, doc in docs.items():
            self._entries[doc_id] = (now, doc)
            self._entries.move_to_end(doc_id)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


class Projector:
    def __init__(
        self, *, store: TaskReadModel, events: EventLog, metrics: ProjectionMetrics, settings: CommonSettings,
        gauges: TaskGauges | None = None,
    ) -> None:
        self._gauges = gauges
        self._store = store
        self._events = events
        self._metrics = metrics
        self._settings = settings

    def _arn(self, function: str) -> str:
        return function_arn(region=self._settings.region, account_id=self._settings.account_id, function=function)

    async def handle_batch(self, msgs: list[Msg], *, written: WrittenDocuments | None = None) -> None:
        """Apply a batch in stream order; the consumer policy then acks it with one ack (AckAll).

        `written` (the partition's recent writes) spares the store a read of the documents it has.
        """
        started = time.perf_counter()
        by_task: dict[str, list[AnyTaskEvent]] = defaultdict(list)
        deliveries: dict[str, list[DeliveryRecorded]] = defaultdict(list)
        redelivered = False
        for msg in msgs:
            redelivered = redelivered or msg.metadata.num_delivered > 1
            if wire.is_delivery_subject(msg.subject):
                try:
                    record = decode_delivery(msg.data)
                except msgspec.DecodeError:
                    self._metrics.refused.labels("undecodable").inc()
                    continue
                deliveries[document_id(record.function, record.task_id)].append(record)
                continue
            try:
                event = decode_event(msg.data)
            except msgspec.DecodeError:
                self._metrics.refused.labels("undecodable").inc()
                log.error("undecodable event skipped", extra={"subject": msg.subject})
                continue
            by_task[document_id(event.function, event.task_id)].append(event)
        # A task whose first event is in this batch, delivered for the first time, has no
        # document yet (the read model is emptied whenever the projection starts without a
        # position), so only the others are read.
        known = [doc_id for doc_id, events in by_task.items() if redelivered or events[0].version > 1]
        fresh = {doc_id for doc_id in by_task if doc_id not in known}
        known += [doc_id for doc_id in deliveries if doc_id not in by_task]
        docs: dict[str, TaskDocument] = {}
        if written is not None:
            docs = {doc_id: doc for doc_id in known if (doc := written.get(doc_id)) is not None}
            known = [doc_id for doc_id in known if doc_id not in docs]
        if known:
            docs.update(await self._store.load_many(known))
        changed: dict[str, TaskDocument] = {}
        for doc_id, events in by_task.items():
            doc = await self._apply(docs.get(doc_id), events)
            if doc is not None:
                changed[doc_id] = doc
        # Delivery records follow their task's final event in the stream: fold them in after it.
        for doc_id, records in deliveries.items():
            base = changed.get(doc_id) or docs.get(doc_id)
            if base is None:  # the task's document is gone (expired): nothing to show it on
                continue
            updated = base
            for record in records:
                updated = with_delivery(updated, record)
            if updated is not base:
                changed[doc_id] = updated
        if changed:
            await self._store.save_many(list(changed.values()), new=fresh)
            if written is not None:
                written.remember(changed)
        self._metrics.batch_seconds.observe(time.perf_counter() - started)

    async def _apply(self, doc: TaskDocument | None, events: list[AnyTaskEvent]) -> TaskDocument | None:
        original = doc
        for event in events:
            if doc is not None and event.version <= doc["version"]:
                self._metrics.skipped.inc()
                continue
            try:
                doc = evolve(doc, event, arn=self._arn(event.function))
                self._metrics.applied.inc()
                if self._gauges is not None:
                    self._gauges.on_event(event)
            except VersionGap:
                # The document is missing earlier events (it expired, or the read model was
                # wiped mid-stream): rebuild this task from its full history instead.
                doc = await self._rebuild(event)
            except TransitionNotAllowed as err:
                self._metrics.refused.labels("transition").inc()
                log.error("event refused", extra={"task_id": event.task_id, "function": event.function,
                                                  "status": str(event.status), "error": err.message})
        return doc if doc is not original else None

    async def _rebuild(self, event: AnyTaskEvent) -> TaskDocument | None:
        try:
            history = [stored.event for stored in await self._events.history(event.function, event.task_id)]
            history = [e for e in history if e.version <= event.version]
            return fold(history, arn=self._arn(event.function))
        except (VersionGap, TransitionNotAllowed, msgspec.DecodeError) as err:
            self._metrics.refused.labels("history").inc()
            log.error("task history cannot be folded", extra={"task_id": event.task_id, "function": event.function,
                                                              "error": str(err)})
            return None
