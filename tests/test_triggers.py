"""Triggers end to end on real servers: the trigger API, nats publishers, HTTP and timer triggers."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import httpx
import pytest
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from shared.acs3 import sign_request
from shared.devstack import Stack
from shared.wire import partition_of
from tests.fc_client import FcClient, zip_code
from tests.integration_fixtures import ACCESS_KEY_ID, ACCESS_KEY_SECRET, StackFactory, publisher
from tests.test_api_errors import assert_fc_error
from tests.test_lifecycle import make_function
from tests.test_recovery import list_all, wait_until

pytestmark = pytest.mark.timeout(180)

HTTP_HANDLER = '''
import json

def handler(event, context):
    request = json.loads(event)
    return {"statusCode": 201, "headers": {"x-seen-method": request["requestContext"]["http"]["method"]},
            "body": json.dumps({"path": request["rawPath"], "query": request["queryParameters"],
                                "body": request["body"]})}
'''


async def create_trigger(fc: FcClient, function: str, name: str, trigger_type: str, config: Any,
                         **extra: Any) -> httpx.Response:
    body = {"triggerName": name, "triggerType": trigger_type,
            "triggerConfig": config if isinstance(config, str) else json.dumps(config), **extra}
    return await fc.request("POST", f"/functions/{function}/triggers", json=body)


async def test_trigger_api_and_refusals(fc: FcClient, fn_name: str) -> None:
    await make_function(fc, fn_name)
    created = await create_trigger(fc, fn_name, "orders", "nats", {"subject": "shop.orders.*"},
                                   description="order intake")
    assert created.status_code == 200, created.text
    trigger = created.json()
    assert trigger["triggerName"] == "orders" and trigger["triggerType"] == "nats"
    assert json.loads(trigger["triggerConfig"]) == {"subject": "shop.orders.*", "enable": True}
    assert trigger["qualifier"] == "LATEST" and trigger["triggerId"] and trigger["createdTime"]
    assert trigger["targetArn"].endswith(f":functions/{fn_name}")
    got = await fc.request("GET", f"/functions/{fn_name}/triggers/orders")
    assert got.json() == trigger

    updated = await fc.request("PUT", f"/functions/{fn_name}/triggers/orders",
                               json={"triggerConfig": json.dumps({"subject": "shop.orders.*", "enable": False})})
    assert updated.status_code == 200, updated.text
    assert updated.json()["status"] == "Disabled" and updated.json()["description"] == "order intake"
    await create_trigger(fc, fn_name, "web", "http", {"authType": "anonymous", "methods": ["GET", "POST"]})
    listed = (await fc.request("GET", f"/functions/{fn_name}/triggers", query={"limit": "1"})).json()
    assert [t["triggerName"] for t in listed["triggers"]] == ["orders"] and listed["nextToken"]
    rest = (await fc.request("GET", f"/functions/{fn_name}/triggers",
                             query={"nextToken": listed["nextToken"]})).json()
    assert [t["triggerName"] for t in rest["triggers"]] == ["web"] and rest["nextToken"] == ""
    assert rest["triggers"][0]["httpTrigger"]["urlInternet"].endswith(f"/http-triggers/{fn_name}/web/")

    refusals = [
        ("oss", {"events": ["oss:ObjectCreated:*"]}, "unsupported triggerType"),
        ("nats", "{not json", "not valid JSON"),
        ("nats", {}, "subject"),
        ("nats", {"subject": "> "}, "not a valid NATS subject"),
        ("nats", {"subject": "taskmode.events.>"}, "may not start"),
        ("nats", {"subject": "*.orders"}, "may not start"),
        ("nats", {"subject": "a", "colour": "red"}, "colour"),
        ("timer", {"cronExpression": "every day"}, "cronExpression"),
        ("timer", {"cronExpression": "0 0 * * *"}, "six fields"),
        ("http", {"authType": "magic"}, "authType"),
        ("http", {"methods": ["FETCH"]}, "methods"),
    ]
    for trigger_type, config, mention in refusals:
        response = await create_trigger(fc, fn_name, "bad", trigger_type, config)
        assert_fc_error(response, 400, "InvalidArgument", mention)
    assert_fc_error(await create_trigger(fc, fn_name, "9lives", "nats", {"subject": "a"}), 400, "InvalidArgument")
    assert_fc_error(await create_trigger(fc, fn_name, "orders", "nats", {"subject": "a"}), 409, "TriggerAlreadyExists")
    assert_fc_error(await create_trigger(fc, "fn_missing_x", "t", "nats", {"subject": "a"}), 404, "FunctionNotFound")
    assert_fc_error(await fc.request("GET", f"/functions/{fn_name}/triggers/bad"), 404, "TriggerNotFound")
    names = [t["triggerName"] for t in (await fc.request("GET", f"/functions/{fn_name}/triggers")).json()["triggers"]]
    assert names == ["orders", "web"]  # nothing half-written by the refusals

    assert (await fc.request("DELETE", f"/functions/{fn_name}/triggers/web")).status_code == 204
    assert (await fc.request("DELETE", f"/functions/{fn_name}")).status_code == 204
    await make_function(fc, fn_name)  # a function created again has none of the old triggers
    assert (await fc.request("GET", f"/functions/{fn_name}/triggers")).json()["triggers"] == []


async def test_a_trigger_qualifier_must_name_a_version_or_alias(fc: FcClient, fn_name: str) -> None:
    """CreateTrigger and UpdateTrigger refuse a qualifier that names nothing, as InvokeFunction
    does (404 VersionNotFound / AliasNotFound), and store nothing when they do."""
    await make_function(fc, fn_name)
    http = {"authType": "anonymous", "methods": ["POST"]}
    assert_fc_error(await create_trigger(fc, fn_name, "ghost", "http", http, qualifier="7"), 404, "VersionNotFound")
    assert_fc_error(await create_trigger(fc, fn_name, "ghost", "nats", {"subject": "ghost.a"}, qualifier="prod"),
                    404, "AliasNotFound")
    assert (await fc.request("GET", f"/functions/{fn_name}/triggers")).json()["triggers"] == []

    assert (await fc.request("POST", f"/functions/{fn_name}/versions", json={})).json()["versionId"] == "1"
    alias = await fc.request("POST", f"/functions/{fn_name}/aliases", json={"aliasName": "prod", "versionId": "1"})
    assert alias.status_code == 200, alias.text
    for name, qualifier in (("on_latest", "LATEST"), ("on_version", "1"), ("on_alias", "prod")):
        created = await create_trigger(fc, fn_name, name, "http", http, qualifier=qualifier)
        assert created.status_code == 200 and created.json()["qualifier"] == qualifier, created.text

    for qualifier, code in (("2", "VersionNotFound"), ("staging", "AliasNotFound")):
        refused = await fc.request("PUT", f"/functions/{fn_name}/triggers/on_version",
                                   json={"qualifier": qualifier, "description": "changed"})
        assert_fc_error(refused, 404, code)
    unchanged = (await fc.request("GET", f"/functions/{fn_name}/triggers/on_version")).json()
    assert unchanged["qualifier"] == "1" and unchanged["description"] == ""
    moved = await fc.request("PUT", f"/functions/{fn_name}/triggers/on_version", json={"qualifier": "prod"})
    assert moved.status_code == 200 and moved.json()["qualifier"] == "prod", moved.text
    back = await fc.request("PUT", f"/functions/{fn_name}/triggers/on_version", json={"qualifier": "LATEST"})
    assert back.status_code == 200 and back.json()["qualifier"] == "LATEST", back.text


async def test_nats_publishers_messages_become_tasks_deduplicated(
        fc: FcClient, fn_name: str, shared_stack: Stack) -> None:
    await make_function(fc, fn_name, handler="index.info")
    subject = f"orders.{uuid.uuid4().hex[:8]}"
    response = await create_trigger(fc, fn_name, "intake", "nats", {"subject": f"{subject}.*"})
    assert response.status_code == 200, response.text
    nc = await publisher(shared_stack)
    try:
        async def request(task_id: str | None, data: bytes, **headers: str) -> dict[str, Any]:
            if task_id is not None:
                headers["x-fc-async-task-id"] = task_id
            reply = await nc.request(f"{subject}.eu", data, timeout=10, headers=headers or None)
            return dict(json.loads(reply.data))

        async def subscribed() -> bool:
            try:
                return "taskId" in await request("warmup", b"")
            except NoRespondersError:
                return False

        await wait_until(subscribed, deadline_s=30, what="trigger subscribed")
        assert await request("order_1", b"first") == {"taskId": "order_1"}
        duplicate = await request("order_1", b"second")
        assert duplicate["Code"] == "TaskAlreadyExists" and duplicate["HttpStatus"] == 409, duplicate
        assert duplicate["TaskId"] == "order_1"
        generated = (await request(None, b"no id"))["taskId"]
        assert generated.startswith("task-")
        delayed = await request("order_late", b"later", **{"x-fc-async-delay": "1"})
        assert delayed == {"taskId": "order_late"}
        bad = await request("9starts-with-digit", b"")
        assert bad["Code"] == "InvalidArgument" and bad["HttpStatus"] == 400
        # Many at once, repeats among them: each id runs once, whoever asked first wins.
        ids = [f"bulk_{i % 150}" for i in range(300)]
        answers = await asyncio.gather(*(request(task_id, b"x") for task_id in ids))
        accepted = [a["taskId"] for a in answers if "taskId" in a]
        assert sorted(accepted) == sorted(set(ids)), "every id accepted exactly once"
        assert sum(a.get("Code") == "TaskAlreadyExists" for a in answers) == 150
        await nc.publish(f"{subject}.us", b"fire and forget", headers={"x-fc-async-task-id": "order_noreply"})
        await nc.flush()
    finally:
        await nc.close()

    task = await fc.wait_for(fn_name, "order_1", {"Succeeded"})
    assert task["taskPayload"] == "first"
    assert [e["status"] for e in task["events"]].count("Running") == 1
    assert json.loads(task["returnPayload"])["calls"] >= 1
    await fc.wait_for(fn_name, "order_late", {"Succeeded"})
    await fc.wait_for(fn_name, "order_noreply", {"Succeeded"})
    await fc.wait_for(fn_name, generated, {"Succeeded"})

    async def all_ran() -> bool:
        listed = await list_all(fc, fn_name)
        return all(listed.get(f"bulk_{i}", {}).get("status") == "Succeeded" for i in range(150))

    await wait_until(all_ran, deadline_s=90, what="bulk tasks Succeeded")

    # Disabled, the trigger fires nothing: nobody listens on the subject any more.
    await fc.request("PUT", f"/functions/{fn_name}/triggers/intake",
                     json={"triggerConfig": {"subject": f"{subject}.*", "enable": False}})
    nc = await publisher(shared_stack)
    try:
        async def unsubscribed() -> bool:
            try:
                await nc.request(f"{subject}.eu", b"", timeout=5, headers={"x-fc-async-task-id": f"t{time.time_ns()}"})
            except NoRespondersError:
                return True
            except NatsTimeoutError:  # sent while the subscription was going away: ask again
                return False
            return False

        await wait_until(unsubscribed, deadline_s=30, what="disabled trigger unsubscribed")
    finally:
        await nc.close()


async def test_http_trigger_runs_the_function_sync_and_async(fc: FcClient, fn_name: str, shared_stack: Stack) -> None:
    assert (await fc.create_function(fn_name, code={"index.py": HTTP_HANDLER})).status_code == 200
    anonymous = await create_trigger(fc, fn_name, "web", "http", {"authType": "anonymous", "methods": ["GET", "POST"]})
    url = anonymous.json()["httpTrigger"]["urlInternet"]
    signed = await create_trigger(fc, fn_name, "private", "http", {"authType": "function", "methods": ["POST"]})
    private_url = signed.json()["httpTrigger"]["urlInternet"]
    async with httpx.AsyncClient(timeout=60) as http:
        sync = await http.post(url + "orders/7?x=1&x=2", content=b"hello")
        assert sync.status_code == 201, sync.text
        assert sync.headers["x-seen-method"] == "POST"
        assert sync.json() == {"path": "/orders/7", "query": {"x": "1,2"}, "body": "hello"}
        assert (await http.put(url + "orders/7")).status_code == 405

        accepted = await http.post(url + "jobs", content=b"later", headers={"x-fc-invocation-type": "Async",
                                                                           "x-fc-async-task-id": "web_job_1"})
        assert accepted.status_code == 202, accepted.text
        assert accepted.headers["x-fc-async-task-id"] == "web_job_1"
        again = await http.post(url + "jobs", headers={"x-fc-invocation-type": "Async",
                                                      "x-fc-async-task-id": "web_job_1"})
        assert again.status_code == 409 and again.json()["Code"] == "TaskAlreadyExists"

        assert (await http.post(private_url, content=b"x")).status_code == 403
        path = f"/http-triggers/{fn_name}/private/"
        host = private_url.split("/")[2]
        headers = {"host": host, "content-type": "application/octet-stream"}
        headers.update(sign_request(method="POST", path=path, query={}, headers=headers, body=b"x",
                                    access_key_id=ACCESS_KEY_ID, access_key_secret=ACCESS_KEY_SECRET))
        assert (await http.post(private_url, content=b"x", headers=headers)).status_code == 201
    task = await fc.wait_for(fn_name, "web_job_1", {"Succeeded"})
    event = json.loads(task["taskPayload"])
    assert event["rawPath"] == "/jobs" and event["body"] == "later"
    assert event["requestContext"]["http"]["method"] == "POST"
    assert json.loads(task["returnPayload"])["statusCode"] == 201


async def test_disable_url_internet_leaves_only_the_intranet_url(fc: FcClient, fn_name: str) -> None:
    """FC's `disableURLInternet`: the trigger has no urlInternet any more; the gateway's one URL
    is its urlIntranet, and requests to it are served as before."""
    assert (await fc.create_function(fn_name, code={"index.py": HTTP_HANDLER})).status_code == 200
    config = {"authType": "anonymous", "methods": ["POST"], "disableURLInternet": True}
    created = await create_trigger(fc, fn_name, "inside", "http", config)
    assert created.status_code == 200, created.text
    assert json.loads(created.json()["triggerConfig"])["disableURLInternet"] is True
    urls = created.json()["httpTrigger"]
    assert "urlInternet" not in urls and urls["urlIntranet"].endswith(f"/http-triggers/{fn_name}/inside/"), urls
    listed = (await fc.request("GET", f"/functions/{fn_name}/triggers")).json()["triggers"]
    assert [t["httpTrigger"] for t in listed] == [urls]
    async with httpx.AsyncClient(timeout=60) as http:
        served = await http.post(urls["urlIntranet"] + "in", content=b"hi")
        assert served.status_code == 201 and served.json()["body"] == "hi", served.text

    enabled = await fc.request("PUT", f"/functions/{fn_name}/triggers/inside",
                               json={"triggerConfig": {**config, "disableURLInternet": False}})
    assert enabled.status_code == 200, enabled.text
    assert enabled.json()["httpTrigger"] == {"urlInternet": urls["urlIntranet"], "urlIntranet": urls["urlIntranet"]}
    got = (await fc.request("GET", f"/functions/{fn_name}/triggers/inside")).json()
    assert got["httpTrigger"] == enabled.json()["httpTrigger"]


async def test_timer_fires_once_per_tick_across_a_restart(fc: FcClient, fn_name: str, shared_stack: Stack) -> None:
    await make_function(fc, fn_name)
    response = await create_trigger(fc, fn_name, "tick", "timer",
                                    {"cronExpression": "@every 2s", "payload": "beat", "enable": True})
    assert response.status_code == 200, response.text

    async def ticks(at_least: int) -> list[int] | None:
        listed = await list_all(fc, fn_name)
        found = sorted(int(task_id.rsplit("-", 1)[1]) for task_id in listed)
        return found if len(found) >= at_least else None

    before = await wait_until(lambda: ticks(2), deadline_s=60, what="two ticks")
    shared_stack.kill_service("triggers")
    shared_stack.start_service("triggers")
    after = await wait_until(lambda: ticks(len(before) + 4), deadline_s=90, what="ticks after the restart")
    await fc.request("PUT", f"/functions/{fn_name}/triggers/tick",
                     json={"triggerConfig": {"cronExpression": "@every 2s", "enable": False}})
    # Every tick from the first to the last, each once: none lost while the service was down.
    assert after == list(range(after[0], after[-1] + 1, 2)), after
    task = (await fc.get_task(fn_name, f"tick-{after[0]}")).json()
    assert json.loads(task["taskPayload"]) == {"triggerTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(after[0])),
                                               "triggerName": "tick", "payload": "beat"}



async def test_a_disabled_timer_stops_firing_and_fires_again_when_enabled(fc: FcClient, fn_name: str) -> None:
    """`enable: false` stops a timer; `enable: true` starts it again from that moment (the ticks
    it missed while disabled are not caught up). A second timer on the function, never disabled,
    is the service's clock: once it has fired ticks several periods after the disable, the
    disabled timer must have fired none of them."""
    await make_function(fc, fn_name)
    every_1s = {"cronExpression": "@every 1s", "payload": "beat"}
    for name in ("tick", "clock"):
        response = await create_trigger(fc, fn_name, name, "timer", {**every_1s, "enable": True})
        assert response.status_code == 200, response.text

    async def ticks() -> dict[str, list[int]]:
        found: dict[str, list[int]] = {"tick": [], "clock": []}
        for task_id in await list_all(fc, fn_name):
            name, at = task_id.rsplit("-", 1)
            found[name].append(int(at))
        return {name: sorted(times) for name, times in found.items()}

    async def clock_past(moment: float) -> dict[str, list[int]] | None:
        found = await ticks()
        return found if found["clock"] and found["clock"][-1] >= moment else None

    started = time.time()
    await wait_until(lambda: clock_past(started + 2), deadline_s=60, what="the timers ticking")
    assert (await ticks())["tick"], "the timer to disable never fired"

    disable = await fc.request("PUT", f"/functions/{fn_name}/triggers/tick",
                               json={"triggerConfig": {**every_1s, "enable": False}})
    disabled_at = time.time()
    assert disable.status_code == 200 and disable.json()["status"] == "Disabled", disable.text
    # Two clock ticks later the service has seen the disable: the timer's last tick is known.
    seen = await wait_until(lambda: clock_past(disabled_at + 2), deadline_s=60, what="clock ticks after the disable")
    last = seen["tick"][-1]
    assert last <= disabled_at + 2, (disabled_at, seen["tick"])
    # Over several more periods of the clock, the disabled timer fires nothing.
    quiet = await wait_until(lambda: clock_past(disabled_at + 7), deadline_s=60, what="five more clock ticks")
    assert quiet["tick"][-1] == last, (disabled_at, quiet["tick"])

    enable = await fc.request("PUT", f"/functions/{fn_name}/triggers/tick",
                              json={"triggerConfig": {**every_1s, "enable": True}})
    enabled_at = time.time()
    assert enable.status_code == 200 and enable.json()["status"] == "Enabled", enable.text

    async def fired_again() -> list[int] | None:
        found = (await ticks())["tick"]
        return found if found[-1] > enabled_at + 1 else None

    again = await wait_until(fired_again, deadline_s=60, what="the re-enabled timer firing")
    resumed = [at for at in again if at > last]
    # From the re-enable on (its lastModifiedTime has whole seconds), nothing of the gap before it.
    assert resumed and resumed[0] >= int(enabled_at) - 1, (disabled_at, enabled_at, again)
    assert resumed == list(range(resumed[0], resumed[-1] + 1)), again
    await fc.request("DELETE", f"/functions/{fn_name}")


async def test_an_http_trigger_fires_on_its_qualifier_sync_and_async(fc: FcClient, fn_name: str) -> None:
    """A trigger on version 1 runs version 1's code, called synchronously or as a task, after
    LATEST's code has changed; a trigger whose qualifier names nothing (any more) answers 404."""
    def code(tag: str) -> dict[str, str]:
        return {"index.py": f"def handler(event, context):\n    return {tag!r}\n"}

    assert (await fc.create_function(fn_name, code=code("version one"))).status_code == 200
    published = await fc.request("POST", f"/functions/{fn_name}/versions", json={})
    assert published.status_code == 200 and published.json()["versionId"] == "1", published.text
    updated = await fc.request("PUT", f"/functions/{fn_name}", json={"code": {"zipFile": zip_code(code("latest"))}})
    assert updated.status_code == 200, updated.text
    pinned = await create_trigger(fc, fn_name, "pinned", "http", {"authType": "anonymous", "methods": ["POST"]},
                                  qualifier="1")
    assert pinned.status_code == 200 and pinned.json()["qualifier"] == "1", pinned.text
    latest = await create_trigger(fc, fn_name, "latest", "http", {"authType": "anonymous", "methods": ["POST"]})
    assert_fc_error(await create_trigger(fc, fn_name, "ghost", "http", {"authType": "anonymous", "methods": ["POST"]},
                                         qualifier="7"), 404, "VersionNotFound")
    # A trigger whose alias is deleted afterwards answers as InvokeFunction on that alias would.
    alias = await fc.request("POST", f"/functions/{fn_name}/aliases", json={"aliasName": "gone", "versionId": "1"})
    assert alias.status_code == 200, alias.text
    orphan = await create_trigger(fc, fn_name, "orphan", "http", {"authType": "anonymous", "methods": ["POST"]},
                                  qualifier="gone")
    assert orphan.status_code == 200, orphan.text
    assert (await fc.request("DELETE", f"/functions/{fn_name}/aliases/gone")).status_code == 204
    async with httpx.AsyncClient(timeout=60) as http:
        sync = await http.post(pinned.json()["httpTrigger"]["urlInternet"], content=b"x")
        assert (sync.status_code, sync.text) == (200, "version one")
        sync_latest = await http.post(latest.json()["httpTrigger"]["urlInternet"], content=b"x")
        assert (sync_latest.status_code, sync_latest.text) == (200, "latest")
        accepted = await http.post(pinned.json()["httpTrigger"]["urlInternet"], content=b"x",
                                   headers={"x-fc-invocation-type": "Async", "x-fc-async-task-id": "pinned_1"})
        assert accepted.status_code == 202, accepted.text
        url = orphan.json()["httpTrigger"]["urlInternet"]
        assert_fc_error(await http.post(url, content=b"x"), 404, "AliasNotFound")
        assert_fc_error(await http.post(url, content=b"x", headers={"x-fc-invocation-type": "Async"}),
                        404, "AliasNotFound")
    task = await fc.wait_for(fn_name, "pinned_1", {"Succeeded"})
    assert task["returnPayload"] == "version one" and task["qualifier"] == "1"


async def test_timer_fires_once_per_tick_with_two_instances_and_one_killed(stack_with: StackFactory) -> None:
    """Two triggers-service instances split the timers by partition leases; whichever holds a
    timer's partition fires it, the other takes over when the holder dies: every tick from the
    first to the last is one task, none lost in the handover, none run twice."""
    stack, fc = stack_with({"TASKMODE_LEASE_S": "2"})
    stack.start_service("triggers", name="triggers2")
    await make_function(fc, "ticking")
    response = await create_trigger(fc, "ticking", "tick", "timer", {"cronExpression": "@every 1s", "payload": "p"})
    assert response.status_code == 200, response.text

    async def ticks(at_least: int) -> list[int] | None:
        listed = await list_all(fc, "ticking")
        found = sorted(int(task_id.rsplit("-", 1)[1]) for task_id in listed)
        return found if len(found) >= at_least else None

    before = await wait_until(lambda: ticks(3), deadline_s=60, what="three ticks")
    # Kill the instance that fires the timer: the one whose log last claimed its partition.
    partition = partition_of("ticking", "tick", 4)

    def holds(label: str) -> bool:
        held = False
        for line in (stack.data_dir / "logs" / f"{label}.log").read_text().splitlines():
            record = json.loads(line) if line.startswith("{") else {}
            if record.get("group") == "timers" and record.get("partition") == partition:
                held = record["msg"] == "partition claimed"
        return held

    [holder] = [label for label in ("triggers", "triggers2") if holds(label)]
    stack.kill_service(holder)
    after = await wait_until(lambda: ticks(len(before) + 6), deadline_s=90, what="ticks after the kill")
    await fc.request("PUT", "/functions/ticking/triggers/tick",
                     json={"triggerConfig": {"cronExpression": "@every 1s", "enable": False}})
    assert after == list(range(after[0], after[-1] + 1)), after
    for tick in after[:: max(1, len(after) // 4)]:
        task = await fc.wait_for("ticking", f"tick-{tick}", {"Succeeded"})
        assert [e["status"] for e in task["events"]].count("Running") == 1
