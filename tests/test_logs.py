"""Log lines: one JSON object each, ISO 8601 time, the record's fields, no terminal colour codes."""

from __future__ import annotations

import json
import logging
from datetime import datetime

from shared.logs import JsonFormatter, timestamp_s


def test_a_line_is_json_with_an_iso_time_and_the_task_fields() -> None:
    record = logging.makeLogRecord({"msg": "task %s", "args": ("Running",), "levelname": "INFO", "name": "x",
                                    "task_id": "t1", "function": "f", "status": "Running",
                                    "color_message": "task \x1b[1mRunning\x1b[0m"})
    line = JsonFormatter("executor").format(record)
    parsed = json.loads(line)
    assert parsed["msg"] == "task Running"
    assert (parsed["task_id"], parsed["function"], parsed["status"]) == ("t1", "f", "Running")
    assert "\x1b" not in line and "color_message" not in parsed
    assert abs(datetime.fromisoformat(parsed["ts"]).timestamp() - record.created) < 0.001
    assert timestamp_s(parsed["ts"]) == datetime.fromisoformat(parsed["ts"]).timestamp()
    assert timestamp_s(12.5) == 12.5
