"""Python instances: `python -m services.executor.python_worker` speaking msgpack frames over stdio."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Final

import msgspec

from services.executor import python_worker as proto
from services.executor.instance import UNHANDLED, Instance, InvocationResult, InvokeContext

_REPO_ROOT: Final = str(Path(__file__).resolve().parents[2])


class PythonInstance(Instance):
    """`python -m services.executor.python_worker` speaking msgpack frames over its stdio."""

    _decode_ready = msgspec.msgpack.Decoder(proto.Ready).decode
    _decode_response = msgspec.msgpack.Decoder(proto.Response).decode

    async def _launch(self) -> InvocationResult | None:
        self.marks_output = True  # the worker writes END_OF_INVOCATION after each request
        env = self._environment()
        # The worker must import whatever the cwd is; -P keeps the code dir from shadowing it (the
        # worker puts the code dir first on sys.path itself, after it has started).
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH", "")) if p)
        await self._spawn([sys.executable, "-P", "-m", "services.executor.python_worker"], env=env, framed=True)
        spec = self.spec
        init = proto.Init(function_name=spec.name, handler=spec.handler, memory_mb=spec.memory_mb,
                          timeout_s=spec.timeout_s, instance_id=self.instance_id, code_dir=str(spec.code_dir))
        ready = self._decode_ready(await self._exchange(init))
        if ready.ok:
            return None
        return InvocationResult(ok=False, payload=ready.error_payload, error_message=ready.error_message,
                                error_type=UNHANDLED)

    async def _call(self, payload: bytes, context: InvokeContext) -> InvocationResult:
        request = proto.Request(request_id=context.request_id, task_id=context.task_id, attempt=context.attempt,
                                payload=payload)
        response = self._decode_response(await self._exchange(request))
        return InvocationResult(ok=response.ok, payload=response.payload, error_message=response.error_message,
                                error_type=response.error_type)

    async def _exchange(self, message: msgspec.Struct) -> bytes:
        assert self._proc is not None and self._proc.stdin is not None and self._proc.stdout is not None
        return await proto.exchange(self._proc.stdin, self._proc.stdout, message)
