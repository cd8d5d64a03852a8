"""Function instances and their pool, against real worker processes (no mocks)."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from services.executor.instance import FunctionSpec, InvokeContext, descendants, process_children
from services.executor.pool import InstancePool
from shared.errors import ServiceUnavailable

pytestmark = pytest.mark.timeout(20)

CTX = InvokeContext(request_id="req-1", task_id="task-1", attempt=2)

HANDLER = '''
import json, os, signal, subprocess, sys, time

calls = 0

def handler(event, context):
    global calls
    calls += 1
    if event == b"bytes":
        return b"\\x00raw"
    if event == b"str":
        return "h\\u00e9llo"
    if event == b"dict":
        return {"a": [1, 2]}
    if event == b"none":
        return None
    if event == b"calls":
        return str(calls)
    if event == b"pid":  # the pid alone is 2 in every sandbox (a PID namespace each)
        return os.environ["FC_INSTANCE_ID"] + ":" + str(os.getpid())
    if event == b"context":
        return {
            "request_id": context.request_id,
            "task_id": context.task_id,
            "function_name": context.function_name,
            "attempt": context.attempt,
            "function": vars(context.function),
            "remaining_ms": context.get_remaining_time_in_millis(),
            "env": {k: os.environ.get(k) for k in (
                "FC_FUNCTION_NAME", "FC_FUNCTION_HANDLER", "FC_FUNCTION_MEMORY_SIZE",
                "FC_INSTANCE_ID", "GREETING")},
            "cwd": os.getcwd(),
        }
    if event == b"print":
        print("printed-to-stdout " * 8000)  # > any pipe buffer
        print("marker-from-handler")
        sys.stdout.buffer.write(b"raw bytes on stdout\\n")
        os.write(1, b"written to fd 1\\n")
        return "still fine"
    if event == b"spin":  # some CPU time (a forked instance may have used less than a clock tick)
        deadline = time.process_time() + 0.05
        while time.process_time() < deadline:
            pass
        return "spun"
    if event == b"raise":
        raise ValueError("bad input")
    if event == b"exit":
        os._exit(3)
    if event == b"sleep":
        print("sleeping now", flush=True)
        time.sleep(60)
    if event == b"stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
        print("child started", flush=True)
        while True:
            time.sleep(1)
    return event
'''

ECHO_SERVER = '''
import json, os
from http.server import BaseHTTPRequestHandler, HTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        status = 200 if self.path == "/invoke" else 404
        if body == b"headers":
            body = json.dumps({k.lower(): v for k, v in self.headers.items()
                               if k.lower().startswith("x-fc-")}).encode()
        elif body == b"fail":
            status, body = 500, b"something broke"
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", int(os.environ["FC_SERVER_PORT"])), Handler).serve_forever()
'''


def write_code(root: Path, source: str, *, module: str = "index") -> Path:
    code_dir = root / "code"
    code_dir.mkdir(exist_ok=True)
    (code_dir / f"{module}.py").write_text(textwrap.dedent(source))
    return code_dir


def python_spec(code_dir: Path, **overrides: Any) -> FunctionSpec:
    fields: dict[str, Any] = {
        "name": "fn",
        "runtime": "python3.10",
        "handler": "index.handler",
        "timeout_s": 5.0,
        "code_dir": code_dir,
        "code_checksum": "v1",
        "memory_mb": 256,
        "environment": {"GREETING": "hi"},
    }
    return FunctionSpec(**{**fields, **overrides})


async def wait_until(condition: Callable[[], bool], *, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.01)


def gone(pid: int) -> bool:
    """No such process (a zombie reparented to an init that never reaps counts as gone)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[InstancePool]:
    pool = InstancePool(work_dir=tmp_path / "work", max_instances_per_function=2)
    yield pool
    await pool.close()


@pytest.fixture
def code_dir(tmp_path: Path) -> Path:
    write_code(tmp_path, "def handler(event, context)\n    return 1\n", module="broken")
    return write_code(tmp_path, HANDLER)


async def test_return_values_become_bytes(pool: InstancePool, code_dir: Path) -> None:
    async with pool.lease(python_spec(code_dir)) as instance:
        results = {event: await instance.invoke(event, CTX) for event in (b"bytes", b"str", b"dict", b"none")}
    assert all(r.ok and r.error_type == "" and r.duration_ms > 0 for r in results.values())
    assert results[b"bytes"].payload == b"\x00raw"
    assert results[b"str"].payload == "héllo".encode()
    assert json.loads(results[b"dict"].payload) == {"a": [1, 2]}
    assert results[b"none"].payload == b""


async def test_handler_sees_context_and_environment(pool: InstancePool, code_dir: Path) -> None:
    async with pool.lease(python_spec(code_dir)) as instance:
        result = await instance.invoke(b"context", CTX)
    assert result.ok, result.error_message
    seen = json.loads(result.payload)
    assert seen["request_id"] == "req-1"
    assert seen["task_id"] == "task-1"
    assert seen["function_name"] == "fn"
    assert seen["attempt"] == 2
    assert seen["function"] == {"name": "fn", "handler": "index.handler", "memory": 256, "timeout": 5.0}
    assert 0 < seen["remaining_ms"] <= 5000
    assert seen["env"] == {
        "FC_FUNCTION_NAME": "fn",
        "FC_FUNCTION_HANDLER": "index.handler",
        "FC_FUNCTION_MEMORY_SIZE": "256",
        "FC_INSTANCE_ID": instance.instance_id,
        "GREETING": "hi",
    }
    assert seen["cwd"] == instance.paths.code_dir == "/code"  # the sandbox shows the code there


async def test_printing_does_not_corrupt_the_protocol(pool: InstancePool, code_dir: Path) -> None:
    async with pool.lease(python_spec(code_dir)) as instance:
        printed = await instance.invoke(b"print", CTX)
        after = await instance.invoke(b"str", CTX)
        await wait_until(lambda: "written to fd 1" in instance.output_tail())
    assert (printed.ok, printed.payload) == (True, b"still fine")
    assert (after.ok, after.payload) == (True, "héllo".encode())
    assert "marker-from-handler" in instance.output_tail()


async def test_each_invocation_gets_its_own_output(pool: InstancePool, code_dir: Path) -> None:
    async with pool.lease(python_spec(code_dir)) as instance:
        printed = await instance.invoke(b"print", CTX)
        quiet = await instance.invoke(b"str", InvokeContext(request_id="req-2", task_id=""))
    logs = printed.logs.decode()
    assert logs.startswith("FC Invoke Start RequestId: req-1\n") and logs.endswith("FC Invoke End RequestId: req-1\n")
    assert "marker-from-handler" in logs and "written to fd 1" in logs
    # The second invocation printed nothing: the first one's output does not spill into it.
    assert quiet.logs == b"FC Invoke Start RequestId: req-2\nFC Invoke End RequestId: req-2\n"
    assert "taskmode-invocation-end" not in instance.output_tail()


async def test_custom_runtime_output_is_captured_by_time(pool: InstancePool, echo_spec: FunctionSpec) -> None:
    async with pool.lease(echo_spec) as instance:
        result = await instance.invoke(b"hello custom", CTX)
    assert result.logs.startswith(b"FC Invoke Start RequestId: req-1\n")
    assert result.logs.endswith(b"FC Invoke End RequestId: req-1\n")


async def test_handler_exception_has_fc_error_shape(pool: InstancePool, code_dir: Path) -> None:
    async with pool.lease(python_spec(code_dir)) as instance:
        result = await instance.invoke(b"raise", CTX)
        assert instance.alive  # a handled exception does not cost the instance
        again = await instance.invoke(b"str", CTX)
    assert not result.ok and not result.timed_out and not result.killed
    assert result.error_type == "UnhandledInvocationError"
    assert result.error_message == "ValueError: bad input"
    body = json.loads(result.payload)
    assert body["errorMessage"] == "bad input"
    assert body["errorType"] == "ValueError"
    assert any("index.py" in line and "handler" in line for line in body["stackTrace"])
    # Only the user's frames, shown under /code as on FC: never the worker's or the server's paths.
    assert all(line.lstrip().startswith('File "/code/index.py"') for line in body["stackTrace"])
    assert str(code_dir) not in result.payload.decode()
    assert again.ok


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        ("missing.handler", "No module named 'missing'"),
        ("index.nothing", "has no function 'nothing'"),
        ("nodot", "invalid handler 'nodot'"),
        ("broken.handler", "SyntaxError"),
    ],
)
async def test_handler_that_cannot_load_fails_clearly(
    pool: InstancePool, code_dir: Path, handler: str, expected: str
) -> None:
    async with pool.lease(python_spec(code_dir, handler=handler)) as instance:
        result = await instance.invoke(b"str", CTX)
    assert not result.ok
    assert result.error_type == "UnhandledInvocationError"
    assert expected in result.error_message
    assert handler in result.error_message
    assert "errorType" in json.loads(result.payload)
    assert pool.instances() == []


async def test_process_dying_mid_invocation_discards_instance(pool: InstancePool, code_dir: Path) -> None:
    spec = python_spec(code_dir)
    async with pool.lease(spec) as instance:
        result = await instance.invoke(b"exit", CTX)
        first = instance.instance_id
    assert not result.ok and not result.killed and not result.timed_out
    assert result.error_type == "UnhandledInvocationError"
    assert "exited with code 3" in result.error_message
    assert pool.instances() == []
    async with pool.lease(spec) as instance:
        assert instance.instance_id != first
        assert (await instance.invoke(b"calls", CTX)).payload == b"1"


async def test_timeout_kills_the_instance(pool: InstancePool, code_dir: Path) -> None:
    spec = python_spec(code_dir, timeout_s=0.5)
    async with pool.lease(spec) as instance:
        pid = instance.pid
        assert pid is not None
        result = await instance.invoke(b"sleep", CTX)
        assert not psutil.pid_exists(pid)
    assert not result.ok and result.timed_out and not result.killed
    assert result.error_message == "Function timed out after 0.5s"
    assert result.error_type == "UnhandledInvocationError"
    assert 500 <= result.duration_ms < 2500
    assert pool.instances() == []
    async with pool.lease(spec) as fresh:
        assert fresh.instance_id != instance.instance_id
        assert (await fresh.invoke(b"str", CTX)).ok


async def test_kill_ends_a_sigterm_ignoring_tree_within_two_seconds(pool: InstancePool, code_dir: Path) -> None:
    spec = python_spec(code_dir, timeout_s=30.0)
    async with pool.lease(spec) as instance:
        pid = instance.pid
        assert pid is not None
        invocation = asyncio.create_task(instance.invoke(b"stubborn", CTX))
        await wait_until(lambda: "child started" in instance.output_tail(), timeout_s=15)
        tree = psutil.Process(pid).children(recursive=True)
        child_pid = max(p.pid for p in tree)  # the handler's own child, the newest process
        started = time.monotonic()
        await instance.kill()
        elapsed_s = time.monotonic() - started
        result = await invocation
    assert elapsed_s < 2.0
    assert not psutil.pid_exists(pid)
    await wait_until(lambda: gone(child_pid), timeout_s=2.0)
    assert not result.ok and result.killed and not result.timed_out
    assert pool.instances() == []


async def test_pool_close_kills_invocations_in_flight(tmp_path: Path, code_dir: Path) -> None:
    pool = InstancePool(work_dir=tmp_path / "work")
    async with pool.lease(python_spec(code_dir, timeout_s=30.0)) as instance:
        pid = instance.pid
        assert pid is not None
        invocation = asyncio.create_task(instance.invoke(b"sleep", CTX))
        await wait_until(lambda: "sleeping now" in instance.output_tail(), timeout_s=15)
        await pool.close()
        result = await invocation
    assert result.killed and not psutil.pid_exists(pid)
    assert pool.instances() == []
    with pytest.raises(ServiceUnavailable):
        async with pool.lease(python_spec(code_dir)):
            pass


async def test_sequential_leases_reuse_the_process(pool: InstancePool, code_dir: Path) -> None:
    spec = python_spec(code_dir)
    async with pool.lease(spec) as first:
        one = await first.invoke(b"calls", CTX)
    async with pool.lease(spec) as second:
        two = await second.invoke(b"calls", CTX)
    assert first is second and first.instance_id == second.instance_id
    assert (one.payload, two.payload) == (b"1", b"2")
    assert [i.instance_id for i in pool.instances()] == [first.instance_id]


async def test_at_most_max_instances_per_function(pool: InstancePool, code_dir: Path) -> None:
    spec = python_spec(code_dir)
    entered: list[str] = []
    two_in, go = asyncio.Event(), asyncio.Event()

    async def one() -> bytes:
        async with pool.lease(spec) as instance:
            entered.append(instance.instance_id)
            if len(entered) == 2:
                two_in.set()
            await go.wait()
            return (await instance.invoke(b"pid", CTX)).payload

    tasks = [asyncio.create_task(one()) for _ in range(3)]
    await two_in.wait()
    assert len(entered) == 2 and len(set(entered)) == 2
    assert len(pool.instances()) == 2
    assert not any(task.done() for task in tasks)
    go.set()
    pids = await asyncio.gather(*tasks)
    assert len(entered) == 3 and set(entered) == set(entered[:2])  # the third reused one
    assert len(set(pids)) == 2
    assert len(pool.instances()) == 2


async def test_new_code_checksum_starts_a_new_instance(pool: InstancePool, code_dir: Path) -> None:
    async with pool.lease(python_spec(code_dir, code_checksum="v1")) as old:
        old_pid = old.pid
        assert old_pid is not None
        assert (await old.invoke(b"calls", CTX)).payload == b"1"
    async with pool.lease(python_spec(code_dir, code_checksum="v2")) as new:
        assert new.instance_id != old.instance_id
        assert (await new.invoke(b"calls", CTX)).payload == b"1"
    assert not psutil.pid_exists(old_pid)  # the old version is not kept idle
    assert [i.instance_id for i in pool.instances()] == [new.instance_id]


async def test_idle_instances_are_reaped(tmp_path: Path, code_dir: Path) -> None:
    pool = InstancePool(work_dir=tmp_path / "work", idle_timeout_s=0.5)
    try:
        async with pool.lease(python_spec(code_dir)) as instance:
            pid = instance.pid
            assert pid is not None
            assert (await instance.invoke(b"str", CTX)).ok
        assert pool.instances() == [instance]
        await wait_until(lambda: not pool.instances())
        await wait_until(lambda: not psutil.pid_exists(pid))
    finally:
        await pool.close()


async def test_usage_reports_the_process_tree(pool: InstancePool, code_dir: Path) -> None:
    async with pool.lease(python_spec(code_dir)) as instance:
        assert (await instance.invoke(b"spin", CTX)).ok
        cpu_s, rss = instance.usage()
        # The exporter's way, one scan of the process table for all instances, sees the same tree.
        assert instance.pid is not None
        tree = process_children()
        assert sorted(descendants(instance.pid, tree)) == sorted(
            child.pid for child in psutil.Process(instance.pid).children(recursive=True))
        scanned_cpu_s, scanned_rss = instance.usage(tree)
    assert 0 < cpu_s <= scanned_cpu_s < 60
    assert 1 << 20 < rss < 1 << 31
    assert 1 << 20 < scanned_rss < 1 << 31


def web_dir(tmp_path: Path) -> Path:
    """A code directory the sandbox's uid may read (pytest's own are private to root)."""
    code = tmp_path / "web"
    code.mkdir(mode=0o755, exist_ok=True)
    return code


def custom_spec(tmp_path: Path, command: list[str], **overrides: Any) -> FunctionSpec:
    return FunctionSpec(
        name="web",
        runtime="custom.debian10",
        handler="index.handler",
        timeout_s=overrides.pop("timeout_s", 10.0),
        code_dir=web_dir(tmp_path),
        code_checksum="c1",
        custom_command=command,
        **overrides,
    )


@pytest.fixture
def echo_spec(tmp_path: Path) -> FunctionSpec:
    (web_dir(tmp_path) / "server.py").write_text(ECHO_SERVER)
    return custom_spec(tmp_path, [sys.executable, "server.py"])


async def test_custom_runtime_echoes_the_body(pool: InstancePool, echo_spec: FunctionSpec) -> None:
    async with pool.lease(echo_spec) as instance:
        echoed = await instance.invoke(b"hello custom", CTX)
        headers = await instance.invoke(b"headers", CTX)
        _, rss = instance.usage()
    assert (echoed.ok, echoed.payload) == (True, b"hello custom")
    assert headers.ok
    seen = json.loads(headers.payload)
    assert seen["x-fc-request-id"] == "req-1"
    assert seen["x-fc-async-task-id"] == "task-1"
    assert seen["x-fc-function-name"] == "web"
    assert rss > 0


async def test_custom_instances_coexist_on_their_own_ports(
    pool: InstancePool, echo_spec: FunctionSpec
) -> None:
    async with pool.lease(echo_spec) as one, pool.lease(echo_spec) as two:
        assert one.instance_id != two.instance_id
        results = await asyncio.gather(one.invoke(b"1", CTX), two.invoke(b"2", CTX))
    assert [r.payload for r in results] == [b"1", b"2"]


async def test_custom_runtime_error_status(pool: InstancePool, echo_spec: FunctionSpec) -> None:
    async with pool.lease(echo_spec) as instance:
        result = await instance.invoke(b"fail", CTX)
        assert instance.alive
    assert not result.ok and result.error_type == "UnhandledInvocationError"
    assert "500" in result.error_message and "something broke" in result.error_message


async def test_custom_command_exiting_before_listening(pool: InstancePool, tmp_path: Path) -> None:
    command = [sys.executable, "-c", "import sys; print('cannot bind, giving up'); sys.exit(7)"]
    async with pool.lease(custom_spec(tmp_path, command)) as instance:
        result = await instance.invoke(b"x", CTX)
    assert not result.ok
    assert "code 7" in result.error_message and "cannot bind, giving up" in result.error_message
    assert pool.instances() == []


async def test_custom_command_that_never_listens(tmp_path: Path) -> None:
    pool = InstancePool(work_dir=tmp_path / "work", start_timeout_s=0.5)
    command = [sys.executable, "-c", "import time; time.sleep(60)"]
    try:
        async with pool.lease(custom_spec(tmp_path, command, timeout_s=0.2)) as instance:
            pid = instance.pid
            result = await instance.invoke(b"x", CTX)
    finally:
        await pool.close()
    assert not result.ok and result.timed_out
    assert result.error_message == "Function instance did not start within 0.5s"
    assert pid is not None and not psutil.pid_exists(pid)


async def test_custom_command_not_found(pool: InstancePool, tmp_path: Path) -> None:
    async with pool.lease(custom_spec(tmp_path, ["./no-such-binary"])) as instance:
        result = await instance.invoke(b"x", CTX)
    assert not result.ok and "no-such-binary" in result.error_message


async def test_custom_runtime_timeout(pool: InstancePool, tmp_path: Path) -> None:
    slow = ECHO_SERVER.replace("def do_POST(self):", "def do_POST(self):\n        __import__('time').sleep(60)")
    (web_dir(tmp_path) / "slow.py").write_text(slow)
    async with pool.lease(custom_spec(tmp_path, [sys.executable, "slow.py"], timeout_s=1.0)) as instance:
        pid = instance.pid
        result = await instance.invoke(b"x", CTX)
    assert result.timed_out and result.error_message == "Function timed out after 1s"
    assert pid is not None and not psutil.pid_exists(pid)


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
async def test_node_instance_runs_esm_and_keeps_output_per_invocation(pool: InstancePool, tmp_path: Path) -> None:
    code_dir = tmp_path / "node"
    code_dir.mkdir()
    (code_dir / "index.mjs").write_text(textwrap.dedent('''
        export const handler = async (event, context) => {
          console.log("seen", event.toString(), context.attempt);
          if (event.toString() === "throw") throw new RangeError("too far");
          return { echo: event.toString(), task: context.taskId, left: context.getRemainingTimeInMillis() > 0 };
        };
    '''))
    spec = FunctionSpec(name="nodefn", runtime="nodejs20", handler="index.handler", timeout_s=10.0,
                        code_dir=code_dir, code_checksum="n1")
    async with pool.lease(spec) as instance:
        first = await instance.invoke(b"one", CTX)
        failed = await instance.invoke(b"throw", CTX)
    assert first.ok and json.loads(first.payload) == {"echo": "one", "task": "task-1", "left": True}
    assert "seen one 2" in first.logs.decode() and "seen throw" not in first.logs.decode()
    assert not failed.ok and failed.error_message == "RangeError: too far"
    body = json.loads(failed.payload)
    assert body["errorType"] == "RangeError" and all("/code/index.mjs" in line for line in body["stackTrace"])
    assert "RangeError: too far" in failed.logs.decode()


NAPPER = "import time\n\ndef handler(event, context):\n    time.sleep(float(event))\n    return 'ok'\n"


async def test_min_instances_are_started_and_kept_and_the_rest_scale_down(tmp_path: Path) -> None:
    events: list[tuple[str, str]] = []
    pool = InstancePool(work_dir=tmp_path / "work", idle_timeout_s=0.3, max_instances_per_function=4,
                        limits=lambda function: 3, minimum=lambda function: 1,
                        observer=lambda function, direction, _cold_s: events.append((function, direction)))
    spec = python_spec(write_code(tmp_path, NAPPER))
    try:
        assert await pool.keep_warm(spec, 1) == 1
        assert await pool.keep_warm(spec, 1) == 0  # already there
        assert len(pool.instances()) == 1 and events == [(spec.name, "up")]
        running = 0
        most = 0

        async def one() -> None:
            nonlocal running, most
            async with pool.lease(spec) as instance:
                running += 1
                most = max(most, running)
                assert (await instance.invoke(b"0.3", CTX)).ok
                running -= 1

        await asyncio.gather(*(one() for _ in range(5)))  # demand beyond the limit of 3
        assert most == 3 and pool.max_instances(spec.name) == 3
        assert [d for _, d in events].count("up") == 3  # the warm one and two more on demand
        # Idle ones are reaped down to the minimum, and no further.
        await wait_until(lambda: [d for _, d in events].count("down") == 2)
        await asyncio.sleep(0.5)  # two more reap rounds: the minimum stays (not a synchronization)
        assert len(pool.instances()) == 1 and [d for _, d in events].count("down") == 2
    finally:
        await pool.close()


# --- instanceConcurrency: several invocations at once in one instance -------------------------

GATED = '''
import asyncio, json, logging, os, pathlib, sys, threading, time

lock = threading.Lock()
running = 0
peak = 0


def _wait_for(flag, deadline_s=15.0):
    deadline = time.monotonic() + deadline_s
    while not pathlib.Path(flag).exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the gate never opened")
        time.sleep(0.005)


def _enter():
    global running, peak
    with lock:
        running += 1
        peak = max(peak, running)


def _leave():
    global running
    with lock:
        running -= 1


def handler(event, context):
    """b"<gate file>|<word>": print, wait for the gate file (in the code directory), print again, answer."""
    flag, _, word = event.decode().partition("|")
    _enter()
    try:
        print("start", word)
        if not word.startswith("q"):  # q...: quiet, so many start lines fit the output tail
            logging.info("logged %s", word)
        if flag:
            _wait_for(flag)
        if word == "raise":
            raise ValueError(word)
        if word == "hang":
            time.sleep(60)
        sys.stdout.write("end " + word)  # no newline: still its own line in its own log
        return json.dumps({"word": word, "instance": os.environ["FC_INSTANCE_ID"], "pid": os.getpid(),
                           "request": context.request_id, "peak": peak})
    finally:
        _leave()


async def ahandler(event, context):
    flag, _, word = event.decode().partition("|")
    _enter()
    try:
        print("async start", word)
        deadline = time.monotonic() + 15
        while flag and not pathlib.Path(flag).exists():
            assert time.monotonic() < deadline, "the gate never opened"
            await asyncio.sleep(0.005)
        return json.dumps({"word": word, "instance": os.environ["FC_INSTANCE_ID"], "peak": peak})
    finally:
        _leave()
'''


def started(pool: InstancePool, words: str | list[str]) -> Callable[[], bool]:
    """Every one of `words` has begun in the worker (printed its start line): they all run."""
    def begun() -> bool:
        tails = "".join(instance.output_tail() for instance in pool.instances())
        return all(f"start {word}\n" in tails for word in words)

    return begun


def ctx(word: str) -> InvokeContext:
    return InvokeContext(request_id=f"req-{word}", task_id=f"task-{word}")


async def _invoke_all(pool: InstancePool, spec: FunctionSpec, events: list[bytes]) -> list[Any]:
    async def one(event: bytes) -> Any:
        async with pool.lease(spec) as instance:
            return instance, await instance.invoke(event, ctx(event.decode().rpartition("|")[2]))

    return [asyncio.ensure_future(one(event)) for event in events]


@pytest.fixture
async def one_instance(tmp_path: Path) -> AsyncIterator[InstancePool]:
    pool = InstancePool(work_dir=tmp_path / "work", max_instances_per_function=1)
    yield pool
    await pool.close()


async def test_concurrent_invocations_share_one_instance_and_the_next_waits(
    one_instance: InstancePool, tmp_path: Path
) -> None:
    pool = one_instance
    spec = python_spec(write_code(tmp_path, GATED), instance_concurrency=3)
    gate = tmp_path / "code" / "gate"  # seen by the handler (its cwd) as "gate"
    calls = await _invoke_all(pool, spec, [f"gate|{word}".encode() for word in ("a", "b", "c")])
    # All three are inside the one instance at once, held at the gate.
    await wait_until(lambda: [i.requests_in_flight for i in pool.instances()] == [3], timeout_s=15)
    await wait_until(started(pool, "abc"), timeout_s=15)
    fourth = (await _invoke_all(pool, spec, [b"|d"]))[0]
    await asyncio.sleep(0.2)  # the fourth had time to start; it must still wait (not a synchronization)
    assert not fourth.done() and [i.requests_in_flight for i in pool.instances()] == [3]
    gate.touch()
    results = [await call for call in [*calls, fourth]]
    instances = {instance.instance_id for instance, _ in results}
    assert len(instances) == 1 and len(pool.instances()) == 1
    answers = {json.loads(result.payload)["word"]: json.loads(result.payload) for _, result in results}
    assert all(result.ok for _, result in results), [result for _, result in results]
    assert {a["peak"] for w, a in answers.items() if w != "d"} == {3}
    assert len({a["pid"] for a in answers.values()}) == 1
    assert all(answers[word]["request"] == f"req-{word}" for word in answers)
    # Each log holds its own invocation's lines only, logging stamped with its own request id.
    for _, result in results:
        word = json.loads(result.payload)["word"]
        logs = result.logs.decode()
        lines = logs.splitlines()
        assert lines[0] == f"FC Invoke Start RequestId: req-{word}" and lines[-1] == f"FC Invoke End RequestId: req-{word}"
        assert f"start {word}" in lines and f"end {word}" in lines
        assert any(line.endswith(f"req-{word} [INFO] logged {word}") for line in lines)
        others = {"a", "b", "c", "d"} - {word}
        assert not any(f" {other}" in line for line in lines[1:-1] for other in others), logs
        assert "\x1e" not in logs


async def test_instance_concurrency_one_never_overlaps(one_instance: InstancePool, tmp_path: Path) -> None:
    spec = python_spec(write_code(tmp_path, GATED))
    calls = await _invoke_all(one_instance, spec, [f"|{word}".encode() for word in "abcd"])
    results = [await call for call in calls]
    assert all(result.ok for _, result in results)
    assert {json.loads(result.payload)["peak"] for _, result in results} == {1}


async def test_async_handlers_run_concurrently_as_tasks(one_instance: InstancePool, tmp_path: Path) -> None:
    spec = python_spec(write_code(tmp_path, GATED), handler="index.ahandler", instance_concurrency=4)
    gate = tmp_path / "code" / "gate"  # seen by the handler (its cwd) as "gate"
    calls = await _invoke_all(one_instance, spec, [f"gate|{word}".encode() for word in "abcd"])
    await wait_until(lambda: [i.requests_in_flight for i in one_instance.instances()] == [4], timeout_s=15)
    await wait_until(started(one_instance, "abcd"), timeout_s=15)
    gate.touch()
    results = [await call for call in calls]
    assert all(result.ok for _, result in results)
    assert {json.loads(result.payload)["peak"] for _, result in results} == {4}
    assert all(f"async start {json.loads(r.payload)['word']}" in r.logs.decode() for _, r in results)


async def test_busy_instances_fill_up_before_another_starts(tmp_path: Path) -> None:
    pool = InstancePool(work_dir=tmp_path / "work", max_instances_per_function=3)
    spec = python_spec(write_code(tmp_path, GATED), instance_concurrency=2)
    gate = tmp_path / "code" / "gate"  # seen by the handler (its cwd) as "gate"
    try:
        calls = await _invoke_all(pool, spec, [f"gate|{word}".encode() for word in "abc"])
        await wait_until(lambda: sum(i.requests_in_flight for i in pool.instances()) == 3, timeout_s=15)
        await wait_until(started(pool, "abc"), timeout_s=15)
        assert sorted(i.requests_in_flight for i in pool.instances()) == [1, 2]
        gate.touch()
        results = [await call for call in calls]
        assert all(result.ok for _, result in results)
        # Idle again, the next callers reuse them.
        again = [await call for call in await _invoke_all(pool, spec, [b"|d"])]
        assert again[0][0] in {instance for instance, _ in results} and len(pool.instances()) == 2
    finally:
        await pool.close()


async def test_a_timeout_beside_others_retires_the_instance_without_failing_them(
    one_instance: InstancePool, tmp_path: Path
) -> None:
    spec = python_spec(write_code(tmp_path, GATED), instance_concurrency=2, timeout_s=3.0)
    gate = tmp_path / "code" / "gate"  # seen by the handler (its cwd) as "gate"
    hanging = (await _invoke_all(one_instance, spec, [b"|hang"]))[0]
    await wait_until(started(one_instance, ["hang"]), timeout_s=15)
    await asyncio.sleep(1.5)  # staggers the two deadlines (not a synchronization)
    calls = await _invoke_all(one_instance, spec, [b"gate|ok"])
    await wait_until(started(one_instance, ["ok"]), timeout_s=15)
    hung_instance, hung = await hanging
    assert hung.timed_out and hung.error_message == "Function timed out after 3s" and "start hang" in hung.logs.decode()
    # Retiring: the other goes on, nothing new joins it.
    assert hung_instance.pid is not None and not gone(hung_instance.pid) and not hung_instance.alive
    late = (await _invoke_all(one_instance, spec, [b"|late"]))[0]
    gate.touch()
    instance, ok = await calls[0]
    assert ok.ok and instance is hung_instance
    late_instance, late_result = await late
    assert late_result.ok and late_instance is not hung_instance
    await wait_until(lambda: gone(hung_instance.pid or 0), timeout_s=5)


async def test_a_kill_ends_every_invocation_on_the_instance(one_instance: InstancePool, tmp_path: Path) -> None:
    spec = python_spec(write_code(tmp_path, GATED), instance_concurrency=2, timeout_s=30.0)
    gate = tmp_path / "code" / "gate"  # seen by the handler (its cwd) as "gate"
    calls = await _invoke_all(one_instance, spec, [b"gate|x", b"gate|y"])
    await wait_until(started(one_instance, "xy"), timeout_s=15)
    instance = one_instance.instances()[0]
    await instance.kill()
    results = [result for _, result in [await call for call in calls]]
    assert all(result.killed and not result.ok for result in results)


async def test_a_handler_error_fails_only_its_own_invocation(one_instance: InstancePool, tmp_path: Path) -> None:
    spec = python_spec(write_code(tmp_path, GATED), instance_concurrency=2)
    gate = tmp_path / "code" / "gate"  # seen by the handler (its cwd) as "gate"
    calls = await _invoke_all(one_instance, spec, [b"gate|raise", b"gate|fine"])
    await wait_until(started(one_instance, ["raise", "fine"]), timeout_s=15)
    gate.touch()
    (_, failed), (_, fine) = [await call for call in calls]
    assert not failed.ok and failed.error_message == "ValueError: raise" and "ValueError: raise" in failed.logs.decode()
    assert fine.ok and "ValueError" not in fine.logs.decode()


THREADED_SERVER = '''
import os, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

barrier = threading.Barrier(3)

class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        barrier.wait(timeout=15)  # three requests in at once, or none passes
        body = str(os.getpid()).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(os.environ["FC_SERVER_PORT"])), Handler).serve_forever()
'''


async def test_custom_runtime_takes_concurrent_requests(one_instance: InstancePool, tmp_path: Path) -> None:
    (web_dir(tmp_path) / "threaded.py").write_text(THREADED_SERVER)
    spec = custom_spec(tmp_path, [sys.executable, "threaded.py"], instance_concurrency=3)
    calls = await _invoke_all(one_instance, spec, [b"a", b"b", b"c"])
    results = [await call for call in calls]
    assert all(result.ok for _, result in results), results
    assert len({result.payload for _, result in results}) == 1 and len({i for i, _ in results}) == 1


async def test_many_handler_threads_fit_a_small_memory_size(one_instance: InstancePool, tmp_path: Path) -> None:
    # 32 threads with the usual 8 MiB stacks would be 256 MiB of mappings against a 128 MB limit.
    spec = python_spec(write_code(tmp_path, GATED), instance_concurrency=32, memory_mb=128)
    gate = tmp_path / "code" / "gate"  # seen by the handler (its cwd) as "gate"
    words = [f"q{i}" for i in range(32)]
    calls = await _invoke_all(one_instance, spec, [f"gate|{word}".encode() for word in words])
    await wait_until(started(one_instance, words), timeout_s=15)
    gate.touch()
    results = [result for _, result in [await call for call in calls]]
    assert all(result.ok for result in results), [r.error_message for r in results if not r.ok]
    assert {json.loads(result.payload)["peak"] for result in results} == {32}


async def test_handler_threads_do_not_count_against_the_process_limit(
    one_instance: InstancePool, tmp_path: Path
) -> None:
    # 80 threads: more than TASKMODE_SANDBOX_MAX_PROCESSES (64), which the kernel counts them in.
    spec = python_spec(write_code(tmp_path, GATED), instance_concurrency=80, memory_mb=512, timeout_s=30.0)
    gate = tmp_path / "code" / "gate"  # seen by the handler (its cwd) as "gate"
    words = [f"q{i}" for i in range(80)]
    calls = await _invoke_all(one_instance, spec, [f"gate|{word}".encode() for word in words])
    await wait_until(started(one_instance, words), timeout_s=15)
    gate.touch()
    results = [result for _, result in [await call for call in calls]]
    assert all(result.ok for result in results), {r.error_message for r in results if not r.ok}
    assert {json.loads(result.payload)["peak"] for result in results} == {80}
