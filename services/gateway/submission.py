"""Submitting an async task: every check, then the single (atomic) append that creates it.

Shared by the InvokeFunction route and the submission fast path, so both behave alike.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import msgspec

from services.gateway import params
from services.gateway.deps import Resources
from services.gateway.metrics import GatewayMetrics
from shared.catalog import FunctionRecord
from shared.errors import ConcurrentUpdateError, TaskAlreadyExists
from shared.events import DEFAULT_MAX_EVENT_AGE_S, DEFAULT_MAX_RETRIES, TaskEnqueued, TaskProcessed
from shared.eventstore import StoredEvent, follow, now_ms
from shared.transitions import Status
from shared.wire import FC_DELAY_HEADER, FC_REQUEST_ID_HEADER, FC_TASK_ID_HEADER

log = logging.getLogger(__name__)


async def submit_task(
    resources: Resources,
    metrics: GatewayMetrics,
    *,
    function: FunctionRecord,
    payload: bytes,
    headers: Mapping[str, str],
    request_id: str,
    qualifier: str,
) -> str:
    """Enqueue a task of `function`; its id. Raises the typed error a caller answers with."""
    name = function.function_name
    try:
        params.check_payload_size(payload, limit=params.MAX_ASYNC_PAYLOAD_BYTES)
        task_id = params.choose_task_id(
            task_id_header=headers.get(FC_TASK_ID_HEADER),
            request_id_header=headers.get(FC_REQUEST_ID_HEADER),
        )
        delay_s = params.parse_delay(headers.get(FC_DELAY_HEADER))
    except Exception:
        metrics.submissions.labels(outcome="rejected").inc()
        raise
    config = await resources.catalog.find_async_config(name)
    at_ms = now_ms()
    event = TaskEnqueued(
        task_id=task_id,
        function=name,
        version=1,
        at_ms=at_ms,
        payload=payload,
        request_id=request_id,
        qualifier=qualifier,
        due_at_ms=at_ms + delay_s * 1000,
        max_event_age_s=config.max_async_event_age_in_seconds if config else DEFAULT_MAX_EVENT_AGE_S,
        max_retries=config.max_async_retry_attempts if config else DEFAULT_MAX_RETRIES,
    )
    try:
        if delay_s == 0:
            # Due now: dispatched in the same atomic append, so the scheduler is not involved.
            event = msgspec.structs.replace(event, dispatched=True)
            processed = follow(StoredEvent(0, event), TaskProcessed, at_ms=at_ms,
                               submission=TaskProcessed.carrying(event))
            await resources.events.append_together(event, processed, expected_seq=0)
            metrics.dispatched.labels(name).inc()
        else:
            await resources.events.append(event, expected_seq=0)
    except ConcurrentUpdateError as err:
        metrics.submissions.labels(outcome="duplicate").inc()
        log.info(
            "task submission refused: duplicate task id",
            extra={"task_id": task_id, "function": name, "status": "Rejected", "request_id": request_id},
        )
        raise TaskAlreadyExists(
            f"task {task_id} already exists for function {name}; task ids are unique for the retention period",
            existing_task_id=task_id,
        ) from err
    metrics.submissions.labels(outcome="enqueued").inc()
    log.info(
        "task submitted",
        extra={
            "task_id": task_id,
            "function": name,
            "status": str(Status.ENQUEUED),
            "request_id": request_id,
            "delay_s": delay_s,
            "payload_bytes": len(payload),
        },
    )
    return task_id
