"""The one consumer policy and the bounded first connect, against a real nats-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, StreamConfig

from shared import wire
from shared.bus import (
    ACK,
    Batching,
    BusUnreachable,
    Nak,
    Term,
    Verdict,
    connect,
    consume,
    decoded,
    ensure_consumer,
)
from shared.devstack import ChildProcess, free_port, start_nats
from shared.events import AnyTaskEvent, TaskEnqueued, encode_event
from shared.function_queues import FunctionQueues, QueueSpec, queue_start_time

pytestmark = pytest.mark.timeout(60)

STREAM = "POLICY"


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChildProcess]:
    server = start_nats(Path(tmp_path_factory.mktemp("nats")))
    yield server
    server.stop()


@pytest.fixture
async def js(nats_server: ChildProcess, request: pytest.FixtureRequest) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(nats_server.url)
    context = nc.jetstream()
    await context.add_stream(StreamConfig(name=STREAM, subjects=["policy.>"]))
    await context.purge_stream(STREAM)
    yield context
    # A test that failed midway must not leave its consumer running on a closed connection.
    for stop, _ in _RUNNING:
        stop.set()
    tasks = [task for _, task in _RUNNING]
    _RUNNING.clear()
    if tasks:
        _, late = await asyncio.wait(tasks, timeout=5)
        for task in late:
            task.cancel()
    await nc.close()


_RUNNING: list[tuple[asyncio.Event, asyncio.Task[None]]] = []


async def run_consumer(js: JetStreamContext, durable: str, *, ack_wait_s: float = 30, **handlers: object) -> tuple[
        asyncio.Event, asyncio.Task[None]]:
    ack_policy = AckPolicy.ALL if "on_batch" in handlers else AckPolicy.EXPLICIT
    await ensure_consumer(js, stream=STREAM, durable=durable, filter_subjects=[f"policy.{durable}.>"],
                          ack_wait_s=ack_wait_s, max_ack_pending=1000, ack_policy=ack_policy)
    stop = asyncio.Event()
    task = asyncio.create_task(consume(js, stream=STREAM, durable=durable, stop=stop,
                                       batching=Batching(size=16, wait_s=0.2), **handlers))  # type: ignore[arg-type]
    _RUNNING.append((stop, task))
    return stop, task


async def until(predicate, *, deadline_s: float = 20) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + deadline_s
    while not predicate():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.01)


async def pending(js: JetStreamContext, durable: str) -> tuple[int, int]:
    info = await js.consumer_info(STREAM, durable)
    return info.num_pending, info.num_ack_pending


async def test_a_handler_error_is_redelivered_soon_not_after_the_ack_wait(js: JetStreamContext) -> None:
    deliveries: list[float] = []

    async def flaky(msg: Msg) -> Verdict:
        deliveries.append(time.monotonic())
        if len(deliveries) == 1:
            raise RuntimeError("boom")
        return ACK

    stop, task = await run_consumer(js, "flaky", ack_wait_s=30, on_message=flaky)
    await js.publish("policy.flaky.1", b"x")
    await until(lambda: len(deliveries) >= 2)
    stop.set()
    await task
    # The error became a nak with a ~1 s delay: far sooner than the 30 s ack wait.
    assert 0.5 < deliveries[1] - deliveries[0] < 10
    assert await pending(js, "flaky") == (0, 0)


async def test_verdicts_nak_with_delay_and_term(js: JetStreamContext) -> None:
    seen: dict[bytes, list[float]] = {}

    async def judge(msg: Msg) -> Verdict:
        seen.setdefault(msg.data, []).append(time.monotonic())
        if msg.data == b"later" and len(seen[msg.data]) == 1:
            return Nak(0.5)
        if msg.data == b"poison":
            return Term("poison")
        return ACK

    stop, task = await run_consumer(js, "judge", on_message=judge)
    for body in (b"later", b"poison", b"fine"):
        await js.publish("policy.judge.x", body)
    await until(lambda: len(seen.get(b"later", [])) >= 2 and b"poison" in seen and b"fine" in seen)
    stop.set()
    await task
    assert seen[b"later"][1] - seen[b"later"][0] >= 0.4
    assert len(seen[b"poison"]) == 1 and len(seen[b"fine"]) == 1  # termed and acked: never again
    assert await pending(js, "judge") == (0, 0)


async def test_an_undecodable_event_is_termed_and_a_good_one_handled(js: JetStreamContext) -> None:
    handled: list[str] = []

    async def on_event(event: AnyTaskEvent, msg: Msg) -> Verdict:
        handled.append(event.task_id)
        return ACK

    stop, task = await run_consumer(js, "decoding", on_message=decoded(on_event))
    await js.publish("policy.decoding.bad", b"not json")
    await js.publish("policy.decoding.good", encode_event(
        TaskEnqueued(task_id="t1", function="f", version=1, at_ms=1)))
    await until(lambda: handled == ["t1"])
    await until(lambda: True)
    stop.set()
    await task
    assert await pending(js, "decoding") == (0, 0)


async def test_a_failing_batch_is_retried_whole_before_anything_newer(js: JetStreamContext) -> None:
    batches: list[list[bytes]] = []

    async def fold(msgs: list[Msg]) -> None:
        batches.append([m.data for m in msgs])
        if len(batches) == 1:
            for i in range(1, 5):  # newer messages are waiting while the first batch fails
                await js.publish("policy.batch.x", str(i).encode())
            raise RuntimeError("store away")

    await js.publish("policy.batch.x", b"0")
    stop, task = await run_consumer(js, "batch", on_batch=fold)
    await until(lambda: sum(len(b) for b in batches[1:]) >= 5)
    stop.set()
    await task
    # The failed batch comes back first and whole (with AckPolicy.ALL, acking a newer batch
    # first would have acknowledged it unprocessed); every message is folded once, in order.
    assert batches[1] == batches[0]
    assert [data for batch in batches[1:] for data in batch] == [str(i).encode() for i in range(5)]
    assert await pending(js, "batch") == (0, 0)


async def handling_delays(js: JetStreamContext, subject: str, handled_at: dict[bytes, float], *,
                          count: int = 30, gap_s: float = 0.02) -> list[float]:
    """Publish `count` messages `gap_s` apart to a consumer that is already running; how long
    each waited between its publish's ack and its handling."""
    published_at: dict[bytes, float] = {}
    for i in range(count):
        body = str(i).encode()
        await js.publish(subject, body)
        published_at[body] = time.monotonic()
        await asyncio.sleep(gap_s)  # the pacing under test, not a synchronisation
    await until(lambda: len(handled_at) >= count)
    return [handled_at[body] - published_at[body] for body in published_at]


async def test_a_busy_consumer_hands_over_each_message_as_it_arrives(js: JetStreamContext) -> None:
    handled_at: dict[bytes, float] = {}

    async def note(msg: Msg) -> Verdict:
        handled_at[msg.data] = time.monotonic()
        return ACK

    await ensure_consumer(js, stream=STREAM, durable="steady", filter_subjects=["policy.steady.>"],
                          ack_wait_s=30, max_ack_pending=1000)
    stop = asyncio.Event()
    # A long idle poll: a busy loop that waited like an idle one (for a whole batch) would hold
    # each message back for up to that long.
    task = asyncio.create_task(consume(js, stream=STREAM, durable="steady", stop=stop, on_message=note,
                                       batching=Batching(size=64, wait_s=2.0)))
    _RUNNING.append((stop, task))
    delays = await handling_delays(js, "policy.steady.x", handled_at)
    assert max(delays) < 0.4, sorted(delays)[-5:]


async def test_a_busy_function_queue_hands_over_each_message_as_it_arrives(js: JetStreamContext) -> None:
    handled_at: dict[bytes, float] = {}

    async def on_batch(function: str, msgs: list[Msg]) -> None:
        for msg in msgs:
            handled_at[msg.data] = time.monotonic()
            await msg.ack()

    # The event stream is the queues' own; here it holds only this test's subjects.
    await js.add_stream(StreamConfig(name=wire.EVENT_STREAM, subjects=["queuetest.>"]))
    queues = FunctionQueues(js, durable_of=lambda function: f"q_{function}", room=lambda function: 100,
                            on_batch=on_batch, long_poll_s=2.0)
    await queues.ensure("f", QueueSpec(filter_subjects=("queuetest.f.>",), max_ack_pending=100, ack_wait_s=30,
                                       start_time=queue_start_time("2020-01-01T00:00:00Z")))
    try:
        delays = await handling_delays(js, "queuetest.f.x", handled_at)
    finally:
        await queues.close()
        await js.delete_stream(wire.EVENT_STREAM)
    # Before: a busy puller asked for its whole room with a 0.5 s wait, and arrivals waited for
    # that request to end (the slowest about 0.37 s at this pace; a few ms now).
    assert max(delays) < 0.3, sorted(delays)[-5:]


async def test_first_connect_gives_up_naming_the_url_and_stops_on_request() -> None:
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(BusUnreachable, match=url):
        await connect(url, name="probe", attempts=3, delay_s=0.1)
    assert time.monotonic() - started < 15
    stop = asyncio.Event()
    stop.set()
    started = time.monotonic()
    with pytest.raises(BusUnreachable):
        await connect(url, name="probe", attempts=1000, delay_s=1.0, stop=stop)
    assert time.monotonic() - started < 5  # stopped at once, not after 1000 attempts
