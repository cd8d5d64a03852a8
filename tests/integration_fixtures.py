"""Fixtures that run the whole system as real processes on loopback ports."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import nats
import psutil
import pytest
from nats.aio.client import Client as NatsClient

from shared import natsauth
from services.executor.python_template import SPARE_NAME, TEMPLATE_NAME
from shared.devstack import Stack, free_port
from tests.fc_client import FcClient

ACCESS_KEY_ID = "testkey"
ACCESS_KEY_SECRET = "testsecret"

async def publisher(stack: Stack) -> NatsClient:
    """A connection to the stack's NATS as the applications around taskmode connect: the
    `publisher` role (trigger subjects, `nats:` destinations; nothing of the system's own)."""
    credentials = stack.nats_credentials(natsauth.PUBLISHER)
    user, password = credentials or (None, None)
    return await nats.connect(stack.nats_url, user=user, password=password,
                              inbox_prefix=natsauth.inbox_prefix(natsauth.PUBLISHER))


# Short waits so crash recovery and retries happen within a test's time.
FAST_ENV = {
    "TASKMODE_EXECUTOR_ACK_WAIT_S": "3",
    "TASKMODE_PROJECTION_ACK_WAIT_S": "2",
    "TASKMODE_SCHEDULER_ACK_WAIT_S": "3",
    "TASKMODE_RETRY_BASE_MS": "100",
    "TASKMODE_EXECUTOR_IDLE_TIMEOUT_S": "30",
    "TASKMODE_DELIVERY_RETRY_BASE_S": "0.2",
    "TASKMODE_DELIVERY_RETRY_MAX_S": "1",
}

HANDLERS = '''
import json, os, signal, time

CALLS = {"n": 0}

def handler(event, context):
    return event

def info(event, context):
    CALLS["n"] += 1
    return {"request_id": context.request_id, "task_id": context.task_id,
            "function_name": context.function_name, "attempt": context.attempt, "calls": CALLS["n"]}

def fail(event, context):
    raise ValueError("boom: " + event.decode())

def fail_then_succeed(event, context):
    if context.attempt < int(event.decode() or "1"):
        raise RuntimeError("attempt %d failed" % context.attempt)
    return "ok after %d" % context.attempt

def sleep(event, context):
    time.sleep(float(event.decode() or "1"))
    return "slept"

def stubborn(event, context):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(0.05)
'''


def function_processes(function: str, *, argv0: str = "") -> list[psutil.Process]:
    """The host's processes of `function`'s instances (found by the FC_FUNCTION_NAME they carry;
    a sandboxed instance cannot tell the host its pids itself). Not its template's: the template
    (its sandbox, itself and its spare) outlives the instances by design."""
    found = []
    for proc in psutil.process_iter(["cmdline", "name"]):
        with contextlib.suppress(psutil.Error):
            cmdline = proc.info["cmdline"] or []
            if argv0 and (not cmdline or cmdline[0] != argv0):
                continue
            environ = proc.environ()
            if environ.get("FC_FUNCTION_NAME") != function or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.info["name"] in (TEMPLATE_NAME, SPARE_NAME) or (
                    proc.info["name"] == "bwrap" and "-template-" in environ.get("FC_INSTANCE_ID", "")):
                continue
            found.append(proc)
    return found


def new_stack(tmp: Path, *, extra_env: dict[str, str] | None = None) -> Stack:
    stack = Stack(
        data_dir=tmp,
        access_keys=f"{ACCESS_KEY_ID}:{ACCESS_KEY_SECRET}",
        gateway_port=free_port(),
        service_env={**FAST_ENV, **(extra_env or {})},
    )
    try:
        stack.start_infra()
        stack.start_services()
    except BaseException:
        stack.stop()  # a service that failed to start must not leave the others running
        raise
    return stack


def client_for(stack: Stack) -> FcClient:
    return FcClient(f"http://127.0.0.1:{stack.gateway_port}", access_key_id=ACCESS_KEY_ID,
                    access_key_secret=ACCESS_KEY_SECRET)


@pytest.fixture(scope="module")
def shared_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One running system for a whole test module; tests isolate themselves by function name."""
    stack = new_stack(tmp_path_factory.mktemp("stack"))
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[Stack]:
    """A system of its own, for tests that kill or restart services."""
    stack = new_stack(tmp_path)
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
async def fc(shared_stack: Stack) -> AsyncIterator[FcClient]:
    client = client_for(shared_stack)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def fn_name() -> str:
    """A function name no other test uses."""
    return f"fn_{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def own_fc(own_stack: Stack) -> AsyncIterator[FcClient]:
    """A signed client for `own_stack`."""
    client = client_for(own_stack)
    try:
        yield client
    finally:
        await client.close()


StackFactory = Callable[[dict[str, str]], tuple[Stack, FcClient]]


@pytest.fixture
async def stack_with(tmp_path: Path) -> AsyncIterator[StackFactory]:
    """Start a system of its own with extra service settings; stopped, with its client, at teardown."""
    started: list[tuple[Stack, FcClient]] = []

    def start(extra_env: dict[str, str]) -> tuple[Stack, FcClient]:
        stack = new_stack(tmp_path / f"stack{len(started)}", extra_env=extra_env)
        started.append((stack, client_for(stack)))
        return started[-1]

    try:
        yield start
    finally:
        for stack, client in started:
            await client.close()
            stack.stop()
