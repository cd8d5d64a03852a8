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
from typing import Final

import psutil

from shared import natsauth

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
            env=env if env is not None else child_environment({}),  # servers get no secrets either
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


def nats_config(*, port: int, store: Path, authorization: str = "", monitor_port: int | None = None) -> str:
    """The nats-server configuration taskmode runs with (JetStream on, loopback only), with the
    roles' users and permissions when `authorization` is given (`natsauth.render_authorization`),
    and nats-server's HTTP monitoring (/varz, /connz, /jsz) on loopback with `monitor_port`."""
    return (
        f"listen: 127.0.0.1:{port}\n"
        + (f"http: 127.0.0.1:{monitor_port}\n" if monitor_port else "")
        + f"max_payload: {NATS_MAX_PAYLOAD_BYTES}\n"
        f"jetstream {{\n  store_dir: {json.dumps(str(store))}\n}}\n"
        f"{authorization}"
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


# nats-server's Go runtime runs one scheduler thread per core by default. Beside the services on
# a small machine, those threads spend more CPU looking for work and waking each other than
# handling messages: with one, nats-server's CPU per task fell by about a third (bench.cpu_per_task).
EMBEDDED_NATS_GOMAXPROCS: Final = "1"


def go_scheduler_env() -> dict[str, str]:
    """GOMAXPROCS for an embedded nats-server: TASKMODE_NATS_GOMAXPROCS, else 1; 0 is Go's own default."""
    procs = os.environ.get("TASKMODE_NATS_GOMAXPROCS", EMBEDDED_NATS_GOMAXPROCS).strip() or EMBEDDED_NATS_GOMAXPROCS
    if procs == "0":
        return {}
    if not procs.isdigit():
        raise ValueError(f"TASKMODE_NATS_GOMAXPROCS must be a whole number, got {procs!r}")
    return {"GOMAXPROCS": procs}


def start_nats_with(
    config: Path, *, log_path: Path, env: dict[str, str] | None = None, name: str = "nats", deadline_s: float = 20.0
) -> ChildProcess:
    """nats-server with configuration file `config`, its URL read back from its log.

    The log is appended to, so what a crashed predecessor wrote stays readable; `env` (added to
    this process's environment) fills the configuration's `$VARIABLES`.
    """
    offset = _log_offset(log_path)
    argv = [executable("nats-server"), "-c", str(config)]
    proc = _spawn(name, argv, log_path, child_environment({**go_scheduler_env(), **(env or {})}))
    chosen = int(wait_for_log_line(_NATS_LISTEN, log_path=log_path, offset=offset, process=proc,
                                   deadline_s=deadline_s).group(1))
    wait_for_port(chosen, deadline_s=deadline_s, process=proc)
    return ChildProcess(name, proc, log_path, url=f"nats://127.0.0.1:{chosen}")


def start_nats(data_dir: Path, *, port: int = -1, deadline_s: float = 20.0,
               passwords: dict[str, str] | None = None, monitor_port: int | None = None) -> ChildProcess:
    """A JetStream-enabled nats-server storing under `data_dir/nats`; port -1 lets it choose.

    With `passwords` (role -> password) it asks every client for a role's credentials; its
    configuration then holds them and is written readable by its owner only.
    """
    store = data_dir / "nats"
    store.mkdir(parents=True, exist_ok=True)
    config = data_dir / "nats-server.conf"
    authorization = natsauth.render_authorization(passwords) if passwords else ""
    natsauth.write_private(config, nats_config(port=port, store=store, authorization=authorization,
                                               monitor_port=monitor_port))
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
    file docker-compose.yml and deploy/k8s use, so the cluster tested here is the one deployed
    (with its users: each role's password reaches the nodes in its NATS_<ROLE>_PASSWORD variable)."""

    data_dir: Path
    envs: list[dict[str, str]]
    passwords: dict[str, str]
    nodes: list[ChildProcess] = field(default_factory=list)

    @classmethod
    def start(cls, data_dir: Path, *, size: int = 3) -> NatsCluster:
        """Start `size` nodes storing under `data_dir/node-<n>`; returns once all listen."""
        passwords = natsauth.new_passwords()
        variables = {natsauth.password_variable(role): password for role, password in passwords.items()}
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
                **variables,
            }
            for i in range(size)
        ]
        cluster = cls(data_dir=data_dir, envs=envs, passwords=passwords)
        for index in range(size):
            cluster.nodes.append(cluster._start_node(index))
        return cluster

    def _start_node(self, index: int) -> ChildProcess:
        name = self.envs[index]["NATS_SERVER_NAME"]
        return start_nats_with(CLUSTER_CONFIG, log_path=self.data_dir / "logs" / f"{name}.log", env=self.envs[index], name=name)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def credentials(self, role: str) -> tuple[str, str]:
        """(user, password) of `role` on the cluster."""
        return role, self.passwords[role]

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


# Inherited by no service: each gets only its own credentials, from `env`.
SECRET_VARIABLES: tuple[str, ...] = ("TASKMODE_ACCESS_KEYS", "TASKMODE_ACCESS_KEYS_FILE", "NATS_USER",
                                     "NATS_PASSWORD", "NATS_PASSWORD_FILE", "TASKMODE_DELIVERY_SECRET",
                                     "TASKMODE_GATEWAY_URL_SECRET")


def _is_secret(name: str) -> bool:
    # NATS_<ROLE>_PASSWORD: a whole cluster's users, as compose's env file holds them.
    return name in SECRET_VARIABLES or (name.startswith("NATS_") and name.endswith("_PASSWORD"))


def child_environment(env: dict[str, str]) -> dict[str, str]:
    """This process's environment minus its secrets, plus `env` (the child's own settings)."""
    inherited = {k: v for k, v in os.environ.items() if not _is_secret(k)}
    return {**inherited, **env}


def start_service(
    module: str, *, env: dict[str, str], log_path: Path, name: str | None = None
) -> ChildProcess:
    """`python -m <module>` with `env` added to this process's environment (minus its secrets)."""
    full_env = child_environment(env)
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
    # role -> password: generated for our own nats-server, or given with `nats_url` for one that
    # asks for them (a NatsCluster's).
    nats_passwords: dict[str, str] = field(default_factory=dict)
    nats_monitor_port: int | None = None  # nats-server's HTTP monitoring, for benches
    infra: list[ChildProcess] = field(default_factory=list)
    services: dict[str, ChildProcess] = field(default_factory=dict)

    def start_infra(self, *, nats_port: int = -1, mongo_port: int | None = None) -> None:
        """Start nats-server (unless `nats_url` is set) and the MongoDB-wire server (unless `mongodb_url` is)."""
        if not self.nats_url:
            self.nats_passwords = natsauth.load_or_create_passwords(self.secrets_dir)
            nats = start_nats(self.data_dir, port=nats_port, passwords=self.nats_passwords,
                              monitor_port=self.nats_monitor_port)
            self.infra.append(nats)
            self.nats_url = nats.url
        elif self.nats_passwords:  # someone else's server that asks for them: hand them over as files
            natsauth.store_passwords(self.secrets_dir, self.nats_passwords)
        if not self.mongodb_url:
            mongo = start_mongo_wire(self.data_dir, port=mongo_port)
            self.infra.append(mongo)
            self.mongodb_url = mongo.url
            # The embedded server scans every collection with a TTL index on each read: sweep
            # expired tasks from the projection instead.
            self.service_env.setdefault("TASKMODE_EXPIRY_SWEEP_S", "60")

    def restart_nats(self, *, kill: bool = False) -> None:
        """Stop (or `kill` -9) the stack's own nats-server and start it again on the same port and store."""
        self.stop_nats(kill=kill)
        self.start_nats_again()

    def stop_nats(self, *, kill: bool = False) -> None:
        """Stop (or `kill` -9) the stack's own nats-server, leaving it down."""
        old = next(child for child in self.infra if child.name == "nats")
        if kill:
            old.kill()
        else:
            old.stop()
        self.infra.remove(old)

    def start_nats_again(self) -> None:
        """Start the stack's own nats-server on its port and store, after `stop_nats`."""
        port = int(self.nats_url.rsplit(":", 1)[1])
        self.infra.append(start_nats(self.data_dir, port=port, passwords=self.nats_passwords))

    def infra_child(self, name: str) -> ChildProcess:
        """The stack's own "nats" or "mongo" server."""
        return next(child for child in self.infra if child.name == name)

    def start_infra_again(self, name: str) -> ChildProcess:
        """Start the stack's "nats" or "mongo" server again (after it died), same port and data."""
        old = self.infra_child(name)
        old.stop()
        if name == "nats":
            new = start_nats(self.data_dir, port=int(self.nats_url.rsplit(":", 1)[1]), passwords=self.nats_passwords)
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

    @property
    def secrets_dir(self) -> Path:
        """Credentials (0600 files): the roles' NATS passwords and the gateway's access keys."""
        return self.data_dir / "secrets"

    def nats_credentials(self, role: str) -> tuple[str, str] | None:
        """(user, password) of a role on our own nats-server, or None when it asks for none."""
        password = self.nats_passwords.get(role)
        return None if password is None else (role, password)

    def env_for(self, service: str) -> dict[str, str]:
        env = {
            "NATS_URL": self.nats_url,
            "MONGODB_URL": self.mongodb_url,
            "TASKMODE_DATA_DIR": str(self.data_dir / "services" / service),
            "PYTHONUNBUFFERED": "1",
        }
        if service in self.nats_passwords:  # a file, so that the password is not in the environment
            env["NATS_USER"] = service
            env["NATS_PASSWORD_FILE"] = str(natsauth.password_file(self.secrets_dir, service))
        if service == "gateway":  # only the gateway checks signatures; no one else holds the keys
            env["TASKMODE_GATEWAY_PORT"] = str(self.gateway_port)
            keys_file = self.secrets_dir / "access-keys"
            natsauth.write_private(keys_file, self.access_keys + "\n")
            env["TASKMODE_ACCESS_KEYS_FILE"] = str(keys_file)
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
