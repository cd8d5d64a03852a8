"""A task's log lines, picked from the executors' JSON log files.

The executor logs what an instance prints as `<instance id>: <line>` (logger
`services.executor.instances.output`) and its own lines about a task with a `task_id` field. An
instance serves one invocation at a time, so the lines an instance printed between a Running
event and the task's next event belong to that attempt. This needs the log directory
(`TASKMODE_CONSOLE_LOGS_DIR`, which `make run` sets); without it the console says where the logs are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from shared.transitions import Status
from shared.logs import timestamp_s

# Only the tail of each log file is read: a page view must stay cheap on a long-running system.
TAIL_BYTES: Final = 16 * 1024 * 1024
MAX_LINES: Final = 500
_OUTPUT_LOGGER_SUFFIX: Final = ".instances.output"
_SLACK_S: Final = 1.0  # log timestamps are taken after the event they follow; allow for it


@dataclass(frozen=True)
class Attempt:
    instance_id: str
    from_s: float
    until_s: float | None


@dataclass(frozen=True)
class LogLine:
    at_s: float
    source: str
    text: str


def attempts_of(task: dict[str, Any]) -> list[Attempt]:
    """Each run of the task: its instance, from its Running event to the next event (or open)."""
    events = task.get("events") or []
    found: list[Attempt] = []
    for index, event in enumerate(events):
        if event.get("status") != Status.RUNNING:
            continue
        try:
            instance_id = str(json.loads(event.get("eventDetail") or "{}").get("instanceId", ""))
        except ValueError:
            continue
        following = events[index + 1]["timestamp"] / 1000 if index + 1 < len(events) else None
        found.append(Attempt(instance_id, event["timestamp"] / 1000, following))
    return found


def _tail_lines(path: Path) -> list[str]:
    with path.open("rb") as handle:
        handle.seek(0, 2)
        size = handle.tell()
        handle.seek(max(0, size - TAIL_BYTES))
        data = handle.read()
    lines = data.decode("utf-8", errors="replace").splitlines()
    return lines[1:] if size > TAIL_BYTES else lines  # the first line may be cut


def _belongs(record: dict[str, Any], task_id: str, attempts: list[Attempt]) -> str | None:
    """The line's text if it is about this task, else None."""
    message = str(record.get("msg", ""))
    if record.get("task_id") == task_id and str(record.get("logger", "")).endswith(_OUTPUT_LOGGER_SUFFIX):
        return message.split(": ", 1)[1] if ": " in message else message  # without the instance prefix
    if record.get("task_id") == task_id:
        status = f" [{record['status']}]" if record.get("status") else ""
        return f"{message}{status}"
    if not str(record.get("logger", "")).endswith(_OUTPUT_LOGGER_SUFFIX):
        return None
    at_s = timestamp_s(record.get("ts", 0))
    for attempt in attempts:
        prefix = f"{attempt.instance_id}: "
        in_window = attempt.from_s - _SLACK_S <= at_s and (attempt.until_s is None or at_s <= attempt.until_s + _SLACK_S)
        if attempt.instance_id and message.startswith(prefix) and in_window:
            return message[len(prefix):]
    return None


def task_log_lines(logs_dir: Path, task: dict[str, Any]) -> list[LogLine]:
    """The task's lines from every `executor*.log` in `logs_dir`, oldest first (at most `MAX_LINES`)."""
    task_id = str(task.get("taskId", ""))
    attempts = attempts_of(task)
    found: list[LogLine] = []
    for path in sorted(logs_dir.glob("executor*.log")):
        for line in _tail_lines(path):
            if task_id not in line and not any(a.instance_id and a.instance_id in line for a in attempts):
                continue  # cheap pre-filter before parsing JSON
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            text = _belongs(record, task_id, attempts)
            if text is not None:
                found.append(LogLine(timestamp_s(record.get("ts", 0)), path.stem, text))
    found.sort(key=lambda item: item.at_s)
    return found[-MAX_LINES:]
