"""The process of one Python-runtime function instance: `python -m services.executor.python_worker`.

The parent (`services.executor.python_instance.PythonInstance`) talks to it over the child's stdin and
stdout with length-prefixed msgpack frames: first an `Init`, answered by `Ready`, then any number
of `Request`s, each answered by one `Response`. The user's code must not be able to corrupt that
channel, so before importing it the worker moves the protocol onto private duplicates of fds 0
and 1, points fd 1 (and `sys.stdout`) at stderr and fd 0 at /dev/null. Everything the handler
prints therefore ends up on stderr, which the parent drains into its logs.

Both ends of that protocol (structs, framing, the parent's `exchange`) live here, so this process
imports nothing but the standard library and msgspec before the user's module.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import io
import logging
import os
import struct
import sys
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


class Init(msgspec.Struct, frozen=True, kw_only=True):
    function_name: str
    handler: str
    memory_mb: int
    timeout_s: float
    instance_id: str
    code_dir: str


class Ready(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    error_message: str = ""
    error_payload: bytes = b""  # FC error JSON when the handler could not be loaded


class Request(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    task_id: str
    attempt: int
    payload: bytes


class Response(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    payload: bytes
    error_message: str = ""
    error_type: str = ""


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


class _RequestIdFilter(logging.Filter):
    """Stamps each record of the handler's logging with the current request id (as FC's does)."""

    request_id = ""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = self.request_id
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


def main() -> int:
    proto_in, proto_out = take_protocol_fds()
    raw = read_frame(proto_in)
    if raw is None:
        return 0
    init = msgspec.msgpack.decode(raw, type=Init)
    global _code_dir
    _code_dir = os.path.realpath(init.code_dir)
    sys.path.insert(0, _code_dir)
    configure_logging()
    try:
        handler = load_handler(init.handler)
    except Exception as exc:
        print_user_traceback(exc)
        message = f"failed to load handler {init.handler!r}: {type(exc).__name__}: {exc}"
        write_all(proto_out, encode_frame(Ready(ok=False, error_message=message, error_payload=error_json(exc))))
        return 1
    write_all(proto_out, encode_frame(Ready(ok=True)))
    decode_request = msgspec.msgpack.Decoder(Request).decode
    while (raw := read_frame(proto_in)) is not None:
        response = run_request(handler, init, decode_request(raw))
        sys.stdout.flush()
        sys.stderr.write(END_OF_INVOCATION + "\n")
        sys.stderr.flush()
        write_all(proto_out, encode_frame(response))
    return 0


if __name__ == "__main__":
    sys.exit(main())
