"""`make run`: the whole system on this machine, until Ctrl-C.

Starts nats-server (JetStream) and the embedded MongoDB-wire server unless NATS_URL / MONGODB_URL
point elsewhere, then the four services; restarts a service that dies; prints where to connect.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.executor.pool import new_sandbox  # noqa: E402
from services.executor.sandbox import SandboxSettings, SandboxUnavailable  # noqa: E402
from shared import logrotate  # noqa: E402
from shared.devstack import Stack  # noqa: E402
from shared.settings import env_bool, env_int  # noqa: E402

_BANNER = "!" * 100


def _sandbox_ok(data_dir: Path) -> bool:
    """Say loudly when function instances cannot be sandboxed; go on only if told to."""
    settings = SandboxSettings.from_env()
    if not settings.enabled:
        print(f"{_BANNER}\nTASKMODE_SANDBOX=false: FUNCTION INSTANCES RUN UNSANDBOXED. Any function can read this\n"
              f"machine's files as the executor's user and reach NATS and MongoDB. Development only.\n{_BANNER}",
              flush=True)
        return True
    try:
        new_sandbox(settings, work_dir=data_dir / "services" / "executor" / "instances").check()
    except SandboxUnavailable as err:
        print(f"{_BANNER}\nNO SANDBOX FOR FUNCTION INSTANCES: {err}\n"
              f"taskmode will not run functions unsandboxed unless you set TASKMODE_SANDBOX=false.\n{_BANNER}",
              file=sys.stderr, flush=True)
        return False
    return True


def _access_keys(data_dir: Path) -> str:
    if os.environ.get("TASKMODE_ACCESS_KEYS"):
        return os.environ["TASKMODE_ACCESS_KEYS"]
    # A dev key generated once and kept with the data, so clients keep working across restarts.
    key_file = data_dir / "dev-access-key"
    if not key_file.exists():
        key_file.write_text(f"dev{secrets.token_hex(6)}:{secrets.token_urlsafe(24)}\n")
        key_file.chmod(0o600)
    return key_file.read_text().strip()


def main() -> int:
    data_dir = Path(os.environ.get("TASKMODE_DATA_DIR", ".data")).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    if not _sandbox_ok(data_dir):
        return 1
    keys = _access_keys(data_dir)
    log_max_bytes = env_int("TASKMODE_LOG_MAX_BYTES", logrotate.DEFAULT_MAX_BYTES)
    log_keep = env_int("TASKMODE_LOG_KEEP", logrotate.DEFAULT_KEEP)
    stack = Stack(
        data_dir=data_dir,
        access_keys=keys,
        gateway_port=int(os.environ.get("TASKMODE_GATEWAY_PORT", "9000")),
        nats_url=os.environ.get("NATS_URL", ""),
        mongodb_url=os.environ.get("MONGODB_URL", ""),
        auth_disabled=env_bool("TASKMODE_AUTH_DISABLED", False),
        metrics_ports=True,
    )
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        stack.start_infra(
            nats_port=int(os.environ.get("TASKMODE_NATS_PORT", "4222")),
            mongo_port=int(os.environ.get("TASKMODE_MONGO_PORT", "27017")),
        )
        stack.start_services()
        key_id, _, secret = keys.split(",")[0].partition(":")
        print(
            f"\ntaskmode is running\n"
            f"  API (FC 3.0)     http://127.0.0.1:{stack.gateway_port}/2023-03-30/\n"
            f"  access key id    {key_id}\n"
            f"  access secret    {secret}\n"
            f"  NATS             {stack.nats_url}\n"
            f"  NATS users       one per service; passwords in {stack.secrets_dir} (admin: nats-admin.password)\n"
            f"  MongoDB          {stack.mongodb_url}\n"
            f"  metrics          http://127.0.0.1:{stack.gateway_port}/metrics (gateway), "
            f":9101 scheduler, :9102 executor, :9103 projection\n"
            f"  logs             {data_dir / 'logs'}\n"
            f"Ctrl-C stops everything.\n",
            flush=True,
        )
        while not stopping.wait(1.0):
            logrotate.rotate_all((data_dir / "logs").glob("*.log"), max_bytes=log_max_bytes, keep=log_keep)
            for name, child in list(stack.services.items()):
                if child.process.poll() is not None:
                    print(f"{name} exited with {child.process.returncode}; restarting", flush=True)
                    stack.start_service(name)
    finally:
        print("stopping…", flush=True)
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
