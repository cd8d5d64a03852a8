"""`make run`'s launcher as a user runs it: start, use, SIGTERM, start again with the same data."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from shared.devstack import free_port
from tests.fc_client import FcClient
from tests.test_lifecycle import make_function

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parent.parent


def start_launcher(data_dir: Path, ports: dict[str, int]) -> tuple[subprocess.Popen[str], dict[str, str]]:
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
    }
    for name in ("TASKMODE_ACCESS_KEYS", "NATS_URL", "MONGODB_URL", "TASKMODE_AUTH_DISABLED", "TASKMODE_DELIVERY_SECRET"):
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, str(ROOT / "deploy" / "run.py")], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    printed: dict[str, str] = {}
    end = time.monotonic() + 60
    assert proc.stdout is not None
    for line in proc.stdout:
        if match := re.match(r"\s+access key id\s+(\S+)", line):
            printed["key_id"] = match.group(1)
        if match := re.match(r"\s+access secret\s+(\S+)", line):
            printed["secret"] = match.group(1)
        if "Ctrl-C stops everything" in line:
            return proc, printed
        assert time.monotonic() < end, "launcher did not come up"
    raise AssertionError(f"launcher exited with {proc.wait()}")


def stop_launcher(proc: subprocess.Popen[str]) -> list[int]:
    children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=60) == 0
    finally:
        assert proc.stdout is not None
        proc.stdout.close()
    return children


async def test_launcher_runs_everything_stops_cleanly_and_keeps_data(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("gateway", "nats", "mongo", "scheduler", "executor", "projection",
                                            "triggers", "deliverer")}
    proc, printed = start_launcher(tmp_path, ports)
    try:
        fc = FcClient(f"http://127.0.0.1:{ports['gateway']}", access_key_id=printed["key_id"],
                      access_key_secret=printed["secret"])
        await make_function(fc, "kept")
        await fc.invoke_async("kept", b"persist me", task_id="kept_task")
        await fc.wait_for("kept", "kept_task", {"Succeeded"})
        await fc.close()
        environments = [child.environ() for child in psutil.Process(proc.pid).children(recursive=True)]
        assert not [env for env in environments if "TASKMODE_ACCESS_KEYS" in env or "NATS_PASSWORD" in env]
        assert sum("TASKMODE_ACCESS_KEYS_FILE" in env for env in environments) == 1  # the gateway's
    finally:
        children = stop_launcher(proc)
    assert len(children) >= 8  # nats, mongo-wire and six services (plus instances)
    assert not [pid for pid in children if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE], "a child outlived the launcher"

    proc, again = start_launcher(tmp_path, ports)
    try:
        assert again == printed  # the generated development key is kept with the data
        fc = FcClient(f"http://127.0.0.1:{ports['gateway']}", access_key_id=again["key_id"],
                      access_key_secret=again["secret"])
        task = (await fc.get_task("kept", "kept_task")).json()
        assert task["status"] == "Succeeded" and task["taskPayload"] == "persist me"
        duplicate = await fc.invoke_async("kept", b"", task_id="kept_task")
        assert duplicate.status_code == 409
        await fc.invoke_async("kept", b"after restart", task_id="second")
        assert (await fc.wait_for("kept", "second", {"Succeeded"}))["returnPayload"] == "after restart"
        await fc.close()
    finally:
        stop_launcher(proc)


def test_only_the_gateway_gets_the_access_keys_and_no_service_a_password_in_its_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.devstack import SERVICES, Stack, child_environment

    monkeypatch.setenv("TASKMODE_ACCESS_KEYS", "leaked:secret")
    monkeypatch.setenv("NATS_PASSWORD", "leaked")
    stack = Stack(data_dir=tmp_path, access_keys="id:secret", gateway_port=9999, nats_url="nats://127.0.0.1:1",
                  mongodb_url="mongodb://127.0.0.1:1", nats_passwords={"gateway": "g", "executor": "e"})
    assert len(SERVICES) == 6
    for service in SERVICES:  # all six children, triggers and deliverer included
        env = child_environment(stack.env_for(service))
        assert "TASKMODE_ACCESS_KEYS" not in env and "NATS_PASSWORD" not in env, service
        assert ("TASKMODE_ACCESS_KEYS_FILE" in env) == (service == "gateway"), service
    keys_file = Path(child_environment(stack.env_for("gateway"))["TASKMODE_ACCESS_KEYS_FILE"])
    assert keys_file.read_text().strip() == "id:secret"
    assert keys_file.stat().st_mode & 0o777 == 0o600
    assert child_environment(stack.env_for("executor"))["NATS_USER"] == "executor"
    # The role passwords make run generates (start_infra): files only the services' user reads.
    from shared import natsauth

    natsauth.load_or_create_passwords(tmp_path / "generated")
    for role in natsauth.ROLES:
        assert natsauth.password_file(tmp_path / "generated", role).stat().st_mode & 0o777 == 0o600, role


def test_log_rotation_keeps_a_writer_appending(tmp_path: Path) -> None:
    from shared.logrotate import rotate_all

    log = tmp_path / "service.log"
    with open(log, "ab", buffering=0) as writer:  # as devstack opens a child's log
        for round_ in range(4):
            writer.write(b"x" * 1500)
            assert rotate_all([log], max_bytes=1000, keep=2) == [log]
            assert log.stat().st_size == 0
            writer.write(b"after\n")
            assert log.read_bytes() == b"after\n", round_
            log.write_bytes(b"")  # next round starts empty
    assert sorted(p.name for p in tmp_path.iterdir()) == ["service.log", "service.log.1", "service.log.2"]
