"""Custom-runtime instances: the user's own HTTP server, started from `custom_command`.

As in FC, the server listens on `FC_SERVER_PORT` (the function's `customRuntimeConfig.port`,
9000 by default) and each invocation is a `POST /invoke` carrying the event as the body. The
sandbox gives every instance a network namespace of its own, so instances cannot collide on
that port, and the executor cannot reach it directly either: `relay.py` runs beside the server
inside the sandbox and passes HTTP through from a Unix socket in a bound directory.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path
from typing import ClassVar, Final

import httpx

from services.executor import relay
from services.executor.instance import Instance, InvocationResult, InvokeContext, failure
from shared import wire

INVOKE_PATH: Final = "/invoke"
READY_POLL_S: Final = 0.02
ERROR_BODY_CHARS: Final = 1024
RELAY_FILE: Final = Path(relay.__file__).resolve()
SOCKET_NAME: Final = "invoke.sock"


def free_port(taken: set[int]) -> int:
    """A port nobody listens on now and that no instance of ours holds (it may not have bound yet)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            return port


class CustomRuntimeInstance(Instance):
    """`spec.custom_command` in its code directory, served over HTTP through the relay's socket.

    With an instanceConcurrency above 1 that many requests are sent at once, each on a connection
    of its own through the relay; whether they run at once is up to the user's server, as on FC.
    """

    max_concurrency = 200  # FC's most
    port = 0
    _client: httpx.AsyncClient | None = None
    # Unsandboxed, instances share the host's network: two starting at once must not get the same
    # port, or one could mistake the other's server for its own.
    _ports_taken: ClassVar[set[int]] = set()

    async def _launch(self) -> InvocationResult | None:
        if not self.spec.custom_command:
            return failure("custom runtime needs a command", kind="InitializationError")
        if self._sandbox.enabled:
            self.port = self.spec.custom_port
        else:
            self.port = free_port(self._ports_taken)
            self._ports_taken.add(self.port)
        socket_dir = self._tmp_dir / "run"
        socket_dir.mkdir(parents=True, exist_ok=True)
        host_socket = socket_dir / SOCKET_NAME
        env = {**self._environment(), "FC_SERVER_PORT": str(self.port)}
        relay_argv = [f"{self.paths.runtime_dir}/{RELAY_FILE.name}", f"{self.paths.socket_dir}/{SOCKET_NAME}",
                      str(self.port), "--"]
        await self._spawn([sys.executable, "-P", *relay_argv, *self.spec.custom_command], env=env, framed=False,
                          socket_dir=socket_dir)
        assert self._exited is not None
        # The relay creates its socket once the server accepts; start() bounds the whole launch.
        while not host_socket.exists():
            await asyncio.wait({self._exited}, timeout=READY_POLL_S)
            if self._exited.done():
                return await self._exited_early(self._exited.result())
        # trust_env=False: a proxy from the environment must never sit between us and the instance.
        # At least a connection per request in flight (httpx's defaults: 100, 20 kept open).
        limits = httpx.Limits(max_connections=max(100, self.concurrency),
                              max_keepalive_connections=max(20, self.concurrency))
        self._client = httpx.AsyncClient(
            base_url="http://instance", timeout=None, trust_env=False,
            transport=httpx.AsyncHTTPTransport(uds=str(host_socket), limits=limits),
        )
        return None

    async def _exited_early(self, code: int) -> InvocationResult:
        if self._drain is not None:  # wait for the last output to reach the tail
            await asyncio.wait({self._drain}, timeout=1.0)
        tail = self.output_tail().strip()[-ERROR_BODY_CHARS:]
        return failure(
            f"Custom runtime exited with code {code} before listening on port {self.port}; output: {tail}",
            kind="InitializationError",
        )

    async def _call(self, payload: bytes, context: InvokeContext, number: int) -> InvocationResult:
        assert self._client is not None
        headers = {
            wire.FC_REQUEST_ID_HEADER: context.request_id,
            wire.FC_FUNCTION_NAME_HEADER: self.spec.name,
            wire.FC_FUNCTION_HANDLER_HEADER: self.spec.handler,
            wire.FC_FUNCTION_MEMORY_HEADER: str(self.spec.memory_mb),
            wire.FC_FUNCTION_TIMEOUT_HEADER: f"{self.spec.timeout_s:g}",
        }
        if context.task_id:
            headers[wire.FC_TASK_ID_HEADER] = context.task_id
        response = await self._client.post(INVOKE_PATH, content=payload, headers=headers)
        if response.is_success:
            return InvocationResult(ok=True, payload=response.content)
        body = response.content.decode(errors="replace")[:ERROR_BODY_CHARS]
        return failure(f"Custom runtime returned HTTP {response.status_code}: {body}", kind="HTTPError")

    async def _release_resources(self) -> None:
        self._ports_taken.discard(self.port)
        if self._client is not None:
            await self._client.aclose()
