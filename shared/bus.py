"""Connecting to NATS with bounded, logged retries, and the consumer loop every service uses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

log = logging.getLogger(__name__)


async def connect(url: str, *, name: str, attempts: int = 30, delay_s: float = 0.5) -> Client:
    """Connect to `url`, retrying `attempts` times; reconnects forever once connected."""
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            return await nats.connect(
                url, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5, connect_timeout=2
            )
        except Exception as err:  # noqa: BLE001 - every connect failure is retried the same way
            last = err
            log.warning("nats connect failed", extra={"url": url, "attempt": attempt, "error": str(err)})
            await asyncio.sleep(delay_s)
    raise ConnectionError(f"could not connect to NATS at {url}") from last


async def ensure_consumer(
    js: JetStreamContext,
    *,
    stream: str,
    durable: str,
    filter_subjects: list[str],
    ack_wait_s: float,
    max_ack_pending: int,
    ack_policy: AckPolicy = AckPolicy.EXPLICIT,
) -> None:
    """Create or update a durable pull consumer that starts from the beginning of the stream.

    `max_deliver` is unlimited because handlers park not-yet-due work with a delayed nak.
    """
    config = ConsumerConfig(
        durable_name=durable,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=ack_policy,
        ack_wait=ack_wait_s,
        max_deliver=-1,
        max_ack_pending=max_ack_pending,
        filter_subjects=filter_subjects,
    )
    await js.add_consumer(stream, config)


async def consume(
    js: JetStreamContext,
    *,
    stream: str,
    durable: str,
    handle_batch: Callable[[list[Msg]], Awaitable[None]],
    stop: asyncio.Event,
    batch: int = 256,
    wait_s: float = 0.5,
    min_interval_s: float = 0.0,
) -> None:
    """Fetch batches from a durable pull consumer and hand them over until `stop` is set.

    The handler owns each message's outcome (ack, nak with delay, or term); this loop only
    fetches, so one place per service decides the fate of every message. With `min_interval_s`
    a partial batch is followed by a pause, so that under load more work arrives per batch.
    """
    sub = await js.pull_subscribe_bind(durable=durable, stream=stream)
    loop = asyncio.get_running_loop()
    try:
        while not stop.is_set():
            try:
                msgs = await sub.fetch(batch, timeout=wait_s)
            except (NatsTimeoutError, asyncio.TimeoutError):
                continue
            if msgs:
                started = loop.time()
                await handle_batch(msgs)
                rest = min_interval_s - (loop.time() - started)
                if len(msgs) < batch and rest > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), rest)
    finally:
        await sub.unsubscribe()
