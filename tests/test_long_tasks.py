"""Long tasks: the executor keeps a running task's lease alive for as long as it runs, so it is
never handed to another executor; when the executor dies, the lease runs out and the lost attempt
is retried or failed exactly as the task's retry policy says. A 1 s lease stands in for the
default 30 s, and tasks of a few seconds for tasks of hours."""

from __future__ import annotations

import pytest

from tests.integration_fixtures import StackFactory
from tests.test_lifecycle import make_function, statuses

pytestmark = pytest.mark.timeout(180)

LEASE_S = "1"


async def test_a_long_task_keeps_its_lease_and_a_dead_executor_loses_it(stack_with: StackFactory) -> None:
    stack, fc = stack_with({"TASKMODE_EXECUTOR_ACK_WAIT_S": LEASE_S})
    await make_function(fc, "long_once", handler="index.sleep", timeout=120, retries=1)
    await make_function(fc, "long_never", handler="index.sleep", timeout=120, retries=0)

    # Alive: six leases long, and still one attempt.
    await fc.invoke_async("long_once", b"6", task_id="alive")
    task = await fc.wait_for("long_once", "alive", {"Succeeded", "Failed"}, deadline_s=60)
    assert statuses(task) == ["Enqueued", "Processed", "Running", "Succeeded"]

    # Its executor killed mid-run: retried once by one policy, failed at once by the other.
    await fc.invoke_async("long_once", b"4", task_id="retried")
    await fc.invoke_async("long_never", b"4", task_id="failed")
    await fc.wait_for("long_once", "retried", {"Running"})
    await fc.wait_for("long_never", "failed", {"Running"})
    stack.kill_service("executor")
    stack.start_service("executor")
    retried = await fc.wait_for("long_once", "retried", {"Succeeded", "Failed"}, deadline_s=60)
    assert statuses(retried) == ["Enqueued", "Processed", "Running", "Retrying", "Running", "Succeeded"]
    assert "instance lost" in retried["events"][3]["eventDetail"]
    assert retried["alreadyRetriedTimes"] == 1
    failed = await fc.wait_for("long_never", "failed", {"Succeeded", "Failed"}, deadline_s=60)
    assert statuses(failed) == ["Enqueued", "Processed", "Running", "Failed"]
    assert "instance lost" in failed["taskErrorMessage"]
