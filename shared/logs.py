"""Structured logging: one JSON line per record, with the record's `extra` fields included.

Only a service's `__main__` calls `configure`; modules use `logging.getLogger(__name__)` and
pass `extra={"task_id": ..., "function": ..., "status": ...}` for task events.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any, Final

import msgspec

# uvicorn attaches an ANSI-coloured copy of some messages as `color_message`: not for JSON.
_STANDARD: Final = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName", "color_message"}
_encode = msgspec.json.Encoder(enc_hook=str).encode


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return _encode(line).decode()


def timestamp_s(value: object) -> float:
    """A log line's `ts` (ISO 8601, or epoch seconds as older lines have it) in epoch seconds."""
    if isinstance(value, int | float):
        return float(value)
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return 0.0


def configure(service: str, *, level: str = "INFO") -> None:
    """Send JSON lines for `service` to stderr at `level`."""
    # A JSON line carries none of the record's source, thread or process fields, so the
    # services skip gathering them (the Logging HOWTO's optimisations): the hot paths log one
    # line per task event, and findCaller alone walked the stack for each.
    logging._srcfile = None  # noqa: SLF001 - the documented switch for caller lookup
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
