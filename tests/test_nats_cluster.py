"""The 3-node NATS cluster of docker-compose.yml and deploy/k8s, run locally from the same
deploy/nats/cluster.conf: tasks flow at 3 replicas while the event stream's leader is killed
with SIGKILL and started again; every accepted task ends Succeeded and no service exits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import pytest

from shared import natsauth, wire
from shared.devstack import NatsCluster, Stack, free_port
from tests.fc_client import FcClient
from tests.integration_fixtures import ACCESS_KEY_ID, ACCESS_KEY_SECRET, FAST_ENV, client_for
from tests.test_lifecycle import make_function

pytestmark = pytest.mark.timeout(180)
TASKS = 60


def wait_for_healthy(cluster: NatsCluster, *, deadline_s: float = 30) -> None:
    """Every node answers /healthz with 200: JetStream is up and knows its meta leader."""
    end = time.monotonic() + deadline_s
    for index in range(len(cluster.nodes)):
        while httpx.get(f"{cluster.monitor_url(index)}/healthz", timeout=2).status_code != 200:
            assert time.monotonic() < end, f"node {index + 1} never became healthy"
            time.sleep(0.2)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    started = NatsCluster.start(tmp_path / "nats")
    try:
        wait_for_healthy(started)
        yield started
    finally:
        started.stop()


@pytest.fixture
def stack_on_cluster(tmp_path: Path, cluster: NatsCluster) -> Iterator[Stack]:
    stack = Stack(
        data_dir=tmp_path / "stack",
        access_keys=f"{ACCESS_KEY_ID}:{ACCESS_KEY_SECRET}",
        gateway_port=free_port(),
        nats_url=cluster.urls[0],
        nats_passwords=cluster.passwords,  # every service connects as its role, as in compose
        service_env={**FAST_ENV, "TASKMODE_STREAM_REPLICAS": "3"},
    )
    try:
        stack.start_infra()  # the MongoDB-wire server only: NATS is the cluster
        stack.start_services()
        yield stack
    finally:
        stack.stop()


async def stream_leader(cluster: NatsCluster, url: str) -> tuple[str, int]:
    """The event stream's leader node and its replica count, as the cluster reports them."""
    user, password = cluster.credentials(natsauth.ADMIN)
    nc = await nats.connect(url, user=user, password=password)
    try:
        info = await nc.jetstream().stream_info(wire.EVENT_STREAM)
        assert info.cluster is not None and info.cluster.leader
        replicas = 1 + len(info.cluster.replicas or [])
        return info.cluster.leader, replicas
    finally:
        await nc.close()


async def submit_until_accepted(fc: FcClient, task_id: str) -> None:
    """A client's retry: the same task id until 202, or 409 (an earlier try was accepted)."""
    end = time.monotonic() + 60
    while True:
        try:
            response = await fc.invoke_async("clustered", task_id.encode(), task_id=task_id)
            if response.status_code in (202, 409):
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < end, f"{task_id} never accepted"
        await asyncio.sleep(0.2)


async def test_tasks_survive_killing_the_stream_leader(cluster: NatsCluster, stack_on_cluster: Stack) -> None:
    fc = client_for(stack_on_cluster)
    try:
        await make_function(fc, "clustered")
        leader, replicas = await stream_leader(cluster, cluster.urls[0])
        assert replicas == 3

        async def submit_all() -> None:
            for number in range(TASKS):
                await submit_until_accepted(fc, f"c{number}")
                await asyncio.sleep(0.05)

        submitting = asyncio.create_task(submit_all())
        await asyncio.sleep(1.0)  # tasks in flight when the leader dies
        victim = int(leader.rsplit("-", 1)[1]) - 1
        cluster.kill(victim)
        await asyncio.sleep(3.0)  # the survivors elect a new leader and carry on at 2 of 3
        cluster.restart(victim)
        await submitting

        for number in range(TASKS):
            task = await fc.wait_for("clustered", f"c{number}", {"Succeeded", "Failed"}, deadline_s=60)
            assert task["status"] == "Succeeded" and task["returnPayload"] == f"c{number}"

        listed: list[str] = []
        end = time.monotonic() + 30
        while len(listed) < TASKS and time.monotonic() < end:
            listed, token = [], ""
            while True:
                page = (await fc.list_tasks("clustered", limit="100", **({"nextToken": token} if token else {}))).json()
                listed += [task["taskId"] for task in page["tasks"]]
                if not (token := page["nextToken"]):
                    break
            await asyncio.sleep(0.2)
        assert sorted(listed) == sorted(f"c{number}" for number in range(TASKS))
    finally:
        await fc.close()

    for name, child in stack_on_cluster.services.items():
        assert child.process.poll() is None, f"{name} exited with {child.process.returncode}"
    wait_for_healthy(cluster)  # the restarted node rejoined
    _, replicas = await stream_leader(cluster, cluster.urls[victim])
    assert replicas == 3
