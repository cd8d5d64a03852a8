"""What `make run` checks before it starts anything: settings, ports, and a second launcher.

Each check answers with lines meant for a person at a terminal: what is wrong and which setting
changes it. Nothing here starts a process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from services.executor.settings import ExecutorSettings
from services.gateway.settings import ACCESS_KEYS_VAR, AUTH_DISABLED_VAR, GatewaySettings
from services.projection.settings import ProjectionSettings
from services.triggers.settings import TriggersSettings
from services.deliverer.settings import DelivererSettings
from services.scheduler.settings import SchedulerSettings
from shared.errors import TaskmodeError
from shared.settings import env_bool, env_int

STREAM_REPLICAS_VAR = "TASKMODE_STREAM_REPLICAS"

# Each worker's metrics port setting and its default (the services' own defaults).
METRICS_PORT_VARS: dict[str, tuple[str, int]] = {
    "scheduler": ("TASKMODE_SCHEDULER_METRICS_PORT", 9101),
    "executor": ("TASKMODE_EXECUTOR_METRICS_PORT", 9102),
    "projection": ("TASKMODE_PROJECTION_METRICS_PORT", 9103),
    "triggers": ("TASKMODE_TRIGGERS_METRICS_PORT", 9104),
    "deliverer": ("TASKMODE_DELIVERER_METRICS_PORT", 9105),
}
GATEWAY_METRICS_PORT_VAR = "TASKMODE_GATEWAY_METRICS_PORT"

_SETTINGS_READERS: dict[str, Callable[[], object]] = {
    "gateway": GatewaySettings.from_env,
    "scheduler": SchedulerSettings.from_env,
    "executor": ExecutorSettings.from_env,
    "projection": ProjectionSettings.from_env,
    "triggers": TriggersSettings.from_env,
    "deliverer": DelivererSettings.from_env,
}


class PreflightError(Exception):
    """Why the stack cannot start; `lines` are printed as they are, one problem per line."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


@dataclass(frozen=True)
class PortClaim:
    """A port the stack is about to listen on, and the setting that chose it."""

    variable: str
    host: str
    port: int


@dataclass(frozen=True)
class LaunchPlan:
    """Everything `make run` will start, read from the environment once."""

    data_dir: Path
    gateway_host: str
    gateway_port: int
    gateway_metrics_port: int  # 0: /metrics on the API port only
    metrics_host: str
    metrics_ports: dict[str, int]  # worker service -> port (0: none)
    nats_port: int | None  # None: NATS_URL is given, no nats-server is started
    mongo_port: int | None  # None: MONGODB_URL is given, no MongoDB-wire server is started
    nats_url: str
    mongodb_url: str
    auth_disabled: bool

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> LaunchPlan:
        """Read the launcher's settings; `PreflightError` lists every malformed one."""
        problems: list[str] = []

        def number(variable: str, default: int) -> int:
            with _environment(env):
                try:
                    return env_int(variable, default)
                except TaskmodeError as err:
                    problems.append(f"{err.message}")
                    return default

        with _environment(env):
            try:
                auth_disabled = env_bool(AUTH_DISABLED_VAR, False)
            except TaskmodeError as err:
                problems.append(err.message)
                auth_disabled = False
        nats_url = env.get("NATS_URL", "")
        mongodb_url = env.get("MONGODB_URL", "")
        plan = cls(
            data_dir=Path(env.get("TASKMODE_DATA_DIR") or ".data").resolve(),
            gateway_host=env.get("TASKMODE_GATEWAY_HOST") or "127.0.0.1",
            gateway_port=number("TASKMODE_GATEWAY_PORT", 9000),
            gateway_metrics_port=number(GATEWAY_METRICS_PORT_VAR, 0),
            metrics_host=env.get("TASKMODE_METRICS_HOST") or "127.0.0.1",
            metrics_ports={service: number(var, default) for service, (var, default) in METRICS_PORT_VARS.items()},
            nats_port=None if nats_url else number("TASKMODE_NATS_PORT", 4222),
            mongo_port=None if mongodb_url else number("TASKMODE_MONGO_PORT", 27017),
            nats_url=nats_url,
            mongodb_url=mongodb_url,
            auth_disabled=auth_disabled,
        )
        if problems:
            raise PreflightError(problems)
        return plan

    def port_claims(self) -> list[PortClaim]:
        """Every port this plan listens on, with the setting that names it."""
        claims = [PortClaim("TASKMODE_GATEWAY_PORT", self.gateway_host, self.gateway_port)]
        if self.gateway_metrics_port:
            claims.append(PortClaim(GATEWAY_METRICS_PORT_VAR, self.gateway_host, self.gateway_metrics_port))
        for service, port in self.metrics_ports.items():
            if port:
                claims.append(PortClaim(METRICS_PORT_VARS[service][0], self.metrics_host, port))
        if self.nats_port is not None:
            claims.append(PortClaim("TASKMODE_NATS_PORT", "127.0.0.1", self.nats_port))
        if self.mongo_port is not None:
            claims.append(PortClaim("TASKMODE_MONGO_PORT", "127.0.0.1", self.mongo_port))
        return claims

    def service_env(self) -> dict[str, str]:
        """Settings every service gets from the launcher, so that what runs is what the banner says."""
        env = {var: str(self.metrics_ports[service]) for service, (var, _) in METRICS_PORT_VARS.items()}
        env[GATEWAY_METRICS_PORT_VAR] = str(self.gateway_metrics_port)
        return env


@contextlib.contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    """Run a settings reader against `env` instead of this process's environment."""
    wanted, saved = dict(env), dict(os.environ)  # `env` may be os.environ itself
    os.environ.clear()
    os.environ.update(wanted)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def check_ports(claims: list[PortClaim]) -> None:
    """`PreflightError` with one line for the first port that is taken or claimed twice."""
    seen: dict[int, str] = {}
    for claim in claims:
        if not 1 <= claim.port <= 65535:
            raise PreflightError([f"{claim.variable}={claim.port} is not a port number (1-65535)"])
        if claim.port in seen:
            raise PreflightError([f"port {claim.port} is set twice, by {seen[claim.port]} and {claim.variable}: "
                                  f"change {claim.variable}"])
        seen[claim.port] = claim.variable
        if _port_taken(claim.host, claim.port):
            raise PreflightError([f"port {claim.port} ({claim.host}) is already in use: "
                                  f"set {claim.variable} to a free port"])


def _port_taken(host: str, port: int) -> bool:
    # SO_REUSEADDR as the servers themselves use it: a port only in TIME_WAIT is free for them.
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            return err.errno == errno.EADDRINUSE
    return False


def check_service_settings(envs: Mapping[str, Mapping[str, str]]) -> None:
    """Read each service's settings from the environment it will get; `PreflightError` lists
    every problem (the services would each stop on the same one, one after another)."""
    problems: list[str] = []
    for service, env in envs.items():
        with _environment(env):
            try:
                settings = _SETTINGS_READERS[service]()
            except TaskmodeError as err:
                problems.append(f"{service}: {err.message}")
                continue
        if isinstance(settings, GatewaySettings) and not settings.auth_disabled and not settings.access_keys:
            problems.append(f"gateway: {ACCESS_KEYS_VAR} is empty; give id:secret or set {AUTH_DISABLED_VAR}=true")
    if problems:
        raise PreflightError(sorted(set(problems)))


def check_single_node_replicas(env: Mapping[str, str], plan: LaunchPlan) -> None:
    """A nats-server of our own is one node: more replicas than that can never be placed."""
    with _environment(env):
        try:
            replicas = env_int(STREAM_REPLICAS_VAR, 1)
        except TaskmodeError as err:
            raise PreflightError([err.message]) from err
    if plan.nats_port is not None and replicas > 1:
        raise PreflightError([f"{STREAM_REPLICAS_VAR}={replicas} needs a NATS cluster, but make run starts a single "
                              f"nats-server: unset {STREAM_REPLICAS_VAR} or point NATS_URL at a cluster"])


# --- one launcher per data directory -------------------------------------------------------

STACK_FILE = "stack.json"
_LOCK_FILE = "run.lock"


def hold_run_lock(data_dir: Path) -> IO[str]:
    """Take the data directory's lock for as long as the returned file stays open.

    An flock dies with its holder, even by SIGKILL, so a crashed launcher never leaves a lock
    behind. `PreflightError` names the running launcher when the lock is taken.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = open(data_dir / _LOCK_FILE, "a+")  # noqa: SIM115 - held open on purpose
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        running = read_stack_file(data_dir)
        where = f" (pid {running.get('pid')}, API {running.get('api', '?')})" if running else ""
        raise PreflightError([f"taskmode is already running on {data_dir}{where}; "
                              "stop it first, or set TASKMODE_DATA_DIR to another directory"]) from None
    os.set_inheritable(lock.fileno(), False)
    return lock


def is_running(data_dir: Path) -> bool:
    """Whether a launcher holds `data_dir`'s lock right now."""
    if not (data_dir / _LOCK_FILE).exists():
        return False
    with open(data_dir / _LOCK_FILE, "a+") as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(probe, fcntl.LOCK_UN)
    return False


def write_stack_file(data_dir: Path, info: dict[str, Any]) -> None:
    """Record where the running stack is, for `make rebuild-projection` and a second launcher."""
    tmp = data_dir / f"{STACK_FILE}.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(data_dir / STACK_FILE)


def read_stack_file(data_dir: Path) -> dict[str, Any]:
    try:
        loaded = json.loads((data_dir / STACK_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return loaded if isinstance(loaded, dict) else {}
