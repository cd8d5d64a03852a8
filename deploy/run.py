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

from shared.devstack import Stack  # noqa: E402
from shared.settings import env_bool  # noqa: E402


def _access_keys(data_dir: Path) -> str:
    if os.environ.get("TASKMODE_ACCESS_KEYS"):
        return os.environ["TASKMODE_ACCESS_KEYS"]
    # A dev key generated once and kept with the data, so clients keep working across restarts.
    key_file = data_dir / "dev-access-key"
    if not key_file.exists():
        key_file.write_text(f"dev{secrets.token_hex(6)}:{secrets.token_urlsafe(24)}\n")
        key_file.chmod(0o600)
    return key_file.read_text().strip()


def _delivery_secret(data_dir: Path) -> str:
    if os.environ.get("TASKMODE_DELIVERY_SECRET"):
        return os.environ["TASKMODE_DELIVERY_SECRET"]
    # Generated once and kept with the data, like the access key: webhook receivers keep it.
    secret_file = data_dir / "delivery-secret"
    if not secret_file.exists():
        secret_file.write_text(secrets.token_urlsafe(32) + "\n")
        secret_file.chmod(0o600)
    return secret_file.read_text().strip()


def main() -> int:
    data_dir = Path(os.environ.get("TASKMODE_DATA_DIR", ".data")).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    keys = _access_keys(data_dir)
    stack = Stack(
        data_dir=data_dir,
        access_keys=keys,
        gateway_port=int(os.environ.get("TASKMODE_GATEWAY_PORT", "9000")),
        nats_url=os.environ.get("NATS_URL", ""),
        mongodb_url=os.environ.get("MONGODB_URL", ""),
        auth_disabled=env_bool("TASKMODE_AUTH_DISABLED", False),
        metrics_ports=True,
        delivery_secret=_delivery_secret(data_dir),
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
            f"  MongoDB          {stack.mongodb_url}\n"
            f"  metrics          http://127.0.0.1:{stack.gateway_port}/metrics (gateway), "
            f":9101 scheduler, :9102 executor, :9103 projection, :9104 triggers, :9105 deliverer\n"
            f"  webhook secret   {stack.delivery_secret}  (also in {data_dir / 'delivery-secret'})\n"
            f"  logs             {data_dir / 'logs'}\n"
            f"Ctrl-C stops everything.\n",
            flush=True,
        )
        while not stopping.wait(1.0):
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
