"""Runs inside a custom runtime's sandbox: starts the user's server, then relays to it.

`python relay.py SOCKET PORT -- COMMAND...` starts COMMAND (with this process's environment and
output), waits until something accepts on 127.0.0.1:PORT, and only then listens on the Unix
socket SOCKET, passing each connection through to that port. The executor talks HTTP over the
socket: the sandbox has a network namespace of its own, so its 127.0.0.1 is out of the
executor's reach, while a socket file in a bound directory is not. The socket appears only once
the server accepts, which is how the executor knows the instance is ready. This process exits
with the server's status when the server ends.

Standard library only: it runs on the function's interpreter, beside the user's code.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

POLL_S = 0.02
CHUNK = 65536


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(CHUNK):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:  # either side went away: the other is closed by the caller
        pass


async def _relay(port: int, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
    try:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        client_w.close()
        return
    await asyncio.gather(_pipe(client_r, server_w), _pipe(server_r, client_w))
    for writer in (client_w, server_w):
        writer.close()


async def _accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


def _status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N: 128 + N, as a shell says


async def main(socket_path: str, port: int, command: list[str]) -> int:
    try:
        child = await asyncio.create_subprocess_exec(*command)
    except OSError as err:
        print(f"cannot start {command[0]!r}: {err}", file=sys.stderr, flush=True)
        return 127
    exited = asyncio.ensure_future(child.wait())
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, child.send_signal, signum)
    while not await _accepts(port):
        if exited.done():
            return _status(exited.result())
        await asyncio.wait({exited}, timeout=POLL_S)
    staging = f"{socket_path}.{os.getpid()}"
    server = await asyncio.start_unix_server(lambda r, w: _relay(port, r, w), path=staging)
    os.rename(staging, socket_path)  # appears whole: the executor connects once it exists
    async with server:
        return _status(await exited)


if __name__ == "__main__":
    if len(sys.argv) < 5 or sys.argv[3] != "--":
        print("usage: relay.py SOCKET PORT -- COMMAND...", file=sys.stderr)
        sys.exit(2)
    sys.exit(asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[4:])))
