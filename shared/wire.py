"""Every name that crosses a process boundary: subjects, stream, buckets, headers, collections.

Services never spell these as literals; a rename happens here and nowhere else.
"""

from __future__ import annotations

from typing import Final

API_VERSION: Final = "2023-03-30"

EVENT_STREAM: Final = "TASKMODE_EVENTS"
EVENT_SUBJECT_PREFIX: Final = "taskmode.events"
EVENT_SUBJECTS_ALL: Final = f"{EVENT_SUBJECT_PREFIX}.>"
RETENTION_S: Final = 7 * 24 * 3600

FUNCTIONS_BUCKET: Final = "taskmode_functions"
ASYNC_CONFIG_BUCKET: Final = "taskmode_async_configs"
CODE_BUCKET: Final = "taskmode_code"

SCHEDULER_DURABLE: Final = "taskmode-scheduler"
EXECUTOR_DURABLE: Final = "taskmode-executor"
PROJECTION_DURABLE: Final = "taskmode-projection"

SYNC_INVOKE_PREFIX: Final = "taskmode.invoke"
EXECUTOR_QUEUE_GROUP: Final = "taskmode-executors"

HEADER_MSG_ID: Final = "Nats-Msg-Id"
HEADER_EXPECTED_LAST_SUBJECT_SEQ: Final = "Nats-Expected-Last-Subject-Sequence"
HEADER_EXPECTED_LAST_SUBJECT_SEQ_SUBJECT: Final = "Nats-Expected-Last-Subject-Sequence-Subject"
# JetStream's error code for a failed Nats-Expected-Last-Subject-Sequence check.
JS_ERR_WRONG_LAST_SEQUENCE: Final = 10071

MONGO_DATABASE: Final = "taskmode"
TASKS_COLLECTION: Final = "async_tasks"


def event_subject(function: str, task_id: str, status: str) -> str:
    """Subject of one task event; the status token lets consumers filter by transition."""
    return f"{EVENT_SUBJECT_PREFIX}.{function}.{task_id}.{status}"


def task_subjects(function: str, task_id: str) -> str:
    """Wildcard over all events of one task (the unit of optimistic concurrency)."""
    return f"{EVENT_SUBJECT_PREFIX}.{function}.{task_id}.*"


def status_subjects(status: str) -> str:
    """Wildcard over one transition for every task of every function."""
    return f"{EVENT_SUBJECT_PREFIX}.*.*.{status}"


def sync_invoke_subject(function: str) -> str:
    """Request/reply subject for a synchronous invocation of `function`."""
    return f"{SYNC_INVOKE_PREFIX}.{function}"


def message_id(function: str, task_id: str, version: int) -> str:
    """Deterministic JetStream de-duplication id of a task's `version`-th event."""
    return f"{function}:{task_id}:{version}"

# Synchronous invocation reply headers (executor -> gateway over NATS request/reply).
REPLY_ERROR_TYPE: Final = "Taskmode-Error-Type"  # FC x-fc-error-type of a handler error
REPLY_INSTANCE_ID: Final = "Taskmode-Instance-Id"
REPLY_SYSTEM_ERROR: Final = "Taskmode-System-Error"  # FC error code when no handler ran
REQUEST_ID_HEADER: Final = "Taskmode-Request-Id"


def task_events_filter(function: str, task_id: str) -> str:
    """Consumer filter over every transition of one task, for watching it live."""
    return task_subjects(function, task_id)


def function_events_filter(function: str) -> str:
    """Consumer filter over every transition of every task of one function."""
    return f"{EVENT_SUBJECT_PREFIX}.{function}.*.*"
