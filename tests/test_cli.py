"""The `taskmode` command, run as a real program against a running stack: output, JSON output
and exit codes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from shared.devstack import Stack, free_port
from tests.integration_fixtures import ACCESS_KEY_ID, ACCESS_KEY_SECRET, HANDLERS
from taskmode_cli.main import hoist_output_option
from taskmode_cli.resources_cmd import parse_weights
from taskmode_cli.state import UsageProblem
from taskmode_cli.tasks_cmd import delay_until, parse_time_ms

pytestmark = pytest.mark.timeout(120)

TASKMODE = str(Path(sys.executable).parent / "taskmode")
Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def taskmode(shared_stack: Stack, tmp_path: Path) -> Run:
    """Run `taskmode ARGS…` with the stack's endpoint and key in the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMODE_")}
    env.update(TASKMODE_ENDPOINT=f"http://127.0.0.1:{shared_stack.gateway_port}", TASKMODE_ACCESS_KEY_ID=ACCESS_KEY_ID,
               TASKMODE_ACCESS_KEY_SECRET=ACCESS_KEY_SECRET, TASKMODE_CONFIG=str(tmp_path / "config.toml"),
               TASKMODE_DATA_DIR=str(tmp_path / "no-data"))

    def run(*args: str, extra_env: dict[str, str] | None = None, drop: tuple[str, ...] = (),
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        full_env = {k: v for k, v in {**env, **(extra_env or {})}.items() if k not in drop}
        return subprocess.run([TASKMODE, *args], capture_output=True, text=True, env=full_env, input=stdin,
                              timeout=60, cwd=tmp_path)

    return run


@pytest.fixture
def code_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "index.py").write_text(HANDLERS)
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "junk.pyc").write_bytes(b"\0")
    return folder


def ok_json(result: subprocess.CompletedProcess[str]) -> object:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_functions_from_a_folder_and_a_zip(taskmode: Run, code_dir: Path, fn_name: str, tmp_path: Path) -> None:
    created = ok_json(taskmode("functions", "create", fn_name, "--code", str(code_dir), "--timeout", "20", "-o", "json"))
    assert isinstance(created, dict) and created["functionName"] == fn_name and created["timeout"] == 20
    listing = taskmode("functions", "list")
    assert listing.returncode == 0 and fn_name in listing.stdout and "runtime" in listing.stdout
    archive = tmp_path / "code.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("index.py", "def handler(event, context):\n    return 'v2'\n")
    updated = ok_json(taskmode("-o", "json", "functions", "update", fn_name, "--code", str(archive), "--memory", "256"))
    assert isinstance(updated, dict) and updated["memorySize"] == 256 and updated["codeChecksum"] != created["codeChecksum"]
    assert taskmode("invoke", fn_name, "-p", "x").stdout.strip() == "v2"
    config = ok_json(taskmode("config", "put", fn_name, "--max-retries", "1", "-o", "json"))
    assert isinstance(config, dict) and config["asyncTask"] is True and config["maxAsyncRetryAttempts"] == 1
    got = ok_json(taskmode("config", "get", fn_name, "--output", "json"))
    assert isinstance(got, dict) and got["maxAsyncRetryAttempts"] == 1
    deleted = taskmode("functions", "delete", fn_name, "--yes")
    assert deleted.returncode == 0
    missing = taskmode("functions", "get", fn_name)
    assert missing.returncode == 3 and "FunctionNotFound" in missing.stderr and "Traceback" not in missing.stderr


def test_invoke_sync_and_async_then_watch(taskmode: Run, code_dir: Path, fn_name: str) -> None:
    assert taskmode("functions", "create", fn_name, "--code", str(code_dir)).returncode == 0
    sync = taskmode("invoke", fn_name, "--payload", "hello")
    assert sync.returncode == 0 and sync.stdout.strip() == "hello"

    submitted = ok_json(taskmode("invoke", fn_name, "-p", "later", "--async", "--task-id", "cli-1", "--delay", "1", "-o", "json"))
    assert isinstance(submitted, dict) and submitted["taskId"] == "cli-1" and submitted["statusCode"] == 202
    began = time.monotonic()
    watched = taskmode("tasks", "watch", fn_name, "cli-1")
    assert watched.returncode == 0, watched.stderr
    lines = watched.stdout.splitlines()
    assert [line.split()[2] for line in lines[:4]] == ["Enqueued", "Processed", "Running", "Succeeded"]
    assert lines[-1].startswith("Succeeded after")
    assert time.monotonic() - began < 30

    as_json = taskmode("tasks", "watch", fn_name, "cli-1", "-o", "json")
    events = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert as_json.returncode == 0 and [e["status"] for e in events][-1] == "Succeeded"
    assert [e["eventId"] for e in events] == [1, 2, 3, 4]

    task = ok_json(taskmode("tasks", "get", fn_name, "cli-1", "-o", "json"))
    assert isinstance(task, dict) and task["status"] == "Succeeded" and task["returnPayload"] == "later"
    shown = taskmode("tasks", "get", fn_name, "cli-1")
    assert shown.returncode == 0 and "Succeeded" in shown.stdout and "transitions" in shown.stdout

    page = ok_json(taskmode("tasks", "list", fn_name, "--status", "Succeeded", "-o", "json"))
    assert isinstance(page, dict) and [t["taskId"] for t in page["tasks"]] == ["cli-1"]
    table = taskmode("tasks", "list", fn_name)
    assert table.returncode == 0 and "cli-1" in table.stdout and "instance id" in table.stdout

    duplicate = taskmode("invoke", fn_name, "--async", "--task-id", "cli-1")
    assert duplicate.returncode == 3 and "TaskAlreadyExists" in duplicate.stderr


def test_failures_stops_and_exit_codes(taskmode: Run, code_dir: Path, fn_name: str) -> None:
    assert taskmode("functions", "create", fn_name, "--code", str(code_dir), "--handler", "index.fail").returncode == 0
    assert taskmode("config", "put", fn_name, "--max-retries", "0").returncode == 0
    handler_error = taskmode("invoke", fn_name, "-p", "x")
    assert handler_error.returncode == 1 and "ValueError" in handler_error.stdout
    failed = taskmode("invoke", fn_name, "-p", "x", "--async", "--task-id", "bad-1", "--watch")
    assert failed.returncode == 1 and "Failed" in failed.stdout

    assert taskmode("functions", "update", fn_name, "--handler", "index.sleep").returncode == 0
    assert taskmode("invoke", fn_name, "-p", "60", "--async", "--task-id", "long-1").returncode == 0
    stopped = taskmode("tasks", "stop", fn_name, "long-1")
    assert stopped.returncode == 0, stopped.stderr
    watched = taskmode("tasks", "watch", fn_name, "long-1", "-o", "json")
    assert watched.returncode == 1 and json.loads(watched.stdout.splitlines()[-1])["status"] == "Stopped"
    again = taskmode("tasks", "stop", fn_name, "long-1")
    assert again.returncode == 3 and "TaskAlreadyFinished" in again.stderr

    unknown = taskmode("tasks", "watch", fn_name, "nope")
    assert unknown.returncode == 3 and "AsyncTaskNotFound" in unknown.stderr and "Traceback" not in unknown.stderr
    usage = taskmode("invoke", fn_name, "--delay", "5")
    assert usage.returncode == 2 and "--async" in usage.stderr


def test_at_becomes_a_delay_and_lands_at_that_time(taskmode: Run, code_dir: Path, fn_name: str) -> None:
    assert taskmode("functions", "create", fn_name, "--code", str(code_dir)).returncode == 0
    at = datetime.now(timezone.utc) + timedelta(seconds=3)
    submitted = taskmode("invoke", fn_name, "--async", "--task-id", "at-1", "--at", at.isoformat())
    assert submitted.returncode == 0, submitted.stderr
    task = ok_json(taskmode("tasks", "get", fn_name, "at-1", "-o", "json"))
    assert isinstance(task, dict)
    due_at_ms = json.loads(task["events"][0]["eventDetail"])["dueAtMs"]
    assert abs(due_at_ms - at.timestamp() * 1000) < 1500
    too_far = taskmode("invoke", fn_name, "--async", "--at", (at + timedelta(days=8)).isoformat())
    assert too_far.returncode == 2 and "604800" in too_far.stderr


def test_key_from_configure_flags_env_and_errors(taskmode: Run, shared_stack: Stack, tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{shared_stack.gateway_port}"
    keys = ("TASKMODE_ACCESS_KEY_ID", "TASKMODE_ACCESS_KEY_SECRET", "TASKMODE_ENDPOINT")
    no_key = taskmode("functions", "list", drop=keys)
    assert no_key.returncode == 2 and "taskmode configure" in no_key.stderr
    configured = taskmode("configure", "--set-endpoint", endpoint, "--set-access-key-id", ACCESS_KEY_ID,
                          "--set-access-key-secret", ACCESS_KEY_SECRET, drop=keys)
    assert configured.returncode == 0, configured.stderr
    config_file = tmp_path / "config.toml"
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
    assert taskmode("functions", "list", drop=keys).returncode == 0  # from the config file alone

    wrong = taskmode("--access-key-secret", "wrong", "functions", "list")
    assert wrong.returncode == 3 and "SignatureNotMatch" in wrong.stderr
    unreachable = taskmode("--endpoint", f"http://127.0.0.1:{free_port()}", "functions", "list")
    assert unreachable.returncode == 4 and "cannot reach" in unreachable.stderr

    data_dir = tmp_path / "data"  # `make run`'s development key, found like fccurl finds it
    data_dir.mkdir()
    (data_dir / "dev-access-key").write_text(f"{ACCESS_KEY_ID}:{ACCESS_KEY_SECRET}\n")
    dev = taskmode("functions", "list", drop=keys[:2], extra_env={"TASKMODE_DATA_DIR": str(data_dir),
                                                                  "TASKMODE_CONFIG": str(tmp_path / "none.toml")})
    assert dev.returncode == 0, dev.stderr


def test_triggers_create_list_get_update_delete(taskmode: Run, code_dir: Path, fn_name: str) -> None:
    assert taskmode("functions", "create", fn_name, "--code", str(code_dir)).returncode == 0
    config = json.dumps({"cronExpression": "@every 1h", "payload": "beat", "enable": False})
    created = ok_json(taskmode("triggers", "create", fn_name, "tick", "--type", "timer", "--config", config,
                               "--description", "hourly", "-o", "json"))
    assert isinstance(created, dict) and created["triggerName"] == "tick" and created["triggerType"] == "timer"
    assert json.loads(created["triggerConfig"])["cronExpression"] == "@every 1h" and created["description"] == "hourly"
    table = taskmode("triggers", "list", fn_name)
    assert table.returncode == 0 and "tick" in table.stdout and "timer" in table.stdout
    listed = ok_json(taskmode("triggers", "list", fn_name, "-o", "json"))
    assert isinstance(listed, dict) and [t["triggerName"] for t in listed["triggers"]] == ["tick"]
    shown = taskmode("triggers", "get", fn_name, "tick")
    assert shown.returncode == 0 and "cronExpression" in shown.stdout
    updated = ok_json(taskmode("triggers", "update", fn_name, "tick", "--description", "changed", "-o", "json"))
    assert isinstance(updated, dict) and updated["description"] == "changed"
    assert ok_json(taskmode("triggers", "delete", fn_name, "tick", "-y", "-o", "json")) == {"deleted": "tick"}
    gone = taskmode("triggers", "get", fn_name, "tick")
    assert gone.returncode == 3 and "NotFound" in gone.stderr and "Traceback" not in gone.stderr
    bad_type = taskmode("triggers", "create", fn_name, "x", "--type", "kafka", "--config", "{}")
    assert bad_type.returncode == 2 and "nats" in bad_type.stderr
    bad_json = taskmode("triggers", "create", fn_name, "x", "--type", "nats", "--config", "{nope")
    assert bad_json.returncode == 2 and "JSON" in bad_json.stderr


def test_versions_aliases_and_qualified_calls(taskmode: Run, code_dir: Path, fn_name: str, tmp_path: Path) -> None:
    assert taskmode("functions", "create", fn_name, "--code", str(code_dir)).returncode == 0
    first = ok_json(taskmode("versions", "publish", fn_name, "--description", "echo", "-o", "json"))
    assert isinstance(first, dict) and first["versionId"] == "1" and first["description"] == "echo"
    archive = tmp_path / "v2.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("index.py", "def handler(event, context):\n    return 'v2'\n")
    assert taskmode("functions", "update", fn_name, "--code", str(archive)).returncode == 0
    second = ok_json(taskmode("versions", "publish", fn_name, "-o", "json"))
    assert isinstance(second, dict) and second["versionId"] == "2"
    versions = ok_json(taskmode("versions", "list", fn_name, "-o", "json"))
    assert isinstance(versions, dict) and [v["versionId"] for v in versions["versions"]] == ["2", "1"]
    table = taskmode("versions", "list", fn_name)
    assert table.returncode == 0 and "echo" in table.stdout

    alias = ok_json(taskmode("aliases", "create", fn_name, "prod", "--version", "1", "--description", "stable",
                             "-o", "json"))
    assert isinstance(alias, dict) and alias["aliasName"] == "prod" and alias["versionId"] == "1"
    assert taskmode("invoke", fn_name, "-p", "hello", "--qualifier", "prod").stdout.strip() == "hello"
    assert taskmode("invoke", fn_name, "-p", "hello").stdout.strip() == "v2"  # LATEST
    canary = ok_json(taskmode("aliases", "update", fn_name, "prod", "--weight", "2=0.25", "-o", "json"))
    assert isinstance(canary, dict) and canary["additionalVersionWeight"] == {"2": 0.25}
    ended = ok_json(taskmode("aliases", "update", fn_name, "prod", "--weight", "{}", "-o", "json"))
    assert isinstance(ended, dict) and ended["additionalVersionWeight"] == {}
    aliases = ok_json(taskmode("aliases", "list", fn_name, "-o", "json"))
    assert isinstance(aliases, dict) and [a["aliasName"] for a in aliases["aliases"]] == ["prod"]
    shown = taskmode("aliases", "get", fn_name, "prod")
    assert shown.returncode == 0 and "stable" in shown.stdout

    submitted = taskmode("invoke", fn_name, "-p", "queued", "--async", "--task-id", "q-1", "-q", "prod", "--watch")
    assert submitted.returncode == 0, submitted.stderr
    task = ok_json(taskmode("tasks", "get", fn_name, "q-1", "--qualifier", "prod", "-o", "json"))
    assert isinstance(task, dict) and task["qualifier"] == "prod" and task["returnPayload"] == "queued"
    page = ok_json(taskmode("tasks", "list", fn_name, "--qualifier", "prod", "-o", "json"))
    assert isinstance(page, dict) and [t["taskId"] for t in page["tasks"]] == ["q-1"]

    unknown = taskmode("invoke", fn_name, "-p", "x", "--qualifier", "nope")
    assert unknown.returncode == 3 and "AliasNotFound" in unknown.stderr and "Traceback" not in unknown.stderr
    missing = taskmode("aliases", "get", fn_name, "nope", "-o", "json")
    assert missing.returncode == 3 and "AliasNotFound" in missing.stderr

    assert ok_json(taskmode("aliases", "delete", fn_name, "prod", "-y", "-o", "json")) == {"deleted": "prod"}
    deleted = taskmode("versions", "delete", fn_name, "1", "--yes")
    assert deleted.returncode == 0, deleted.stderr
    again = taskmode("versions", "delete", fn_name, "1", "--yes")
    assert again.returncode == 3 and "VersionNotFound" in again.stderr


def test_time_and_option_parsing() -> None:
    assert parse_time_ms("1700000000000", option="--at") == 1_700_000_000_000
    assert parse_time_ms("2023-11-14T22:13:20Z", option="--at") == 1_700_000_000_000
    assert parse_time_ms("2023-11-14T22:13:20", option="--at") == 1_700_000_000_000  # UTC when no zone
    assert delay_until(10_500, now_ms=10_000) == 1 and delay_until(5_000, now_ms=10_000) == 0
    assert hoist_output_option(["tasks", "list", "fn", "-o", "json"]) == ["-o", "json", "tasks", "list", "fn"]
    assert hoist_output_option(["--output=json", "functions", "list"]) == ["--output=json", "functions", "list"]
    assert parse_weights(["2=0.3"]) == {"2": 0.3} and parse_weights(['{"3": 0.1}']) == {"3": 0.1}
    assert parse_weights(["{}"]) == {} and parse_weights(None) is None
    for bad in ("2", "2=x", "[1]"):
        with pytest.raises(UsageProblem):
            parse_weights([bad])


def test_the_cli_is_an_api_client_only() -> None:
    """The CLI talks to the API; it shares only `shared/` (for signing) with the server side."""
    from tests.test_architecture import ROOT, imported_modules

    offenders = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in (ROOT / "taskmode_cli").rglob("*.py")
        for module in imported_modules(path)
        if module.split(".")[0] == "services"
    ]
    assert offenders == []
