"""Console settings, read from TASKMODE_CONSOLE_* (and the other services' metrics ports)."""

from __future__ import annotations

from pathlib import Path
from typing import Final, Self

import msgspec

from shared.settings import env_bool, env_float, env_int, env_str

SESSION_HOURS_VAR: Final = "TASKMODE_CONSOLE_SESSION_HOURS"
SECURE_COOKIES_VAR: Final = "TASKMODE_CONSOLE_SECURE_COOKIES"
METRICS_URLS_VAR: Final = "TASKMODE_CONSOLE_METRICS_URLS"
LOGS_DIR_VAR: Final = "TASKMODE_CONSOLE_LOGS_DIR"
SAMPLE_EVERY_VAR: Final = "TASKMODE_CONSOLE_SAMPLE_EVERY_S"

# Where the other services serve their metrics by default (their own settings' defaults).
_SERVICE_METRICS_PORTS: Final = {"SCHEDULER": 9101, "EXECUTOR": 9102, "PROJECTION": 9103}


def default_metrics_urls() -> tuple[str, ...]:
    """The scheduler's, executor's and projection's /metrics on this machine, as their settings say."""
    host = env_str("TASKMODE_METRICS_HOST", "127.0.0.1")
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    urls = []
    for service, default_port in _SERVICE_METRICS_PORTS.items():
        port = env_int(f"TASKMODE_{service}_METRICS_PORT", default_port)
        if port:
            urls.append(f"http://{host}:{port}/metrics")
    return tuple(urls)


class ConsoleSettings(msgspec.Struct, frozen=True, kw_only=True):
    session_hours: float = 8.0
    # Secure cookies only travel over https; a request that arrived over https always gets them.
    secure_cookies: bool = False
    metrics_urls: tuple[str, ...] = ()
    logs_dir: Path | None = None
    sample_every_s: float = 5.0

    @classmethod
    def from_env(cls) -> Self:
        listed = env_str(METRICS_URLS_VAR, "")
        logs = env_str(LOGS_DIR_VAR, "")
        return cls(
            session_hours=env_float(SESSION_HOURS_VAR, 8.0),
            secure_cookies=env_bool(SECURE_COOKIES_VAR, False),
            metrics_urls=tuple(u.strip() for u in listed.split(",") if u.strip()) if listed else default_metrics_urls(),
            logs_dir=Path(logs) if logs else None,
            sample_every_s=env_float(SAMPLE_EVERY_VAR, 5.0),
        )
