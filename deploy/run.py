"""`make run`: the whole system on this machine, until Ctrl-C (or SIGTERM, or a closed terminal).

Before anything starts: one launcher per data directory (`.data/run.lock`), every setting read
the way each service will read it, every port free. Then nats-server (JetStream) and the
embedded MongoDB-wire server unless NATS_URL / MONGODB_URL point elsewhere, then the four
services; once all answer, the banner. Every child is supervised (restarted with back-off, given
up on when it keeps failing at start) and dies with the launcher, even when the launcher is
killed with SIGKILL (shared/devstack sets PR_SET_PDEATHSIG). Where the stack runs is written to
`.data/stack.json` for `make rebuild-projection`.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deploy.preflight import (  # noqa: E402
    STACK_FILE,
    LaunchPlan,
    PreflightError,
    check_ports,
    check_service_settings,
    check_single_node_replicas,
    hold_run_lock,
    write_stack_file,
)
from deploy.supervise import GaveUp, Supervised, Supervisor, log_tail  # noqa: E402
from services.executor.pool import new_sandbox  # noqa: E402
from services.executor.sandbox import SandboxSettings, SandboxUnavailable  # noqa: E402
from shared import logrotate  # noqa: E402
from shared.devstack import SERVICES, Stack  # noqa: E402
from shared.settings import env_int  # noqa: E402

READY_DEADLINE_S = 90.0


def say(message: str) -> None:
    print(message, flush=True)


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


def _loopback(host: str) -> str:
    """Where to reach a server bound to `host` from this machine."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - our own loopback URL
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


class Launcher:
    """One `make run`: a plan, its stack, and the supervisor that keeps it up."""

    def __init__(self, plan: LaunchPlan, stack: Stack, stopping: threading.Event) -> None:
        self.plan = plan
        self.stack = stack
        self.stopping = stopping
        self.supervisor = Supervisor(say=say)

    # --- start ---------------------------------------------------------------------------

    def check_settings(self) -> None:
        """Every service's settings, read as that service will read them."""
        urls = {
            "NATS_URL": self.plan.nats_url or f"nats://127.0.0.1:{self.plan.nats_port}",
            "MONGODB_URL": self.plan.mongodb_url or f"mongodb://127.0.0.1:{self.plan.mongo_port}",
        }
        envs = {service: {**os.environ, **self.stack.env_for(service), **urls} for service in SERVICES}
        check_service_settings(envs)

    def start(self) -> None:
        """Infrastructure, then services, then wait until every one answers."""
        self.stack.start_infra(nats_port=self.plan.nats_port or -1, mongo_port=self.plan.mongo_port)
        for child in self.stack.infra:
            label = {"nats": "nats-server", "mongo": "nx-27017"}[child.name]
            supervised = Supervised(label, start=lambda name=child.name: self.stack.start_infra_again(name).process,
                                    log_path=child.log_path, process=child.process, started_at=time.monotonic())
            self.supervisor.add(supervised)
        for service in SERVICES:
            supervised = Supervised(service, start=lambda name=service: self._start_service(name),
                                    log_path=self.stack.data_dir / "logs" / f"{service}.log")
            supervised.launch()
            self.supervisor.add(supervised)
        self._wait_until_ready()

    def _start_service(self, service: str) -> subprocess.Popen[bytes]:
        try:
            return self.stack.start_service(service).process
        except (RuntimeError, TimeoutError):
            # The gateway died or did not listen in time; the supervisor sees and handles that.
            return self.stack.services[service].process

    def _ready(self, service: str) -> bool:
        """/readyz where the service has it; before that existed, its health or metrics answer."""
        if service == "gateway":
            base, fallback = f"http://{_loopback(self.plan.gateway_host)}:{self.stack.gateway_port}", "/healthz"
        else:
            port = self.plan.metrics_ports[service]
            if not port:  # nothing to ask: alive for a few seconds has to do
                return time.monotonic() - self._child(service).started_at > 3
            base, fallback = f"http://{_loopback(self.plan.metrics_host)}:{port}", "/metrics"
        status = _status(f"{base}/readyz")
        return status == 200 or (status == 404 and _status(f"{base}{fallback}") == 200)

    def _child(self, name: str) -> Supervised:
        return next(child for child in self.supervisor.children if child.name == name)

    def _wait_until_ready(self) -> None:
        waiting = list(SERVICES)
        end = time.monotonic() + READY_DEADLINE_S
        while waiting and not self.stopping.is_set():
            self.supervisor.check()
            waiting = [service for service in waiting if self._child(service).dead or not self._ready(service)]
            if time.monotonic() > end:
                raise GaveUp([f"{', '.join(waiting)} did not become ready within {READY_DEADLINE_S:g} s; "
                              f"see {self.stack.data_dir / 'logs'}"])
            time.sleep(0.2)

    # --- run -----------------------------------------------------------------------------

    def record(self) -> None:
        projection_env = {**os.environ, **self.stack.env_for("projection")}
        write_stack_file(self.stack.data_dir, {
            "pid": os.getpid(),
            "api": self.api_url(),
            "nats_url": self.stack.nats_url,
            "mongodb_url": self.stack.mongodb_url,
            "embedded_mongo": self.plan.mongo_port is not None,
            # What the running projection was given, so a rebuild creates the same indexes.
            "projection_env": {key: projection_env.get(key, "") for key in ("TASKMODE_EXPIRY_SWEEP_S",)},
        })

    def api_url(self) -> str:
        return f"http://{_loopback(self.plan.gateway_host)}:{self.stack.gateway_port}/2023-03-30/"

    def banner(self) -> str:
        gateway = f"http://{_loopback(self.plan.gateway_host)}:{self.stack.gateway_port}"
        metrics = [f"{gateway}/metrics (gateway)"]
        if self.plan.gateway_metrics_port:
            metrics.append(f":{self.plan.gateway_metrics_port} (gateway)")
        for service, port in self.plan.metrics_ports.items():
            metrics.append(f":{port} {service}" if port else f"{service} off")
        lines = ["", "taskmode is running", f"  API (FC 3.0)     {self.api_url()}",
                 f"  console          {gateway}/console  (CLI: .venv/bin/taskmode)"]
        if self.plan.auth_disabled:
            lines += [
                "  !! AUTHENTICATION IS OFF (TASKMODE_AUTH_DISABLED): every request is accepted unsigned.",
                "  !! Anyone who can reach the API can run code on this machine. Never on a shared machine.",
            ]
        else:
            key_id, _, secret = self.stack.access_keys.split(",")[0].partition(":")
            lines += [f"  access key id    {key_id}", f"  access secret    {secret}"]
        mongo = self.stack.mongodb_url + ("  (embedded nx-27017, for development)" if self.plan.mongo_port else "")
        lines += [
            f"  NATS             {self.stack.nats_url}",
            f"  NATS users       one per service; passwords in {self.stack.secrets_dir} (your applications: "
            "nats-publisher.password; admin: nats-admin.password)",
            f"  MongoDB          {mongo}",
            f"  metrics          {', '.join(metrics)}",
            f"  health           {gateway}/healthz, {gateway}/readyz",
            f"  webhook secret   {self.stack.delivery_secret}  (also in {self.stack.data_dir / 'delivery-secret'})",
            f"  logs             {self.stack.data_dir / 'logs'}",
            "Ctrl-C stops everything.",
            "",
        ]
        return "\n".join(lines)

    def supervise(self) -> None:
        logs = self.stack.data_dir / "logs"
        max_bytes = env_int("TASKMODE_LOG_MAX_BYTES", logrotate.DEFAULT_MAX_BYTES)
        keep = env_int("TASKMODE_LOG_KEEP", logrotate.DEFAULT_KEEP)
        while not self.stopping.wait(0.5):
            self.supervisor.check()
            # The children append to their logs: rotated under them, copy-and-truncate.
            logrotate.rotate_all(logs.glob("*.log"), max_bytes=max_bytes, keep=keep)


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
    try:
        plan = LaunchPlan.from_env(os.environ)
        lock: IO[str] = hold_run_lock(plan.data_dir)
    except PreflightError as err:
        for line in err.lines:
            say(f"make run: {line}")
        return 2
    try:
        return _run(plan)
    finally:
        (plan.data_dir / STACK_FILE).unlink(missing_ok=True)
        lock.close()


def _run(plan: LaunchPlan) -> int:
    if not _sandbox_ok(plan.data_dir):
        return 1
    stack = Stack(
        data_dir=plan.data_dir,
        access_keys=_access_keys(plan.data_dir),
        gateway_port=plan.gateway_port,
        nats_url=plan.nats_url,
        mongodb_url=plan.mongodb_url,
        auth_disabled=plan.auth_disabled,
        metrics_ports=True,
        service_env=plan.service_env(),
        delivery_secret=_delivery_secret(plan.data_dir),
    )
    stopping = threading.Event()
    launcher = Launcher(plan, stack, stopping)
    try:
        check_single_node_replicas(os.environ, plan)
        launcher.check_settings()
        check_ports(plan.port_claims())
    except PreflightError as err:
        for line in err.lines:
            say(f"make run: {line}")
        return 2
    # A closed terminal (SIGHUP) stops the stack as cleanly as Ctrl-C or SIGTERM.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        launcher.start()
        if stopping.is_set():
            return 0
        launcher.record()
        say(launcher.banner())
        launcher.supervise()
        return 0
    except GaveUp as err:
        for line in err.lines:
            say(line)
        return 1
    except (RuntimeError, TimeoutError) as err:  # the infrastructure did not come up
        say(f"make run: {err}")
        for child in stack.infra:
            say(f"The end of {child.log_path}:")
            for line in log_tail(child.log_path):
                say(f"  {line}")
        return 1
    finally:
        say("stopping…")
        stack.stop()
        say("stopped")


if __name__ == "__main__":
    sys.exit(main())
