"""Python instances: `python_worker.py` speaking msgpack frames over stdio."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Final

import msgspec

from services.executor import python_worker as proto
from services.executor.instance import UNHANDLED, FunctionSpec, Instance, InvocationResult, InvokeContext
from services.executor.sandbox import Sandbox
from services.executor.template import MAX_WORKER_CONCURRENCY, Templates

WORKER_FILE: Final = Path(proto.__file__).resolve()  # run as a script: it imports no taskmode module


class PythonInstance(Instance):
    """`python -P python_worker.py` speaking msgpack frames over its stdio; with an
    instanceConcurrency above 1, that many requests at once (answered in any order, by `seq`)."""

    max_concurrency = MAX_WORKER_CONCURRENCY
    _decode_ready = msgspec.msgpack.Decoder(proto.Ready).decode
    _decode_response = msgspec.msgpack.Decoder(proto.Response).decode
    _answers: asyncio.Task[None] | None = None  # reads every Response once the worker is ready
    _waiting: dict[int, asyncio.Future[proto.Response]] | None = None  # requests not answered yet, by number

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
                          timeout_s=spec.timeout_s, instance_id=self.instance_id, code_dir=self.paths.code_dir,
                          concurrency=self.concurrency)
        ready = self._decode_ready(await self._exchange(init))
        if ready.ok:
            return None
        return InvocationResult(ok=False, payload=ready.error_payload, error_message=ready.error_message,
                                error_type=UNHANDLED)

    async def _call(self, payload: bytes, context: InvokeContext, number: int) -> InvocationResult:
        assert self._proc is not None and self._proc.stdin is not None
        self.tags_output = self.concurrency > 1  # the worker tags its output only then
        if self._waiting is None:
            self._waiting = {}
            self._answers = asyncio.ensure_future(self._read_answers(self._waiting))
        elif self._answers is not None and self._answers.done():
            raise ConnectionError("the worker's channel is broken")
        answer = self._waiting[number] = asyncio.get_running_loop().create_future()
        try:
            request = proto.Request(request_id=context.request_id, task_id=context.task_id, attempt=context.attempt,
                                    payload=payload, seq=number)
            self._proc.stdin.write(proto.encode_frame(request))
            await self._proc.stdin.drain()
            response = await answer
        finally:
            self._waiting.pop(number, None)
        return InvocationResult(ok=response.ok, payload=response.payload, error_message=response.error_message,
                                error_type=response.error_type)

    async def _read_answers(self, waiting: dict[int, asyncio.Future[proto.Response]]) -> None:
        """Hand each Response to the request it answers; when the channel breaks, fail them all."""
        assert self._proc is not None and self._proc.stdout is not None
        stdout = self._proc.stdout
        try:
            while True:
                (size,) = proto.FRAME_HEADER.unpack(await stdout.readexactly(proto.FRAME_HEADER.size))
                response = self._decode_response(await stdout.readexactly(size))
                answer = waiting.get(response.seq)
                if answer is not None and not answer.done():  # else: given up on (timed out)
                    answer.set_result(response)
        except (asyncio.IncompleteReadError, ConnectionError, msgspec.DecodeError) as exc:
            for answer in waiting.values():
                if not answer.done():
                    answer.set_exception(ConnectionError(f"the worker's channel broke: {exc!r}"))

    async def _exchange(self, message: msgspec.Struct) -> bytes:
        assert self._proc is not None and self._proc.stdin is not None and self._proc.stdout is not None
        return await proto.exchange(self._proc.stdin, self._proc.stdout, message)
