"""One way for every service to come up: connect → stream → consumer(s) → catalog.

Each resource's close is pushed on the caller's `AsyncExitStack` as soon as it is open, so a
failure halfway closes what was opened, in reverse order.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from dataclasses import dataclass

from nats.aio.client import Client
from nats.js import JetStreamContext

from shared import bus
from shared.catalog import Catalog
from shared.eventstore import EventStore, ensure_stream
from shared.settings import CommonSettings

log = logging.getLogger(__name__)

_DRAIN_TIMEOUT_S = 5.0


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
    await ensure_stream(js, replicas=settings.stream_replicas)
    return Bus(nc=nc, js=js, events=EventStore(js, partitions=settings.partitions))


async def open_catalog(bus_: Bus, stack: AsyncExitStack) -> Catalog:
    """The function catalog, with its local mirror watched until `stack` closes."""
    catalog = await Catalog.open(bus_.js)
    await catalog.watch()
    stack.push_async_callback(catalog.close)
    return catalog
