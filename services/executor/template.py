"""Warm templates of Python instances: the executor's side of `python_template.py`.

A cold start through a template is a fork of a process that has its interpreter up and our worker
imported, in place of bwrap, an interpreter start and the imports (~150 ms on a small machine).

One template per function spec (`TemplateKey`: the function, its version and code, memory, disk,
network and environment): two functions, or two versions of one, never share a template, since
its forks share its uid and network namespace. A template starts with the first instance of its
spec that needs one, lives while it has instances and for `idle_s` after its last one ended, and
is replaced when it dies. Where forks cannot be isolated (the probe in the template fails: no
nested user namespaces), `Templates.fork` answers None and instances start as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import struct
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from services.executor import orphans
from services.executor import python_template as proto
from services.executor.sandbox import Confinement, Launch, Sandbox, die_with_parent

if TYPE_CHECKING:
    from services.executor.instance import FunctionSpec

log = logging.getLogger(__name__)

TEMPLATE_FILE: Final = Path(proto.__file__).resolve()
_CREDENTIALS: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid
_EXIT_AFTER_TEMPLATE_S: Final = 5.0  # an instance outlives its dead template by this at most
MAX_WORKER_CONCURRENCY: Final = 200  # invocations at once a Python worker takes (FC's most instanceConcurrency)
_HELLO_TIMEOUT_S: Final = 30.0  # a template that has not greeted by then is given up on


class TemplateGone(RuntimeError):
    """The template died (or was killed) before it answered; a new one may be started."""


@dataclass(frozen=True)
class TemplateKey:
    name: str
    version: str
    runtime: str
    code_checksum: str
    code_dir: str
    memory_mb: int
    disk_mb: int
    internet: bool
    environment: tuple[tuple[str, str], ...]
    # Process-limit room each instance needs beyond its own processes: a concurrent worker's
    # handler threads (RLIMIT_NPROC counts threads), as for an instance started on its own.
    threads: int = 0

    @classmethod
    def of(cls, spec: FunctionSpec) -> TemplateKey:
        concurrency = max(1, min(spec.instance_concurrency, MAX_WORKER_CONCURRENCY))
        return cls(name=spec.name, version=spec.version, runtime=spec.runtime, code_checksum=spec.code_checksum,
                   code_dir=str(spec.code_dir), memory_mb=spec.memory_mb, disk_mb=spec.disk_mb,
                   internet=spec.internet_access, environment=tuple(sorted(spec.environment.items())),
                   threads=concurrency + 1 if concurrency > 1 else 0)


async def _ready(fd: int, *, write: bool = False) -> None:
    """Until `fd` is readable (or writable)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        await ready
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


async def receive(sock: socket.socket) -> tuple[bytes, int]:
    """One message from a non-blocking SO_PASSCRED socket, and the sender's pid as we see it."""
    while True:
        try:
            data, ancillary, _flags, _address = sock.recvmsg(proto.MAX_MESSAGE, socket.CMSG_SPACE(_CREDENTIALS.size))
        except BlockingIOError:
            await _ready(sock.fileno())
            continue
        pid = 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _CREDENTIALS.unpack(payload[: _CREDENTIALS.size])[0]
        return data, pid


def _socketpair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    ours.setblocking(False)
    return ours, theirs


class ForkedProcess:
    """An instance forked by a template, as `Instance` uses a process (pid, streams, wait).

    Its parent is the template, not us: the template reports its end on `reports`; if the
    template itself dies first, so does the instance (its sandbox goes, or its death signal fires).
    """

    def __init__(self, *, pid: int, stdin: asyncio.StreamWriter, stdout: asyncio.StreamReader,
                 stderr: asyncio.StreamReader, reports: socket.socket, template_pid: int, isolated: bool,
                 on_exit: Callable[[], None]) -> None:
        self.pid = pid
        self.stdin: asyncio.StreamWriter | None = stdin
        self.stdout: asyncio.StreamReader | None = stdout
        self.stderr: asyncio.StreamReader | None = stderr
        self.isolated = isolated
        self._returncode: int | None = None
        self._reports = reports
        self._template_pid = template_pid
        self._pidfd = -1
        with contextlib.suppress(OSError):  # gone already: its end is reported all the same
            self._pidfd = os.pidfd_open(pid)
        self._on_exit = on_exit
        self._ended = asyncio.ensure_future(self._watch())

    @property
    def returncode(self) -> int | None:
        return self._returncode

    async def wait(self) -> int:
        return await asyncio.shield(self._ended)

    def signal_group(self, signum: signal.Signals) -> None:
        """`signum` to the instance (isolated: its namespace goes with it) or its process group."""
        if self.isolated:
            # By pidfd: once the template has reaped it, its pid may be someone else's.
            if self._returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if self._pidfd >= 0:
                        signal.pidfd_send_signal(self._pidfd, signum)
                    else:  # no pidfd (it was gone already, or an old kernel)
                        os.kill(self.pid, signum)
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    async def _watch(self) -> int:
        try:
            status = await self._exit_status()
        finally:
            self._reports.close()
            if self._pidfd >= 0:
                os.close(self._pidfd)
                self._pidfd = -1
            self._on_exit()
        self._returncode = status
        return status

    async def _exit_status(self) -> int:
        while True:
            data, sender = await receive(self._reports)
            if not data:
                break  # the template is gone: the instance goes with it
            if sender != self._template_pid:
                continue  # only the template's word counts
            message = proto.decode(data)
            if isinstance(message, proto.Exited):
                return os.waitstatus_to_exitcode(message.status)
        if self._pidfd >= 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_ready(self._pidfd), _EXIT_AFTER_TEMPLATE_S)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        return -signal.SIGKILL


async def _read_pipe(fd: int, transports: list[asyncio.BaseTransport]) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0))
    transports.append(transport)
    return reader


async def _write_pipe(fd: int, transports: list[asyncio.BaseTransport]) -> asyncio.StreamWriter:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, os.fdopen(fd, "wb", 0))
    transports.append(transport)
    return asyncio.StreamWriter(transport, protocol, None, loop)


class Template:
    """One template process (for one `TemplateKey`)."""

    def __init__(self, key: TemplateKey, *, sandbox: Sandbox, work_dir: Path, processes: int) -> None:
        """`processes`: the template's process limit, over all its instances (each has its own)."""
        self.key = key
        self.template_id = f"{key.name}-template-{uuid.uuid4().hex[:8]}"
        self.live = 0  # instances being forked or forked and not yet ended
        self.idle_since = time.monotonic()
        self.isolated = False
        self._sandbox = sandbox
        self._dir = work_dir / self.template_id
        self._processes = processes
        self._proc: asyncio.subprocess.Process | None = None
        self._launch: Launch | None = None
        self._control: socket.socket | None = None
        self._pid = 0  # the template's pid as we see it (in a sandbox: not bwrap's)
        self._started: asyncio.Future[None] | None = None
        self._killed = False
        self._log: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        """The template's own pid (in a sandbox: not bwrap's); 0 until it is ready."""
        return self._pid

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None and self._control is not None

    @property
    def settled(self) -> bool:
        """Its start has been tried (and succeeded or failed)."""
        return self._started is not None and self._started.done()

    async def ready(self, env: Mapping[str, str]) -> None:
        """Started (once, by whichever caller comes first) and greeted; raises if it did not start."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._start(env))
        # wait(), not await: a caller that gives up must not cancel the start others wait for.
        await asyncio.wait({self._started})
        if self._started.cancelled():
            raise TemplateGone(f"template {self.template_id} was killed while starting")
        self._started.result()

    async def _start(self, env: Mapping[str, str]) -> None:
        sandbox = self._sandbox
        paths = sandbox.paths(code_dir=Path(self.key.code_dir), instance_dir=self._dir)
        self._dir.mkdir(parents=True, exist_ok=True)
        own = {**env, "FC_INSTANCE_ID": self.template_id, "TMPDIR": paths.tmp_dir, "HOME": paths.tmp_dir}
        argv = [sys.executable, "-P", f"{paths.runtime_dir}/{TEMPLATE_FILE.name}",
                f"--tmp-mb={self.key.disk_mb}", f"--processes={sandbox.settings.max_processes + self.key.threads}"]
        if sandbox.enabled:
            argv.append("--isolate")
        confinement = Confinement(memory_mb=self.key.memory_mb, tmp_mb=self.key.disk_mb, internet=self.key.internet,
                                  processes=self._processes)
        self._launch = launch = sandbox.launch(argv, env=own, code_dir=Path(self.key.code_dir),
                                               instance_dir=self._dir, confinement=confinement)
        ours, theirs = _socketpair()
        self._control = ours
        try:
            self._proc = proc = await asyncio.create_subprocess_exec(
                *launch.argv, cwd=launch.cwd, env=launch.env, pass_fds=launch.pass_fds, start_new_session=True,
                preexec_fn=die_with_parent, stdin=theirs.fileno(), stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE)
        finally:
            theirs.close()
        if self._killed:
            raise TemplateGone(f"template {self.template_id} was killed while starting")
        await launch.started(proc.pid)
        group_file = orphans.register(self._dir.parent, pgid=proc.pid, instance_id=self.template_id)
        assert proc.stderr is not None
        self._log = asyncio.ensure_future(self._relay_log(proc.stderr, group_file))
        try:
            data, self._pid = await asyncio.wait_for(receive(ours), _HELLO_TIMEOUT_S)
        except TimeoutError as exc:
            raise TemplateGone(f"template {self.template_id} did not start within {_HELLO_TIMEOUT_S:g}s") from exc
        if not data:
            raise TemplateGone(f"template {self.template_id} exited before it was ready")
        hello = proto.decode(data)
        assert isinstance(hello, proto.Hello)
        self.isolated = hello.isolated
        if sandbox.enabled and not hello.isolated:
            log.warning("instances cannot be forked from a template here (%s); each starts on its own", hello.reason,
                        extra={"function": self.key.name, "reason": hello.reason})
        self.idle_since = time.monotonic()
        log.info("template %s started (pid %d)", self.template_id, proc.pid)

    async def _relay_log(self, stream: asyncio.StreamReader, group_file: Path) -> None:
        try:
            while line := await stream.readline():
                log.warning("template %s: %s", self.template_id, line.decode(errors="replace").rstrip())
        finally:
            orphans.unregister(group_file)

    async def fork(self, env: Mapping[str, str]) -> ForkedProcess:
        """A new instance of this template's function, running `python_worker.main`."""
        control = self._control
        if not self.alive or control is None:
            raise TemplateGone(f"template {self.template_id} is not running")
        ours, theirs = _socketpair()
        stdin_read, stdin_write = os.pipe2(os.O_CLOEXEC)
        stdout_read, stdout_write = os.pipe2(os.O_CLOEXEC)
        stderr_read, stderr_write = os.pipe2(os.O_CLOEXEC)
        transports: list[asyncio.BaseTransport] = []
        self.live += 1  # not idle (nor reaped) while it forks
        try:
            try:
                request = proto.encode(proto.Fork(env=dict(env)))
                await _send(control, request, [stdin_read, stdout_write, stderr_write, theirs.fileno()])
            except OSError as exc:
                raise TemplateGone(f"template {self.template_id} went away: {exc}") from exc
            finally:
                for fd in (stdin_read, stdout_write, stderr_write):
                    os.close(fd)
                theirs.close()
            data, pid = await receive(ours)
            if not data:
                raise TemplateGone(f"template {self.template_id} went away while forking")
            message = proto.decode(data)
            if isinstance(message, proto.Failed):
                raise OSError(f"the template could not fork an instance: {message.message}")
            if not isinstance(message, proto.Started) or pid in (0, self._pid):
                raise OSError("the forked instance ended before it started")
            stdin = await _write_pipe(stdin_write, transports)
            stdout = await _read_pipe(stdout_read, transports)
            stderr = await _read_pipe(stderr_read, transports)
        except BaseException:
            self._instance_ended()
            # The instance (if it started) reads the end of its stdin and exits.
            for transport in transports:
                transport.close()
            for fd in (stdin_write, stdout_read, stderr_read)[len(transports):]:
                os.close(fd)
            ours.close()
            raise
        return ForkedProcess(pid=pid, stdin=stdin, stdout=stdout, stderr=stderr, reports=ours,
                             template_pid=self._pid, isolated=self.isolated, on_exit=self._instance_ended)

    def _instance_ended(self) -> None:
        self.live -= 1
        self.idle_since = time.monotonic()

    async def kill(self) -> None:
        """Kill the template (and so every instance it forked); idempotent."""
        self._killed = True
        if self._started is not None and not self._started.done():
            self._started.cancel()
            await asyncio.wait({self._started})
        proc = self._proc
        if self._control is not None:
            self._control.close()
            self._control = None
        if proc is not None:
            # The group holds bwrap and the sandbox. Not proc.kill() as well: it polls first, and
            # reaping bwrap there would leave asyncio's own wait without an exit status.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        if self._log is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._log, 1.0)
        if self._launch is not None:
            await self._launch.close()
            self._launch = None
        await asyncio.to_thread(_remove_tree, self._dir)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


async def _send(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    while True:
        try:
            socket.send_fds(sock, [data], fds)
            return
        except BlockingIOError:
            await _ready(sock.fileno(), write=True)


class Templates:
    """The live templates of a pool, by spec."""

    def __init__(self, sandbox: Sandbox, *, work_dir: Path, instances_per_template: int) -> None:
        self._sandbox = sandbox
        self._work_dir = work_dir
        # The template's process limit bounds all its instances together; each gets its own.
        self._instances_per_template = instances_per_template
        self._templates: dict[TemplateKey, Template] = {}
        self._closed = False
        self._refused = False  # forks cannot be confined here: instances start on their own
        self._retiring: set[asyncio.Future[None]] = set()

    def pids(self) -> list[int]:
        """The pids of the running templates (for tests and the curious)."""
        return [template.pid for template in self._templates.values() if template.alive and template.pid]

    async def fork(self, spec: FunctionSpec, env: Mapping[str, str]) -> ForkedProcess | None:
        """An instance of `spec` forked from its template (started if need be), or None when
        templates are off or cannot confine their forks here (start the instance directly)."""
        if self._closed or not self._sandbox.settings.fork_templates:
            return None
        key = TemplateKey.of(spec)
        for _ in range(2):  # a template found dead is replaced once
            if self._refused:
                return None
            template = self._templates.get(key)
            if template is None or (template.settled and not template.alive):
                if template is not None:
                    await self._drop(template)
                processes = (self._sandbox.settings.max_processes + key.threads) * (self._instances_per_template + 1)
                template = self._templates[key] = Template(key, sandbox=self._sandbox, work_dir=self._work_dir,
                                                           processes=processes)
                self._retire_others(key)
            try:
                await template.ready(env)
            except (OSError, TemplateGone, AssertionError, ValueError) as exc:
                log.warning("a template did not start; the instance starts on its own",
                            extra={"function": spec.name, "error": str(exc)})
                await self._drop(template)
                return None
            if self._sandbox.enabled and not template.isolated:
                # A property of the host (no nested user namespaces): not asked again.
                self._refused = True
                await self._drop(template)
                return None
            try:
                return await template.fork(env)
            except TemplateGone:
                await self._drop(template)
        return None

    def _retire_others(self, key: TemplateKey) -> None:
        """Another spec of the same function version took over: its templates without instances go
        (in the background: not on the way of the instance that is starting)."""
        stale = [t for k, t in self._templates.items()
                 if k != key and (k.name, k.version) == (key.name, key.version) and t.live == 0]
        for template in stale:
            del self._templates[template.key]
            retiring = asyncio.ensure_future(template.kill())
            self._retiring.add(retiring)
            retiring.add_done_callback(self._retiring.discard)

    async def _drop(self, template: Template) -> None:
        if self._templates.get(template.key) is template:
            del self._templates[template.key]
        await template.kill()

    async def reap(self, idle_s: float) -> None:
        """Kill templates without instances for `idle_s`, and forget dead ones."""
        cutoff = time.monotonic() - idle_s
        doomed = [t for t in self._templates.values()
                  if t.settled and t.live == 0
                  and (t.idle_since <= cutoff or not t.alive)]
        for template in doomed:
            await self._drop(template)

    async def close(self) -> None:
        self._closed = True
        doomed, self._templates = list(self._templates.values()), {}
        await asyncio.gather(*(template.kill() for template in doomed), *self._retiring, return_exceptions=True)
