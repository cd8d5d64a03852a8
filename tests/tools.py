"""External programs some tests need (promtool, Prometheus, Alertmanager, a compose CLI), and
real Prometheus / Alertmanager servers started on loopback for a test.

`make test` installs the tools when missing and sets TASKMODE_REQUIRE_TOOLS=1, so there a
missing tool fails the test; a plain `pytest` run skips such tests instead, saying what is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from shared.devstack import ChildProcess, free_port, start_program

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def tool(*names: str, install: str) -> str:
    """The first of `names` on PATH (or beside this Python); skip or fail when none is."""
    for name in names:
        beside = Path(sys.executable).parent / name
        if beside.exists():
            return str(beside)
        if found := shutil.which(name):
            return found
    message = f"{' or '.join(names)} not installed ({install}; `make test` installs it)"
    if os.environ.get("TASKMODE_REQUIRE_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def promtool() -> str:
    return tool("promtool", install="apt-get install prometheus")


def prometheus_binary() -> str:
    return tool("prometheus", install="apt-get install prometheus")


def alertmanager_binary() -> str:
    return tool("prometheus-alertmanager", "alertmanager", install="apt-get install prometheus-alertmanager")


def amtool() -> str:
    return tool("amtool", install="apt-get install prometheus-alertmanager")


def compose_command() -> list[str]:
    """`docker compose` when the docker CLI has the plugin, else a standalone Compose v2."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return [tool("docker-compose", install="make compose-cli")]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def wait_until_ready(url: str, child: ChildProcess, *, deadline_s: float = 30) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if child.process.poll() is not None:
            raise RuntimeError(f"{child.name} exited: {child.log_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{child.name} not ready at {url}: {child.log_text()[-2000:]}")


def start_prometheus(work: Path, config: dict[str, Any], *, extra_args: tuple[str, ...] = ()) -> tuple[ChildProcess, str]:
    """A real Prometheus on a free loopback port with `config`; returns it and its base URL."""
    work.mkdir(parents=True, exist_ok=True)
    config_path = work / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    argv = [prometheus_binary(), f"--config.file={config_path}", f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn", *extra_args]
    child = start_program("prometheus", argv, log_path=work / "prometheus.log")
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(f"{url}/-/ready", child)
    return child, url


def start_alertmanager(work: Path, config: dict[str, Any]) -> tuple[ChildProcess, str]:
    """A real Alertmanager on a free loopback port with `config`, not clustering with anyone."""
    work.mkdir(parents=True, exist_ok=True)
    config_path = work / "alertmanager.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    argv = [alertmanager_binary(), f"--config.file={config_path}", f"--storage.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=", "--log.level=warn"]
    child = start_program("alertmanager", argv, log_path=work / "alertmanager.log")
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(f"{url}/-/ready", child)
    return child, url


def alertmanager_config_with_webhook(url: str) -> dict[str, Any]:
    """deploy/alertmanager/alertmanager.yml, delivering to `url` instead of the secret file.

    Debian's Alertmanager (0.25) predates `url_file`; everything else (routes, grouping,
    inhibition) is the deployed configuration.
    """
    config: dict[str, Any] = load_yaml(DEPLOY / "alertmanager" / "alertmanager.yml")
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook.pop("url_file")
            hook["url"] = url
    return config
