"""Synchronous InvokeFunction: the gateway's NATS request is answered with the handler's result."""

from __future__ import annotations

import base64
import logging

from nats.aio.client import Client
from nats.aio.msg import Msg

from services.executor.code_cache import CodeCache
from services.executor.instance import InvokeContext
from services.executor.pool import InstancePool
from services.executor.specs import function_spec
from shared import wire
from shared.errors import TaskmodeError
from shared.ports import FunctionCatalog
from shared.qualifiers import check_qualifier, resolve

# FC's x-fc-log-result: the last 4 KB of the invocation's log.
LOG_TAIL_BYTES = 4096

log = logging.getLogger(__name__)


class SyncInvoker:
    def __init__(self, *, nc: Client, catalog: FunctionCatalog, code: CodeCache, pool: InstancePool) -> None:
        self._nc = nc
        self._catalog = catalog
        self._code = code
        self._pool = pool

    async def handle(self, msg: Msg) -> None:
        function_name = msg.subject.rsplit(".", 1)[-1]
        request_headers = msg.headers or {}
        request_id = request_headers.get(wire.REQUEST_ID_HEADER, "")
        try:
            qualifier = check_qualifier(request_headers.get(wire.REQUEST_QUALIFIER))
            resolved = await resolve(self._catalog, function_name, qualifier)
        except TaskmodeError as err:  # deleted (or repointed) since the gateway checked
            await self._reply(msg, err.message.encode(), {wire.REPLY_SYSTEM_ERROR: err.code})
            return
        spec = await function_spec(resolved.function, self._code, version=resolved.version_id)
        async with self._pool.lease(spec) as instance:
            result = await instance.invoke(msg.data, InvokeContext(request_id=request_id, task_id=""))
        headers = {wire.REPLY_INSTANCE_ID: instance.instance_id}
        if request_headers.get(wire.REQUEST_LOG_TAIL):
            headers[wire.REPLY_LOG_TAIL] = base64.b64encode(result.logs[-LOG_TAIL_BYTES:]).decode()
        if not result.ok:
            headers[wire.REPLY_ERROR_TYPE] = result.error_type or "UnhandledInvocationError"
        log.info("sync invocation", extra={"function": function_name, "request_id": request_id, "ok": result.ok})
        await self._reply(msg, result.payload, headers)

    async def _reply(self, msg: Msg, data: bytes, headers: dict[str, str]) -> None:
        # Msg.respond cannot carry headers; the reply subject takes a plain publish.
        if msg.reply:
            await self._nc.publish(msg.reply, data, headers=headers)
