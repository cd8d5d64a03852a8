"""Soak: submissions at a steady rate while every process is killed -9 in turn.

For `TASKMODE_SOAK_S` seconds (80 in `make test`, 900 with `make soak`) a client submits tasks
(some with its own ids, some letting the gateway choose, some delayed, some failing once) while
the gateway, scheduler, executor, projection, triggers, deliverer, nats-server and the
MongoDB-wire server are each killed with SIGKILL in turn and restarted as a supervisor would. Afterwards:

- every accepted task is terminal, with a complete history (event ids 1..n, each step an edge of
  the transition table) that GetAsyncTask and the read model agree on;
- no task exists that its client cannot know of: its id was in an answer, or the client chose it,
  or its request got no answer at all (the gateway died with it);
- nothing ran twice: the handler prints a line per run, and no (task, attempt) printed twice,
  nor more runs than the task has Running events.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from shared.devstack import Stack
from tests.fc_client import FcClient
from tests.test_lifecycle import statuses
from tests.test_recovery import assert_valid_chain, list_all, wait_until

SOAK_S = float(os.environ.get("TASKMODE_SOAK_S", "80"))
RATE_PER_S = 8.0
KILL_EVERY_S = 10.0
FINAL = {"Succeeded", "Failed", "Stopped", "Expired", "Invalid"}

pytestmark = pytest.mark.timeout(int(SOAK_S) + 600)

HANDLER = '''
import time

def handler(event, context):
    print(f"ran {context.task_id} {context.attempt}", flush=True)
    text = event.decode()
    if text.startswith("fail-once") and context.attempt == 0:
        raise RuntimeError("first attempt fails")
    time.sleep(float(text.rsplit(":", 1)[-1]))
    return "done"
'''


class Client:
    """Submits at a steady rate and remembers every answer."""

    def __init__(self, fc: FcClient) -> None:
        self.fc = fc
        self.answers: list[dict[str, Any]] = []
        self.count = 0

    async def submit_one(self, rng: random.Random) -> None:
        self.count += 1
        own_id = f"soak_{self.count}" if rng.random() < 0.7 else None
        payload = f"{'fail-once' if rng.random() < 0.1 else 'ok'}:{rng.choice((0, 0.05, 0.2))}".encode()
        delay = rng.choice((None, None, None, 1, 2))
        try:
            response = await self.fc.invoke_async("soak", payload, task_id=own_id, delay_s=delay)
        except httpx.HTTPError:
            self.answers.append({"status": 0, "task_id": "", "own_id": own_id})
            return
        self.answers.append({"status": response.status_code, "own_id": own_id,
                             "task_id": response.headers.get("x-fc-async-task-id", "")})

    async def run(self, until: float, killing_done: asyncio.Event) -> None:
        """Submit until `until`, and on while processes are still being killed."""
        rng = random.Random(7)
        pending: set[asyncio.Task[None]] = set()
        next_at = time.monotonic()
        while time.monotonic() < until or not killing_done.is_set():
            task = asyncio.create_task(self.submit_one(rng))
            pending.add(task)
            task.add_done_callback(pending.discard)
            next_at += 1 / RATE_PER_S
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await asyncio.gather(*pending)


def _kill(stack: Stack, victim: str) -> None:
    if victim == "nats":
        stack.stop_nats(kill=True)
        stack.start_nats_again()
    elif victim == "mongo":
        mongo = next(child for child in stack.infra if child.name == "mongo")
        mongo.kill()
        stack.infra.remove(mongo)
        stack.start_mongo_wire_again()
    else:
        stack.kill_service(victim)
        stack.start_service(victim)


def _supervise(stack: Stack) -> None:
    for name, child in list(stack.services.items()):
        if child.process.poll() is not None:  # e.g. the projection exits while MongoDB is away
            stack.start_service(name)


async def test_soak_with_every_process_killed_in_turn(own_stack: Stack, own_fc: FcClient) -> None:
    assert (await own_fc.create_function("soak", code={"index.py": HANDLER}, timeout=30)).status_code == 200
    assert (await own_fc.put_async_config("soak", asyncTask=True, maxAsyncRetryAttempts=5)).status_code == 200
    client = Client(own_fc)
    until = time.monotonic() + SOAK_S
    killing_done = asyncio.Event()
    submitting = asyncio.create_task(client.run(until, killing_done))
    victims = ["executor", "gateway", "scheduler", "nats", "projection", "mongo", "triggers", "deliverer"]
    killed: list[str] = []
    # Every process is killed at least once, however slow the machine (a restart takes seconds).
    while time.monotonic() < until - KILL_EVERY_S / 2 or len(killed) < len(victims):
        await asyncio.sleep(KILL_EVERY_S)
        _supervise(own_stack)
        victim = victims[len(killed) % len(victims)]
        await asyncio.to_thread(_kill, own_stack, victim)
        killed.append(victim)
    killing_done.set()
    await submitting
    assert set(killed) == set(victims), f"only {killed} were killed: make TASKMODE_SOAK_S longer"

    accepted = {a["task_id"] for a in client.answers if a["status"] == 202}
    assert len(accepted) > len(client.answers) / 2, Counter(a["status"] for a in client.answers)

    async def settled() -> bool:
        _supervise(own_stack)
        try:
            tasks = await list_all(own_fc, "soak")
        except (httpx.HTTPError, KeyError, ValueError):
            return False
        return accepted <= set(tasks) and all(t["status"] in FINAL for t in tasks.values())

    await wait_until(settled, deadline_s=300, what="every accepted task finished and projected")
    tasks = await list_all(own_fc, "soak")

    known = {a["task_id"] or a["own_id"] for a in client.answers if a["task_id"] or a["own_id"]}
    unanswered_unnamed = sum(1 for a in client.answers if a["status"] == 0 and not a["own_id"])
    unknown = set(tasks) - known
    assert len(unknown) <= unanswered_unnamed, f"tasks no client could know of: {sorted(unknown)[:5]}"

    runs = Counter(re.findall(r"ran (\S+) (\d+)", _executor_output(own_stack)))
    assert not [key for key, n in runs.items() if n > 1], "an attempt ran twice"
    for task_id, listed in tasks.items():
        task = (await own_fc.get_task("soak", task_id)).json()
        assert_valid_chain(task)
        assert task["status"] == listed["status"], (task_id, task["status"], listed["status"])
        running = statuses(task).count("Running")
        attempts = sum(n for (run_id, _), n in runs.items() if run_id == task_id)
        assert attempts <= running, (task_id, attempts, statuses(task))
    print(f"soak: {len(client.answers)} submissions, {len(accepted)} accepted, {len(tasks)} tasks, "
          f"kills {killed}, statuses {Counter(t['status'] for t in tasks.values())}, "
          f"answers {Counter(a['status'] for a in client.answers)}")


def _executor_output(stack: Stack) -> str:
    logs = stack.data_dir / "logs"
    return "".join(path.read_text(errors="replace") for path in logs.glob("executor*.log*"))
