"""The embedded nats-server's Go scheduler: one thread by default, configurable, checked."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from shared.devstack import go_scheduler_env, start_nats

pytestmark = pytest.mark.timeout(60)


def _environment_of(pid: int) -> dict[str, str]:
    return psutil.Process(pid).environ()


def test_an_embedded_nats_server_runs_one_go_scheduler_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TASKMODE_NATS_GOMAXPROCS", raising=False)
    monkeypatch.setenv("GOMAXPROCS", "8")  # a value inherited from the shell does not win
    server = start_nats(tmp_path)
    try:
        assert _environment_of(server.process.pid)["GOMAXPROCS"] == "1"
    finally:
        server.stop()


def test_the_go_scheduler_threads_are_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKMODE_NATS_GOMAXPROCS", "2")
    assert go_scheduler_env() == {"GOMAXPROCS": "2"}
    monkeypatch.setenv("TASKMODE_NATS_GOMAXPROCS", "0")  # Go's own default: one per core
    assert go_scheduler_env() == {}
    monkeypatch.setenv("TASKMODE_NATS_GOMAXPROCS", "two")
    with pytest.raises(ValueError, match="TASKMODE_NATS_GOMAXPROCS"):
        go_scheduler_env()
