"""The event store against a real nats-server: ordering, optimistic concurrency, dedup."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.js import JetStreamContext

from shared.devstack import ChildProcess, start_nats
from shared.errors import ConcurrentUpdateError, TransitionNotAllowed
from shared.events import TaskEnqueued, TaskProcessed, TaskStarted, TaskStopped, TaskSucceeded
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError

from shared.acks import AckInbox
from shared.eventstore import EventStore, TaskCreator, ensure_stream, follow, now_ms

pytestmark = pytest.mark.timeout(30)


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


def enqueued(task_id: str) -> TaskEnqueued:
    return TaskEnqueued(task_id=task_id, function="f", version=1, at_ms=now_ms(), payload=b"p")


async def test_first_event_is_unique_per_task(js: JetStreamContext) -> None:
    store = EventStore(js, partitions=4)
    await store.append(enqueued("a"), expected_seq=0)
    with pytest.raises(ConcurrentUpdateError):
        await store.append(enqueued("a"), expected_seq=0)
    await store.append(enqueued("b"), expected_seq=0)  # another task id is independent


async def test_an_append_whose_answer_was_lost_lands_once(js: JetStreamContext, monkeypatch: pytest.MonkeyPatch) -> None:
    # The first try is stored but its answer never reaches us (a reconnect, say): the retry is
    # refused by the expected sequence and recognised as ours, so the event is stored once.
    deliver = AckInbox.request
    lost: list[Msg] = []

    async def lose_the_first_answer(self: AckInbox, subject: str, data: bytes, headers: bytes, *,
                                    timeout_s: float) -> Msg:
        answer = await deliver(self, subject, data, headers, timeout_s=timeout_s)
        if not lost:
            lost.append(answer)
            raise NatsTimeoutError
        return answer

    monkeypatch.setattr(AckInbox, "request", lose_the_first_answer)
    store = EventStore(js, partitions=4)
    event = enqueued("lost-answer")

    seq = await store.append(event, expected_seq=0)

    assert len(lost) == 1
    assert [(stored.seq, stored.event) for stored in await store.history("f", "lost-answer")] == [(seq, event)]


async def test_racing_writers_on_one_task_exactly_one_wins(js: JetStreamContext) -> None:
    store = EventStore(js, partitions=4)
    await store.append(enqueued("race"), expected_seq=0)
    current = await store.last("f", "race")
    assert current is not None
    results = await asyncio.gather(
        store.append(follow(current, TaskProcessed), expected_seq=current.seq),
        store.append(follow(current, TaskStopped), expected_seq=current.seq),
        return_exceptions=True,
    )
    assert sum(isinstance(r, int) for r in results) == 1
    assert sum(isinstance(r, ConcurrentUpdateError) for r in results) == 1


async def test_history_is_in_order_and_last_sees_the_newest(js: JetStreamContext) -> None:
    store = EventStore(js, partitions=4)
    seq = await store.append(enqueued("h"), expected_seq=0)
    current = await store.last("f", "h")
    assert current is not None and current.seq == seq
    for cls, fields in ((TaskProcessed, {}), (TaskStarted, {"instance_id": "i"}), (TaskSucceeded, {})):
        event = follow(current, cls, **fields)
        current = type(current)(await store.append(event, expected_seq=current.seq), event)
    history = await store.history("f", "h")
    assert [s.event.status for s in history] == ["Enqueued", "Processed", "Running", "Succeeded"]
    assert [s.event.version for s in history] == [1, 2, 3, 4]
    enq = await store.last_with_status("f", "h", "Enqueued")
    assert enq is not None and enq.event.payload == b"p"
    assert await store.last("f", "missing") is None


async def test_follow_refuses_an_edge_outside_the_table(js: JetStreamContext) -> None:
    store = EventStore(js, partitions=4)
    await store.append(enqueued("edge"), expected_seq=0)
    current = await store.last("f", "edge")
    assert current is not None
    with pytest.raises(TransitionNotAllowed):
        follow(current, TaskSucceeded)


async def create_all(creator: TaskCreator, events: list[TaskEnqueued]) -> list[Exception | None]:
    """Send every event through `creator` at once; each one's outcome, in order."""
    loop = asyncio.get_running_loop()
    outcomes: list[asyncio.Future[Exception | None]] = [loop.create_future() for _ in events]
    for event, outcome in zip(events, outcomes):
        async def done(error: Exception | None, outcome: asyncio.Future[Exception | None] = outcome) -> None:
            outcome.set_result(error)

        await creator.create(event, done)
    return list(await asyncio.gather(*outcomes))


async def test_pipelined_first_appends_keep_the_dedup_of_single_appends(js: JetStreamContext) -> None:
    store = EventStore(js, partitions=4)
    await store.append(enqueued("pipe_taken"), expected_seq=0)
    creator = TaskCreator(store, max_in_flight=16)  # fewer than the events: creating waits for room
    await creator.start()
    try:
        ids = [f"pipe_{i % 50}" for i in range(100)] + ["pipe_taken"]
        outcomes = await create_all(creator, [enqueued(task_id) for task_id in ids])
    finally:
        await creator.close()
    # In flight together, repeats still lose: the stream applies the appends in order.
    assert outcomes[:50] == [None] * 50
    assert all(isinstance(o, ConcurrentUpdateError) for o in outcomes[50:])
    for i in range(50):
        history = await store.history("f", f"pipe_{i}")
        assert [s.event.status for s in history] == ["Enqueued"]


async def test_unacknowledged_pipelined_appends_are_settled_by_reading_back(js: JetStreamContext) -> None:
    store = EventStore(js, partitions=4)
    await store.append(enqueued("lost_taken"), expected_seq=0)
    creator = TaskCreator(store, timeout_s=0.5)
    await creator.start()
    assert creator._sub is not None
    await creator._sub.unsubscribe()  # every acknowledgement is lost from now on
    try:
        another = TaskEnqueued(task_id="lost_taken", function="f", version=1, at_ms=now_ms(), payload=b"another")
        outcome_new, outcome_taken = await create_all(creator, [enqueued("lost_new"), another])
    finally:
        await creator.close()
    assert outcome_new is None  # stored: read back, it is ours
    assert isinstance(outcome_taken, ConcurrentUpdateError)  # another Enqueued event is there
    assert creator.in_flight == 0


async def test_the_stream_is_s2_compressed_and_an_older_uncompressed_one_is_brought_to_it(js: JetStreamContext) -> None:
    from nats.js.api import StoreCompression

    from shared import wire

    assert (await js.stream_info(wire.EVENT_STREAM)).config.compression == StoreCompression.S2
    await ensure_stream(js, compressed=False)  # as a stream made before compression was on
    assert (await js.stream_info(wire.EVENT_STREAM)).config.compression == StoreCompression.NONE
    await ensure_stream(js)  # what every service does at start
    assert (await js.stream_info(wire.EVENT_STREAM)).config.compression == StoreCompression.S2
