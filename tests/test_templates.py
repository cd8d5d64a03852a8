"""Python instances forked from a warm template (template.py, python_template.py), sandboxed.

Real templates and instances, as the executor starts them; the properties a directly started
instance has must hold for a forked one too.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import textwrap
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from services.executor.instance import FunctionSpec, Instance, InvokeContext
from services.executor.pool import InstancePool, new_sandbox
from services.executor.sandbox import SandboxSettings
from tests.test_instances import gone, wait_until

pytestmark = pytest.mark.timeout(60)

CTX = InvokeContext(request_id="req-1", task_id="task-1")

HANDLER = '''
import json, os, subprocess, time

WHO = "{who}"

def handler(event, context):
    request = json.loads(event)
    action, arg = request["action"], request.get("arg")
    if action == "who":
        return {{"who": WHO, "instance": os.environ["FC_INSTANCE_ID"], "pid": os.getpid(), "uid": os.getuid(),
                 "env": dict(os.environ), "tmp": sorted(os.listdir("/tmp"))}}
    if action == "write_tmp":
        with open("/tmp/" + arg, "w") as f:
            f.write("x")
        return sorted(os.listdir("/tmp"))
    if action == "span":  # when it ran (a workload of one second)
        started = time.time()
        time.sleep(1.0)
        return [started, time.time()]
    if action == "allocate":
        try:
            return len(bytearray(arg << 20))
        except MemoryError as exc:
            return ["MemoryError"]
    if action == "escape":
        subprocess.Popen(["setsid", "sleep", arg], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
        return ["started"]
    raise ValueError(action)
'''


def code(root: Path, who: str) -> Path:
    directory = root / who
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    (directory / "index.py").write_text(textwrap.dedent(HANDLER.format(who=who)))
    return directory


def spec(root: Path, who: str = "a", **overrides: Any) -> FunctionSpec:
    fields: dict[str, Any] = {
        "name": "fn", "runtime": "python3.10", "handler": "index.handler", "timeout_s": 20.0,
        "code_dir": code(root, who), "code_checksum": who, "memory_mb": 128, "internet_access": False,
    }
    return FunctionSpec(**{**fields, **overrides})


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[InstancePool]:
    pool = InstancePool(work_dir=tmp_path / "work", max_instances_per_function=3)
    pool.sandbox.check()
    yield pool
    await pool.close()


async def call(instance: Instance, action: str, arg: Any = None) -> Any:
    result = await instance.invoke(json.dumps({"action": action, "arg": arg}).encode(), CTX)
    assert result.ok, result.error_message + instance.output_tail()
    return json.loads(result.payload)


def parent(instance: Instance) -> int:
    assert instance.pid is not None
    return psutil.Process(instance.pid).ppid()


async def test_forked_instances_serve_and_run_concurrently(pool: InstancePool, tmp_path: Path) -> None:
    fn = spec(tmp_path)
    async with pool.lease(fn) as first, pool.lease(fn) as second:
        assert pool.templates.pids() and parent(first) == parent(second) == pool.templates.pids()[0]
        who = [await call(first, "who"), await call(second, "who")]
        assert {w["instance"] for w in who} == {first.instance_id, second.instance_id}
        assert [w["pid"] for w in who] == [1, 1]  # each is PID 1 of a namespace of its own
        spans = await asyncio.gather(call(first, "span"), call(second, "span"))
    assert max(start for start, _ in spans) < min(end for _, end in spans), spans


async def test_an_instance_has_a_private_tmp_and_none_of_the_executors_environment(
    pool: InstancePool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("NATS_URL", "TASKMODE_ACCESS_KEYS", "MONGODB_URL"):
        monkeypatch.setenv(name, "secret")
    fn = spec(tmp_path)
    async with pool.lease(fn) as first, pool.lease(fn) as second:
        assert await call(first, "write_tmp", "mine") == ["mine"]
        seen = await call(second, "who")
        assert second.pid is not None
        # What the processes were started with (the template's, inherited by its forks), as /proc shows it.
        started_with = [set(psutil.Process(pid).environ()) for pid in (second.pid, *pool.templates.pids())]
    assert seen["tmp"] == []
    for keys in (set(seen["env"]), *started_with):
        assert not {k for k in keys if k.startswith(("NATS", "TASKMODE", "MONGO"))}, keys
    assert seen["env"]["FC_INSTANCE_ID"] == seen["instance"]


async def test_a_killed_instance_takes_its_setsid_child_along(pool: InstancePool, tmp_path: Path) -> None:
    marker = f"{1000 + uuid.uuid4().int % 9000}.{uuid.uuid4().int % 1000}"

    def survivors() -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["cmdline"]) if marker in (p.info["cmdline"] or [])]

    fn = spec(tmp_path)
    async with pool.lease(fn) as keeper, pool.lease(fn) as doomed:
        assert await call(doomed, "escape", marker) == ["started"]
        await wait_until(lambda: bool(survivors()), timeout_s=10)
        await doomed.kill()
        await wait_until(lambda: not survivors(), timeout_s=10)
        assert (await call(keeper, "who"))["who"] == "a"  # its sibling and their template go on


async def test_a_killed_template_is_replaced(pool: InstancePool, tmp_path: Path) -> None:
    fn = spec(tmp_path)
    async with pool.lease(fn) as instance:
        await call(instance, "who")
        (template,) = pool.templates.pids()
        os.kill(template, signal.SIGKILL)
        await wait_until(lambda: gone(template), timeout_s=10)
        result = await instance.invoke(json.dumps({"action": "who"}).encode(), CTX)
        assert not result.ok  # its instances went with it
    async with pool.lease(fn) as fresh:
        assert (await call(fresh, "who"))["who"] == "a"
        assert parent(fresh) != template and pool.templates.pids() == [parent(fresh)]


async def test_the_memory_limit_holds_for_forked_instances(pool: InstancePool, tmp_path: Path) -> None:
    fn = spec(tmp_path, memory_mb=128)
    async with pool.lease(fn) as first, pool.lease(fn) as second:
        for instance in (first, second):
            assert await call(instance, "allocate", 32) == 32 << 20
            assert await call(instance, "allocate", 1024) == ["MemoryError"]


async def test_another_function_or_version_never_shares_a_template(pool: InstancePool, tmp_path: Path) -> None:
    async with pool.lease(spec(tmp_path, "a")) as a:
        assert (await call(a, "who"))["who"] == "a"
        a_template = parent(a)
        async with pool.lease(spec(tmp_path, "a", name="other")) as other:
            assert (await call(other, "who"))["who"] == "a"
            assert parent(other) != a_template
    async with pool.lease(spec(tmp_path, "b")) as b:  # new code of the same function
        assert (await call(b, "who"))["who"] == "b"
        assert parent(b) != a_template
    await wait_until(lambda: gone(a_template), timeout_s=10)  # the old version's template is retired


async def test_templates_go_when_idle_and_on_close(tmp_path: Path) -> None:
    pool = InstancePool(work_dir=tmp_path / "work", idle_timeout_s=0.5)
    try:
        async with pool.lease(spec(tmp_path)) as instance:
            await call(instance, "who")
            (template,) = pool.templates.pids()
        await wait_until(lambda: gone(template), timeout_s=10)  # the instance, then its template
        async with pool.lease(spec(tmp_path)) as instance:
            await call(instance, "who")
            (template,) = pool.templates.pids()
    finally:
        await pool.close()
    assert gone(template)


async def test_unsandboxed_instances_fork_from_a_plain_template(tmp_path: Path) -> None:
    work = tmp_path / "work"
    pool = InstancePool(work_dir=work, sandbox=new_sandbox(SandboxSettings(enabled=False), work_dir=work))
    try:
        fn = spec(tmp_path)
        async with pool.lease(fn) as first, pool.lease(fn) as second:
            assert parent(first) == parent(second) == pool.templates.pids()[0]
            seen = [await call(first, "who"), await call(second, "who")]
        assert {s["instance"] for s in seen} == {first.instance_id, second.instance_id}
        assert len({s["env"]["TMPDIR"] for s in seen}) == 2  # a directory of its own each
    finally:
        await pool.close()
