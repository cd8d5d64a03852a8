"""Destinations end to end: real services, and a real HTTP receiver on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from aiohttp import web

from shared import natsauth, wire
from shared.destinations import destination_task_id, verify_webhook
from shared.devstack import Stack, free_port
from tests.fc_client import FcClient
from tests.integration_fixtures import HANDLERS, StackFactory, publisher
from tests.test_api_errors import assert_fc_error
from tests.test_recovery import wait_until

pytestmark = pytest.mark.timeout(180)


class Receiver:
    """An HTTP server on loopback that keeps every request it gets; it can be down and come back."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self._runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    async def start(self) -> None:
        async def keep(request: web.Request) -> web.Response:
            self.received.append((request.path, dict(request.headers), await request.read()))
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/{tail:.*}", keep)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def records(self, path: str) -> list[tuple[dict[str, str], bytes]]:
        return [(headers, body) for p, headers, body in self.received if p == f"/{path}"]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver(free_port())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def make(fc: FcClient, name: str, *, handler: str = "index.handler", **config: Any) -> None:
    response = await fc.create_function(name, code={"index.py": HANDLERS}, handler=handler)
    assert response.status_code == 200, response.text
    response = await fc.put_async_config(name, asyncTask=True, **config)
    assert response.status_code == 200, response.text


def destinations(on_success: str | None = None, on_failure: str | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if on_success:
        config["onSuccess"] = {"destination": on_success}
    if on_failure:
        config["onFailure"] = {"destination": on_failure}
    return {"destinationConfig": config}


async def destination_status(fc: FcClient, name: str, task_id: str, wanted: str) -> bool:
    task = (await fc.get_task(name, task_id)).json()
    return bool(task.get("destinationStatus") == wanted)


def check_signed(headers: dict[str, str], body: bytes, secret: str) -> dict[str, Any]:
    assert verify_webhook(secret, timestamp=headers["x-taskmode-timestamp"], body=body,
                          signature=headers["x-taskmode-signature"], now_s=time.time())
    assert not verify_webhook("another secret", timestamp=headers["x-taskmode-timestamp"], body=body,
                              signature=headers["x-taskmode-signature"], now_s=time.time())
    return dict(json.loads(body))


async def test_success_and_failure_records_are_delivered_signed(
        fc: FcClient, fn_name: str, shared_stack: Stack, receiver: Receiver) -> None:
    await make(fc, fn_name, handler="index.fail_then_succeed", maxAsyncRetryAttempts=1,
               **destinations(receiver.url("ok"), receiver.url("failed")))
    assert (await fc.invoke_async(fn_name, b"1", task_id="recovers")).status_code == 202
    assert (await fc.invoke_async(fn_name, b"5", task_id="gives_up")).status_code == 202
    await wait_until(lambda: destination_status(fc, fn_name, "recovers", "Delivered"), deadline_s=60,
                     what="success record delivered")
    await wait_until(lambda: destination_status(fc, fn_name, "gives_up", "Delivered"), deadline_s=60,
                     what="failure record delivered")
    [(ok_headers, ok_body)] = receiver.records("ok")
    [(failed_headers, failed_body)] = receiver.records("failed")
    ok = check_signed(ok_headers, ok_body, shared_stack.delivery_secret)
    failed = check_signed(failed_headers, failed_body, shared_stack.delivery_secret)
    assert ok_headers["x-taskmode-delivery-id"] == f"{fn_name}/recovers"
    assert set(ok) == {"timestamp", "requestContext", "requestPayload", "responseContext", "responsePayload"}
    assert ok["requestContext"]["condition"] == "Success"
    assert ok["requestContext"]["approximateInvokeCount"] == 2  # one failure, one retry that succeeded
    assert ok["requestContext"]["functionArn"].endswith(f":functions/{fn_name}")
    assert ok["requestPayload"] == "1" and ok["responsePayload"] == "ok after 1"
    assert ok["responseContext"] == {"statusCode": 200, "functionError": ""}
    assert failed["requestContext"]["condition"] == "RetriesExhausted"
    assert failed["requestContext"]["approximateInvokeCount"] == 2
    assert failed["responseContext"]["functionError"] == "UnhandledInvocationError"
    assert "attempt 1 failed" in json.loads(failed["responsePayload"])["errorMessage"]


async def test_a_receiver_down_then_back_gets_the_record_once(
        fc: FcClient, fn_name: str, shared_stack: Stack) -> None:
    later = Receiver(free_port())
    await make(fc, fn_name, **destinations(later.url("hook")))
    await fc.invoke_async(fn_name, b"patience", task_id="waits")
    # Nobody listens yet: attempts fail and are retried with backoff.
    await wait_until(lambda: destination_status(fc, fn_name, "waits", "Delivering"), deadline_s=60,
                     what="a failed attempt recorded")
    await later.start()
    try:
        await wait_until(lambda: destination_status(fc, fn_name, "waits", "Delivered"), deadline_s=60,
                         what="record delivered after retries")
        # A restart of the deliverer replays nothing that was delivered: a later task's record
        # arriving proves the restarted deliverer went past the first one.
        shared_stack.kill_service("deliverer")
        shared_stack.start_service("deliverer")
        await fc.invoke_async(fn_name, b"next", task_id="after_restart")
        await wait_until(lambda: destination_status(fc, fn_name, "after_restart", "Delivered"), deadline_s=90,
                         what="record after the restart delivered")
        bodies = [json.loads(body)["requestPayload"] for _, body in later.records("hook")]
        assert sorted(bodies) == ["next", "patience"], bodies
    finally:
        await later.stop()


async def test_function_and_nats_destinations(fc: FcClient, fn_name: str, shared_stack: Stack) -> None:
    sink = f"{fn_name}_sink"
    await make(fc, sink)
    arn = (await fc.request("GET", f"/functions/{sink}")).json()["functionArn"]
    await make(fc, fn_name, handler="index.fail", maxAsyncRetryAttempts=0,
               **destinations(on_failure=arn))
    await fc.invoke_async(fn_name, b"to the sink", task_id="source")
    record_task = await fc.wait_for(sink, destination_task_id(fn_name, "source"), {"Succeeded"}, deadline_s=60)
    record = json.loads(record_task["taskPayload"])
    assert record["requestContext"]["condition"] == "RetriesExhausted" and record["requestPayload"] == "to the sink"

    other = f"{fn_name}_bus"
    subject = f"results.{fn_name}"
    await make(fc, other, **destinations(f"nats:{subject}"))
    nc = await publisher(shared_stack)
    try:
        sub = await nc.subscribe(subject)
        await fc.invoke_async(other, b"over the bus", task_id="bus_1")
        msg = await sub.next_msg(timeout=60)
        assert json.loads(msg.data)["responsePayload"] == "over the bus"
        assert msg.headers and msg.headers["Nats-Msg-Id"] == f"{other}/bus_1"
    finally:
        await nc.close()


async def test_an_expired_task_fires_on_failure(fc: FcClient, fn_name: str, shared_stack: Stack,
                                                receiver: Receiver) -> None:
    await make(fc, fn_name, maxAsyncEventAgeInSeconds=1, **destinations(on_failure=receiver.url("expired")))
    shared_stack.kill_service("scheduler")  # nothing dispatches the delayed task in time
    try:
        submitted = time.time()
        await fc.invoke_async(fn_name, b"too late", task_id="stale", delay_s=1)

        async def aged() -> bool:  # due after 1 s, too old 1 s later
            return time.time() > submitted + 3

        await wait_until(aged, deadline_s=10, what="the task's age passing")
    finally:
        shared_stack.start_service("scheduler")
    task = await fc.wait_for(fn_name, "stale", {"Expired"}, deadline_s=60)
    assert task["status"] == "Expired"
    await wait_until(lambda: destination_status(fc, fn_name, "stale", "Delivered"), deadline_s=60,
                     what="expiry record delivered")
    [(_, body)] = receiver.records("expired")
    record = json.loads(body)
    assert record["requestContext"]["condition"] == "EventAgeExceeded"
    assert record["requestContext"]["approximateInvokeCount"] == 0
    assert record["requestPayload"] == "too late"


async def test_destinations_that_do_not_parse_or_exist_are_refused(fc: FcClient, fn_name: str) -> None:
    await make(fc, fn_name)
    arn = (await fc.request("GET", f"/functions/{fn_name}")).json()["functionArn"]
    region, account = arn.split(":")[2:4]
    refused = [
        ("ftp://example.invalid/x", "not a function ARN"),
        ("http://", "not a function ARN"),
        (f"acs:fc:elsewhere:{account}:functions/x", "only functions of region"),
        (f"acs:fc:{region}:{account}:functions/no_such_fn", "does not exist"),
        (f"acs:fc:{region}:{account}:queues/x", "acs:fc:"),
        (arn, "its own destination"),
        ("nats:taskmode.events.0.x.y.Succeeded", "may not start"),
        ("nats:results.*", "wildcards"),
    ]
    for destination, mention in refused:
        response = await fc.put_async_config(fn_name, **destinations(on_failure=destination))
        assert_fc_error(response, 400, "InvalidArgument", "destinationConfig.onFailure", mention)
    config = (await fc.request("GET", f"/functions/{fn_name}/async-invoke-config")).json()
    assert config.get("destinationConfig") is None  # the earlier, valid config is unchanged



async def test_a_receiver_that_trickles_its_answer_does_not_hold_the_attempt(stack_with: StackFactory) -> None:
    """An attempt has one deadline (TASKMODE_DELIVERY_TIMEOUT_S) however its receiver answers,
    instead of httpx's per-read timeout, which a byte every half second never trips: a 2xx
    status counts as soon as it is in (a body trickled after it is not waited for), and a status
    line trickled byte by byte fails the attempt on time, to be retried."""
    stack, fc = stack_with({"TASKMODE_DELIVERY_TIMEOUT_S": "2"})
    done = asyncio.Event()
    asked: dict[str, asyncio.Event] = {"body": asyncio.Event(), "status": asyncio.Event()}

    async def trickle(writer: asyncio.StreamWriter, data: bytes) -> None:
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), 0.5)  # the receiver's pace, not a test wait
            if done.is_set():
                return

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")))
            await reader.readexactly(length)
            if head.startswith(b"POST /body"):
                asked["body"].set()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
                await trickle(writer, b" " * 1000)
            else:
                asked["status"].set()
                await trickle(writer, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n" * 10)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the deliverer gave up on this answer
        finally:
            writer.close()

    port = free_port()
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    try:
        await make(fc, "trickled_body", **destinations(f"http://127.0.0.1:{port}/body"))
        await make(fc, "trickled_status", **destinations(f"http://127.0.0.1:{port}/status"))
        assert (await fc.invoke_async("trickled_body", b"x", task_id="slow_body")).status_code == 202
        assert (await fc.invoke_async("trickled_status", b"x", task_id="slow_status")).status_code == 202
        await asyncio.wait_for(asyncio.gather(asked["body"].wait(), asked["status"].wait()), 60)
        # Both well within the deliverer's ack wait (30 s): no redelivery is involved.
        await wait_until(lambda: destination_status(fc, "trickled_body", "slow_body", "Delivered"), deadline_s=15,
                         what="the 2xx status counted without the trickled body")
        await wait_until(lambda: destination_status(fc, "trickled_status", "slow_status", "Delivering"),
                         deadline_s=15, what="the trickled status line failed the attempt on its deadline")
    finally:
        done.set()
        server.close()
        await server.wait_closed()


async def _delivery_queues(stack: Stack) -> set[str]:
    user, password = stack.nats_credentials(natsauth.ADMIN) or (None, None)
    nc = await nats.connect(stack.nats_url, user=user, password=password)
    try:
        js = nc.jetstream()
        names = [str(info.name) for info in await js.consumers_info(wire.EVENT_STREAM)]
    finally:
        await nc.close()
    return {name.removeprefix(wire.DELIVERY_DURABLE_PREFIX) for name in names
            if name.startswith(wire.DELIVERY_DURABLE_PREFIX)}


async def test_only_functions_with_a_destination_are_read_and_none_is_missed_while_no_deliverer_runs(
        stack_with: StackFactory, receiver: Receiver) -> None:
    """The deliverer reads a function's final events only while its config names a destination,
    from the time the config was put: a task that ends while no deliverer runs (or before its
    queue exists) gets its record once one runs; a config without destinations leaves no queue."""
    stack, fc = stack_with({})
    await make(fc, "plain")  # an async config without destinations
    await make(fc, "wired", **destinations(receiver.url("wired")))
    await wait_until(lambda: _has(stack, {"wired"}), deadline_s=30, what="a queue for the function with a destination")
    assert (await fc.invoke_async("plain", b"nobody listens", task_id="p1")).status_code == 202
    await fc.wait_for("plain", "p1", {"Succeeded"})

    stack.kill_service("deliverer")
    await make(fc, "late", **destinations(receiver.url("late")))  # put while no deliverer runs
    assert (await fc.invoke_async("late", b"while down", task_id="l1")).status_code == 202
    await fc.wait_for("late", "l1", {"Succeeded"})
    stack.start_service("deliverer")

    await wait_until(lambda: destination_status(fc, "late", "l1", "Delivered"), deadline_s=60,
                     what="the record of a task that ended while no deliverer ran")
    assert [json.loads(body)["requestPayload"] for _, body in receiver.records("late")] == ["while down"]
    assert await _delivery_queues(stack) == {"wired", "late"}

    # Destinations removed: the queue goes, and later tasks send nothing.
    assert (await fc.put_async_config("wired", asyncTask=True)).status_code == 200
    await wait_until(lambda: _has(stack, {"late"}), deadline_s=30, what="the queue without a destination gone")


async def _has(stack: Stack, functions: set[str]) -> bool:
    return await _delivery_queues(stack) == functions
