"""A hostile handler against the sandbox: each attack from the hardening issue fails.

Instances run as the executor starts them (`InstancePool` with the default, enabled sandbox); the
handler reports what it could do and the test checks, from outside too where it can, that the
attack went nowhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from services.executor.instance import FunctionSpec, InvokeContext
from services.executor.pool import InstancePool
from services.executor.sandbox import Confinement
from tests.test_instances import wait_until

pytestmark = pytest.mark.timeout(60)

CTX = InvokeContext(request_id="req-1", task_id="task-1")

HOSTILE = '''
import json, os, socket, subprocess, sys, time

def attempt(action):
    try:
        return {"ok": True, "value": action()}
    except BaseException as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

def read(path):
    with open(path, "rb") as f:
        return f.read(200).decode(errors="replace")

def write(path):
    with open(path, "w") as f:
        f.write("print('pwned')")
    return "written"

def connect(host, port):
    socket.create_connection((host, port), timeout=2).close()
    return "connected"

def spawn_many(n):
    children = [subprocess.Popen(["sleep", "30"]) for _ in range(n)]
    return len(children)

def fill_tmp(mb):
    with open("/tmp/fill", "wb") as f:
        for _ in range(mb):
            f.write(b"\\0" * (1 << 20))
    return mb

def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\\0", b" ").decode(errors="replace").strip()
    except OSError as exc:
        return f"unreadable: {exc}"

def handler(event, context):
    request = json.loads(event)
    attack, arg = request["attack"], request.get("arg")
    if attack == "whoami":
        return {"uid": os.getuid(), "gid": os.getgid(), "pids": [p for p in os.listdir("/proc") if p.isdigit()],
                "cmdlines": [cmdline(p) for p in os.listdir("/proc") if p.isdigit()],
                "env": dict(os.environ), "root": sorted(os.listdir("/"))}
    if attack == "read":
        return attempt(lambda: read(arg))
    if attack == "write":
        return attempt(lambda: write(arg))
    if attack == "listdir":
        return attempt(lambda: os.listdir(arg))
    if attack == "connect":
        return attempt(lambda: connect(*arg))
    if attack == "allocate":
        return attempt(lambda: len(bytearray(arg << 20)))
    if attack == "fork":
        return attempt(lambda: spawn_many(arg))
    if attack == "open_many":
        return attempt(lambda: len([open("/dev/null") for _ in range(arg)]))
    if attack == "fill_tmp":
        return attempt(lambda: fill_tmp(arg))
    if attack == "interfaces":
        return sorted(name for _, name in socket.if_nameindex())
    if attack == "escape":  # a child in a session of its own, meant to outlive the instance
        subprocess.Popen(["setsid", "sleep", arg], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(0.2)
        return "started"
    raise ValueError(attack)
'''


@pytest.fixture
def code_root(tmp_path: Path) -> Path:
    root = tmp_path / "code"
    root.mkdir(mode=0o755)
    for name in ("victim", "attacker"):
        directory = root / name
        directory.mkdir(mode=0o755)
        (directory / "index.py").write_text(textwrap.dedent(HOSTILE if name == "attacker" else "def handler(e, c):\n    return 'victim'\n"))
    return root


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[InstancePool]:
    pool = InstancePool(work_dir=tmp_path / "work", max_instances_per_function=2)
    pool.sandbox.check()
    yield pool
    await pool.close()


def spec(code_root: Path, **overrides: Any) -> FunctionSpec:
    fields: dict[str, Any] = {
        "name": "attacker", "runtime": "python3.10", "handler": "index.handler", "timeout_s": 20.0,
        "code_dir": code_root / "attacker", "code_checksum": "a1", "memory_mb": 128, "disk_mb": 512,
        "internet_access": False,
    }
    return FunctionSpec(**{**fields, **overrides})


async def attack(pool: InstancePool, spec_: FunctionSpec, name: str, arg: Any = None) -> Any:
    async with pool.lease(spec_) as instance:
        result = await instance.invoke(json.dumps({"attack": name, "arg": arg}).encode(), CTX)
    assert result.ok, result.error_message + instance.output_tail()
    return json.loads(result.payload)


async def test_a_different_uid_no_services_processes_and_no_executor_environment(
    pool: InstancePool, code_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NATS_URL", "nats://127.0.0.1:4222")
    monkeypatch.setenv("TASKMODE_ACCESS_KEYS", "id:secret")
    monkeypatch.setenv("SOME_SECRET", "s3cret")
    seen = await attack(pool, spec(code_root), "whoami")
    assert seen["uid"] != os.getuid() and seen["uid"] != 0
    # Its own PID namespace: the sandbox's init and the worker, nothing of the host. Forked from its
    # function's template (template.py), it also sees the template and the spare the template
    # forked ahead (and, while that spare is being made, the child that sets up its namespaces):
    # processes of this function only, never the services' or another function's.
    assert len(seen["pids"]) <= 5, seen["cmdlines"]
    assert all(line.split()[0] in (shutil.which("bwrap"), sys.executable) for line in seen["cmdlines"]), seen
    assert not {"NATS_URL", "TASKMODE_ACCESS_KEYS", "SOME_SECRET"} & set(seen["env"])
    own = await attack(pool, spec(code_root), "read", f"/proc/{os.getpid()}/environ")
    assert not own["ok"]


async def test_the_data_directory_and_other_code_are_invisible(pool: InstancePool, code_root: Path,
                                                               tmp_path: Path) -> None:
    secret = tmp_path / "work" / "dev-access-key"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text("id:secret\n")
    secret.chmod(0o644)  # even readable by anyone, it is not there to read
    attacker = spec(code_root)
    for path in (str(secret), str(code_root / "victim" / "index.py"), "/etc/shadow"):
        outcome = await attack(pool, attacker, "read", path)
        assert not outcome["ok"], (path, outcome)
    assert not (await attack(pool, attacker, "listdir", str(tmp_path)))["ok"]
    # Its own code is read-only, and the victim's cannot be reached to be rewritten.
    for path in ("/code/index.py", str(code_root / "victim" / "index.py")):
        outcome = await attack(pool, attacker, "write", path)
        assert not outcome["ok"], (path, outcome)
    assert (code_root / "victim" / "index.py").read_text().endswith("'victim'\n")


async def test_memory_is_limited_to_memory_size(pool: InstancePool, code_root: Path) -> None:
    small = spec(code_root, memory_mb=128)
    assert (await attack(pool, small, "allocate", 32))["ok"]
    outcome = await attack(pool, small, "allocate", 2048)
    assert not outcome["ok"] and "MemoryError" in outcome["error"]


async def test_process_count_and_tmp_size_are_capped(pool: InstancePool, code_root: Path) -> None:
    limited = spec(code_root, disk_mb=8)
    forked = await attack(pool, limited, "fork", 200)
    assert not forked["ok"], forked
    filled = await attack(pool, limited, "fill_tmp", 64)
    assert not filled["ok"] and "No space left" in filled["error"]


async def test_no_network_without_internet_access(pool: InstancePool, code_root: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        offline = spec(code_root, internet_access=False)
        assert await attack(pool, offline, "interfaces") == ["lo"]
        outcome = await attack(pool, offline, "connect", ["127.0.0.1", port])
        assert not outcome["ok"]


async def test_internet_access_does_not_reach_the_hosts_loopback(pool: InstancePool, code_root: Path) -> None:
    """Where NATS and MongoDB listen under `make run`: out of reach even with internet access."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        online = spec(code_root, internet_access=True, code_checksum="a2")
        assert "tap0" in await attack(pool, online, "interfaces")
        for host in ("127.0.0.1", "10.0.2.2"):  # 10.0.2.2: slirp4netns's alias of the host
            outcome = await attack(pool, online, "connect", [host, port])
            assert not outcome["ok"], (host, outcome)


async def test_nothing_it_starts_outlives_it(pool: InstancePool, code_root: Path) -> None:
    marker = f"{1000 + uuid.uuid4().int % 9000}.{uuid.uuid4().int % 1000}"  # a unique sleep length

    def survivors() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            if marker in (proc.info["cmdline"] or []):
                found.append(proc)
        return found

    async with pool.lease(spec(code_root)) as instance:
        result = await instance.invoke(json.dumps({"attack": "escape", "arg": marker}).encode(), CTX)
        assert result.ok, result.error_message
        assert survivors(), "the escaping child should be running while its instance is"
        await instance.kill()
    await wait_until(lambda: not survivors(), timeout_s=10)


async def test_an_interpreter_installed_under_tmp_still_runs_inside(pool: InstancePool, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # A checkout cloned under /tmp has its venv there; the sandbox's private /tmp must not hide it.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    monkeypatch.setattr(sys, "prefix", str(venv))
    code = tmp_path / "code"
    code.mkdir()
    instance_dir = tmp_path / "instance"
    instance_dir.mkdir()
    launch = pool.sandbox.launch([str(venv / "bin" / "python"), "-c", "import sys; print(sys.prefix)"],
                                 env={"PATH": "/usr/bin:/bin"}, code_dir=code, instance_dir=instance_dir,
                                 confinement=Confinement(memory_mb=256, tmp_mb=16, internet=False))
    try:
        process = await asyncio.create_subprocess_exec(*launch.argv, env=launch.env, cwd=launch.cwd,
                                                       pass_fds=launch.pass_fds, stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.STDOUT)
        await launch.started(process.pid)
        output, _ = await asyncio.wait_for(process.communicate(), 30)
    finally:
        await launch.close()
    assert process.returncode == 0, output.decode(errors="replace")
    assert output.decode().strip() == str(venv)


async def test_open_files_are_capped(pool: InstancePool, code_root: Path) -> None:
    limit = pool.sandbox.settings.max_open_files
    outcome = await attack(pool, spec(code_root), "open_many", limit + 10)
    assert not outcome["ok"] and "Too many open files" in outcome["error"], outcome


NODE_PROBE = """
const fs = require("fs");
exports.handler = async (event) => {
  const { secret } = JSON.parse(event.toString());
  let read;
  try { read = fs.readFileSync(secret, "utf8"); } catch (err) { read = null; }
  const pids = fs.readdirSync("/proc").filter((name) => /^[0-9]+$/.test(name));
  let wrote = true;
  try { fs.writeFileSync("/code/index.js", "pwned"); } catch (err) { wrote = false; }
  return { uid: process.getuid(), pids, read, wrote, env: Object.keys(process.env) };
};
"""

CUSTOM_PROBE = """
import json, os
from http.server import BaseHTTPRequestHandler, HTTPServer

def probe(secret):
    try:
        read = open(secret).read()
    except OSError:
        read = None
    try:
        open("/code/server.py", "a").close()
        wrote = True
    except OSError:
        wrote = False
    return {"uid": os.getuid(), "pids": [p for p in os.listdir("/proc") if p.isdigit()], "read": read,
            "wrote": wrote, "env": sorted(os.environ)}

class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
        body = json.dumps(probe(request["secret"])).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", int(os.environ["FC_SERVER_PORT"])), Handler).serve_forever()
"""


@pytest.mark.parametrize("runtime", ["nodejs20", "custom.debian10"])
async def test_node_and_custom_instances_are_sandboxed_too(pool: InstancePool, tmp_path: Path, runtime: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOME_SECRET", "s3cret")
    secret = tmp_path / "work" / "dev-access-key"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text("id:secret\n")
    secret.chmod(0o644)  # even readable by anyone, it is not there to read
    code = tmp_path / runtime
    code.mkdir(mode=0o755)
    if runtime == "nodejs20":
        (code / "index.js").write_text(NODE_PROBE)
        probe = FunctionSpec(name="node_probe", runtime=runtime, handler="index.handler", timeout_s=20.0,
                             code_dir=code, code_checksum="n1", memory_mb=128, internet_access=False)
    else:
        (code / "server.py").write_text(CUSTOM_PROBE)
        probe = FunctionSpec(name="custom_probe", runtime=runtime, handler="index.handler", timeout_s=20.0,
                             code_dir=code, code_checksum="c1", memory_mb=128, internet_access=False,
                             custom_command=[sys.executable, "server.py"])
    async with pool.lease(probe) as instance:
        result = await instance.invoke(json.dumps({"secret": str(secret)}).encode(), CTX)
    assert result.ok, result.error_message + instance.output_tail()
    seen = json.loads(result.payload)
    assert seen["uid"] not in (0, os.getuid()), seen
    assert len(seen["pids"]) <= 3, seen  # the sandbox's init and the runtime: none of the host's
    assert seen["read"] is None and seen["wrote"] is False, seen
    assert "SOME_SECRET" not in seen["env"], seen
