"""The sandbox every function instance runs in: bubblewrap, a uid of its own, limits, no network.

What an instance sees and may do (`Sandbox.launch` builds all of it, in one place, so that any
future way of starting instances is wrapped the same way):

- its own PID, mount, IPC, UTS and cgroup namespaces: it sees only its own processes, and when
  the sandbox's first process dies the kernel kills every other one, `setsid` children included;
- a root file system made of read-only binds: `/usr` (and the `/bin`, `/lib*` links), a few
  files of `/etc`, the Python runtime, its function's code at `/code`, the worker scripts at
  `/opt/taskmode`; a private, size-capped tmpfs at `/tmp`; a minimal `/dev`; its own `/proc`.
  Nothing of the data directory, other functions' code, or the services' processes;
- a uid that is not the services': with a root executor, bwrap sets up the namespaces and
  `setpriv` then drops to a uid leased for this instance alone (no capabilities, no new
  privileges); with an unprivileged executor, a user namespace maps the sandbox uid onto the
  executor's own (weaker: outside the namespace it is the executor's uid);
- resource limits per process (`prlimit`): data segment = the function's `memorySize`, a
  process count, an open-file count, no core files;
- a network namespace of its own: just a loopback when `internetAccess` is false; otherwise
  slirp4netns gives it outbound access with the host's loopback (where NATS and MongoDB listen)
  out of reach.

Python instances are forked from a template (`template.py`, `python_template.py`): the template,
one per function spec, is what is launched here, and each instance forked from it adds a user,
PID, mount and IPC namespace of its own (it is PID 1 there, so the kernel still kills whatever it
started when it dies), a private `/tmp` and its own process limit, with no capabilities. Its
instances share the template's uid, network namespace and limits' totals: they are all of one
function (one code version, one configuration), never of another.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from shared.settings import env_bool, env_int

log = logging.getLogger(__name__)

CODE_DIR: Final = "/code"
TMP_DIR: Final = "/tmp"
RUNTIME_DIR: Final = "/opt/taskmode"  # the worker scripts, read-only
SOCKET_DIR: Final = "/run/taskmode"  # the one writable bind: where a custom runtime's relay listens
MIB: Final = 1024 * 1024

# Host files a program commonly reads; anything else of /etc stays invisible.
_ETC_FILES: Final = (
    "hosts", "nsswitch.conf", "ssl", "ca-certificates", "ca-certificates.conf", "localtime",
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "mime.types", "protocols", "services",
)
_DEVICES: Final = ("null", "zero", "full", "random", "urandom")
SLIRP_READY_TIMEOUT_S: Final = 10.0


class SandboxUnavailable(RuntimeError):
    """A sandbox cannot be made here (tool missing, namespaces refused); the message says why."""


@dataclass(frozen=True)
class SandboxSettings:
    """TASKMODE_SANDBOX (true; false runs instances as plain processes), and the limits."""

    enabled: bool = True
    uid_base: int = 64000  # a root executor gives each instance a uid from uid_base on
    uid_count: int = 1000
    max_processes: int = 64  # per instance
    max_open_files: int = 1024  # per process
    fork_templates: bool = True  # Python instances are forked from a warm template (template.py)

    @classmethod
    def from_env(cls) -> SandboxSettings:
        return cls(
            enabled=env_bool("TASKMODE_SANDBOX", True),
            uid_base=env_int("TASKMODE_SANDBOX_UID_BASE", 64000),
            uid_count=env_int("TASKMODE_SANDBOX_UID_COUNT", 1000),
            max_processes=env_int("TASKMODE_SANDBOX_MAX_PROCESSES", 64),
            max_open_files=env_int("TASKMODE_SANDBOX_MAX_OPEN_FILES", 1024),
            fork_templates=env_bool("TASKMODE_FORK_TEMPLATES", True),
        )


@dataclass(frozen=True)
class Confinement:
    """One instance's limits, from its function."""

    memory_mb: int
    tmp_mb: int
    internet: bool
    processes: int = 0  # the process limit, when not the settings' per-instance one (a template's)
    # Threads the runtime itself runs beyond the function's own processes (a concurrent Python
    # worker's handler threads): the process limit counts threads too.
    threads: int = 0


@dataclass
class Launch:
    """How to start one instance's process, and the resources that live as long as it does.

    Call `started(pid)` once the process exists (it wires up the network, if any) and `close()`
    when it is gone.
    """

    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    pass_fds: tuple[int, ...] = ()
    _info_fd: int = -1  # bwrap writes the sandbox's pid here
    _block_fd: int = -1  # the sandbox waits for a byte here before it runs the command
    _uid_lock: int = -1
    _network: asyncio.subprocess.Process | None = None
    _slirp: Sequence[str] = ()
    _rootless: bool = False

    async def started(self, pid: int) -> None:
        """Give the sandbox its network (when it has one), then let its command run."""
        for fd in self.pass_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pass_fds = ()
        if self._block_fd < 0:
            return
        try:
            if self._slirp:
                sandbox_pid = await asyncio.wait_for(asyncio.to_thread(_read_child_pid, self._info_fd),
                                                     SLIRP_READY_TIMEOUT_S)
                await self._connect_network(sandbox_pid)
        finally:
            with contextlib.suppress(OSError):
                os.write(self._block_fd, b"1")  # on failure the command runs offline, and says so

    async def _connect_network(self, sandbox_pid: int) -> None:
        ready_read, ready_write = os.pipe()
        try:
            argv = [*self._slirp, "--ready-fd", str(ready_write)]
            if self._rootless:  # join the sandbox's user namespace first, to be allowed into its netns
                argv.append(f"--userns-path=/proc/{sandbox_pid}/ns/user")
            self._network = await asyncio.create_subprocess_exec(
                *argv, str(sandbox_pid), "tap0", pass_fds=(ready_write,), preexec_fn=die_with_parent,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            os.close(ready_write)
            ready_write = -1
            ready = await asyncio.wait_for(asyncio.to_thread(os.read, ready_read, 1), SLIRP_READY_TIMEOUT_S)
            if ready != b"1":
                log.error("the sandbox's network did not come up", extra={"pid": sandbox_pid})
        finally:
            for fd in (ready_read, ready_write):
                if fd >= 0:
                    os.close(fd)

    async def close(self) -> None:
        """After the process is gone: stop its network and give back its uid and descriptors."""
        if self._network is not None and self._network.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._network.kill()
            await self._network.wait()
        self.release()

    def release(self) -> None:
        """Close every descriptor this launch holds (idempotent)."""
        for fd in [*self.pass_fds, self._info_fd, self._block_fd, self._uid_lock]:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.pass_fds = ()
        self._info_fd = self._block_fd = self._uid_lock = -1


def _read_child_pid(fd: int) -> int:
    buf = b""
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            raise SandboxUnavailable("bwrap did not report the sandbox's pid")
        buf += chunk
        with contextlib.suppress(ValueError):
            return int(json.loads(buf)["child-pid"])


_PR_SET_PDEATHSIG: Final = 1


def die_with_parent() -> None:
    """Runs in a child before exec: if the executor dies (even by SIGKILL), so does the child."""
    if sys.platform == "linux":
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class _Args:
    """bwrap arguments, creating each parent directory once and world-traversable (bwrap's own
    implicit directories are 0700, which a dropped uid could not enter)."""

    def __init__(self) -> None:
        self.argv: list[str] = []
        self._dirs: set[str] = {"/"}

    def parents(self, dest: str) -> None:
        for parent in reversed(Path(dest).parents):
            self.dir(str(parent))

    def dir(self, path: str) -> None:
        if path not in self._dirs:
            self.parents(path)
            self._dirs.add(path)
            self.argv += ["--perms", "0755", "--dir", path]

    def add(self, option: str, *values: str, dest: str | None = None) -> None:
        if dest is not None:
            self.parents(dest)
            self._dirs.add(dest)
        self.argv += [option, *values]


def _system_roots(args: _Args) -> None:
    args.add("--ro-bind", "/usr", "/usr", dest="/usr")
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = Path("/") / name
        if host.is_symlink():
            args.add("--symlink", os.readlink(host), str(host), dest=str(host))
        elif host.is_dir():
            args.add("--ro-bind", str(host), str(host), dest=str(host))


def _python_roots() -> list[str]:
    """Where the interpreter lives beyond /usr (a venv, a pyenv build), bound at the same paths."""
    roots: list[str] = []
    for prefix in (sys.prefix, sys.base_prefix, str(Path(sys.executable).resolve().parents[1])):
        real = str(Path(prefix).resolve())
        if real == "/usr" or real.startswith("/usr/") or any(real == r or real.startswith(r + "/") for r in roots):
            continue
        roots.append(real)
        if prefix != real and prefix not in roots:
            roots.append(prefix)  # a venv's own path, if it is a symlink
    return roots


class UidLeases:
    """Uids for root-executor instances, one per live instance across every executor of the host.

    A uid is held by an flock on a file in a host-wide directory, so the kernel frees it when the
    holder dies; per-uid kernel accounting (the process limit) then stays per instance.
    """

    def __init__(self, *, base: int, count: int, lock_dir: Path | None = None) -> None:
        self._base = base
        self._count = count
        self._dir = lock_dir or Path(tempfile.gettempdir()) / "taskmode_sandbox_uids"
        self._next = 0

    def acquire(self) -> tuple[int, int]:
        """A free uid and the descriptor that holds it (close it to give the uid back)."""
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for step in range(self._count):
            offset = (self._next + step) % self._count
            fd = os.open(self._dir / str(self._base + offset), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._next = offset + 1
            return self._base + offset, fd
        raise SandboxUnavailable(f"all {self._count} sandbox uids from {self._base} are in use")


@dataclass(frozen=True)
class InstancePaths:
    """Where an instance's process finds things, as it sees them (inside the sandbox or not)."""

    code_dir: str
    tmp_dir: str
    runtime_dir: str  # the worker scripts
    socket_dir: str  # where a custom runtime's relay listens


class Sandbox:
    """Builds the command line of a sandboxed instance (or of a plain one, when disabled)."""

    def __init__(self, settings: SandboxSettings, *, support_dir: Path, worker_files: Mapping[str, Path]) -> None:
        self.settings = settings
        self._worker_files = dict(worker_files)  # name inside RUNTIME_DIR -> host file
        self._rootless = os.geteuid() != 0
        self._uids = UidLeases(base=settings.uid_base, count=settings.uid_count)
        self._support = support_dir
        self._bwrap = shutil.which("bwrap") or ""
        self._slirp = shutil.which("slirp4netns") or ""
        self._setpriv = shutil.which("setpriv") or ""
        self._prlimit = shutil.which("prlimit") or ""

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def paths(self, *, code_dir: Path, instance_dir: Path) -> InstancePaths:
        """The paths an instance is told about: fixed inside a sandbox, the host's otherwise."""
        if self.enabled:
            return InstancePaths(code_dir=CODE_DIR, tmp_dir=TMP_DIR, runtime_dir=RUNTIME_DIR, socket_dir=SOCKET_DIR)
        runtime = {path.parent for path in self._worker_files.values()}
        assert len(runtime) == 1, "the worker scripts live in one directory"
        return InstancePaths(code_dir=str(code_dir), tmp_dir=str(instance_dir / "tmp"),
                             runtime_dir=str(runtime.pop()), socket_dir=str(instance_dir / "run"))

    def check(self) -> None:
        """Raise `SandboxUnavailable` unless a sandbox can be made here (run once at start)."""
        if not self.enabled:
            return
        tools = {"bwrap": self._bwrap, "slirp4netns": self._slirp, "prlimit": self._prlimit}
        if not self._rootless:
            tools["setpriv"] = self._setpriv
        missing = [name for name, path in tools.items() if not path]
        if missing:
            raise SandboxUnavailable(
                f"{', '.join(missing)} not found: install bubblewrap, slirp4netns and util-linux "
                "(make install does), or set TASKMODE_SANDBOX=false to run functions unsandboxed")
        launch = self.launch(["true"], env={"PATH": "/usr/bin:/bin"}, code_dir=self._support,
                             instance_dir=self._support, confinement=Confinement(memory_mb=64, tmp_mb=1, internet=False))
        try:
            done = subprocess.run(launch.argv, env=launch.env, pass_fds=launch.pass_fds, capture_output=True,
                                  timeout=30, check=False)
        finally:
            launch.release()
        if done.returncode != 0:
            raise SandboxUnavailable(
                f"bwrap cannot create a sandbox here ({done.stderr.decode(errors='replace').strip()}); "
                "user namespaces may be disabled. Set TASKMODE_SANDBOX=false to run functions unsandboxed")

    def _write_support_files(self) -> None:
        if (self._support / "resolv.conf").exists():
            return
        self._support.mkdir(parents=True, exist_ok=True)
        base, count = self.settings.uid_base, self.settings.uid_count
        ids = range(base, base + (1 if self._rootless else count))
        users = "".join(f"sbx:x:{uid}:{uid}:function:/tmp:/usr/sbin/nologin\n" for uid in ids)
        groups = "".join(f"sbx:x:{uid}:\n" for uid in ids)
        files = {"passwd": "root:x:0:0:root:/root:/usr/sbin/nologin\n" + users, "group": "root:x:0:\n" + groups,
                 # slirp4netns answers DNS on 10.0.2.3 (it forwards to the host's resolver).
                 "resolv.conf": "nameserver 10.0.2.3\n"}
        for name, text in files.items():
            staging = self._support / f".{name}.{os.getpid()}"
            staging.write_text(text)
            staging.chmod(0o644)
            staging.rename(self._support / name)

    def launch(self, command: Sequence[str], *, env: Mapping[str, str], code_dir: Path, instance_dir: Path,
               confinement: Confinement, socket_dir: Path | None = None) -> Launch:
        """How to run `command` for one instance; `env` is its whole environment.

        `instance_dir` is the instance's scratch directory on the host (its /tmp when unsandboxed);
        `socket_dir`, when given, is bound writable at SOCKET_DIR.
        """
        if not self.enabled:
            (instance_dir / "tmp").mkdir(parents=True, exist_ok=True)
            return Launch(argv=list(command), env=dict(env), cwd=str(code_dir))
        self._write_support_files()
        launch = Launch(argv=[], env=dict(env), cwd=None, _rootless=self._rootless)
        try:
            launch.argv = self._bwrap_argv(command, launch, code_dir=code_dir, confinement=confinement,
                                           socket_dir=socket_dir)
        except BaseException:
            launch.release()
            raise
        return launch

    def _path_fd(self, launch: Launch, path: Path) -> str:
        # By descriptor: the executor opens the path (its parents may be closed to the sandbox uid).
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        launch.pass_fds += (fd,)
        return str(fd)

    def _bwrap_argv(self, command: Sequence[str], launch: Launch, *, code_dir: Path, confinement: Confinement,
                    socket_dir: Path | None) -> list[str]:
        settings = self.settings
        args = _Args()
        args.add(self._bwrap, "--die-with-parent", "--unshare-pid", "--unshare-net", "--unshare-ipc",
                 "--unshare-uts", "--unshare-cgroup-try", "--hostname", "fc-instance")
        if self._rootless:
            uid = settings.uid_base
            # (Not --disable-userns: bwrap makes it a second, nested namespace that slirp4netns cannot
            # join to give the sandbox its network.)
            args.add("--unshare-user", "--uid", str(uid), "--gid", str(uid))
        else:
            uid, launch._uid_lock = self._uids.acquire()
        _system_roots(args)
        args.dir("/etc")
        for name in _ETC_FILES:
            args.add("--ro-bind-try", f"/etc/{name}", f"/etc/{name}")
        for name in ("passwd", "group"):
            args.add("--ro-bind-fd", self._path_fd(launch, self._support / name), f"/etc/{name}", dest=f"/etc/{name}")
        if confinement.internet:
            args.add("--ro-bind-fd", self._path_fd(launch, self._support / "resolv.conf"), "/etc/resolv.conf",
                     dest="/etc/resolv.conf")
        # The private /tmp comes before the interpreter's binds: a checkout under /tmp (a venv at
        # /tmp/x/.venv) would otherwise be hidden by it.
        args.add("--perms", "1777", "--size", str(confinement.tmp_mb * MIB), "--tmpfs", TMP_DIR, dest=TMP_DIR)
        for root in _python_roots():
            args.add("--ro-bind-fd", self._path_fd(launch, Path(root)), root, dest=root)
        args.add("--proc", "/proc", dest="/proc")
        # A /dev of our own rather than bwrap's --dev, which slirp4netns cannot join from outside.
        args.add("--perms", "0755", "--tmpfs", "/dev", dest="/dev")
        for device in _DEVICES:
            args.add("--dev-bind", f"/dev/{device}", f"/dev/{device}")
        for link, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                             ("stderr", "/proc/self/fd/2"), ("shm", TMP_DIR)):
            args.add("--symlink", target, f"/dev/{link}")
        args.add("--ro-bind-fd", self._path_fd(launch, code_dir), CODE_DIR, dest=CODE_DIR)
        args.dir(RUNTIME_DIR)
        for name, host in self._worker_files.items():
            inside = f"{RUNTIME_DIR}/{name}"
            args.add("--ro-bind-fd", self._path_fd(launch, host), inside, dest=inside)
        if socket_dir is not None:
            if not self._rootless:
                os.chown(socket_dir, uid, uid)
            socket_dir.chmod(0o700)
            args.add("--bind-fd", self._path_fd(launch, socket_dir), SOCKET_DIR, dest=SOCKET_DIR)
        args.add("--chdir", CODE_DIR)
        if confinement.internet:
            info_read, info_write = os.pipe()
            block_read, block_write = os.pipe()
            launch._info_fd, launch._block_fd = info_read, block_write
            os.set_inheritable(info_write, True)
            os.set_inheritable(block_read, True)
            launch.pass_fds += (info_write, block_read)
            args.add("--info-fd", str(info_write), "--block-fd", str(block_read))
            launch._slirp = [self._slirp, "--configure", "--mtu=65520", "--disable-host-loopback"]
            if not self._rootless:  # slirp4netns runs as root here: let it shed that
                launch._slirp = [*launch._slirp, "--enable-sandbox", "--enable-seccomp"]
        if not self._rootless:
            args.add("--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--", self._setpriv,
                     f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
                     "--bounding-set=-all", "--no-new-privs")
        args.add("--", self._prlimit, f"--data={confinement.memory_mb * MIB}",
                 f"--nproc={(confinement.processes or settings.max_processes) + confinement.threads}",
                 f"--nofile={settings.max_open_files}", "--core=0", "--")
        return [*args.argv, *command]
