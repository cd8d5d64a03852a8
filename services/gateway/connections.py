"""Connection-level limits uvicorn does not have: header and body read timeouts, and a cap on the
connections one client address may hold open.

uvicorn closes idle keep-alive connections, but a connection that is still sending its request
is never timed out, so a client that trickles its headers (slowloris) or its body can hold a file
descriptor forever. `guarded_protocol` returns uvicorn's httptools protocol with three timers:
the headers of a request must be complete within `header_timeout_s` of its first byte (or of the
connection being opened), a body must not pause for longer than `body_idle_timeout_s` while the
app waits for it, and one address may hold at most `max_per_client` connections (0: no cap;
behind a proxy every client has the proxy's address, so set it for the proxy or disable it).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


def guarded_protocol(*, header_timeout_s: float, body_idle_timeout_s: float,
                     max_per_client: int) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol with read timeouts and a per-client connection cap."""
    open_per_client: dict[str, int] = {}

    class GuardedHttpProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._read_timer: asyncio.TimerHandle | None = None
            self._client_host: str | None = None  # counted against the cap while open
            self._awaiting_headers = False

        def _arm(self, delay_s: float, why: str) -> None:
            self._disarm()
            self._read_timer = self.loop.call_later(delay_s, self._timed_out, why)

        def _disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _timed_out(self, why: str) -> None:
            self._read_timer = None
            if not self._awaiting_headers and self.flow is not None and self.flow.read_paused:
                self._arm(body_idle_timeout_s, why)  # the app stopped reading, not the client
                return
            if not self.transport.is_closing():
                log.info("connection closed: %s", why, extra={"client": self._client_host})
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            peer = transport.get_extra_info("peername")
            host = str(peer[0]) if isinstance(peer, tuple) and peer else ""
            if max_per_client and open_per_client.get(host, 0) >= max_per_client:
                log.warning("connection refused: too many open from one client", extra={"client": host})
                transport.abort()
                return
            self._client_host = host
            open_per_client[host] = open_per_client.get(host, 0) + 1
            super().connection_made(transport)
            self._awaiting_headers = True
            self._arm(header_timeout_s, "request headers not received in time")

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            host = self._client_host
            if host is None:  # refused in connection_made: uvicorn never saw it
                return
            self._client_host = None
            remaining = open_per_client.get(host, 1) - 1
            if remaining > 0:
                open_per_client[host] = remaining
            else:
                open_per_client.pop(host, None)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            cycle = self.cycle
            if not self._awaiting_headers and cycle is not None and cycle.more_body and not cycle.response_complete:
                self._arm(body_idle_timeout_s, "request body stalled")  # each chunk pushes it back

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._awaiting_headers = True
            self._arm(header_timeout_s, "request headers not received in time")

        def on_headers_complete(self) -> None:
            self._awaiting_headers = False
            self._disarm()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

    return GuardedHttpProtocol
