"""Python instances: `python_worker.py` speaking msgpack frames over stdio."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Final

import msgspec

from services.executor import python_worker as proto
from services.executor.instance import UNHANDLED, FunctionSpec, Instance, InvocationResult, InvokeContext
from services.executor.sandbox import Sandbox
from services.executor.template import Templates

WORKER_FILE: Final = Path(proto.__file__).resolve()  # run as a script: it imports no taskmode module


class PythonInstance(Instance):
    """`python -P python_worker.py` speaking msgpack frames over its stdio."""

    _decode_ready = msgspec.msgpack.Decoder(proto.Ready).decode
    _decode_response = msgspec.msgpack.Decoder(proto.Response).decode

    def __init__(self, spec: FunctionSpec, *, work_dir: Path, sandbox: Sandbox,
                 templates: Templates | None = None) -> None:
        super().__init__(spec, work_dir=work_dir, sandbox=sandbox)
        self._templates = templates

    async def _launch(self) -> InvocationResult | None:
        self.marks_output = True  # the worker writes END_OF_INVOCATION after each request
        env = self._environment()
        forked = None
        if self._templates is not None:
            if not self._sandbox.enabled:  # its /tmp is a directory of ours (a sandbox mounts one)
                Path(self.paths.tmp_dir).mkdir(parents=True, exist_ok=True)
            forked = await self._templates.fork(self.spec, env)
        if forked is not None:
            self._adopt(forked)
        else:
            # -P: the code directory (the cwd) must not shadow the standard library or msgspec; the
            # worker puts it first on sys.path itself, once it has started.
            worker = f"{self.paths.runtime_dir}/{WORKER_FILE.name}"
            await self._spawn([sys.executable, "-P", worker], env=env, framed=True)
        spec = self.spec
        init = proto.Init(function_name=spec.name, handler=spec.handler, memory_mb=spec.memory_mb,
                          timeout_s=spec.timeout_s, instance_id=self.instance_id, code_dir=self.paths.code_dir)
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
