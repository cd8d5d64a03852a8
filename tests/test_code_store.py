"""Function code in the object store, read back against a real nats-server: whole, bounded in
time when the bus freezes, and a dispatch that meets a frozen bus waits instead of ending Invalid."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import time
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig

from services.executor.code_cache import CodeCache
from services.executor.metrics import ExecutorMetrics
from services.executor.pool import InstancePool
from services.executor.runner import TaskRunner
from services.executor.settings import ExecutorSettings
from shared import wire
from shared.bus import BUS_TROUBLE, Nak
from shared.catalog import Catalog, FunctionRecord
from shared.devstack import ChildProcess, start_nats
from shared.errors import FunctionNotFound
from shared.events import TaskEnqueued, TaskProcessed
from shared.eventstore import EventStore, StoredEvent, ensure_stream, follow, now_ms
from shared.metrics_registry import new_registry
from shared.transitions import Status

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ChildProcess]:
    process = start_nats(tmp_path / "nats")
    yield process
    process.stop()


@pytest.fixture
async def js(server: ChildProcess) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    context = nc.jetstream()
    await ensure_stream(context)
    yield context
    await nc.close()


async def test_code_is_read_back_whole_across_many_chunks(js: JetStreamContext) -> None:
    catalog = await Catalog.open(js)
    archive = os.urandom(1_300_000)  # about ten 128 KiB chunks
    await catalog.put_code("big", archive)
    assert await catalog.get_code("big") == archive
    await catalog.put_code("empty", b"")
    assert await catalog.get_code("empty") == b""


async def test_missing_code_is_function_not_found(js: JetStreamContext) -> None:
    catalog = await Catalog.open(js)
    with pytest.raises(FunctionNotFound):
        await catalog.get_code("never-stored")


async def test_a_frozen_bus_ends_a_code_read_with_bus_trouble_not_a_hang(server: ChildProcess,
                                                                         js: JetStreamContext) -> None:
    catalog = await Catalog.open(js)
    await catalog.put_code("frozen", os.urandom(400_000))
    server.process.send_signal(signal.SIGSTOP)
    try:
        began = time.monotonic()
        with pytest.raises(BUS_TROUBLE):
            await asyncio.wait_for(catalog.get_code("frozen"), 60)
        assert time.monotonic() - began < 60
    finally:
        server.process.send_signal(signal.SIGCONT)


class FlakyCatalog(Catalog):
    """The real catalog, except that its first code read meets a bus timeout."""

    failures_left = 1

    async def get_code(self, checksum: str) -> bytes:
        if self.failures_left:
            self.failures_left -= 1
            raise nats.errors.TimeoutError
        return await super().get_code(checksum)


def _zip(source: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("index.py", source)
    return buffer.getvalue()


async def test_a_dispatch_whose_code_cannot_be_fetched_now_waits_processed(js: JetStreamContext,
                                                                            tmp_path: Path) -> None:
    real = await Catalog.open(js)
    catalog = FlakyCatalog(js=js, functions=real._functions, async_configs=real._async_configs,
                           code=real._code, versions=real.versions)
    await catalog.put_code("code1", _zip("def handler(event, context):\n    return event\n"))
    await catalog.create_function(FunctionRecord(function_name="fetchy", function_id="id-1", function_arn="arn",
                                                 runtime="python3.10", handler="index.handler", code_checksum="code1",
                                                 created_time="2026-01-01T00:00:00Z"))
    events = EventStore(js, partitions=1)
    enqueued = TaskEnqueued(task_id="t1", function="fetchy", version=1, at_ms=now_ms(), payload=b"p",
                            function_id="id-1")
    seq = await events.append(enqueued, expected_seq=0)
    processed = follow(StoredEvent(seq, enqueued), TaskProcessed, submission=TaskProcessed.carrying(enqueued))
    await events.append(processed, expected_seq=seq)
    subject = wire.function_status_subjects("fetchy", Status.PROCESSED)
    sub = await js.pull_subscribe(subject, durable=None, stream=wire.EVENT_STREAM,
                                  config=ConsumerConfig(filter_subject=subject))
    [msg] = await sub.fetch(1, timeout=5)

    settings = ExecutorSettings.from_env()
    pool = InstancePool(work_dir=tmp_path / "work")
    runner = TaskRunner(events=events, catalog=catalog, code=CodeCache(catalog=catalog, root=tmp_path / "code"),
                        pool=pool, metrics=ExecutorMetrics.build(new_registry()), settings=settings)
    try:
        verdict = await runner.handle(processed, msg)
    finally:
        await pool.close()
    assert isinstance(verdict, Nak), verdict
    last = await events.last("fetchy", "t1")
    assert last is not None and isinstance(last.event, TaskProcessed), last
