"""Two of every service on one NATS, one of each killed -9 mid-flow: nothing lost or doubled.

Schedulers and projections split the task partitions between them by leases; executors and
gateways compete for work. A task's events must still be handled in order, once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from shared.devstack import free_port
from tests.fc_client import FcClient
from tests.integration_fixtures import ACCESS_KEY_ID, ACCESS_KEY_SECRET, StackFactory
from tests.test_lifecycle import make_function
from tests.test_recovery import assert_valid_chain, list_all, wait_until

pytestmark = pytest.mark.timeout(240)

SECOND = {"scheduler": "scheduler2", "executor": "executor2", "projection": "projection2", "gateway": "gateway2"}


async def test_two_of_each_service_with_a_kill_9_of_one_of_each(stack_with: StackFactory, tmp_path: Path) -> None:
    stack, fc = stack_with({"TASKMODE_LEASE_S": "2"})
    second_port = free_port()
    for service, label in SECOND.items():
        env = {"TASKMODE_GATEWAY_PORT": str(second_port)} if service == "gateway" else None
        stack.start_service(service, name=label, env=env)
    fc2 = FcClient(f"http://127.0.0.1:{second_port}", access_key_id=ACCESS_KEY_ID, access_key_secret=ACCESS_KEY_SECRET)
    try:
        async def both_hold_partitions() -> bool:
            return all("partition claimed" in stack.services[label].log_text()
                       for label in ("scheduler", "scheduler2", "projection", "projection2"))

        # Leases split the partitions: each instance of a partitioned service holds some.
        await wait_until(both_hold_partitions, deadline_s=30, what="partitions split between instances")
        name = "scaled"
        await make_function(fc, name, handler="index.sleep", retries=3)
        ids = [f"s{i:03d}" for i in range(120)]

        async def submit(client: FcClient, task_id: str, delay_s: int = 0) -> None:
            response = await client.invoke_async(name, b"0.05", task_id=task_id, delay_s=delay_s)
            assert response.status_code == 202, response.text

        # Half through each gateway; every fourth task delayed, so the schedulers work too.
        await asyncio.gather(*(submit(fc if i % 2 else fc2, task_id, 1 if i % 4 == 0 else 0)
                               for i, task_id in enumerate(ids[:60])))
        await fc.wait_for(name, ids[1], {"Running", "Succeeded"})
        for label in ("scheduler", "executor", "projection", "gateway2"):
            stack.kill_service(label)
        await asyncio.gather(*(submit(fc, task_id, 1 if i % 4 == 0 else 0) for i, task_id in enumerate(ids[60:])))

        async def all_succeeded() -> bool:
            results = await asyncio.gather(*(fc.get_task(name, task_id) for task_id in ids))
            return all(r.json().get("status") == "Succeeded" for r in results)

        await wait_until(all_succeeded, deadline_s=120, what="every task Succeeded")
        for task_id in ids:
            task = (await fc.get_task(name, task_id)).json()
            assert_valid_chain(task)
            running = [e for e in task["events"] if e["status"] == "Running"]
            # A lost attempt (its executor killed) may run again, but only after a Retrying.
            assert len(running) == 1 + sum(e["status"] == "Retrying" for e in task["events"]), task

        async def read_model_converged() -> bool:
            listed = await list_all(fc, name)
            return set(listed) == set(ids) and all(t["status"] == "Succeeded" for t in listed.values())

        await wait_until(read_model_converged, deadline_s=120, what="read model converged")
        listed = await list_all(fc, name)
        for task_id in ids:
            direct = (await fc.get_task(name, task_id)).json()
            assert listed[task_id]["events"] == direct["events"]
    finally:
        await fc2.close()
