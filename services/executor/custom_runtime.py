"""Custom-runtime instances: the user's own HTTP server, started from `custom_command`.

As in FC, the server listens on the port in `FC_SERVER_PORT` and each invocation is a
`POST /invoke` carrying the event as the body. We pick a free port per instance so that several
instances of one function can run side by side.
"""

from __future__ import annotations

import asyncio
import socket
from typing import ClassVar, Final

import httpx

from services.executor.instance import Instance, InvocationResult, InvokeContext, failure
from shared import wire

INVOKE_PATH: Final = "/invoke"
READY_POLL_S: Final = 0.02
ERROR_BODY_CHARS: Final = 1024


def free_port(taken: set[int]) -> int:
    """A port nobody listens on now and that no instance of ours holds (it may not have bound yet)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            return port


async def accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


class CustomRuntimeInstance(Instance):
    """`spec.custom_command` in `code_dir`, served over HTTP on 127.0.0.1:`port`."""

    port = 0
    _client: httpx.AsyncClient | None = None
    # Ports are a process-wide resource: two instances starting at once must not get the same one,
    # or the second could mistake the first's server for its own.
    _ports_taken: ClassVar[set[int]] = set()

    async def _launch(self) -> InvocationResult | None:
        if not self.spec.custom_command:
            return failure("custom runtime needs a command", kind="InitializationError")
        self.port = free_port(self._ports_taken)
        self._ports_taken.add(self.port)
        env = {**self._environment(), "FC_SERVER_PORT": str(self.port)}
        await self._spawn(self.spec.custom_command, env=env, framed=False)
        assert self._exited is not None
        # Poll until the server accepts; start() bounds the whole launch by the timeout.
        while not await accepts(self.port):
            await asyncio.wait({self._exited}, timeout=READY_POLL_S)
            if self._exited.done():
                return await self._exited_early(self._exited.result())
        # trust_env=False: a proxy from the environment must never sit between us and 127.0.0.1.
        self._client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.port}", timeout=None, trust_env=False
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

    async def _call(self, payload: bytes, context: InvokeContext) -> InvocationResult:
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
