"""The lifecycle every worker service shares: logging, a stop event set by SIGTERM/SIGINT,
and a metrics endpoint on loopback."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

import uvloop
from prometheus_client import CollectorRegistry, start_http_server

from shared.logs import configure

log = logging.getLogger(__name__)


def serve_metrics(registry: CollectorRegistry, *, port: int) -> None:
    """Expose `registry` at http://127.0.0.1:`port`/metrics (port 0: not at all)."""
    if port:
        start_http_server(port, addr="127.0.0.1", registry=registry)


def run(service: str, main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Configure logging, then run `main(stop)` until it returns; SIGTERM/SIGINT set `stop`."""
    configure(service)

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("starting", extra={"service": service})
        await main(stop)
        log.info("stopped", extra={"service": service})

    # uvloop: a faster event loop for every service (the gateway's uvicorn picks it up too).
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as loop_runner:
        loop_runner.run(runner())
