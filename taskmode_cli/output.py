"""How results are shown: Rich tables for people, `--output json` for scripts."""

from __future__ import annotations

import enum
import json
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

# Piped output is not squeezed into 80 columns: task tables are wide and scripts read them whole.
_PIPED_WIDTH = 200
stdout = Console(highlight=False, soft_wrap=True)
if not stdout.is_terminal:
    stdout = Console(highlight=False, soft_wrap=True, width=_PIPED_WIDTH)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)

STATUS_STYLES = {
    "Succeeded": "green", "Failed": "red", "Invalid": "red", "Expired": "yellow", "Stopped": "yellow",
    "Stopping": "yellow", "Running": "cyan", "Retrying": "magenta", "Enqueued": "blue", "Processed": "blue",
}


class OutputFormat(str, enum.Enum):
    table = "table"
    json = "json"


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLES.get(status, ""))


def format_ms(epoch_ms: Any) -> str:
    """An epoch-milliseconds time as UTC with milliseconds ('' when absent)."""
    if not isinstance(epoch_ms, (int, float)) or not epoch_ms:
        return ""
    moment = datetime.fromtimestamp(epoch_ms / 1000, tz=timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def format_duration_ms(duration_ms: Any) -> str:
    if not isinstance(duration_ms, (int, float)):
        return ""
    if duration_ms < 1000:
        return f"{duration_ms:.0f} ms"
    if duration_ms < 120_000:
        return f"{duration_ms / 1000:.2f} s"
    return f"{duration_ms / 60_000:.1f} min"


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str | None = None) -> None:
    table = Table(title=title, show_lines=False, header_style="bold")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*[cell if isinstance(cell, Text) else Text(str(cell) if cell is not None else "") for cell in row])
    stdout.print(table)


def print_record(record: dict[str, Any], *, title: str | None = None) -> None:
    """A flat key/value view of one API object (nested values as compact JSON)."""
    table = Table(title=title, show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in record.items():
        if isinstance(value, (dict, list)):
            shown = json.dumps(value, ensure_ascii=False)
        elif key in ("startedTime", "endTime", "timestamp"):
            shown = format_ms(value)
        else:
            shown = "" if value is None else str(value)
        table.add_row(key, status_text(shown) if key == "status" else Text(shown))
    stdout.print(table)


def task_row(task: dict[str, Any]) -> list[Any]:
    return [
        status_text(str(task.get("status", ""))),
        task.get("taskId", ""),
        task.get("instanceId") or "",
        task.get("qualifier") or "",
        format_ms(task.get("startedTime")),
        format_ms(_running_at(task)),
        format_ms(task.get("endTime")),
        format_duration_ms(task.get("durationMs")),
        task.get("alreadyRetriedTimes", 0),
    ]


TASK_COLUMNS = ("status", "task id", "instance id", "qualifier", "submitted", "started", "ended", "duration", "retries")


def _running_at(task: dict[str, Any]) -> int | None:
    """When the handler first started: the first Running event (startedTime is the submission)."""
    for event in task.get("events") or []:
        if event.get("status") == "Running":
            return int(event.get("timestamp", 0)) or None
    return None
