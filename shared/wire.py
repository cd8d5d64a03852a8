"""Every name that crosses a process boundary: subjects, stream, buckets, headers, collections.

Services never spell these as literals; a rename happens here and nowhere else.
"""

from __future__ import annotations

import zlib
from typing import Final

from shared.transitions import Status

API_VERSION: Final = "2023-03-30"

EVENT_STREAM: Final = "TASKMODE_EVENTS"
EVENT_SUBJECT_PREFIX: Final = "taskmode.events"
EVENT_SUBJECTS_ALL: Final = f"{EVENT_SUBJECT_PREFIX}.>"
RETENTION_S: Final = 7 * 24 * 3600
# The event stream's own age limit: a task delayed by up to RETENTION_S (x-fc-async-delay,
# x-taskmode-execution-time) must still have its events RETENTION_S after it was due.
STREAM_MAX_AGE_S: Final = 2 * RETENTION_S
# Destination delivery records share the event stream (so the projection reads them in order
# with the task events they follow) on subjects of their own, outside every task wildcard:
# `taskmode.deliveries.<partition>.<function>.<taskId>`.
DELIVERY_SUBJECT_PREFIX: Final = "taskmode.deliveries"
DELIVERY_SUBJECTS_ALL: Final = f"{DELIVERY_SUBJECT_PREFIX}.>"

# Delayed tasks (shared/delays.py): a task due later has a schedule message on
# `taskmode.schedules.<function>.<taskId>`, which nats-server turns into a due tick on
# `taskmode.due.<function>.<taskId>` at the due time. Both live in the event stream, outside every
# task wildcard.
SCHEDULE_SUBJECT_PREFIX: Final = "taskmode.schedules"
SCHEDULE_SUBJECTS_ALL: Final = f"{SCHEDULE_SUBJECT_PREFIX}.>"
DUE_SUBJECT_PREFIX: Final = "taskmode.due"
DUE_SUBJECTS_ALL: Final = f"{DUE_SUBJECT_PREFIX}.>"

FUNCTIONS_BUCKET: Final = "taskmode_functions"
ASYNC_CONFIG_BUCKET: Final = "taskmode_async_configs"
CODE_BUCKET: Final = "taskmode_code"
TRIGGERS_BUCKET: Final = "taskmode_triggers"
# Published versions and aliases of functions (see shared/versions.py).
# Flow control per function (FC's concurrency and scaling configs) and the live instances the
# executors report (ListInstances).
CONCURRENCY_CONFIG_BUCKET: Final = "taskmode_concurrency_configs"
SCALING_CONFIG_BUCKET: Final = "taskmode_scaling_configs"
INSTANCES_BUCKET: Final = "taskmode_instances"
# Running slots of functions with a reservedConcurrency, shared by every executor.
RUNNING_BUCKET: Final = "taskmode_running"
# The key of the account-wide running slots in RUNNING_BUCKET (the others are function names, which have no dot).
RUNNING_ACCOUNT_KEY: Final = "account.all"
VERSIONS_BUCKET: Final = "taskmode_versions"
# Per-invocation logs of async tasks: one message per attempt, kept for the retention period.
LOGS_STREAM: Final = "TASKMODE_LOGS"
LOGS_SUBJECT_PREFIX: Final = "taskmode.logs"

# FC's name of a function's unpublished, current configuration and code.
LATEST: Final = "LATEST"

# Per-function durable consumers (shared/function_queues.py): the scheduler's over a function's
# Enqueued events, the executors' over its dispatches (Processed and Retrying).
DEQUEUE_DURABLE_PREFIX: Final = "taskmode-dequeue-"
DISPATCH_DURABLE_PREFIX: Final = "taskmode-dispatch-"
# ... and the deliverer's over the final events of a function with a destination.
DELIVERY_DURABLE_PREFIX: Final = "taskmode-deliver-"
PROJECTION_DURABLE: Final = "taskmode-projection"
# The deliverer's per-partition consumers of earlier versions (over every final event): removed.
OLD_DELIVERER_DURABLE: Final = "taskmode-deliverer"
# Which instance of a partitioned service owns which partition: leases in this KV bucket.
LEASES_BUCKET: Final = "taskmode_leases"
# Signature nonces the gateways have seen (replay protection), kept for twice the clock skew.
NONCES_BUCKET: Final = "taskmode_nonces"

SYNC_INVOKE_PREFIX: Final = "taskmode.invoke"
TRIGGERS_CLIENT_NAME: Final = "taskmode-triggers"
TRIGGERS_QUEUE_PREFIX: Final = "taskmode-trigger"
# HTTP triggers are served at <gateway><HTTP_TRIGGER_PREFIX>/<function>/<trigger>/<path>.
HTTP_TRIGGER_PREFIX: Final = "/http-triggers"
EXECUTOR_QUEUE_GROUP: Final = "taskmode-executors"

# NATS client names (what `nats-server` monitoring shows per connection).
GATEWAY_CLIENT_NAME: Final = "taskmode-gateway"
SCHEDULER_CLIENT_NAME: Final = "taskmode-scheduler"
EXECUTOR_CLIENT_NAME: Final = "taskmode-executor"
PROJECTION_CLIENT_NAME: Final = "taskmode-projection"
PROJECTION_REBUILD_CLIENT_NAME: Final = "taskmode-projection-rebuild"
DELIVERER_CLIENT_NAME: Final = "taskmode-deliverer"

# Webhook destinations: when the record was signed (unix seconds), its signature
# ("v1=" + hex HMAC-SHA256 of "<timestamp>.<body>"), and a key that is the same for every
# attempt at one task's record (a receiver dedups on it).
WEBHOOK_TIMESTAMP_HEADER: Final = "x-taskmode-timestamp"
WEBHOOK_SIGNATURE_HEADER: Final = "x-taskmode-signature"
DELIVERY_ID_HEADER: Final = "x-taskmode-delivery-id"

# FC 3.0 HTTP headers: the API's (gateway) and those a custom runtime's server receives.
FC_REQUEST_ID_HEADER: Final = "x-fc-request-id"
FC_INVOCATION_TYPE_HEADER: Final = "x-fc-invocation-type"
FC_TASK_ID_HEADER: Final = "x-fc-async-task-id"
# FC 2.0's name for the task id header; accepted as an alias of FC_TASK_ID_HEADER.
FC_STATEFUL_INVOCATION_ID_HEADER: Final = "x-fc-stateful-async-invocation-id"
FC_LOG_TYPE_HEADER: Final = "x-fc-log-type"  # request: None | Tail
FC_LOG_RESULT_HEADER: Final = "x-fc-log-result"  # response: the last 4 KB of the log, base64
FC_DELAY_HEADER: Final = "x-fc-async-delay"
# Ours, not FC's: the absolute time a task is due (epoch milliseconds or RFC 3339), what the FC
# console's Submit Task dialog calls the execution time.
EXECUTION_TIME_HEADER: Final = "x-taskmode-execution-time"
FC_INSTANCE_ID_HEADER: Final = "x-fc-instance-id"
FC_ERROR_TYPE_HEADER: Final = "x-fc-error-type"
FC_FUNCTION_NAME_HEADER: Final = "x-fc-function-name"
FC_FUNCTION_HANDLER_HEADER: Final = "x-fc-function-handler"
FC_FUNCTION_MEMORY_HEADER: Final = "x-fc-function-memory"
FC_FUNCTION_TIMEOUT_HEADER: Final = "x-fc-function-timeout"

HEADER_MSG_ID: Final = "Nats-Msg-Id"
HEADER_EXPECTED_LAST_SUBJECT_SEQ: Final = "Nats-Expected-Last-Subject-Sequence"
HEADER_EXPECTED_LAST_SUBJECT_SEQ_SUBJECT: Final = "Nats-Expected-Last-Subject-Sequence-Subject"
# JetStream atomic batch publish (nats-server 2.12+): all messages of a batch are stored, or none.
HEADER_BATCH_ID: Final = "Nats-Batch-Id"
HEADER_BATCH_SEQUENCE: Final = "Nats-Batch-Sequence"
HEADER_BATCH_COMMIT: Final = "Nats-Batch-Commit"
# JetStream's error code for a failed Nats-Expected-Last-Subject-Sequence check.
JS_ERR_WRONG_LAST_SEQUENCE: Final = 10071

MONGO_DATABASE: Final = "taskmode"
TASKS_COLLECTION: Final = "async_tasks"


def function_partition(function: str, partitions: int) -> int:
    """The partition whose lease-holder dequeues a function's tasks (the scheduler's
    per-function queues are spread over the partition leases by this hash)."""
    return zlib.crc32(function.encode()) % partitions


def function_status_subjects(function: str, status: Status) -> str:
    """Wildcard over one transition of every task of one function (every partition)."""
    return f"{EVENT_SUBJECT_PREFIX}.*.{function}.*.{status}"


def partition_of(function: str, task_id: str, partitions: int) -> int:
    """The partition of a task: a stable hash, so every service (and language) agrees on it."""
    return zlib.crc32(f"{function}.{task_id}".encode()) % partitions


def event_subject(function: str, task_id: str, status: Status, *, partitions: int) -> str:
    """Subject of one task event: `taskmode.events.<partition>.<function>.<taskId>.<Status>`.

    The partition token lets N schedulers and projections split the tasks between them while
    each task's events stay in one partition, in order; the status token lets consumers filter
    by transition.
    """
    partition = partition_of(function, task_id, partitions)
    return f"{EVENT_SUBJECT_PREFIX}.{partition}.{function}.{task_id}.{status}"


def task_subjects(function: str, task_id: str) -> str:
    """Wildcard over all events of one task (the unit of optimistic concurrency).

    The partition is a wildcard so that readers need not know the partition count.
    """
    return f"{EVENT_SUBJECT_PREFIX}.*.{function}.{task_id}.*"


def task_status_subject(function: str, task_id: str, status: Status) -> str:
    """Wildcard over one task's events of one status."""
    return f"{EVENT_SUBJECT_PREFIX}.*.{function}.{task_id}.{status}"


def function_subjects(function: str) -> str:
    """Wildcard over every event of every task of one function."""
    return f"{EVENT_SUBJECT_PREFIX}.*.{function}.*.*"


def schedule_subject(function: str, task_id: str) -> str:
    """Where the schedule of a task due later is kept (one per task: a new one replaces it)."""
    return f"{SCHEDULE_SUBJECT_PREFIX}.{function}.{task_id}"


def due_subject(function: str, task_id: str) -> str:
    """Where nats-server publishes a delayed task's tick at its due time."""
    return f"{DUE_SUBJECT_PREFIX}.{function}.{task_id}"


def function_due_subjects(function: str) -> str:
    """Wildcard over the due ticks of one function's tasks."""
    return f"{DUE_SUBJECT_PREFIX}.{function}.*"


def status_subjects(status: Status, *, partition: int | None = None) -> str:
    """Wildcard over one transition for every task of every function (of one partition)."""
    return f"{EVENT_SUBJECT_PREFIX}.{'*' if partition is None else partition}.*.*.{status}"


def partition_subjects(partition: int) -> str:
    """Wildcard over every event of one partition."""
    return f"{EVENT_SUBJECT_PREFIX}.{partition}.>"


def partition_durable(base: str, partition: int) -> str:
    """Durable consumer name of one partition of a partitioned service (e.g. taskmode-projection-p3)."""
    return f"{base}-p{partition}"


def trigger_queue_group(function: str, trigger: str) -> str:
    """Queue group of one nats trigger: its instances share the trigger's messages."""
    return f"{TRIGGERS_QUEUE_PREFIX}.{function}.{trigger}"


def delivery_subject(function: str, task_id: str, *, partitions: int) -> str:
    """Subject of a task's delivery records (in the task's partition)."""
    return f"{DELIVERY_SUBJECT_PREFIX}.{partition_of(function, task_id, partitions)}.{function}.{task_id}"


def delivery_partition_subjects(partition: int) -> str:
    """Wildcard over the delivery records of one partition."""
    return f"{DELIVERY_SUBJECT_PREFIX}.{partition}.>"


def is_delivery_subject(subject: str) -> bool:
    return subject.startswith(DELIVERY_SUBJECT_PREFIX + ".")


def sync_invoke_subject(function: str) -> str:
    """Request/reply subject for a synchronous invocation of `function`."""
    return f"{SYNC_INVOKE_PREFIX}.{function}"


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
    return function_subjects(function)


REQUEST_QUALIFIER: Final = "Taskmode-Qualifier"  # gateway -> executor: the qualifier asked for
REQUEST_LOG_TAIL: Final = "Taskmode-Log-Tail"  # gateway -> executor: "1" to get the log tail back
REPLY_LOG_TAIL: Final = "Taskmode-Log-Tail"  # executor -> gateway: that tail, base64


def log_subject(function: str, task_id: str, attempt: int) -> str:
    """Subject of one attempt's log of an async task."""
    return f"{LOGS_SUBJECT_PREFIX}.{function}.{task_id}.{attempt}"
