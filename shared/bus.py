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
from nats.js.errors import NotFoundError

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


class ConsumerGone(Exception):
    """The durable consumer was deleted (e.g. to rebuild the read model): the service restarts."""


async def fetch(
    js: JetStreamContext,
    sub: JetStreamContext.PullSubscription,
    *,
    stream: str,
    durable: str,
    batch: int,
    wait_s: float,
) -> list[Msg]:
    """Up to `batch` messages, or none after `wait_s`; rides out a bus that is briefly away.

    Only a deleted consumer ends the service (`ConsumerGone`); any other failure (the server
    restarting, a lost connection) is logged and answered with an empty batch after a pause.
    """
    try:
        return await sub.fetch(batch, timeout=wait_s)
    except (NatsTimeoutError, asyncio.TimeoutError):
        return []
    except Exception as err:  # noqa: BLE001 - classified below
        try:
            await js.consumer_info(stream, durable)
        except NotFoundError as gone:
            raise ConsumerGone(f"consumer {durable} no longer exists") from gone
        except Exception:  # noqa: BLE001 - the server itself is unreachable: wait for it
            pass
        log.warning("fetch failed; retrying", extra={"durable": durable, "error": repr(err)})
        await asyncio.sleep(wait_s)
        return []


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
            msgs = await fetch(js, sub, stream=stream, durable=durable, batch=batch, wait_s=wait_s)
            if msgs:
                started = loop.time()
                await handle_batch(msgs)
                rest = min_interval_s - (loop.time() - started)
                if len(msgs) < batch and rest > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), rest)
    finally:
        await sub.unsubscribe()
