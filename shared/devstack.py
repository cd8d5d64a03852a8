"""Start the real infrastructure servers as child processes on loopback.

Used by `make run` (through `deploy/run.py`) and by the integration tests, so both run the
same nats-server and MongoDB-wire server the same way. Every server binds to 127.0.0.1; nats
picks its own port (read back from its log) and the MongoDB-wire server gets a port we reserve.

Every child gets PR_SET_PDEATHSIG: when the process (precisely: the thread) that started it
dies, even by SIGKILL, the kernel kills the child too, so neither a crashed launcher nor a
crashed test run leaves servers or services behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

_NATS_LISTEN = re.compile(rb"Listening for client connections on [\d.]+:(\d+)")


@dataclass
class ChildProcess:
    """A started server or service: its process, where it listens and where it logs."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def stop(self, *, grace_s: float = 10.0) -> int:
        """SIGTERM, wait up to `grace_s`, then SIGKILL; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL without grace: what a crash looks like."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def executable(name: str) -> str:
    """A console script installed next to this interpreter, else one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed (run 'make install')")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, *, deadline_s: float, process: subprocess.Popen[bytes]) -> None:
    """Poll until something accepts on 127.0.0.1:`port`, or fail if the process died."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on port {port} within {deadline_s}s")


_PR_SET_PDEATHSIG = 1


def _die_with(parent_pid: int) -> Callable[[], None]:
    """A pre-exec hook: SIGKILL this child when its starter dies (Linux; elsewhere a no-op)."""

    def hook() -> None:
        if sys.platform != "linux":
            return
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the starter died before the hook ran: too late to ask
            os._exit(1)

    return hook


def _spawn(name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns the descriptor from here on
    try:
        return subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # a Ctrl-C in the terminal reaches us, not the children
            preexec_fn=_die_with(os.getpid()),  # noqa: PLW1509 - async-signal-safe: one prctl call
        )
    finally:
        log.close()


def start_program(name: str, argv: Sequence[str], *, log_path: Path, env: dict[str, str] | None = None) -> ChildProcess:
    """Any other server a test needs (Prometheus, Alertmanager), started and logged like ours."""
    return ChildProcess(name, _spawn(name, argv, log_path, env), log_path)


# FC accepts synchronous payloads up to 32 MB; the bus must carry them plus headers.
NATS_MAX_PAYLOAD_BYTES = 40 * 1024 * 1024


def nats_config(*, port: int, store: Path) -> str:
    """The nats-server configuration taskmode runs with (JetStream on, loopback only)."""
    return (
        f"listen: 127.0.0.1:{port}\n"
        f"max_payload: {NATS_MAX_PAYLOAD_BYTES}\n"
        f"jetstream {{\n  store_dir: {json.dumps(str(store))}\n}}\n"
    )


def _log_offset(log_path: Path) -> int:
    return log_path.stat().st_size if log_path.exists() else 0


def wait_for_log_line(
    pattern: re.Pattern[bytes], *, log_path: Path, offset: int, process: subprocess.Popen[bytes], deadline_s: float
) -> re.Match[bytes]:
    """The first match of `pattern` in what `process` logged after `offset`; fails if it dies first."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        with open(log_path, "rb") as log:
            log.seek(offset)
            match = pattern.search(log.read())
        if match:
            return match
        if process.poll() is not None:
            tail = log_path.read_bytes()[offset:].decode(errors="replace")
            raise RuntimeError(f"process exited with {process.returncode}: {tail}")
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise TimeoutError(f"no {pattern.pattern!r} in {log_path} within {deadline_s}s")


def start_nats_with(
    config: Path, *, log_path: Path, env: dict[str, str] | None = None, name: str = "nats", deadline_s: float = 20.0
) -> ChildProcess:
    """nats-server with configuration file `config`, its URL read back from its log.

    The log is appended to, so what a crashed predecessor wrote stays readable; `env` (added to
    this process's environment) fills the configuration's `$VARIABLES`.
    """
    offset = _log_offset(log_path)
    argv = [executable("nats-server"), "-c", str(config)]
    proc = _spawn(name, argv, log_path, {**os.environ, **env} if env else None)
    chosen = int(wait_for_log_line(_NATS_LISTEN, log_path=log_path, offset=offset, process=proc,
                                   deadline_s=deadline_s).group(1))
    wait_for_port(chosen, deadline_s=deadline_s, process=proc)
    return ChildProcess(name, proc, log_path, url=f"nats://127.0.0.1:{chosen}")


def start_nats(data_dir: Path, *, port: int = -1, deadline_s: float = 20.0) -> ChildProcess:
    """A JetStream-enabled nats-server storing under `data_dir/nats`; port -1 lets it choose."""
    store = data_dir / "nats"
    store.mkdir(parents=True, exist_ok=True)
    config = data_dir / "nats-server.conf"
    config.write_text(nats_config(port=port, store=store))
    return start_nats_with(config, log_path=data_dir / "logs" / "nats-server.log", deadline_s=deadline_s)


def _is_server_with_pid_file(pid: int, pid_file: Path) -> bool:
    """Whether `pid` is a live (not zombie) nx-27017 that was started with `pid_file`."""
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and str(pid_file) in process.cmdline()
    except psutil.Error:
        return False


def clear_stale_pid_file(pid_file: Path) -> None:
    """Remove nx-27017's pid file unless the server it names is really running.

    nx-27017 refuses to start while its pid file names any live process: after a SIGKILL (or
    once the number is reused by an unrelated process, or while the dead server is an unreaped
    zombie) that file would block every restart. A real server on the same store is refused.
    """
    try:
        pid = int(pid_file.read_text().strip() or "0")
    except (FileNotFoundError, ValueError):
        pid = 0
    if pid and _is_server_with_pid_file(pid, pid_file):
        raise RuntimeError(f"nx-27017 already runs on {pid_file.parent} (pid {pid})")
    pid_file.unlink(missing_ok=True)


CLUSTER_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "nats" / "cluster.conf"


@dataclass
class NatsCluster:
    """Three (or more) nats-server nodes on loopback, each run with deploy/nats/cluster.conf, the
    file docker-compose.yml and deploy/k8s use, so the cluster tested here is the one deployed."""

    data_dir: Path
    envs: list[dict[str, str]]
    nodes: list[ChildProcess] = field(default_factory=list)

    @classmethod
    def start(cls, data_dir: Path, *, size: int = 3) -> NatsCluster:
        """Start `size` nodes storing under `data_dir/node-<n>`; returns once all listen."""
        route_ports = [free_port() for _ in range(size)]
        routes = {f"NATS_ROUTE_{i + 1}": f"nats://127.0.0.1:{port}" for i, port in enumerate(route_ports)}
        envs = [
            {
                "NATS_SERVER_NAME": f"node-{i + 1}",
                "NATS_CLIENT_LISTEN": f"127.0.0.1:{free_port()}",
                "NATS_HTTP_LISTEN": f"127.0.0.1:{free_port()}",
                "NATS_CLUSTER_LISTEN": f"127.0.0.1:{route_ports[i]}",
                "NATS_STORE_DIR": str(data_dir / f"node-{i + 1}"),
                **routes,
            }
            for i in range(size)
        ]
        cluster = cls(data_dir=data_dir, envs=envs)
        for index in range(size):
            cluster.nodes.append(cluster._start_node(index))
        return cluster

    def _start_node(self, index: int) -> ChildProcess:
        name = self.envs[index]["NATS_SERVER_NAME"]
        return start_nats_with(CLUSTER_CONFIG, log_path=self.data_dir / "logs" / f"{name}.log", env=self.envs[index], name=name)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def monitor_url(self, index: int) -> str:
        return f"http://{self.envs[index]['NATS_HTTP_LISTEN']}"

    def kill(self, index: int) -> None:
        """SIGKILL one node: a crash, no goodbye to the others."""
        self.nodes[index].kill()

    def restart(self, index: int) -> None:
        """Start a stopped or killed node again, with its store and ports."""
        self.nodes[index].stop()
        self.nodes[index] = self._start_node(index)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()


def start_mongo_wire(data_dir: Path, *, port: int | None = None, deadline_s: float = 30.0) -> ChildProcess:
    """The embedded MongoDB wire-protocol server (nx-27017, SQLite-backed) under `data_dir/mongo`.

    Its log is what it prints (`logs/mongo-wire.log`); its own log file copy goes to /dev/null.
    """
    store = data_dir / "mongo"
    store.mkdir(parents=True, exist_ok=True)
    chosen = port or free_port()
    log_path = data_dir / "logs" / "mongo-wire.log"
    pid_file = store / "nx-27017.pid"
    clear_stale_pid_file(pid_file)
    argv = [
        executable("nx-27017"),
        "--data-dir", str(store),
        "--host", "127.0.0.1",
        "-p", str(chosen),
        "--log-file", os.devnull,
        "--pid-file", str(pid_file),
    ]
    proc = _spawn("mongo", argv, log_path, None)
    wait_for_port(chosen, deadline_s=deadline_s, process=proc)
    return ChildProcess("mongo", proc, log_path, url=f"mongodb://127.0.0.1:{chosen}")


def start_service(
    module: str, *, env: dict[str, str], log_path: Path, name: str | None = None
) -> ChildProcess:
    """`python -m <module>` with `env` added to this process's environment."""
    full_env = {**os.environ, **env}
    proc = _spawn(name or module, [sys.executable, "-m", module], log_path, full_env)
    return ChildProcess(name or module, proc, log_path)


SERVICES: tuple[str, ...] = ("projection", "scheduler", "executor", "triggers", "deliverer", "gateway")


@dataclass
class Stack:
    """The whole system as child processes: infrastructure plus the four services.

    `service_env` is added to every service's environment (tests use it for short ack waits).
    """

    data_dir: Path
    access_keys: str
    gateway_port: int
    nats_url: str = ""
    mongodb_url: str = ""
    auth_disabled: bool = False
    metrics_ports: bool = False
    service_env: dict[str, str] = field(default_factory=dict)
    # Signs webhook destination records (only the deliverer holds it; receivers are told it).
    delivery_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    infra: list[ChildProcess] = field(default_factory=list)
    services: dict[str, ChildProcess] = field(default_factory=dict)

    def start_infra(self, *, nats_port: int = -1, mongo_port: int | None = None) -> None:
        """Start nats-server (unless `nats_url` is set) and the MongoDB-wire server (unless `mongodb_url` is)."""
        if not self.nats_url:
            nats = start_nats(self.data_dir, port=nats_port)
            self.infra.append(nats)
            self.nats_url = nats.url
        if not self.mongodb_url:
            mongo = start_mongo_wire(self.data_dir, port=mongo_port)
            self.infra.append(mongo)
            self.mongodb_url = mongo.url
            # The embedded server scans every collection with a TTL index on each read: sweep
            # expired tasks from the projection instead.
            self.service_env.setdefault("TASKMODE_EXPIRY_SWEEP_S", "60")

    def restart_nats(self) -> None:
        """Stop the stack's own nats-server and start it again on the same port and store."""
        old = next(child for child in self.infra if child.name == "nats")
        old.stop()
        port = int(self.nats_url.rsplit(":", 1)[1])
        self.infra[self.infra.index(old)] = start_nats(self.data_dir, port=port)

    def infra_child(self, name: str) -> ChildProcess:
        """The stack's own "nats" or "mongo" server."""
        return next(child for child in self.infra if child.name == name)

    def start_infra_again(self, name: str) -> ChildProcess:
        """Start the stack's "nats" or "mongo" server again (after it died), same port and data."""
        old = self.infra_child(name)
        old.stop()
        if name == "nats":
            new = start_nats(self.data_dir, port=int(self.nats_url.rsplit(":", 1)[1]))
        else:
            new = start_mongo_wire(self.data_dir, port=int(self.mongodb_url.rsplit(":", 1)[1]))
        self.infra[self.infra.index(old)] = new
        return new

    def stop_mongo_wire(self) -> None:
        """Stop the stack's own MongoDB-wire server (an outage of the read model)."""
        old = next(child for child in self.infra if child.name == "mongo")
        old.stop()
        self.infra.remove(old)

    def start_mongo_wire_again(self) -> None:
        """Start the MongoDB-wire server again, on the same port and data."""
        port = int(self.mongodb_url.rsplit(":", 1)[1])
        self.infra.append(start_mongo_wire(self.data_dir, port=port))

    def env_for(self, service: str) -> dict[str, str]:
        env = {
            "NATS_URL": self.nats_url,
            "MONGODB_URL": self.mongodb_url,
            "TASKMODE_DATA_DIR": str(self.data_dir / "services" / service),
            "PYTHONUNBUFFERED": "1",
        }
        if service == "gateway":  # only the gateway checks signatures; no one else holds the keys
            env["TASKMODE_GATEWAY_PORT"] = str(self.gateway_port)
            env["TASKMODE_ACCESS_KEYS"] = self.access_keys
            env["TASKMODE_AUTH_DISABLED"] = "true" if self.auth_disabled else "false"
            env["TASKMODE_CONSOLE_LOGS_DIR"] = str(self.data_dir / "logs")  # the console shows task logs
        if service == "deliverer":
            env["TASKMODE_DELIVERY_SECRET"] = self.delivery_secret
        if not self.metrics_ports:
            for name in ("SCHEDULER", "EXECUTOR", "PROJECTION", "TRIGGERS", "DELIVERER"):
                env[f"TASKMODE_{name}_METRICS_PORT"] = "0"
        return {**env, **self.service_env}

    def start_service(self, service: str, *, name: str | None = None, env: dict[str, str] | None = None) -> ChildProcess:
        """Start one service (`name` tells apart several of a kind, e.g. two executors; `env`
        overrides its settings, e.g. a second gateway's port)."""
        label = name or service
        service_env = {**self.env_for(service), **(env or {})}
        child = start_service(
            f"services.{service}", env=service_env, log_path=self.data_dir / "logs" / f"{label}.log", name=label
        )
        self.services[label] = child
        if service == "gateway":
            port = int(service_env.get("TASKMODE_GATEWAY_PORT", self.gateway_port))
            wait_for_port(port, deadline_s=30, process=child.process)
        return child

    def start_services(self) -> None:
        for service in SERVICES:
            self.start_service(service)

    def kill_service(self, name: str) -> None:
        self.services[name].kill()

    def stop(self) -> None:
        """Stop services first (they drain the bus), then the infrastructure, newest first."""
        for child in reversed(list(self.services.values())):
            child.stop()
        for child in reversed(self.infra):
            child.stop()
