"""One way for every service to come up: connect → stream → consumer(s) → catalog.

Each resource's close is pushed on the caller's `AsyncExitStack` as soon as it is open, so a
failure halfway closes what was opened, in reverse order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TypeVar

from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext

from shared import bus
from shared.catalog import Catalog
from shared.eventstore import EventStore, ensure_stream
from shared.settings import CommonSettings

log = logging.getLogger(__name__)

_DRAIN_TIMEOUT_S = 5.0
# JetStream's API can time out while a cluster elects leaders (or a loaded server catches up):
# set-up steps are retried for this long before the service gives up.
_SETUP_PATIENCE_S = 60.0

T = TypeVar("T")


async def _patiently(step: Callable[[], Awaitable[T]], *, what: str) -> T:
    """Run a set-up step, retrying JetStream API timeouts with backoff for a while."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _SETUP_PATIENCE_S
    delay_s = 0.25
    while True:
        try:
            return await step()
        except (NatsTimeoutError, asyncio.TimeoutError) as err:
            if loop.time() + delay_s > deadline:
                raise
            log.warning("set-up step timed out; retrying", extra={"step": what, "error": repr(err)})
            await asyncio.sleep(delay_s)
            delay_s = min(4.0, delay_s * 2)


@dataclass(frozen=True)
class Bus:
    nc: Client
    js: JetStreamContext
    events: EventStore


async def _close(nc: Client) -> None:
    try:
        await asyncio.wait_for(nc.drain(), timeout=_DRAIN_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001 - closing anyway is the only thing left to do
        log.warning("nats drain failed; closing", extra={"error": repr(err)})
        await nc.close()


async def open_bus(
    settings: CommonSettings, stack: AsyncExitStack, *, name: str, stop: asyncio.Event | None = None
) -> Bus:
    """Connect to NATS as `name` and make sure the event stream exists in its current shape."""
    nc = await bus.connect(settings.nats_url, name=name, stop=stop, user_credentials=settings.nats_credentials)
    stack.push_async_callback(_close, nc)
    js = nc.jetstream()
    await _patiently(lambda: ensure_stream(js, replicas=settings.stream_replicas), what="event stream")
    return Bus(nc=nc, js=js, events=EventStore(js, partitions=settings.partitions))


async def open_catalog(bus_: Bus, stack: AsyncExitStack) -> Catalog:
    """The function catalog, with its local mirror watched until `stack` closes."""
    catalog = await _patiently(lambda: Catalog.open(bus_.js), what="catalog")
    await _patiently(catalog.watch, what="catalog watch")
    stack.push_async_callback(catalog.close)
    return catalog
