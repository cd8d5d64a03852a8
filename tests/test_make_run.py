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
