"""The gateway's side of admission: read the FC headers, count and log, then `shared.submission`.

Shared by the InvokeFunction route and the submission fast path, so both behave alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from services.gateway.deps import Resources
from services.gateway.metrics import GatewayMetrics
from shared import submission, wire
from shared.eventstore import now_ms
from shared.catalog import FunctionRecord
from shared.errors import InvalidArgument, TaskAlreadyExists
from shared.transitions import Status
from shared.wire import FC_DELAY_HEADER, FC_REQUEST_ID_HEADER, FC_STATEFUL_INVOCATION_ID_HEADER, FC_TASK_ID_HEADER

log = logging.getLogger(__name__)


def _choose_task_id(headers: Mapping[str, str]) -> str:
    # FC 2.0's header names the task id too; FC 3.0's wins when both are sent.
    given_id = (headers.get(FC_TASK_ID_HEADER) or "").strip()
    stateful_id = (headers.get(FC_STATEFUL_INVOCATION_ID_HEADER) or "").strip()
    return submission.choose_task_id(
        task_id_header=given_id or stateful_id,
        request_id_header=headers.get(FC_REQUEST_ID_HEADER),
        source=FC_STATEFUL_INVOCATION_ID_HEADER if stateful_id and not given_id else FC_TASK_ID_HEADER,
    )


def early_task_id(headers: Mapping[str, str]) -> str | None:
    """The task id a submission with these headers gets, settled before the request's first bus
    round trip (the nonce), so that every answer from then on, a 503 included, carries it;
    None when the headers name an invalid id (`submit_task` then refuses it with the exact error).
    The caller passes it back to `submit_task` as `task_id`, so a generated id is the same one."""
    try:
        return _choose_task_id(headers)
    except InvalidArgument:
        return None


async def submit_task(
    resources: Resources,
    metrics: GatewayMetrics,
    *,
    function: FunctionRecord,
    payload: bytes,
    headers: Mapping[str, str],
    request_id: str,
    qualifier: str,
    chosen: Callable[[str], None],
    task_id: str | None = None,
) -> str:
    """Enqueue a task of `function`; its id. Raises the typed error a caller answers with.

    `chosen` is told the task id as soon as it is settled, before the append: from then on every
    answer carries it, errors included, so a client that retries after a 5xx (whose append may
    still have landed) retries with that id and is deduplicated instead of running twice.
    `task_id`: the id `early_task_id` settled already, else it is chosen here."""
    name = function.function_name
    try:
        submission.check_payload_size(payload, limit=submission.MAX_ASYNC_PAYLOAD_BYTES)
        task_id = task_id or _choose_task_id(headers)
        at_ms = now_ms()
        due_at_ms = submission.due_time(delay_header=headers.get(FC_DELAY_HEADER),
                                        execution_time_header=headers.get(wire.EXECUTION_TIME_HEADER), now_ms=at_ms)
        delay_s = max(0, (due_at_ms - at_ms) // 1000)
    except Exception:
        metrics.submissions.labels(outcome="rejected").inc()
        raise
    chosen(task_id)
    admission = submission.Admission(function=name, task_id=task_id, payload=payload, request_id=request_id,
                                     qualifier=qualifier, delay_s=delay_s, function_id=function.function_id,
                                     due_at_ms=due_at_ms if due_at_ms > at_ms else 0)
    try:
        await submission.submit(resources.events, admission, await resources.catalog.find_async_config(name, qualifier))
    except TaskAlreadyExists:
        metrics.submissions.labels(outcome="duplicate").inc()
        log.info(
            "task submission refused: duplicate task id",
            extra={"task_id": task_id, "function": name, "status": "Rejected", "request_id": request_id},
        )
        raise
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
            "qualifier": qualifier,
        },
    )
    return task_id
