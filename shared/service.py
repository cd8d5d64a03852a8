"""The lifecycle every worker service shares: logging, a stop event set by SIGTERM/SIGINT/SIGHUP,
an `AsyncExitStack` that closes what was opened in reverse order, and an HTTP endpoint with
`/metrics`, `/healthz` (alive) and `/readyz` (connected and consuming)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import threading
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AsyncExitStack
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import uvloop
from prometheus_client import CollectorRegistry, make_wsgi_app

from shared.bus import BusUnreachable, ConsumerGone
from shared.logs import configure

log = logging.getLogger(__name__)

# Exit codes a supervisor can tell apart: restart at once, or back off (configuration/outage).
EXIT_CONSUMER_GONE = 3
EXIT_BUS_UNREACHABLE = 4

Main = Callable[[asyncio.Event, AsyncExitStack], Awaitable[None]]


class Readiness:
    """Named checks that must all hold for `/readyz` to answer 200."""

    def __init__(self) -> None:
        self._checks: dict[str, Callable[[], bool]] = {}

    def add(self, name: str, check: Callable[[], bool]) -> None:
        self._checks[name] = check

    def report(self) -> tuple[bool, dict[str, bool]]:
        results: dict[str, bool] = {}
        for name, check in self._checks.items():
            try:
                results[name] = bool(check())
            except Exception:  # noqa: BLE001 - a check that cannot answer is not ready
                results[name] = False
        return bool(results) and all(results.values()), results


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Scrapes every few seconds are not worth a log line each."""


def _app(registry: CollectorRegistry, readiness: Readiness) -> Callable[..., Iterable[bytes]]:
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "application/json")])
            return [b'{"status":"ok"}']
        if path == "/readyz":
            ready, checks = readiness.report()
            start_response("200 OK" if ready else "503 Service Unavailable", [("Content-Type", "application/json")])
            return [json.dumps({"status": "ready" if ready else "not ready", "checks": checks}).encode()]
        return metrics(environ, start_response)  # type: ignore[no-any-return]

    return app


def serve_http(
    registry: CollectorRegistry, readiness: Readiness, *, port: int, host: str, stack: AsyncExitStack
) -> int:
    """Serve metrics and health on `host`:`port` (0: not at all) until `stack` closes; the bound port."""
    if not port:
        return 0
    server = make_server(host, port, _app(registry, readiness), _ThreadingServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()

    def close() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    stack.callback(close)
    return int(server.server_address[1])


def run(service: str, main: Main) -> None:
    """Configure logging, then run `main(stop, stack)` until it returns.

    SIGTERM, SIGINT and SIGHUP set `stop`; everything `main` registered on `stack` is closed
    afterwards in reverse order, also when it fails.
    """
    configure(service)

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        log.info("starting", extra={"service": service})
        async with AsyncExitStack() as stack:
            await main(stop, stack)
        log.info("stopped", extra={"service": service})

    # uvloop: a faster event loop for every service (the gateway's uvicorn picks it up too).
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as loop_runner:
        try:
            loop_runner.run(runner())
        except ConsumerGone as gone:
            # Deliberate (a rebuild deleted it): exit non-zero so a supervisor starts us afresh.
            log.warning("exiting: %s", gone)
            raise SystemExit(EXIT_CONSUMER_GONE) from gone
        except BusUnreachable as unreachable:
            log.error("exiting: %s", unreachable)
            raise SystemExit(EXIT_BUS_UNREACHABLE) from unreachable


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


def background(stack: AsyncExitStack, coro: Awaitable[None]) -> asyncio.Task[None]:
    """Start `coro` as a task that `stack` cancels (and waits for) when it closes."""
    task: asyncio.Task[None] = asyncio.ensure_future(coro)
    stack.push_async_callback(cancel_all, task)
    return task


async def cancel_all(*tasks: asyncio.Task[None]) -> None:
    """Cancel background tasks and wait until they are gone."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
