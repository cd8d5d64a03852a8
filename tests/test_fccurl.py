"""deploy/fccurl.py: signed requests from the command line, and the curl commands it prints."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest

from shared.acs3 import verify_request
from shared.devstack import Stack
from shared.errors import SignatureNotMatch
from tests.fc_client import zip_code
from tests.integration_fixtures import ACCESS_KEY_ID, ACCESS_KEY_SECRET, HANDLERS

pytestmark = pytest.mark.timeout(90)

FCCURL = Path(__file__).resolve().parent.parent / "deploy" / "fccurl.py"
KEY_ENV = {"TASKMODE_ACCESS_KEY_ID": ACCESS_KEY_ID, "TASKMODE_ACCESS_KEY_SECRET": ACCESS_KEY_SECRET}
TERMINAL = {"Succeeded", "Failed", "Stopped", "Expired", "Invalid"}


def _load_fccurl() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fccurl", FCCURL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module


fccurl_module = _load_fccurl()


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMODE_")}
    return {**env, **extra}


def run_fccurl(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """`python deploy/fccurl.py ARGS` as a user would run it (keys from the environment)."""
    return subprocess.run(
        [sys.executable, str(FCCURL), *args], cwd=cwd, env=env if env is not None else _clean_env(**KEY_ENV),
        capture_output=True, timeout=60, check=False,
    )


def split_response(out: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lowercase names) and body of `-i` output (curl's or ours)."""
    head, _, body = out.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def wait_for(check: Callable[[], Any], *, deadline_s: float = 20.0, what: str) -> Any:
    end = time.monotonic() + deadline_s
    last: Any = None
    while time.monotonic() < end:
        last = check()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {deadline_s}s; last {last!r}")


@pytest.fixture
def api(shared_stack: Stack) -> str:
    return f"http://127.0.0.1:{shared_stack.gateway_port}/2023-03-30"


def _create_function(api: str, name: str, tmp_path: Path) -> None:
    body = {"functionName": name, "runtime": "python3.10", "handler": "index.handler", "timeout": 30,
            "code": {"zipFile": zip_code({"index.py": HANDLERS})}}
    (tmp_path / "create.json").write_text(json.dumps(body))
    created = run_fccurl("--data-binary", "@create.json", f"{api}/functions", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["functionName"] == name


# --- against the running system -----------------------------------------------------------------


def test_create_function_submit_task_and_fetch_it(api: str, fn_name: str, tmp_path: Path) -> None:
    _create_function(api, fn_name, tmp_path)
    config = run_fccurl("-X", "PUT", "-d", '{"asyncTask": true}', f"{api}/functions/{fn_name}/async-invoke-config",
                        cwd=tmp_path)
    assert config.returncode == 0, config.stderr
    assert json.loads(config.stdout)["asyncTask"] is True

    submitted = run_fccurl(
        "-i", "-H", "x-fc-invocation-type: Async", "-H", "x-fc-async-task-id: job-1", "-d", "hello from fccurl",
        f"{api}/functions/{fn_name}/invocations", cwd=tmp_path,
    )
    assert submitted.returncode == 0, submitted.stderr
    status, headers, body = split_response(submitted.stdout)
    assert (status, headers["x-fc-async-task-id"], body) == (202, "job-1", b"")
    assert headers["x-fc-request-id"]

    def finished() -> dict[str, Any] | None:
        got = run_fccurl(f"{api}/functions/{fn_name}/async-tasks/job-1", cwd=tmp_path)
        assert got.returncode == 0, got.stderr
        task: dict[str, Any] = json.loads(got.stdout)
        return task if task["status"] in TERMINAL else None

    task = wait_for(finished, what="task job-1 finishing")
    assert task["status"] == "Succeeded"
    assert task["returnPayload"] == "hello from fccurl"
    assert [e["status"] for e in task["events"]] == ["Enqueued", "Processed", "Running", "Succeeded"]

    # A query string is signed too (the list reads the projection, which may trail a little).
    def listed() -> list[str]:
        got = run_fccurl(f"{api}/functions/{fn_name}/async-tasks?status=Succeeded&prefix=job&limit=10"
                         "&includePayload=true", cwd=tmp_path)
        assert got.returncode == 0, got.stderr
        return [t["taskId"] for t in json.loads(got.stdout)["tasks"]]

    assert wait_for(listed, what="the task being listed") == ["job-1"]

    again = run_fccurl("-f", "-H", "x-fc-invocation-type: Async", "-H", "x-fc-async-task-id: job-1",
                       "-d", "again", f"{api}/functions/{fn_name}/invocations", cwd=tmp_path)
    assert again.returncode == 22
    assert json.loads(again.stdout)["Code"] == "TaskAlreadyExists"


def test_key_sources_and_a_wrong_secret(api: str, tmp_path: Path) -> None:
    wrong = run_fccurl("-i", "--key", f"{ACCESS_KEY_ID}:nope", f"{api}/functions", cwd=tmp_path, env=_clean_env())
    status, _, body = split_response(wrong.stdout)
    assert wrong.returncode == 0  # like curl: an HTTP error is not a failure without -f
    assert (status, json.loads(body)["Code"]) == (403, "SignatureNotMatch")

    right = run_fccurl("--key", f"{ACCESS_KEY_ID}:{ACCESS_KEY_SECRET}", f"{api}/functions", cwd=tmp_path,
                       env=_clean_env())
    assert right.returncode == 0 and "functions" in json.loads(right.stdout)

    # Without a key in the environment, the development key `make run` keeps is used.
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "dev-access-key").write_text(f"{ACCESS_KEY_ID}:{ACCESS_KEY_SECRET}\n")
    from_file = run_fccurl("-f", f"{api}/functions", cwd=tmp_path, env=_clean_env(TASKMODE_DATA_DIR=str(data_dir)))
    assert from_file.returncode == 0, from_file.stdout

    none = run_fccurl(f"{api}/functions", cwd=tmp_path, env=_clean_env(TASKMODE_DATA_DIR=str(tmp_path / "empty")))
    assert none.returncode == 2 and b"no access key" in none.stderr


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl binary on this machine (Debian images have one)")
def test_print_curl_commands_work_with_the_real_curl(api: str, fn_name: str, tmp_path: Path) -> None:
    curl = shutil.which("curl")
    assert curl is not None
    _create_function(api, fn_name, tmp_path)

    def printed(*args: str) -> str:
        done = run_fccurl("--print-curl", *args, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert b"valid once, until" in done.stderr
        return done.stdout.decode().strip()

    def shell(command: str) -> bytes:
        done = subprocess.run(["sh", "-c", command], cwd=tmp_path, capture_output=True, timeout=30, check=False)
        assert done.returncode == 0, (command, done.stderr)
        return done.stdout

    # A body with a quote and a leading "@" must reach the function as it is.
    payload = "@not-a-file: it's 100% data"
    submit = printed("-i", "-H", "x-fc-invocation-type: Async", "-H", "x-fc-async-task-id: curl-1", "--data-raw", payload,
                     f"{api}/functions/{fn_name}/invocations")
    status, headers, _ = split_response(shell(submit))
    assert (status, headers["x-fc-async-task-id"]) == (202, "curl-1")

    def get() -> str:
        return printed(f"{api}/functions/{fn_name}/async-tasks/curl-1")

    task = wait_for(lambda: (t := json.loads(shell(get())))["status"] in TERMINAL and t, what="curl-1 finishing")
    assert (task["status"], task["returnPayload"]) == ("Succeeded", payload)
    # A printed command runs once: its nonce makes a second run a refused replay.
    once = get()
    assert json.loads(shell(once))["taskId"] == "curl-1"
    assert json.loads(shell(once))["Code"] == "SignatureNonceUsed"

    # A query value with a space, sent percent-encoded, and a PUT without a body.
    listing = printed(f"{api}/functions/{fn_name}/async-tasks?prefix=no such&limit=5")
    assert json.loads(shell(listing)) == {"nextToken": "", "tasks": []}
    delayed = printed("-H", "x-fc-invocation-type: Async", "-H", "x-fc-async-task-id: curl-2",
                      "-H", "x-fc-async-delay: 600", "-d", "later", f"{api}/functions/{fn_name}/invocations")
    shell(delayed)
    assert shell(printed("-X", "PUT", f"{api}/functions/{fn_name}/async-tasks/curl-2/stop")) == b"{}"

    # --data-binary @FILE is passed on to curl, which reads the file itself.
    (tmp_path / "config.json").write_text('{"asyncTask": true,\n "maxAsyncRetryAttempts": 1}\n')
    put = printed("-X", "PUT", "--data-binary", "@config.json", f"{api}/functions/{fn_name}/async-invoke-config")
    assert "--data-binary @config.json" in put
    assert json.loads(shell(put))["maxAsyncRetryAttempts"] == 1

    # -f makes curl fail on the 409 of a duplicate task id, as it makes fccurl fail.
    duplicate = subprocess.run(["sh", "-c", submit.replace("curl -sS -i", "curl -sS -f", 1)], cwd=tmp_path,
                               capture_output=True, timeout=30, check=False)
    assert duplicate.returncode == 22


# --- without a server ---------------------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    return fccurl_module._parser().parse_args(list(argv))


def _verify(prepared: Any, *, secret: str = ACCESS_KEY_SECRET) -> str:
    url = urlsplit(prepared.url)
    return verify_request(
        method=prepared.method, raw_path=url.path, raw_query=url.query, headers=prepared.headers,
        body=prepared.body.data, secrets={ACCESS_KEY_ID: secret}, now=datetime.now(timezone.utc),
    )


def test_prepared_requests_verify_like_the_gateway_checks_them(tmp_path: Path) -> None:
    (tmp_path / "body.txt").write_bytes(b'{"a":\r\n 1}\n')
    cases = [
        _args("http://127.0.0.1:9000/2023-03-30/functions"),
        _args("-X", "put", "http://h:1/2023-03-30/functions/f/async-tasks/t/stop"),
        _args("-H", "X-Fc-Invocation-Type: Async", "-d", "payload", "http://h/2023-03-30/functions/f/invocations"),
        _args("http://h/2023-03-30/functions/f/async-tasks?prefix=a+b&limit=5&includePayload=True&nextToken="),
        _args("--data-binary", f"@{tmp_path / 'body.txt'}", "http://h/2023-03-30/functions"),
    ]
    for args in cases:
        prepared = fccurl_module.prepare(args, key_id=ACCESS_KEY_ID, secret=ACCESS_KEY_SECRET)
        assert _verify(prepared) == ACCESS_KEY_ID
        with pytest.raises(SignatureNotMatch):
            _verify(prepared, secret="other")
    assert fccurl_module.prepare(cases[0], key_id="k", secret="s").method == "GET"
    posted = fccurl_module.prepare(cases[2], key_id="k", secret="s")
    assert (posted.method, posted.headers["content-type"]) == ("POST", "application/octet-stream")
    assert posted.headers["x-fc-invocation-type"] == "Async"
    binary = fccurl_module.prepare(cases[4], key_id="k", secret="s")
    assert binary.body.data == b'{"a":\r\n 1}\n' and binary.headers["content-type"] == "application/json"
    assert "prefix=a%20b" in fccurl_module.prepare(cases[3], key_id="k", secret="s").url


def test_data_options_follow_curl(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_bytes(b"one\r\ntwo\n")
    assert fccurl_module.read_body(_args("-d", f"@{tmp_path / 'b.txt'}", "http://h/")).data == b"onetwo"
    kept = fccurl_module.read_body(_args("--data-binary", f"@{tmp_path / 'b.txt'}", "http://h/"))
    assert (kept.data, kept.file) == (b"one\r\ntwo\n", str(tmp_path / "b.txt"))
    assert fccurl_module.read_body(_args("-d", "", "http://h/")).given
    assert fccurl_module.read_body(_args("--data-raw", "@b.txt", "http://h/")).data == b"@b.txt"
    with pytest.raises(fccurl_module.UsageError):
        fccurl_module.read_body(_args("-d", f"@{tmp_path / 'missing'}", "http://h/"))
    with pytest.raises(fccurl_module.UsageError):
        fccurl_module.parse_headers(["no colon"])
    with pytest.raises(fccurl_module.UsageError):
        fccurl_module.prepare(_args("http://h/x?a=1&a=2"), key_id="k", secret="s")
    with pytest.raises(fccurl_module.UsageError):
        fccurl_module.prepare(_args("ftp://h/x"), key_id="k", secret="s")


def test_printed_curl_carries_the_signed_headers() -> None:
    prepared = fccurl_module.prepare(
        _args("-X", "POST", "-H", "x-fc-invocation-type: Async", "-d", "it's", "http://h:9/2023-03-30/functions/f/invocations"),
        key_id=ACCESS_KEY_ID, secret=ACCESS_KEY_SECRET,
    )
    argv = shlex.split(fccurl_module.curl_command(prepared))
    assert argv[:4] == ["curl", "-sS", "-X", "POST"]
    sent = {argv[i + 1].partition(":")[0].lower(): argv[i + 1].partition(": ")[2]
            for i, a in enumerate(argv) if a == "-H"}
    assert sent == {k.lower(): v for k, v in prepared.headers.items()}
    assert sent["authorization"].startswith(f"ACS3-HMAC-SHA256 Credential={ACCESS_KEY_ID},")
    assert argv[-2:] == ["--data-raw", "it's"]
    # A binary body cannot be put on a command line; --data-binary @FILE names the file instead.
    raw = fccurl_module.Prepared(method="POST", url="http://h/x", headers={},
                                 body=fccurl_module.Body(data=b"\x00\xff", given=True))
    with pytest.raises(fccurl_module.UsageError):
        fccurl_module.curl_command(raw)
