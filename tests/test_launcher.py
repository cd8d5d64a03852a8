"""`make run`'s launcher under trouble: killed servers, a killed launcher, taken ports, bad
settings, a second launcher, a closed terminal, a rebuild of the read model."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from pymongo import MongoClient

from deploy.supervise import GaveUp, Supervised, Supervisor
from shared.devstack import free_port
from tests.fc_client import FcClient
from tests.test_lifecycle import make_function
from tests.test_recovery import wait_until

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parent.parent
PORT_NAMES = ("gateway", "nats", "mongo", "scheduler", "executor", "projection", "triggers", "deliverer")


async def gateway_ready(port: int) -> bool:
    """Whether the gateway's /readyz answers 200 (connected to NATS and MongoDB)."""
    async with httpx.AsyncClient(timeout=5) as client:
        try:
            return (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
        except httpx.HTTPError:
            return False


def launcher_env(data_dir: Path, ports: dict[str, int], **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "TASKMODE_DATA_DIR": str(data_dir),
        "TASKMODE_GATEWAY_PORT": str(ports["gateway"]),
        "TASKMODE_NATS_PORT": str(ports["nats"]),
        "TASKMODE_MONGO_PORT": str(ports["mongo"]),
        "TASKMODE_SCHEDULER_METRICS_PORT": str(ports["scheduler"]),
        "TASKMODE_EXECUTOR_METRICS_PORT": str(ports["executor"]),
        "TASKMODE_PROJECTION_METRICS_PORT": str(ports["projection"]),
        "TASKMODE_TRIGGERS_METRICS_PORT": str(ports["triggers"]),
        "TASKMODE_DELIVERER_METRICS_PORT": str(ports["deliverer"]),
        **extra,
    }
    for name in ("TASKMODE_ACCESS_KEYS", "NATS_URL", "MONGODB_URL", "TASKMODE_AUTH_DISABLED"):
        if name not in extra:
            env.pop(name, None)
    return env


class Launcher:
    """deploy/run.py as a child, its output collected line by line in the background."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen([sys.executable, str(ROOT / "deploy" / "run.py")], env=env, cwd=ROOT,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, predicate: Callable[[str], bool], *, deadline_s: float = 90) -> str:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            found = next((line for line in self.lines if predicate(line)), None)
            if found is not None:
                return found
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"no such line; the launcher printed:\n{self.output}")

    def wait_until_running(self) -> None:
        self.wait_for_line(lambda line: "Ctrl-C stops everything" in line)

    def printed(self, label: str) -> str:
        line = self.wait_for_line(lambda text: text.strip().startswith(label))
        return line.strip()[len(label):].strip()

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)

    def child_running(self, fragment: str) -> psutil.Process:
        return next(child for child in self.descendants() if fragment in " ".join(child.cmdline()))

    def finish(self, timeout_s: float = 60) -> int:
        code = self.process.wait(timeout=timeout_s)
        self._reader.join(timeout=5)
        assert self.process.stdout is not None
        self.process.stdout.close()
        return code


@pytest.fixture
def ports() -> dict[str, int]:
    return {name: free_port() for name in PORT_NAMES}


@pytest.fixture
def launchers() -> Iterator[list[Launcher]]:
    started: list[Launcher] = []
    yield started
    for launcher in started:  # a failed test must not leave a stack running
        if launcher.process.poll() is None:
            launcher.process.kill()
            launcher.finish()


def assert_gone(pids: list[int], *, deadline_s: float = 15) -> None:
    end = time.monotonic() + deadline_s
    while True:
        alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > end:
            break
        time.sleep(0.2)
    assert not alive, f"processes outlived the launcher: {[psutil.Process(p).cmdline() for p in alive]}"


async def test_servers_are_supervised_and_the_stack_answers_to_sighup(
    tmp_path: Path, ports: dict[str, int], launchers: list[Launcher]
) -> None:
    # A pid file naming a live process that is no MongoDB-wire server (this test) must not
    # block the start.
    (tmp_path / "mongo").mkdir(parents=True)
    (tmp_path / "mongo" / "nx-27017.pid").write_text(str(os.getpid()))
    launcher = Launcher(launcher_env(tmp_path, ports))
    launchers.append(launcher)
    launcher.wait_until_running()
    metrics = launcher.printed("metrics")
    for service in ("scheduler", "executor", "projection"):
        assert f":{ports[service]} {service}" in metrics  # the ports in use, not the defaults
    fc = FcClient(f"http://127.0.0.1:{ports['gateway']}", access_key_id=launcher.printed("access key id"),
                  access_key_secret=launcher.printed("access secret"))

    second = subprocess.run([sys.executable, str(ROOT / "deploy" / "run.py")], env=launcher_env(tmp_path, ports),
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert second.returncode == 2
    assert "already running" in second.stdout and len(second.stdout.strip().splitlines()) == 1

    try:
        # kill -9 of each server: reported, restarted, and the system works again.
        for label, fragment in (("nx-27017", "nx-27017"), ("nats-server", "nats-server")):
            launcher.child_running(fragment).kill()
            launcher.wait_for_line(lambda line, name=label: line.startswith(f"{name} was killed by SIGKILL"))
            launcher.wait_for_line(lambda line, name=label: line == f"starting {name} again")
        # The gateway answers 503 at once until it has reconnected to the restarted nats-server.
        await wait_until(lambda: gateway_ready(ports["gateway"]), deadline_s=60, what="gateway reconnected")
        await make_function(fc, "survivor")
        await fc.invoke_async("survivor", b"after the crashes", task_id="t1")
        await fc.wait_for("survivor", "t1", {"Succeeded"}, deadline_s=60)

        # The rebuild uses this stack's ports and leaves the embedded store without a TTL index.
        rebuild = subprocess.run([sys.executable, str(ROOT / "deploy" / "rebuild_projection.py")],
                                 env=launcher_env(tmp_path, ports), cwd=ROOT, capture_output=True, text=True,
                                 timeout=60)
        assert rebuild.returncode == 0, rebuild.stdout + rebuild.stderr
        assert f"127.0.0.1:{ports['nats']}" in rebuild.stdout
        # The projection notices its lost position (exit 3, restarted at once) and replays.
        end = time.monotonic() + 30
        while not (listed := (await fc.list_tasks("survivor")).json().get("tasks")) and time.monotonic() < end:
            await asyncio.sleep(0.2)
        assert [task["taskId"] for task in listed] == ["t1"]
        with MongoClient(f"mongodb://127.0.0.1:{ports['mongo']}") as mongo:
            indexes = list(mongo["taskmode"]["async_tasks"].list_indexes())
        assert not [index for index in indexes if "expireAfterSeconds" in index]
    finally:
        await fc.close()

    children = [child.pid for child in launcher.descendants()]
    launcher.process.send_signal(signal.SIGHUP)  # the terminal closed
    assert launcher.finish() == 0
    assert "stopped" in launcher.lines
    assert_gone(children)
    assert not (tmp_path / "stack.json").exists()


def test_killing_the_launcher_kills_every_child(tmp_path: Path, ports: dict[str, int], launchers: list[Launcher]) -> None:
    launcher = Launcher(launcher_env(tmp_path, ports))
    launchers.append(launcher)
    launcher.wait_until_running()
    children = [child.pid for child in launcher.descendants()]
    assert len(children) >= 6
    launcher.process.kill()
    launcher.finish()
    assert_gone(children)
    # Nothing stale is left to block the next start either.
    again = Launcher(launcher_env(tmp_path, ports))
    launchers.append(again)
    again.wait_until_running()
    again.process.terminate()
    assert again.finish() == 0


def test_a_taken_port_is_one_line_naming_its_setting(tmp_path: Path, ports: dict[str, int]) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports["executor"]))
        squatter.listen()
        result = subprocess.run([sys.executable, str(ROOT / "deploy" / "run.py")], env=launcher_env(tmp_path, ports),
                                cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert re.search(rf"port {ports['executor']} .*in use.*TASKMODE_EXECUTOR_METRICS_PORT", lines[0])
    assert not (tmp_path / "logs").exists()  # nothing was started


def test_bad_settings_are_all_reported_before_anything_starts(tmp_path: Path, ports: dict[str, int]) -> None:
    env = launcher_env(tmp_path, ports, TASKMODE_EXECUTOR_CONCURRENCY="lots", TASKMODE_PROJECTION_BATCH="1e3")
    result = subprocess.run([sys.executable, str(ROOT / "deploy" / "run.py")], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "executor: TASKMODE_EXECUTOR_CONCURRENCY must be an integer" in result.stdout
    assert "projection: TASKMODE_PROJECTION_BATCH must be an integer" in result.stdout
    assert "taskmode is running" not in result.stdout
    assert not (tmp_path / "logs").exists()


def _child_that_exits(log: Path, code: int, message: str) -> Callable[[], subprocess.Popen[bytes]]:
    def start() -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen([sys.executable, "-c", f"import sys; print({message!r}); sys.exit({code})"],
                                    stdout=out, stderr=subprocess.STDOUT)
    return start


def _supervise_until_given_up(supervisor: Supervisor, *, deadline_s: float) -> GaveUp:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            supervisor.check()
        except GaveUp as gave_up:
            return gave_up
        time.sleep(0.05)
    raise AssertionError("the supervisor never gave up")


def test_a_child_failing_at_start_is_retried_with_back_off_then_given_up(tmp_path: Path) -> None:
    said: list[str] = []
    supervisor = Supervisor(say=said.append)
    log = tmp_path / "broken.log"
    child = Supervised("broken", start=_child_that_exits(log, 1, "cannot bind: address in use"), log_path=log)
    child.launch()
    supervisor.add(child)
    gave_up = _supervise_until_given_up(supervisor, deadline_s=30)
    # Four restarts, waiting 1, 2, 4 and 8 s, were announced before it stopped trying.
    assert [line.split("restarting in ")[1].split(" s")[0] for line in said if "restarting in" in line] == ["1", "2", "4", "8"]
    assert gave_up.lines[0].startswith("broken exited with 1 5 times in a row")
    assert gave_up.lines[-1].strip() == "cannot bind: address in use"


def test_a_configuration_error_is_given_up_on_sooner(tmp_path: Path) -> None:
    supervisor = Supervisor(say=lambda _: None)
    log = tmp_path / "misconfigured.log"
    child = Supervised("gateway", start=_child_that_exits(log, 2, "TASKMODE_ACCESS_KEYS is not set"), log_path=log)
    child.launch()
    supervisor.add(child)
    started = time.monotonic()
    gave_up = _supervise_until_given_up(supervisor, deadline_s=10)
    assert time.monotonic() - started < 5
    assert "TASKMODE_ACCESS_KEYS is not set" in gave_up.lines[-1]


def test_a_requested_restart_is_immediate_and_not_counted(tmp_path: Path) -> None:
    said: list[str] = []
    supervisor = Supervisor(say=said.append)
    log = tmp_path / "projection.log"
    child = Supervised("projection", start=_child_that_exits(log, 3, "consumer gone"), log_path=log)
    child.launch()
    supervisor.add(child)
    end = time.monotonic() + 5
    while said.count("projection asked to be restarted; restarting") < 8 and time.monotonic() < end:
        supervisor.check()  # never raises GaveUp
        time.sleep(0.02)
    assert said.count("projection asked to be restarted; restarting") >= 8
    assert child.quick_failures == 0
    assert child.process is not None
    child.process.wait()


def test_the_banner_says_loudly_that_authentication_is_off(tmp_path: Path) -> None:
    from deploy.preflight import LaunchPlan
    from deploy.run import Launcher as RunLauncher
    from shared.devstack import Stack

    plan = LaunchPlan.from_env({"TASKMODE_DATA_DIR": str(tmp_path), "TASKMODE_AUTH_DISABLED": "true",
                                "TASKMODE_EXECUTOR_METRICS_PORT": "0", "TASKMODE_GATEWAY_PORT": "9555"})
    stack = Stack(data_dir=tmp_path, access_keys="", gateway_port=9555, nats_url="nats://127.0.0.1:1",
                  mongodb_url="mongodb://127.0.0.1:2", auth_disabled=True)
    banner = RunLauncher(plan, stack, threading.Event()).banner()
    assert "AUTHENTICATION IS OFF" in banner and "access secret" not in banner
    assert "http://127.0.0.1:9555/2023-03-30/" in banner
    assert "executor off" in banner and ":9101 scheduler" in banner


def _path_without(tmp_path: Path, tool: str) -> str:
    """A PATH holding every program of /usr/bin and /bin but `tool` (as on a machine without it)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for directory in (Path("/usr/bin"), Path("/bin")):
        for program in directory.iterdir():
            if program.name != tool and not os.path.lexists(bin_dir / program.name):
                (bin_dir / program.name).symlink_to(program)
    return f"{Path(sys.executable).parent}:{bin_dir}"


def test_without_a_sandbox_make_run_says_so_loudly_and_starts_nothing(tmp_path: Path, ports: dict[str, int]) -> None:
    env = {**launcher_env(tmp_path / "data", ports), "PATH": _path_without(tmp_path, "bwrap")}
    env.pop("TASKMODE_SANDBOX", None)
    result = subprocess.run([sys.executable, str(ROOT / "deploy" / "run.py")], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "!" * 40 in result.stderr and "NO SANDBOX FOR FUNCTION INSTANCES: bwrap not found" in result.stderr
    assert "TASKMODE_SANDBOX=false" in result.stderr
    assert "taskmode is running" not in result.stdout
    assert not (tmp_path / "data" / "logs").exists()  # nothing was started


def test_running_unsandboxed_takes_an_explicit_setting_and_is_announced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from deploy import run

    monkeypatch.setenv("PATH", _path_without(tmp_path, "bwrap"))
    monkeypatch.delenv("TASKMODE_SANDBOX", raising=False)
    assert run._sandbox_ok(tmp_path) is False
    monkeypatch.setenv("TASKMODE_SANDBOX", "false")
    assert run._sandbox_ok(tmp_path) is True
    out = capsys.readouterr().out
    assert "!" * 40 in out and "FUNCTION INSTANCES RUN UNSANDBOXED" in out
