"""Templates (Jinja2, autoescaped) and the small view helpers they use."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final

from jinja2 import Environment, FileSystemLoader, select_autoescape

from shared.transitions import TERMINAL, Status

TEMPLATES_DIR: Final = Path(__file__).resolve().parent / "templates"
STATUSES: Final = [status.value for status in Status]
TERMINAL_NAMES: Final = frozenset(status.value for status in TERMINAL)


def format_ms(epoch_ms: Any) -> str:
    """Epoch milliseconds as UTC with milliseconds ('' when absent)."""
    if not isinstance(epoch_ms, (int, float)) or not epoch_ms:
        return ""
    moment = datetime.fromtimestamp(epoch_ms / 1000, tz=timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def format_duration(duration_ms: Any) -> str:
    if not isinstance(duration_ms, (int, float)):
        return ""
    if duration_ms < 1000:
        return f"{duration_ms:.0f} ms"
    if duration_ms < 120_000:
        return f"{duration_ms / 1000:.2f} s"
    return f"{duration_ms / 60_000:.1f} min"


def pretty_detail(detail: Any) -> str:
    """An event's JSON detail as `key: value` pairs, for the timeline."""
    if not detail:
        return ""
    try:
        fields = json.loads(detail)
    except ValueError:
        return str(detail)
    if not isinstance(fields, dict):
        return str(detail)
    shown = []
    for key, value in fields.items():
        if key.endswith("AtMs") and isinstance(value, int):
            value = format_ms(value)
        shown.append(f"{key}: {value}")
    return ", ".join(shown)


def pretty_payload(text: Any) -> str:
    """A payload or result, indented when it is JSON."""
    if text is None:
        return ""
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except (ValueError, TypeError):
        return str(text)


def running_at(task: dict[str, Any]) -> int | None:
    """When the handler first started (startedTime is the submission time, as in FC)."""
    for event in task.get("events") or []:
        if event.get("status") == Status.RUNNING.value:
            return int(event.get("timestamp") or 0) or None
    return None


def row_view(task: dict[str, Any]) -> dict[str, Any]:
    """What a task list row shows."""
    status = str(task.get("status", ""))
    return {
        "status": status,
        "task_id": task.get("taskId", ""),
        "instance_id": task.get("instanceId") or "",
        "qualifier": task.get("qualifier") or "",
        "submitted": format_ms(task.get("startedTime")),
        "started": format_ms(running_at(task)),
        "ended": format_ms(task.get("endTime")),
        "duration": format_duration(task.get("durationMs")),
        "retries": task.get("alreadyRetriedTimes", 0),
        "terminal": status in TERMINAL_NAMES,
    }


def build_environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(ms=format_ms, duration=format_duration, detail=pretty_detail, pretty=pretty_payload)
    env.globals.update(STATUSES=STATUSES, TERMINAL=TERMINAL_NAMES)
    return env
