"""Partition leases in NATS KV: a fair split, no partition held twice, failover after expiry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.js import JetStreamContext

from shared import wire
from shared.devstack import ChildProcess, start_nats
from shared.partitions import PartitionLeases, open_leases, run_partitioned

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChildProcess]:
    server = start_nats(Path(tmp_path_factory.mktemp("nats")))
    yield server
    server.stop()


@pytest.fixture
async def js(nats_server: ChildProcess) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(nats_server.url)
    context = nc.jetstream()
    yield context
    await nc.close()


def test_partition_of_is_stable_and_spreads_tasks() -> None:
    assert wire.partition_of("fn", "task-1", 4) == wire.partition_of("fn", "task-1", 4)
    counts = [0] * 4
    for i in range(4000):
        counts[wire.partition_of("fn", f"task-{i}", 4)] += 1
    assert all(800 < count < 1200 for count in counts), counts


async def settle(*members: PartitionLeases, rounds: int = 4) -> None:
    for _ in range(rounds):
        for member in members:
            gained, lost, surplus = await member.tick()
            for partition in surplus:
                await member.release(partition)


async def test_two_members_split_the_partitions_and_never_share_one(js: JetStreamContext) -> None:
    kv = await open_leases(js)
    a = PartitionLeases(kv, group="split", partitions=8, lease_s=30)
    b = PartitionLeases(kv, group="split", partitions=8, lease_s=30)
    await settle(a)
    assert a.held == set(range(8))  # alone, it takes everything
    await settle(b, a, b, a)  # b joins: a hands back its surplus, b claims it
    assert len(a.held) == 4 and len(b.held) == 4
    assert a.held.isdisjoint(b.held) and a.held | b.held == set(range(8))


async def test_a_dead_members_partitions_move_after_its_leases_expire(js: JetStreamContext) -> None:
    kv = await open_leases(js)
    dead = PartitionLeases(kv, group="failover", partitions=4, lease_s=1)
    await settle(dead)
    assert dead.held == set(range(4))
    survivor = PartitionLeases(kv, group="failover", partitions=4, lease_s=1)
    await survivor.tick()
    assert survivor.held == set()  # the leases are still valid: nothing to take yet
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    while survivor.held != set(range(4)):  # `dead` never renews again (as after kill -9)
        assert loop.time() < end, survivor.held
        await survivor.tick()
        await asyncio.sleep(0.1)


async def test_run_partitioned_consumes_what_it_holds_and_frees_it_on_stop(js: JetStreamContext) -> None:
    kv = await open_leases(js)
    leases = PartitionLeases(kv, group="runner", partitions=3, lease_s=3)
    running: set[int] = set()
    started = asyncio.Event()

    async def consume(partition: int, partition_stop: asyncio.Event) -> None:
        running.add(partition)
        if len(running) == 3:
            started.set()
        await partition_stop.wait()
        running.discard(partition)

    stop = asyncio.Event()
    runner = asyncio.create_task(run_partitioned(leases, consume, stop=stop, lease_s=3))
    await asyncio.wait_for(started.wait(), 20)
    stop.set()
    await asyncio.wait_for(runner, 20)
    assert running == set() and leases.held == set()
    other = PartitionLeases(kv, group="runner", partitions=3, lease_s=3)
    await other.tick()
    assert other.held == {0, 1, 2}  # released at once, not left to expire
