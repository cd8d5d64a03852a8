"""The process of one Python-runtime function instance: `python -m services.executor.python_worker`.

The parent (`services.executor.python_instance.PythonInstance`) talks to it over the child's stdin and
stdout with length-prefixed msgpack frames: first an `Init`, answered by `Ready`, then any number
of `Request`s, each answered by one `Response` carrying the request's `seq`. The user's code must
not be able to corrupt that channel, so before importing it the worker moves the protocol onto
private duplicates of fds 0 and 1, points fd 1 (and `sys.stdout`) at stderr and fd 0 at /dev/null.
Everything the handler prints therefore ends up on stderr, which the parent drains into its logs.

With `Init.concurrency` 1 (FC's instanceConcurrency, the default) requests run one after the
other in the main thread. Above 1, up to that many run at once: async handlers as tasks of one
event loop, sync ones in a thread pool of that size, and responses go out as they finish (the
parent matches them by `seq`). Their output shares stderr, so each line a handler writes through
`sys.stdout`/`sys.stderr`/`logging` is tagged with its request's `seq` (`\x1e<seq>\x1e`) for the
parent to attribute; what is written below Python (fd 1/2 directly, subprocesses) is untagged.

Both ends of that protocol (structs, framing, the parent's `exchange`) live here, so this process
imports nothing but the standard library and msgspec before the user's module.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import importlib
import inspect
import io
import logging
import os
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, Final

import msgspec

FRAME_HEADER: Final = struct.Struct(">I")  # body length, big-endian
# Must equal services.executor.instance.END_OF_INVOCATION (this module imports nothing of ours).
END_OF_INVOCATION: Final = "\x1etaskmode-invocation-end\x1e"
# Where user code appears to live in stack traces, as on FC (the real directory is ours).
SHOWN_CODE_DIR: Final = "/code"
MIB: Final = 1024 * 1024
MIN_THREAD_STACK: Final = 1 * MIB  # a concurrent worker's handler threads: see thread_stack_bytes
MAX_THREAD_STACK: Final = 8 * MIB


class Init(msgspec.Struct, frozen=True, kw_only=True):
    function_name: str
    handler: str
    memory_mb: int
    timeout_s: float
    instance_id: str
    code_dir: str
    concurrency: int = 1  # requests run at once (FC's instanceConcurrency)


class Ready(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    error_message: str = ""
    error_payload: bytes = b""  # FC error JSON when the handler could not be loaded


class Request(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    task_id: str
    attempt: int
    payload: bytes
    seq: int = 0  # the parent's number for it; its Response carries it back


class Response(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    payload: bytes
    error_message: str = ""
    error_type: str = ""
    seq: int = 0  # the Request's


def encode_frame(message: msgspec.Struct) -> bytes:
    body = msgspec.msgpack.encode(message)
    return FRAME_HEADER.pack(len(body)) + body


async def exchange(stdin: asyncio.StreamWriter, stdout: asyncio.StreamReader, message: msgspec.Struct) -> bytes:
    """The parent's side: send one frame to the worker and read the body of its answer."""
    stdin.write(encode_frame(message))
    await stdin.drain()
    (size,) = FRAME_HEADER.unpack(await stdout.readexactly(FRAME_HEADER.size))
    return await stdout.readexactly(size)


_code_dir = ""  # set by main() once the Init frame names it


def user_frames(exc: BaseException) -> list[str]:
    """The traceback of `exc` as FC shows it: only frames in the user's code, under /code.

    The worker's own frames and the interpreter's (asyncio, importlib) would show this server's
    paths, which are none of the caller's business and no help in finding the bug.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    root = _code_dir.rstrip("/") + "/" if _code_dir else None
    shown = traceback.StackSummary.from_list([
        (SHOWN_CODE_DIR + "/" + frame.filename[len(root):], frame.lineno or 0, frame.name, frame.line)
        for frame in frames if root is not None and frame.filename.startswith(root)
    ])
    return shown.format()


def print_user_traceback(exc: BaseException) -> None:
    """The error as the handler's log shows it (user frames only)."""
    sys.stderr.write("Traceback (most recent call last):\n" + "".join(user_frames(exc)))
    sys.stderr.write(_shown("".join(traceback.format_exception_only(exc))))


def _shown(text: str) -> str:
    """`text` with the real code directory replaced by /code (a SyntaxError names its file)."""
    return text.replace(_code_dir, SHOWN_CODE_DIR) if _code_dir else text


def error_json(exc: BaseException, *, message: str | None = None) -> bytes:
    """FC's error body: `{"errorMessage", "errorType", "stackTrace"}`, user frames only."""
    return msgspec.json.encode(
        {
            "errorMessage": _shown(str(exc) if message is None else message),
            "errorType": type(exc).__name__,
            "stackTrace": user_frames(exc),
        }
    )


# The request a concurrent worker runs in this thread or task (None: one at a time, or none).
_current_request: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


class _RequestIdFilter(logging.Filter):
    """Stamps each record of the handler's logging with the current request id (as FC's does)."""

    request_id = ""  # one request at a time: the one running (threads the handler starts included)

    def filter(self, record: logging.LogRecord) -> bool:
        current = _current_request.get()
        record.request_id = self.request_id if current is None else current
        return True


_request_ids = _RequestIdFilter()


def configure_logging() -> None:
    """The root logger writes to stderr (the invocation's log) at INFO, FC's Python format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(request_id)s [%(levelname)s] %(message)s"))
    handler.addFilter(_request_ids)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


class InvalidHandler(Exception):
    """The handler string does not name a callable in an importable module."""


class Context:
    """What the handler gets as its second argument, shaped like FC's Python context."""

    def __init__(self, *, init: Init, request: Request, started: float) -> None:
        self.request_id = request.request_id
        self.task_id = request.task_id
        self.attempt = request.attempt
        self.retry_count = request.attempt
        self.function_name = init.function_name
        self.instance_id = init.instance_id
        self.credentials = None
        self.function = SimpleNamespace(
            name=init.function_name,
            handler=init.handler,
            memory=init.memory_mb,
            timeout=init.timeout_s,
        )
        self._deadline = started + init.timeout_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def load_handler(handler: str) -> Callable[..., Any]:
    module_name, _, attr = handler.rpartition(".")
    if not module_name or not attr:
        raise InvalidHandler(f"invalid handler {handler!r}: expected '<module>.<function>'")
    module = importlib.import_module(module_name)
    func: object = getattr(module, attr, None)
    if not callable(func):
        raise InvalidHandler(f"module {module_name!r} has no function {attr!r}")
    return func


def to_bytes(value: object) -> bytes:
    """Handler return value to the response body: bytes as is, str UTF-8, None empty, else JSON."""
    if value is None:
        return b""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    return msgspec.json.encode(value)


async def _await(awaitable: Any) -> Any:
    return await awaitable


def run_request(handler: Callable[..., Any], init: Init, request: Request) -> Response:
    context = Context(init=init, request=request, started=time.monotonic())
    _request_ids.request_id = request.request_id
    try:
        result = handler(request.payload, context)
        if inspect.isawaitable(result):
            result = asyncio.run(_await(result))
        body = to_bytes(result)
    except Exception as exc:  # the user's error is the invocation's result, not ours
        print_user_traceback(exc)
        return Response(
            ok=False,
            payload=error_json(exc),
            error_message=f"{type(exc).__name__}: {exc}",
            error_type="UnhandledInvocationError",
        )
    return Response(ok=True, payload=body)


def _read_exactly(fd: int, size: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < size:
        chunk = os.read(fd, size - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def read_frame(fd: int) -> bytes | None:
    header = _read_exactly(fd, FRAME_HEADER.size)
    if header is None:
        return None
    (size,) = FRAME_HEADER.unpack(header)
    return _read_exactly(fd, size)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def take_protocol_fds() -> tuple[int, int]:
    """Keep private copies of stdin/stdout for frames; leave the user /dev/null and stderr."""
    proto_in, proto_out = os.dup(0), os.dup(1)  # dup() fds are not inherited by children
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):  # always, unless something replaced them
            stream.reconfigure(line_buffering=True)
    return proto_in, proto_out


class _Invocation:
    """A request a concurrent worker runs: its output tag and the line it has not finished."""

    def __init__(self, seq: int) -> None:
        self.tag = f"\x1e{seq}\x1e"
        self.partial = ""


_invocation: contextvars.ContextVar[_Invocation | None] = contextvars.ContextVar("invocation", default=None)


class TaggedOutput(io.TextIOBase):
    """`sys.stdout`/`sys.stderr` of a concurrent worker: whole lines, each tagged with the request
    it was written during, go out on stderr; output outside a request goes as it is."""

    def __init__(self, out: io.TextIOWrapper, lock: threading.Lock, name: str) -> None:
        super().__init__()
        self._out = out
        self._lock = lock
        self._name = name
        self.buffer = _TaggedBytes(self)

    @property
    def name(self) -> str:
        return self._name

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._out.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self._out.errors

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._out.fileno()

    def write(self, text: str) -> int:
        invocation = _invocation.get()
        if invocation is None:
            with self._lock:
                self._out.write(text)
                self._out.flush()
            return len(text)
        invocation.partial += text
        if "\n" in invocation.partial:
            *lines, invocation.partial = invocation.partial.split("\n")
            self._emit("".join(f"{invocation.tag}{line}\n" for line in lines))
        return len(text)

    def end(self, invocation: _Invocation) -> None:
        """The request is over: its unfinished line, then its end mark."""
        self._emit(f"{invocation.tag}{invocation.partial}{END_OF_INVOCATION}\n")
        invocation.partial = ""

    def _emit(self, text: str) -> None:
        with self._lock:  # whole lines: another thread's never lands inside one
            self._out.write(text)
            self._out.flush()


class _TaggedBytes(io.RawIOBase):
    """`sys.stdout.buffer` of a concurrent worker: bytes written through it are tagged as text."""

    def __init__(self, text: TaggedOutput) -> None:
        super().__init__()
        self._text = text

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._text.write(chunk.decode(errors="replace"))
        return len(chunk)


def thread_stack_bytes(memory_mb: int, concurrency: int) -> int:
    """The stack each handler thread reserves: a thread stack is a private mapping, which counts
    against the memory limit (RLIMIT_DATA) whether or not it is touched, so `concurrency` threads
    of the usual 8 MiB would not fit a small `memorySize`. Half the memory over the threads,
    between 1 and 8 MiB."""
    share = memory_mb * MIB // (2 * max(1, concurrency))
    return max(MIN_THREAD_STACK, min(MAX_THREAD_STACK, share)) // 65536 * 65536


def serve_concurrently(handler: Callable[..., Any], init: Init, proto_in: int, proto_out: int,
                       output: TaggedOutput) -> None:
    """Run up to `init.concurrency` requests at once until stdin closes; answer each as it ends."""
    decode_request = msgspec.msgpack.Decoder(Request).decode
    threading.stack_size(thread_stack_bytes(init.memory_mb, init.concurrency))
    threads = concurrent.futures.ThreadPoolExecutor(max_workers=init.concurrency, thread_name_prefix="handler")

    async def one(request: Request) -> None:
        invocation = _Invocation(request.seq)
        _invocation.set(invocation)  # this task's own context (and copied to the handler's thread)
        _current_request.set(request.request_id)
        context = Context(init=init, request=request, started=time.monotonic())
        try:
            if inspect.iscoroutinefunction(handler):
                result = await handler(request.payload, context)
            else:
                call = contextvars.copy_context().run
                result = await asyncio.get_running_loop().run_in_executor(
                    threads, call, handler, request.payload, context)
                if inspect.isawaitable(result):
                    result = await result
            response = Response(ok=True, payload=to_bytes(result), seq=request.seq)
        except Exception as exc:  # the user's error is the invocation's result, not ours
            print_user_traceback(exc)
            response = Response(ok=False, payload=error_json(exc), error_message=f"{type(exc).__name__}: {exc}",
                                error_type="UnhandledInvocationError", seq=request.seq)
        output.end(invocation)
        write_all(proto_out, encode_frame(response))

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        incoming: asyncio.Queue[bytes | None] = asyncio.Queue()

        def read_all() -> None:  # blocking reads, off the loop
            while (raw := read_frame(proto_in)) is not None:
                loop.call_soon_threadsafe(incoming.put_nowait, raw)
            loop.call_soon_threadsafe(incoming.put_nowait, None)

        threading.Thread(target=read_all, name="requests", daemon=True).start()
        running: set[asyncio.Task[None]] = set()
        while (raw := await incoming.get()) is not None:
            task = asyncio.create_task(one(decode_request(raw)))
            running.add(task)
            task.add_done_callback(running.discard)
        await asyncio.gather(*running)

    asyncio.run(serve())
    threads.shutdown(wait=False)


def main() -> int:
    proto_in, proto_out = take_protocol_fds()
    raw = read_frame(proto_in)
    if raw is None:
        return 0
    init = msgspec.msgpack.decode(raw, type=Init)
    global _code_dir
    _code_dir = os.path.realpath(init.code_dir)
    sys.path.insert(0, _code_dir)
    tagged: TaggedOutput | None = None
    if init.concurrency > 1 and isinstance(sys.stderr, io.TextIOWrapper):
        lock = threading.Lock()
        tagged = TaggedOutput(sys.stderr, lock, "<stderr>")
        sys.stdout, sys.stderr = TaggedOutput(sys.stderr, lock, "<stdout>"), tagged
    configure_logging()
    try:
        handler = load_handler(init.handler)
    except Exception as exc:
        print_user_traceback(exc)
        message = f"failed to load handler {init.handler!r}: {type(exc).__name__}: {exc}"
        write_all(proto_out, encode_frame(Ready(ok=False, error_message=message, error_payload=error_json(exc))))
        return 1
    write_all(proto_out, encode_frame(Ready(ok=True)))
    if tagged is not None:
        serve_concurrently(handler, init, proto_in, proto_out, tagged)
        return 0
    decode_request = msgspec.msgpack.Decoder(Request).decode
    while (raw := read_frame(proto_in)) is not None:
        request = decode_request(raw)
        response = msgspec.structs.replace(run_request(handler, init, request), seq=request.seq)
        sys.stdout.flush()
        sys.stderr.write(END_OF_INVOCATION + "\n")
        sys.stderr.flush()
        write_all(proto_out, encode_frame(response))
    return 0


if __name__ == "__main__":
    sys.exit(main())
