"""Delayed and scheduled submission (x-fc-async-delay up to 7 days, x-taskmode-execution-time).

A delayed task is filed by the scheduler as a nats-server message schedule, which comes back
as a due tick at its due time (shared/delays.py). These tests check the promises: on time
(within 1 s of the due time) and once, across a restart of every service and of nats-server,
with a pause surviving the same restart; stoppable before it is due; and waiting tasks, a
hundred thousand of another function or more than the scheduler may hold of the same one,
never stand in front of a task that is due now.
"""

from __future__ import annotations

import datetime as dt
import time

import nats
import pytest

from shared import natsauth, submission, wire
from shared.delays import pending_schedules
from shared.devstack import Stack
from shared.eventstore import EventStore, TaskCreator
from tests.fc_client import FcClient
from tests.test_lifecycle import make_function, statuses
from tests.test_recovery import wait_until

pytestmark = pytest.mark.timeout(300)


def rfc3339(epoch_ms: int) -> str:
    return dt.datetime.fromtimestamp(epoch_ms / 1000, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_time(task: dict, status: str) -> int:  # type: ignore[type-arg]
    return next(e["timestamp"] for e in task["events"] if e["status"] == status)


async def test_delayed_and_scheduled_tasks_run_once_on_time_across_a_restart_of_every_service(
    own_stack: Stack, own_fc: FcClient
) -> None:
    fc = own_fc
    await make_function(fc, "timed")
    await make_function(fc, "paused")  # and a pause survives the same restart
    disabled = await fc.request("POST", "/functions/paused/invoke/disable", json={"reason": "across restarts"})
    assert disabled.status_code == 200, disabled.text
    await fc.invoke_async("paused", b"", task_id="held_before")
    submitted_ms = int(time.time() * 1000)
    due_ms = submitted_ms + 30_000  # long enough for every service to restart first, even on a busy machine
    response = await fc.invoke_async("timed", b"d", task_id="delayed", delay_s=30)
    assert response.status_code == 202, response.text
    response = await fc.invoke_async("timed", b"s", task_id="scheduled",
                                     headers={"x-taskmode-execution-time": rfc3339(due_ms)})
    assert response.status_code == 202, response.text
    delayed = (await fc.get_task("timed", "delayed")).json()
    scheduled = (await fc.get_task("timed", "scheduled")).json()
    assert abs(delayed["scheduledTime"] - due_ms) < 5_000 and scheduled["scheduledTime"] == due_ms
    assert statuses(delayed) == statuses(scheduled) == ["Enqueued"]

    for service in ("gateway", "scheduler", "executor", "projection"):
        own_stack.services[service].stop()
    own_stack.stop_nats()  # the schedules are kept by the server, in its stream
    own_stack.start_nats_again()
    for service in ("gateway", "scheduler", "executor", "projection"):
        own_stack.start_service(service)
    await wait_until(_scheduler_ready(own_stack), deadline_s=30, what="the restarted scheduler holds its partitions")
    assert int(time.time() * 1000) < min(due_ms, delayed["scheduledTime"]) - 2_000, "restart took too long to test"

    await fc.invoke_async("paused", b"", task_id="held_after")
    for task_id in ("delayed", "scheduled"):
        task = await fc.wait_for("timed", task_id, {"Succeeded"}, deadline_s=90)
        assert statuses(task) == ["Enqueued", "Processed", "Running", "Succeeded"], task  # once
        late_ms = event_time(task, "Running") - task["scheduledTime"]
        assert 0 <= late_ms <= 1_000, f"{task_id} started {late_ms} ms after it was due"
    # Both timed tasks ran meanwhile; the paused function's tasks did not.
    for task_id in ("held_before", "held_after"):
        assert statuses((await fc.get_task("paused", task_id)).json()) == ["Enqueued"]
    assert (await fc.request("GET", "/functions/paused")).json()["invocationRestriction"]["disable"] is True
    assert (await fc.request("POST", "/functions/paused/invoke/enable")).status_code == 200
    for task_id in ("held_before", "held_after"):
        await fc.wait_for("paused", task_id, {"Succeeded"}, deadline_s=60)


def _scheduler_ready(stack: Stack):  # type: ignore[no-untyped-def]
    async def ready() -> bool:
        return "partition claimed" in stack.services["scheduler"].log_text()
    return ready


async def test_more_delayed_tasks_than_the_scheduler_holds_never_hold_up_a_due_one(own_stack: Stack,
                                                                                    own_fc: FcClient) -> None:
    own_stack.services["scheduler"].stop()
    own_stack.start_service("scheduler", env={"TASKMODE_SCHEDULER_MAX_PARKED": "20"})
    await make_function(own_fc, "crowded")
    for i in range(60):
        response = await own_fc.invoke_async("crowded", b"", task_id=f"later{i}", delay_s=600)
        assert response.status_code == 202, response.text
    response = await own_fc.invoke_async("crowded", b"", task_id="now")
    assert response.status_code == 202, response.text
    await own_fc.wait_for("crowded", "now", {"Succeeded"}, deadline_s=30)
    for i in (0, 59):
        assert statuses((await own_fc.get_task("crowded", f"later{i}")).json()) == ["Enqueued"]


async def test_a_task_stopped_before_it_is_due_never_runs(own_stack: Stack, own_fc: FcClient) -> None:
    await make_function(own_fc, "stoppable")
    await own_fc.invoke_async("stoppable", b"", task_id="later", delay_s=600)
    await own_fc.invoke_async("stoppable", b"", task_id="soon", delay_s=2)
    assert (await own_fc.stop_task("stoppable", "later")).status_code == 200
    assert (await own_fc.stop_task("stoppable", "soon")).status_code == 200
    await own_fc.invoke_async("stoppable", b"", task_id="witness", delay_s=2)
    await own_fc.wait_for("stoppable", "witness", {"Succeeded"}, deadline_s=60)  # "soon" was due as well
    for task_id in ("later", "soon"):
        assert statuses((await own_fc.get_task("stoppable", task_id)).json()) == ["Enqueued", "Stopped"]


async def test_a_hundred_thousand_tasks_due_in_an_hour_do_not_delay_a_task_due_now(
    own_stack: Stack, own_fc: FcClient
) -> None:
    await make_function(own_fc, "patient")
    await make_function(own_fc, "urgent")
    function_id = (await own_fc.request("GET", "/functions/patient")).json()["functionId"]
    waiting = 100_000
    credentials = own_stack.nats_credentials(natsauth.ADMIN)
    assert credentials is not None
    nc = await nats.connect(own_stack.nats_url, user=credentials[0], password=credentials[1])
    try:
        js = nc.jetstream()
        partitions = int(own_stack.service_env.get("TASKMODE_PARTITIONS", "4"))  # the services' default
        events = EventStore(js, partitions=partitions)
        due_ms = int(time.time() * 1000) + 3_600_000
        started = time.monotonic()
        creator = TaskCreator(events)  # what a bus trigger's burst does: pipelined first appends
        await creator.start()
        failures: list[Exception] = []

        async def settled(error: Exception | None) -> None:
            if error is not None:
                failures.append(error)

        for i in range(waiting):
            await submission.submit_pipelined(
                creator, submission.Admission(function="patient", task_id=f"w{i:06d}", payload=b"",
                                              request_id=f"r{i}", function_id=function_id, due_at_ms=due_ms),
                None, settled)
        await creator.close()
        assert not failures, failures[:3]
        print(f"\n{waiting} delayed tasks appended in {time.monotonic() - started:.1f} s")

        async def all_filed() -> bool:  # the steady state: every one waits as a schedule of nats-server's
            info = await js.consumer_info(wire.EVENT_STREAM, f"{wire.DEQUEUE_DURABLE_PREFIX}patient")
            return info.num_ack_pending == info.num_pending == 0 and await pending_schedules(js, "patient") == waiting

        await wait_until(all_filed, deadline_s=240, what="every waiting task filed as a schedule")
        submitted_ms = int(time.time() * 1000)
        assert (await own_fc.invoke_async("urgent", b"", task_id="now")).status_code == 202
        task = await own_fc.wait_for("urgent", "now", {"Succeeded"}, deadline_s=60)
        assert statuses(task) == ["Enqueued", "Processed", "Running", "Succeeded"]
        late_ms = event_time(task, "Processed") - submitted_ms
        print(f"the task due now was dispatched {late_ms} ms after its submission")
        assert late_ms < 2_000
        for task_id in ("w000000", f"w{waiting - 1:06d}"):
            assert statuses((await own_fc.get_task("patient", task_id)).json()) == ["Enqueued"]
    finally:
        await nc.close()
