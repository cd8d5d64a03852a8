"""The lifecycle every worker service shares: logging, a stop event set by SIGTERM/SIGINT,
and a metrics endpoint on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

import uvloop
from prometheus_client import CollectorRegistry, start_http_server

from shared.bus import ConsumerGone
from shared.logs import configure

log = logging.getLogger(__name__)


def serve_metrics(registry: CollectorRegistry, *, port: int, host: str = "127.0.0.1") -> None:
    """Expose `registry` at http://`host`:`port`/metrics (port 0: not at all)."""
    if port:
        start_http_server(port, addr=host, registry=registry)


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
        try:
            loop_runner.run(runner())
        except ConsumerGone as gone:
            # Deliberate (a rebuild deleted it): exit non-zero so a supervisor starts us afresh.
            log.warning("exiting: %s", gone)
            raise SystemExit(3) from gone


async def periodically(action: Callable[[], Awaitable[None]], *, every_s: float, stop: asyncio.Event, what: str) -> None:
    """Run `action` every `every_s` until `stop`; a failure is logged and retried next tick.

    For side work (metrics, sweeps) that must never take the service down with it.
    """
    while not stop.is_set():
        try:
            await action()
        except Exception as err:  # noqa: BLE001 - see docstring
            log.warning("%s failed", what, extra={"error": str(err)})
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)


async def cancel_all(*tasks: asyncio.Task[None]) -> None:
    """Cancel background tasks and wait until they are gone."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
