"""Synchronous InvokeFunction: the gateway's NATS request is answered with the handler's result."""

from __future__ import annotations

import logging

from nats.aio.client import Client
from nats.aio.msg import Msg

from services.executor.code_cache import CodeCache
from services.executor.instance import InvokeContext
from services.executor.pool import InstancePool
from services.executor.specs import function_spec
from shared import wire
from shared.errors import FunctionNotFound
from shared.ports import FunctionCatalog

log = logging.getLogger(__name__)


class SyncInvoker:
    def __init__(self, *, nc: Client, catalog: FunctionCatalog, code: CodeCache, pool: InstancePool) -> None:
        self._nc = nc
        self._catalog = catalog
        self._code = code
        self._pool = pool

    async def handle(self, msg: Msg) -> None:
        function_name = msg.subject.rsplit(".", 1)[-1]
        request_id = (msg.headers or {}).get(wire.REQUEST_ID_HEADER, "")
        function = await self._catalog.find_function(function_name)
        if function is None:
            await self._reply(msg, b"", {wire.REPLY_SYSTEM_ERROR: FunctionNotFound.code})
            return
        spec = await function_spec(function, self._code)
        async with self._pool.lease(spec) as instance:
            result = await instance.invoke(msg.data, InvokeContext(request_id=request_id, task_id=""))
        headers = {wire.REPLY_INSTANCE_ID: instance.instance_id}
        if not result.ok:
            headers[wire.REPLY_ERROR_TYPE] = result.error_type or "UnhandledInvocationError"
        log.info("sync invocation", extra={"function": function_name, "request_id": request_id, "ok": result.ok})
        await self._reply(msg, result.payload, headers)

    async def _reply(self, msg: Msg, data: bytes, headers: dict[str, str]) -> None:
        # Msg.respond cannot carry headers; the reply subject takes a plain publish.
        if msg.reply:
            await self._nc.publish(msg.reply, data, headers=headers)
