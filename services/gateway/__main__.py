"""`python -m services.gateway`: read settings, configure logging, serve until SIGTERM."""

from __future__ import annotations

import logging
import resource
import signal
import sys
from types import FrameType

import uvicorn

from shared.errors import TaskmodeError
from shared.logs import configure
from services.gateway.app import create_app
from services.gateway.connections import guarded_protocol
from services.gateway.settings import ACCESS_KEYS_VAR, AUTH_DISABLED_VAR, GatewaySettings

log = logging.getLogger("services.gateway")


def _note_signal(sig: int, frame: FrameType | None) -> None:
    # uvicorn re-raises the signal that stopped it once it has shut down; landing here instead of
    # the default action lets the process end with status 0 after a graceful stop.
    log.info("stopped by signal", extra={"signal": signal.Signals(sig).name})


def _raise_open_file_limit(wanted: int) -> None:
    """Room for `wanted` descriptors (connections plus our own), as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def main() -> int:
    configure("gateway")
    try:
        settings = GatewaySettings.from_env()
    except TaskmodeError as err:
        log.error("invalid configuration", extra={"error": err.message})
        return 2
    if settings.auth_disabled:
        log.warning(
            "AUTHENTICATION IS DISABLED: every request is accepted without a signature; never do this "
            "outside a development machine",
            extra={"setting": AUTH_DISABLED_VAR},
        )
    elif not settings.access_keys:
        log.error(
            f"{ACCESS_KEYS_VAR} is not set: give id:secret[,id:secret...] (or set {AUTH_DISABLED_VAR}=true "
            "for a development machine)"
        )
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _note_signal)
    _raise_open_file_limit(settings.max_connections + 256)
    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=10,
            http=guarded_protocol(header_timeout_s=settings.header_timeout_s,
                                  body_idle_timeout_s=settings.body_idle_timeout_s,
                                  max_per_client=settings.max_connections_per_client),
            limit_concurrency=settings.max_connections,
            h11_max_incomplete_event_size=64 * 1024,
        )
    )
    server.run()
    # uvicorn leaves with should_exit set on a normal stop; a failed startup never sets `started`.
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
