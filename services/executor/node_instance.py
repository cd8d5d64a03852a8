"""Node.js instances (`nodejs18`, `nodejs20`): `node node_worker.js`, JSON frames over stdio.

Both runtimes run on the machine's `node` (TASKMODE_NODE_BINARY, else `node` on PATH); the
worker keeps to what Node 18 and 20 both have. The protocol is the Python worker's, with JSON
bodies (payloads base64) so the worker needs nothing beyond Node itself.
"""

from __future__ import annotations

import base64
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Final

import msgspec

from services.executor.instance import UNHANDLED, Instance, InvocationResult, InvokeContext, failure

WORKER_FILE: Final = Path(__file__).with_name("node_worker.js").resolve()
NODE_BINARY_VAR: Final = "TASKMODE_NODE_BINARY"
_FRAME_HEADER: Final = struct.Struct(">I")


def node_binary() -> str | None:
    """The `node` executable instances run on, or None when there is none."""
    return os.environ.get(NODE_BINARY_VAR) or shutil.which("node")


class NodeInstance(Instance):
    """`node node_worker.js` speaking length-prefixed JSON frames over its stdio.

    One request at a time whatever the function's instanceConcurrency (the worker answers in
    order, one after the other): `max_concurrency` stays 1, so the pool scales out instead.
    """

    async def _launch(self) -> InvocationResult | None:
        node = node_binary()
        if node is None:
            return failure(
                "runtime nodejs needs Node.js on the executor's machine (node on PATH or TASKMODE_NODE_BINARY)",
                kind="InitializationError",
            )
        self.marks_output = True
        # The sandbox shows the worker at the runtime directory; node itself must be under a
        # directory the sandbox binds (/usr, where Debian's nodejs lives).
        worker = f"{self.paths.runtime_dir}/{WORKER_FILE.name}"
        await self._spawn([node, worker], env=self._environment(), framed=True)
        spec = self.spec
        ready = await self._exchange({
            "functionName": spec.name, "handler": spec.handler, "memoryMb": spec.memory_mb,
            "timeoutS": spec.timeout_s, "instanceId": self.instance_id, "codeDir": self.paths.code_dir,
        })
        if ready.get("ok"):
            return None
        return InvocationResult(ok=False, payload=base64.b64decode(ready.get("errorPayload", "")),
                                error_message=str(ready.get("errorMessage", "")), error_type=UNHANDLED)

    async def _call(self, payload: bytes, context: InvokeContext, number: int) -> InvocationResult:
        response = await self._exchange({
            "requestId": context.request_id, "taskId": context.task_id, "attempt": context.attempt,
            "payload": base64.b64encode(payload).decode(),
        })
        return InvocationResult(ok=bool(response.get("ok")), payload=base64.b64decode(response.get("payload", "")),
                                error_message=str(response.get("errorMessage", "")),
                                error_type=str(response.get("errorType", "")))

    async def _exchange(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdin is not None and self._proc.stdout is not None
        body = msgspec.json.encode(message)
        self._proc.stdin.write(_FRAME_HEADER.pack(len(body)) + body)
        await self._proc.stdin.drain()
        (size,) = _FRAME_HEADER.unpack(await self._proc.stdout.readexactly(_FRAME_HEADER.size))
        answer: dict[str, Any] = msgspec.json.decode(await self._proc.stdout.readexactly(size))
        return answer
