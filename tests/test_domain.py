"""The transition table, the event codec and the read-model fold, without any server."""

from __future__ import annotations

import msgspec
import pytest

from shared.errors import TransitionNotAllowed, VersionGap
from shared.events import (
    TaskEnqueued,
    TaskFailed,
    TaskProcessed,
    TaskRetrying,
    TaskStarted,
    TaskStopped,
    TaskStopping,
    TaskSucceeded,
    decode_event,
    encode_event,
)
from shared.transitions import ALLOWED, TERMINAL, Status, check_transition, parse_status
from shared.taskview import evolve, fold, public_view


def ev(cls, version: int, at_ms: int = 1000, **fields):  # type: ignore[no-untyped-def]
    return cls(task_id="t1", function="f", version=version, at_ms=at_ms, **fields)


def test_table_covers_every_status_and_terminal_states_are_dead_ends() -> None:
    assert set(ALLOWED) == {None, *Status}
    for status in TERMINAL:
        assert ALLOWED[status] == frozenset()
    for targets in ALLOWED.values():
        assert targets <= set(Status)


@pytest.mark.parametrize(
    ("current", "new"),
    [(None, Status.RUNNING), (Status.ENQUEUED, Status.RUNNING), (Status.SUCCEEDED, Status.FAILED),
     (Status.RUNNING, Status.STOPPED), (Status.STOPPING, Status.RETRYING)],
)
def test_edges_outside_the_table_are_refused(current: Status | None, new: Status) -> None:
    with pytest.raises(TransitionNotAllowed):
        check_transition(current, new, task_id="t")


def test_dequeued_is_accepted_as_processed() -> None:
    assert parse_status("Dequeued") is Status.PROCESSED
    assert parse_status("Running") is Status.RUNNING
    with pytest.raises(ValueError):
        parse_status("Bogus")


def test_events_round_trip_and_ignore_unknown_fields() -> None:
    event = ev(TaskEnqueued, 1, payload=b"\x00\xffbin", max_retries=2)
    assert decode_event(encode_event(event)) == event
    raw = msgspec.json.decode(encode_event(ev(TaskProcessed, 2)))
    raw["added_later"] = "x"
    assert decode_event(msgspec.json.encode(raw)) == ev(TaskProcessed, 2)


def test_fold_builds_the_fc_async_task() -> None:
    doc = fold([
        ev(TaskEnqueued, 1, 1000, payload=b"in", request_id="r1"),
        ev(TaskProcessed, 2, 1001),
        ev(TaskStarted, 3, 1002, instance_id="i1"),
        ev(TaskRetrying, 4, 1010, error="E1", attempt=0, retry_at_ms=1500),
        ev(TaskStarted, 5, 1500, instance_id="i2", attempt=1),
        ev(TaskFailed, 6, 1600, error="E2", attempt=1),
    ])
    assert doc is not None
    view = public_view(doc)
    assert view["status"] == "Failed"
    assert [e["status"] for e in view["events"]] == ["Enqueued", "Processed", "Running", "Retrying", "Running", "Failed"]
    assert view["alreadyRetriedTimes"] == 1
    assert view["instanceId"] == "i2"
    assert view["taskErrorMessage"] == "E2"
    # Submitted at 1000, first ran at 1002; ran 1002-1010 and 1500-1600 (the backoff is not run time).
    assert (view["submitTime"], view["startedTime"], view["endTime"], view["durationMs"]) == (1000, 1002, 1600, 108)
    assert view["requestId"] == "r1" and view["taskPayload"] == "in"
    assert "_id" not in view and "version" not in view
    assert "taskPayload" not in public_view(doc, include_payload=False)


def test_a_dispatch_carrying_the_submission_does_not_repeat_it_in_the_event_detail() -> None:
    enqueued = ev(TaskEnqueued, 1, 1000, payload=b"secret-ish payload", request_id="r1")
    doc = fold([enqueued, ev(TaskProcessed, 2, 1001, submission=TaskProcessed.carrying(enqueued))])
    assert doc is not None
    detail = public_view(doc)["events"][1]["eventDetail"]
    assert "submission" not in detail and "payload" not in detail
    assert doc["taskPayload"] == "secret-ish payload"  # kept once, where it belongs


def test_times_of_a_task_that_never_ran_and_of_one_stopped_while_running() -> None:
    never = fold([ev(TaskEnqueued, 1, 1000), ev(TaskStopped, 2, 1400)])
    assert never is not None
    assert (never["submitTime"], never["startedTime"], never["endTime"], never["durationMs"]) == (1000, None, 1400, None)
    stopped = fold([
        ev(TaskEnqueued, 1, 1000), ev(TaskProcessed, 2, 1001),
        ev(TaskStarted, 3, 1100, instance_id="i1", function_version="2"),
        ev(TaskStopping, 4, 1200), ev(TaskStopped, 5, 1250),
    ])
    assert stopped is not None
    assert (stopped["startedTime"], stopped["durationMs"], stopped["executedVersion"]) == (1100, 150, "2")


def test_fold_refuses_gaps_and_illegal_edges_without_mutating() -> None:
    doc = evolve(None, ev(TaskEnqueued, 1))
    with pytest.raises(VersionGap):
        evolve(doc, ev(TaskStarted, 3, instance_id="i"))
    with pytest.raises(TransitionNotAllowed):
        evolve(doc, ev(TaskSucceeded, 2))
    assert doc["version"] == 1 and len(doc["events"]) == 1


def test_stop_while_running_then_success_keeps_the_result() -> None:
    doc = fold([ev(TaskEnqueued, 1), ev(TaskProcessed, 2), ev(TaskStarted, 3, instance_id="i"),
                ev(TaskStopping, 4), ev(TaskSucceeded, 5, result=b"done")])
    assert doc is not None and doc["status"] == "Succeeded" and doc["returnPayload"] == "done"
    stopped = fold([ev(TaskEnqueued, 1), ev(TaskStopped, 2, reason="stopped by user")])
    assert stopped is not None and stopped["taskErrorMessage"] == "stopped by user"


def test_quiet_attempts_are_framed_from_the_task_events() -> None:
    from shared.task_logs import quiet_attempts

    doc = fold([
        ev(TaskEnqueued, 1, 1000, request_id="r9"), ev(TaskProcessed, 2, 1001),
        ev(TaskStarted, 3, 1002, instance_id="i1", function_version="LATEST"),
        ev(TaskRetrying, 4, 1010, error="E", attempt=0, retry_at_ms=1500),
        ev(TaskStarted, 5, 1500, instance_id="i2", attempt=1),
    ])
    assert doc is not None
    entries = quiet_attempts(doc)
    assert list(entries) == [0]  # attempt 1 is still running: no entry yet
    first = entries[0]
    assert (first.request_id, first.instance_id, first.start_time, first.end_time) == ("r9", "i1", 1002, 1010)
    assert first.content == "FC Invoke Start RequestId: r9\nFC Invoke End RequestId: r9\n"
    stopped = evolve(evolve(doc, ev(TaskStopping, 6, 1600)), ev(TaskStopped, 7, 1650))
    assert quiet_attempts(stopped)[1].end_time == 1650
