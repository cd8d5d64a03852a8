"""The bus asks for credentials, and each role can do only what its service needs.

A real nats-server with the roles' users (as `make run` starts it); each test connects as one
role and checks that a publish or subscription outside its permissions is refused by the server.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from shared import natsauth, wire
from shared.devstack import ChildProcess, start_nats
from shared.transitions import Status

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ChildProcess, dict[str, str]]]:
    passwords = natsauth.new_passwords()
    nats_server = start_nats(tmp_path_factory.mktemp("nats"), passwords=passwords)
    try:
        yield nats_server, passwords
    finally:
        nats_server.stop()


class Connection:
    def __init__(self, nc: Client, errors: list[Exception]) -> None:
        self.nc = nc
        self.errors = errors

    async def refused(self) -> list[str]:
        """The permission violations the server reported since the last call."""
        await self.nc.flush()
        await asyncio.sleep(0.3)  # the server's -ERR follows the operation asynchronously
        found = [str(err) for err in self.errors if "permissions violation" in str(err).lower()]
        self.errors.clear()
        return found


@pytest.fixture
async def connect(server: tuple[ChildProcess, dict[str, str]]) -> AsyncIterator:  # type: ignore[type-arg]
    nats_server, passwords = server
    opened: list[Client] = []

    async def as_role(role: str) -> Connection:
        errors: list[Exception] = []

        async def note(err: Exception) -> None:
            errors.append(err)

        nc = await nats.connect(nats_server.url, user=role, password=passwords[role],
                                inbox_prefix=natsauth.inbox_prefix(role), error_cb=note, allow_reconnect=False)
        opened.append(nc)
        return Connection(nc, errors)

    yield as_role
    for nc in opened:
        await nc.close()


def event(status: Status) -> str:
    return wire.event_subject("fn", "task-1", status, partitions=4)


async def _connect_raw(url: str, credentials: dict[str, str]) -> str:
    """The server's answer to a CONNECT (raw protocol: a failed nats-py connect leaks its socket)."""
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        await reader.readline()  # INFO
        writer.write(f"CONNECT {json.dumps({'verbose': False, **credentials})}\r\nPING\r\n".encode())
        return (await asyncio.wait_for(reader.readline(), 10)).decode()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_connection_without_credentials_is_refused(server: tuple[ChildProcess, dict[str, str]]) -> None:
    url, passwords = server[0].url, server[1]
    assert "Authorization Violation" in await _connect_raw(url, {})
    assert "Authorization Violation" in await _connect_raw(url, {"user": "executor", "pass": "guessed"})
    assert await _connect_raw(url, {"user": "executor", "pass": passwords["executor"]}) == "PONG\r\n"


@pytest.mark.parametrize("role", [*natsauth.SERVICE_ROLES, natsauth.PUBLISHER])
async def test_each_role_appends_only_its_own_transitions(connect, role: str) -> None:  # type: ignore[no-untyped-def]
    conn = await connect(role)
    allowed = set(natsauth.APPENDS[role])
    for status in Status:
        await conn.nc.publish(event(status), b"{}")
        refused = await conn.refused()
        assert bool(refused) == (status not in allowed), (role, status, refused)


async def test_only_the_gateway_changes_the_catalog(connect) -> None:  # type: ignore[no-untyped-def]
    for role in (natsauth.SCHEDULER, natsauth.EXECUTOR, natsauth.PROJECTION, natsauth.TRIGGERS, natsauth.DELIVERER,
                 natsauth.PUBLISHER):
        conn = await connect(role)
        for subject in (f"$KV.{wire.FUNCTIONS_BUCKET}.victim", f"$KV.{wire.ASYNC_CONFIG_BUCKET}.victim",
                        f"$KV.{wire.VERSIONS_BUCKET}.victim", f"$KV.{wire.TRIGGERS_BUCKET}.victim",
                        f"$O.{wire.CODE_BUCKET}.C.chunk", f"$JS.API.STREAM.PURGE.OBJ_{wire.CODE_BUCKET}"):
            await conn.nc.publish(subject, b"x")
            assert await conn.refused(), (role, subject)
    gateway = await connect(natsauth.GATEWAY)
    await gateway.nc.publish(f"$KV.{wire.FUNCTIONS_BUCKET}.victim", b"{}")
    assert not await gateway.refused()


async def test_no_role_reads_another_roles_replies_or_steals_invocations(connect) -> None:  # type: ignore[no-untyped-def]
    executor = await connect(natsauth.EXECUTOR)
    await executor.nc.subscribe(f"{natsauth.inbox_prefix(natsauth.GATEWAY)}.>")
    assert await executor.refused()
    for role in (natsauth.GATEWAY, natsauth.SCHEDULER, natsauth.PROJECTION, natsauth.DELIVERER):
        conn = await connect(role)
        await conn.nc.subscribe(f"{wire.SYNC_INVOKE_PREFIX}.*", queue=wire.EXECUTOR_QUEUE_GROUP)
        await conn.nc.subscribe(wire.EVENT_SUBJECTS_ALL)
        assert len(await conn.refused()) == 2, role


async def test_user_subjects_are_open_to_the_roles_that_need_them_and_the_system_is_not(  # type: ignore[no-untyped-def]
        connect) -> None:
    # A `nats` trigger's subject: the triggers service listens, an application publishes; a `nats:`
    # destination: the deliverer publishes, an application listens.
    triggers = await connect(natsauth.TRIGGERS)
    publisher = await connect(natsauth.PUBLISHER)
    deliverer = await connect(natsauth.DELIVERER)
    heard = await triggers.nc.subscribe("orders.*", queue="taskmode-trigger-fn-orders")
    results = await publisher.nc.subscribe("results.fn")
    assert not await triggers.refused() and not await publisher.refused()  # (flushed: subscribed)
    await publisher.nc.publish("orders.eu", b"order")
    await deliverer.nc.publish("results.fn", b"record")
    assert (await heard.next_msg(timeout=10)).data == b"order"
    assert (await results.next_msg(timeout=10)).data == b"record"
    for conn in (triggers, publisher, deliverer):
        assert not await conn.refused()
    # What they must not reach, even if a subject slipped past the API's checks.
    await triggers.nc.subscribe(wire.EVENT_SUBJECTS_ALL)
    await triggers.nc.subscribe(f"{natsauth.inbox_prefix(natsauth.GATEWAY)}.>")
    assert len(await triggers.refused()) == 2
    for subject in (event(Status.SUCCEEDED), f"{wire.LOGS_SUBJECT_PREFIX}.fn.t.0",
                    f"{wire.SYNC_INVOKE_PREFIX}.fn", f"$KV.{wire.FUNCTIONS_BUCKET}.fn",
                    wire.schedule_subject("fn", "t"), wire.due_subject("fn", "t")):
        await deliverer.nc.publish(subject, b"x")
        assert await deliverer.refused(), subject
        await publisher.nc.publish(subject, b"x")
        assert await publisher.refused(), subject
    await publisher.nc.subscribe(wire.EVENT_SUBJECTS_ALL)
    assert await publisher.refused()


async def test_only_the_scheduler_files_delayed_tasks_schedules(connect) -> None:  # type: ignore[no-untyped-def]
    for role in natsauth.SERVICE_ROLES:
        conn = await connect(role)
        await conn.nc.publish(wire.schedule_subject("fn", "t"), b"{}")
        assert bool(await conn.refused()) == (role != natsauth.SCHEDULER), role


def test_generated_passwords_read_as_strings_in_a_nats_config() -> None:
    # A `$VARIABLE` whose value starts with a digit is read as a number by nats-server (which then
    # refuses to start): the cluster config takes the passwords that way.
    for password in [natsauth.new_password() for _ in range(2000)]:
        assert password[0].isalpha() and password.isalnum() and len(password) >= 40, password


def test_the_compose_config_carries_the_same_permissions() -> None:
    config = (Path(__file__).resolve().parents[1] / "deploy" / "nats" / "cluster.conf").read_text()
    assert natsauth.render_authorization() in config
