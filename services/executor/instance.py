"""A function instance: one worker process that runs user handlers.

An `Instance` is one OS process (a session leader, so a kill reaches the whole tree) that serves
up to `concurrency` invocations at a time (FC's instanceConcurrency; one unless the function
asks for more and the runtime can), started inside the sandbox `sandbox.py` builds; subclasses
speak a runtime's protocol (`python_instance.py`, `custom_runtime.py`) and `pool.py` leases them.
Nothing here knows about NATS or MongoDB; the executor service drives it.

With several invocations in flight on one instance:
- output a runtime attributes to one invocation (the Python worker tags each line) goes to that
  invocation's log; output it cannot attribute goes to the log of every invocation in flight;
- a timed-out invocation fails at once, and the instance *retires*: it takes no new invocation
  and is killed as soon as the others have ended (each is bounded by the same timeout), so they
  are not failed for their neighbour's fault;
- `kill` (a stop) ends the whole process, as FC stops the instance: every invocation in flight
  on it ends as killed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar, Final, Protocol

import msgspec
import psutil

from services.executor import orphans
from services.executor.sandbox import Confinement, Launch, Sandbox, die_with_parent
from services.executor.template import ForkedProcess

logger = logging.getLogger(__name__)
output_logger = logging.getLogger(f"{__name__}.output")  # what user code prints, per instance

KILL_GRACE_S: Final = 0.3  # SIGTERM -> SIGKILL
OUTPUT_TAIL_BYTES: Final = 4096
UNHANDLED: Final = "UnhandledInvocationError"
# What one invocation's log may hold; beyond it the start is dropped (the end explains a failure).
INVOCATION_LOG_BYTES: Final = 256 * 1024
# Written by a worker (python, nodejs) on its output after each invocation, before its answer:
# everything before it on that pipe belongs to the invocation. Never shown.
END_OF_INVOCATION: Final = b"\x1etaskmode-invocation-end\x1e"
# How long output may trail an answer from a runtime that writes no END_OF_INVOCATION (custom).
_UNMARKED_OUTPUT_GRACE_S: Final = 0.05
# With several invocations in flight, a worker that tags its output (Python) starts each line
# with \x1e<invocation number>\x1e: the line belongs to that invocation. Never shown.
_INVOCATION_TAG: Final = re.compile(rb"\x1e(\d+)\x1e")


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    runtime: str  # "python3..." or "custom..."
    handler: str  # python: "index.handler" -> index.py in code_dir, function handler
    timeout_s: float  # wall-clock limit of one invocation (and of an instance's start)
    code_dir: Path
    code_checksum: str  # identifies the code version; older versions are not reused
    memory_mb: int = 128
    environment: Mapping[str, str] = field(default_factory=dict)
    custom_command: Sequence[str] = ()  # custom runtime: command + args
    version: str = "LATEST"  # LATEST or the published version this spec is a snapshot of
    custom_port: int = 9000  # custom runtime: where its server listens (in its own network namespace)
    disk_mb: int = 512  # the size of its /tmp
    internet_access: bool = True
    instance_concurrency: int = 1  # FC's instanceConcurrency: invocations one instance runs at once


@dataclass(frozen=True)
class InvokeContext:
    request_id: str
    task_id: str  # "" for synchronous invocations
    attempt: int = 0


@dataclass(frozen=True)
class InvocationResult:
    ok: bool
    payload: bytes  # handler return value, or FC error JSON when not ok
    error_message: str = ""
    error_type: str = ""  # "" | "UnhandledInvocationError" | "HandledInvocationError"
    timed_out: bool = False
    killed: bool = False  # ended by kill() (a stop), not by its own doing
    duration_ms: float = 0.0
    logs: bytes = b""  # what the invocation wrote, framed by FC's Invoke Start/End lines
    output_bytes: int = 0  # how much the invocation itself wrote (0: `logs` is only the framing)
    logs_truncated: bool = False  # the start of the output was dropped to fit INVOCATION_LOG_BYTES


class _Capture:
    """One invocation's output, bounded to INVOCATION_LOG_BYTES (the newest kept)."""

    def __init__(self, request_id: str, task_id: str = "") -> None:
        self.request_id = request_id
        self.task_id = task_id
        self.data = bytearray(f"FC Invoke Start RequestId: {request_id}\n".encode())
        self.truncated = False
        self.written = 0
        self.ended = asyncio.Event()

    def add(self, chunk: bytes) -> None:
        self.written += len(chunk)
        self.data += chunk
        if len(self.data) > INVOCATION_LOG_BYTES:
            del self.data[:-INVOCATION_LOG_BYTES]
            self.truncated = True

    def close(self) -> bytes:
        if self.data and not self.data.endswith(b"\n"):
            self.data += b"\n"
        self.data += f"FC Invoke End RequestId: {self.request_id}\n".encode()
        return bytes(self.data)


def failure(
    message: str, *, kind: str, error_type: str = UNHANDLED, timed_out: bool = False, killed: bool = False
) -> InvocationResult:
    """A failed result whose payload is FC's error JSON; `kind` becomes its errorType."""
    body = msgspec.json.encode({"errorMessage": message, "errorType": kind})
    return InvocationResult(ok=False, payload=body, error_message=message, error_type=error_type,
                            timed_out=timed_out, killed=killed)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped responding"
    if code < 0:
        with suppress(ValueError):
            return f"was killed by signal {signal.Signals(-code).name}"
    return f"exited with code {code}"


class Process(Protocol):
    """What an instance needs of its process: a started one, or one forked from a template."""

    stdin: asyncio.StreamWriter | None
    stdout: asyncio.StreamReader | None
    stderr: asyncio.StreamReader | None

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...


class Instance:
    """One process serving up to `concurrency` invocations at a time; subclasses speak the runtime's
    protocol."""

    # The most invocations at once the runtime's protocol can carry (1: one after the other).
    max_concurrency: ClassVar[int] = 1

    def __init__(self, spec: FunctionSpec, *, work_dir: Path, sandbox: Sandbox) -> None:
        self.spec = spec
        self.instance_id = f"{spec.name}-{uuid.uuid4().hex[:8]}"
        self.idle_since = time.monotonic()  # pool bookkeeping
        self._sandbox = sandbox
        self._tmp_dir = work_dir / self.instance_id  # on the host: scratch, sockets
        self.paths = sandbox.paths(code_dir=spec.code_dir, instance_dir=self._tmp_dir)
        self._launched: Launch | None = None
        self._proc: Process | None = None
        self._exited: asyncio.Task[int] | None = None
        self._drain: asyncio.Task[None] | None = None
        self._tail = bytearray()
        self._init_failure: InvocationResult | None = None
        self._stop_reason = ""  # "killed" | "timeout" | "crashed" | "init"
        self._stopping: asyncio.Task[None] | None = None
        self._busy = asyncio.Semaphore(self.concurrency)
        self._cpu_s = 0.0
        self._captures: dict[int, _Capture] = {}  # invocations in flight, by their number
        self._numbers = itertools.count(1)
        # A timed-out invocation left others running: no new ones, killed once they are done.
        self._retiring = False
        # Whether the runtime marks the end of each invocation's output (END_OF_INVOCATION).
        self.marks_output = False
        # Whether the runtime tags each line of output with its invocation (_INVOCATION_TAG).
        self.tags_output = False

    async def _launch(self) -> InvocationResult | None:
        """Start the process and wait until it serves; return a failure if it cannot."""
        raise NotImplementedError

    async def _call(self, payload: bytes, context: InvokeContext, number: int) -> InvocationResult:
        """One invocation; `number` identifies it among those in flight (protocol, output tags)."""
        raise NotImplementedError

    async def _release_resources(self) -> None:
        """Close what the subclass opened, after the process is gone."""

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def concurrency(self) -> int:
        """How many invocations this instance runs at once: the function's instanceConcurrency,
        as far as the runtime can (the pool leases it to that many callers)."""
        return max(1, min(self.spec.instance_concurrency, self.max_concurrency))

    @property
    def requests_in_flight(self) -> int:
        """Invocations running on this instance now (at most `concurrency`)."""
        return len(self._captures)

    @property
    def alive(self) -> bool:
        """Running, started successfully, not stopped nor retiring: fit to serve another invocation."""
        running = self._proc is not None and self._proc.returncode is None
        return running and not self._stop_reason and self._init_failure is None and not self._retiring

    def output_tail(self) -> str:
        """The last few KB the process wrote to stdout/stderr (for error messages and tests)."""
        return self._tail.decode(errors="replace")

    async def start(self, *, timeout_s: float | None = None) -> None:
        """Start the process and wait until it serves, for at most `timeout_s` (default: the function's
        timeout); a failure to start is kept and returned by every `invoke`."""
        bound_s = self.spec.timeout_s if timeout_s is None else timeout_s
        try:
            failed = await asyncio.wait_for(self._launch(), timeout=bound_s)
        except TimeoutError:
            message = f"Function instance did not start within {bound_s:g}s"
            failed = failure(message, kind="InitializationTimeout", timed_out=True)
        except OSError as exc:  # e.g. the custom command does not exist
            failed = failure(f"Function instance failed to start: {exc}", kind="InitializationError")
        except (asyncio.IncompleteReadError, ConnectionError):
            failed = await self._ended("while starting")
        if failed is not None:
            self._init_failure = failed
            await self._stop("init")

    async def invoke(self, payload: bytes, context: InvokeContext) -> InvocationResult:
        async with self._busy:
            if self._init_failure is not None:
                return self._init_failure
            if not self.alive or self._exited is None:
                killed = self._stop_reason == "killed"
                return failure("Function instance is not running", kind="InstanceStopped", killed=killed)
            started = time.perf_counter()
            number = next(self._numbers)
            capture = self._captures[number] = _Capture(context.request_id, context.task_id)
            try:
                result = await self._invoke_once(payload, context, number)
                await self._await_output(capture, ok=result.ok or not result.killed)
            finally:
                del self._captures[number]
                if self._retiring and not self._captures:
                    await self._stop("timeout")  # the last one out of a retiring instance
            return replace(result, duration_ms=(time.perf_counter() - started) * 1000, logs=capture.close(),
                           output_bytes=capture.written, logs_truncated=capture.truncated)

    async def _await_output(self, capture: _Capture, *, ok: bool) -> None:
        """Let the invocation's last output arrive: up to its end mark, or a short grace."""
        running = self._proc is not None and self._proc.returncode is None and not self._stop_reason
        if not running or not ok:
            return  # the process is gone: what it wrote has been drained already
        if self.marks_output:
            with suppress(TimeoutError):
                await asyncio.wait_for(capture.ended.wait(), timeout=1.0)
        else:
            await asyncio.sleep(_UNMARKED_OUTPUT_GRACE_S)

    async def kill(self) -> None:
        """Hard stop: SIGTERM to the process group, SIGKILL after a short grace; idempotent."""
        await self._stop("killed")

    def usage(self, children: Mapping[int, Sequence[int]] | None = None) -> tuple[float, int]:
        """(cpu seconds so far, rss bytes) of the process tree; cpu stays at its last value.

        `children` (pid -> child pids, from `process_children`) spares each instance its own scan
        of every process on the machine when many are measured at once.
        """
        if self._proc is None or self._proc.returncode is not None:
            return self._cpu_s, 0
        try:
            root = psutil.Process(self._proc.pid)
            if children is None:
                procs = [root, *root.children(recursive=True)]
            else:
                procs = [root, *(psutil.Process(pid) for pid in descendants(root.pid, children))]
        except psutil.Error:
            return self._cpu_s, 0
        cpu_s, rss = 0.0, 0
        for proc in procs:
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    # children_* only counts reaped children, so adding it never double counts
                    cpu_s += times.user + times.system + times.children_user + times.children_system
                    rss += proc.memory_info().rss
            except psutil.Error:
                continue
        self._cpu_s = max(self._cpu_s, cpu_s)
        return self._cpu_s, rss

    async def _invoke_once(self, payload: bytes, context: InvokeContext, number: int) -> InvocationResult:
        assert self._exited is not None
        call = asyncio.ensure_future(self._call(payload, context, number))
        try:
            either = {call, self._exited}
            done, _ = await asyncio.wait(either, timeout=self.spec.timeout_s, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            call.cancel()
            self._stop_reason = self._stop_reason or "crashed"  # the protocol is mid-request
            self._stopping = self._stopping or asyncio.ensure_future(self._terminate())
            raise
        if call in done and call.exception() is None:
            return call.result()
        call.cancel()
        if not done:
            if len(self._captures) > 1:
                # Others run beside it: they may finish; the instance takes nothing new, and the
                # last of them to end stops it (invoke), the timed-out handler with it.
                self._retiring = True
                logger.info("instance %s retiring: an invocation timed out beside %d others", self.instance_id,
                            len(self._captures) - 1)
            else:
                await self._stop("timeout")
            return failure(f"Function timed out after {self.spec.timeout_s:g}s", kind="FunctionTimeout", timed_out=True)
        return await self._ended("during the invocation")

    async def _ended(self, when: str) -> InvocationResult:
        """The process went away (or its channel broke): classify as a stop or a crash."""
        if self._stop_reason == "killed":
            return failure("Function instance was stopped", error_type="", kind="InstanceStopped", killed=True)
        code: int | None = None
        if self._exited is not None:
            with suppress(TimeoutError):
                code = await asyncio.wait_for(asyncio.shield(self._exited), timeout=1.0)
        await self._stop("crashed")  # also drains the last of its output into the tail
        tail = self.output_tail().strip()[-1024:]
        message = f"Function instance {_describe_exit(code)} {when}"
        return failure(f"{message}; output: {tail}" if tail else message, kind="InstanceExited")

    async def _stop(self, reason: str) -> None:
        self._stop_reason = self._stop_reason or reason
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._terminate())
        await asyncio.shield(self._stopping)

    async def _terminate(self) -> None:
        proc, exited = self._proc, self._exited
        if proc is not None and exited is not None:
            tree: list[psutil.Process] = []
            if proc.returncode is None:
                with suppress(psutil.Error):
                    tree = psutil.Process(proc.pid).children(recursive=True)
                self._signal_group(signal.SIGTERM)
                with suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(exited), timeout=KILL_GRACE_S)
            # Also after the leader is gone: children left in its group (or that moved out).
            self._signal_group(signal.SIGKILL)
            for child in tree:
                with suppress(psutil.Error):
                    child.kill()
            await exited
            if proc.stdin is not None:
                proc.stdin.close()
            if self._drain is not None:
                with suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(self._drain, timeout=1.0)
        if self._launched is not None:
            await self._launched.close()
        await self._release_resources()
        await asyncio.to_thread(shutil.rmtree, self._tmp_dir, True)
        logger.info("instance %s stopped (%s)", self.instance_id, self._stop_reason)

    def _signal_group(self, signum: signal.Signals) -> None:
        assert self._proc is not None
        if isinstance(self._proc, ForkedProcess):
            self._proc.signal_group(signum)
            return
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signum)  # start_new_session: pgid == pid

    def _environment(self) -> dict[str, str]:
        """The instance's whole environment: a fixed base, the function's variables, FC's."""
        self._tmp_dir.mkdir(parents=True, exist_ok=True)
        spec, paths = self.spec, self.paths
        return {  # FC's variables win over the function's own
            **base_environment(home=paths.tmp_dir), **spec.environment,
            "FC_FUNCTION_NAME": spec.name, "FC_FUNCTION_HANDLER": spec.handler,
            "FC_FUNCTION_MEMORY_SIZE": str(spec.memory_mb), "FC_INSTANCE_ID": self.instance_id,
            "FC_FUNC_CODE_PATH": paths.code_dir, "TMPDIR": paths.tmp_dir,
        }

    async def _spawn(self, argv: Sequence[str], *, env: Mapping[str, str], framed: bool,
                     socket_dir: Path | None = None) -> None:
        """Start the process inside the sandbox (every runtime goes through here). `framed`: a
        worker speaking frames on stdin/stdout, its output on stderr (python, nodejs); else a
        program whose stdout and stderr are both its output. `socket_dir` is bound writable."""
        spec = self.spec
        self._launched = launch = self._sandbox.launch(
            argv, env=env, code_dir=spec.code_dir, instance_dir=self._tmp_dir, socket_dir=socket_dir,
            confinement=Confinement(memory_mb=spec.memory_mb, tmp_mb=spec.disk_mb, internet=spec.internet_access,
                                    threads=self.concurrency + 1 if self.concurrency > 1 else 0),
        )
        pipe = asyncio.subprocess.PIPE
        self._proc = proc = await asyncio.create_subprocess_exec(
            *launch.argv, cwd=launch.cwd, env=launch.env, pass_fds=launch.pass_fds,
            start_new_session=True,  # own group: kill reaches the tree
            preexec_fn=die_with_parent,
            stdin=pipe if framed else asyncio.subprocess.DEVNULL, stdout=pipe,
            stderr=pipe if framed else asyncio.subprocess.STDOUT,
        )
        self._exited = asyncio.ensure_future(proc.wait())
        await launch.started(proc.pid)
        output = proc.stderr if framed else proc.stdout
        assert output is not None
        self._watch(output)

    def _adopt(self, proc: ForkedProcess) -> None:
        """Serve from a process forked from a template (framed, like `_spawn(framed=True)`)."""
        self._proc = proc
        self._exited = asyncio.ensure_future(proc.wait())
        assert proc.stderr is not None
        self._watch(proc.stderr)

    def _watch(self, output: asyncio.StreamReader) -> None:
        assert self._proc is not None and self._exited is not None
        group_file = orphans.register(self._tmp_dir.parent, pgid=self._proc.pid, instance_id=self.instance_id)
        self._exited.add_done_callback(lambda _: orphans.unregister(group_file))
        self._drain = asyncio.ensure_future(self._collect_output(output))
        logger.info("instance %s started (pid %d)", self.instance_id, self._proc.pid)

    async def _collect_output(self, stream: asyncio.StreamReader) -> None:
        partial = b""
        while chunk := await stream.read(65536):
            *lines, partial = (partial + chunk).split(b"\n")
            for line in lines:
                self._output_line(line)
            if not self.marks_output:
                # Unmarked output is captured as it comes (by every invocation in flight: nothing
                # says whose it is); marked output line by line, above.
                for capture in list(self._captures.values()):
                    capture.add(chunk)
        if partial:
            self._output_line(partial, complete=False)

    def _output_line(self, line: bytes, *, complete: bool = True) -> None:
        """One line of the process's output: to the tail, the executor's log and the capture(s)."""
        captures = list(self._captures.values())  # untagged: every invocation in flight (one or none at C=1)
        if self.tags_output and (tag := _INVOCATION_TAG.match(line)) is not None:
            line = line[tag.end():]
            owner = self._captures.get(int(tag[1]))
            captures = [owner] if owner is not None else []
        ended = self.marks_output and line.endswith(END_OF_INVOCATION)
        if ended:
            line = line[: -len(END_OF_INVOCATION)]
            if not line:
                for capture in captures:
                    capture.ended.set()
                return
        text = line + b"\n" if complete else line
        self._tail += text
        del self._tail[:-OUTPUT_TAIL_BYTES]
        # What a handler prints carries the task (and request) it printed during, so one task's
        # lines can be followed across services; output between invocations carries neither.
        current = captures[0] if len(captures) == 1 else None
        extra = {"task_id": current.task_id, "request_id": current.request_id} if current and current.task_id else {}
        output_logger.info("%s: %s", self.instance_id, line.decode(errors="replace"), extra=extra)
        for capture in captures:
            if self.marks_output:
                capture.add(text)
            if ended:
                capture.ended.set()


def base_environment(*, home: str) -> dict[str, str]:
    """What every instance's environment starts from. Nothing of the executor's own environment
    is passed on: it holds the bus and database addresses (and, in a careless deployment,
    secrets), none of which is the function's business."""
    return {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": home,
        "PYTHONUNBUFFERED": "1",
    }


def process_children() -> dict[int, list[int]]:
    """Every process's child pids, from one scan of the process table."""
    children: dict[int, list[int]] = {}
    for proc in psutil.process_iter(["ppid"]):
        children.setdefault(proc.info["ppid"], []).append(proc.pid)
    return children


def descendants(pid: int, children: Mapping[int, Sequence[int]]) -> list[int]:
    """The pids below `pid` in `children` (see `process_children`), at any depth."""
    found: list[int] = []
    pending = list(children.get(pid, ()))
    while pending:
        child = pending.pop()
        found.append(child)
        pending.extend(children.get(child, ()))
    return found
