"""A small signed HTTP client for the FC 3.0 API, used by the integration tests and benchmarks."""

from __future__ import annotations

import asyncio
import base64
import io
import time
import zipfile
from typing import Any
from urllib.parse import quote

import httpx

from shared.acs3 import sign_request

API = "/2023-03-30"


def zip_code(files: dict[str, str]) -> str:
    """Base64 of a zip holding `files` (name -> source), as CreateFunction's code.zipFile."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, source in files.items():
            zf.writestr(name, source)
    return base64.b64encode(buf.getvalue()).decode()


class FcClient:
    def __init__(self, base_url: str, *, access_key_id: str, access_key_secret: str, sign: bool = True) -> None:
        # Fewer connections than the gateway allows one client address (64 by default, see
        # TASKMODE_GATEWAY_MAX_CONNECTIONS_PER_CLIENT): past it a connection is refused.
        self._http = httpx.AsyncClient(base_url=base_url, timeout=30, limits=httpx.Limits(max_connections=32))
        self._key_id = access_key_id
        self._secret = access_key_secret
        self._sign = sign

    async def close(self) -> None:
        await self._http.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        json: Any = None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """Send a request; `path` is below /2023-03-30 and is percent-encoded here."""
        import json as jsonlib

        raw = body if body is not None else (jsonlib.dumps(json).encode() if json is not None else b"")
        full_path = API + quote(path, safe="/")
        hdrs = {"host": self._http.base_url.netloc.decode(), **(headers or {})}
        if json is not None:
            hdrs["content-type"] = "application/json"
        elif body is not None:
            hdrs.setdefault("content-type", "application/octet-stream")
        if self._sign:
            hdrs.update(
                sign_request(method=method, path=full_path, query=query or {}, headers=hdrs, body=raw,
                             access_key_id=self._key_id, access_key_secret=self._secret)
            )
        return await self._http.request(method, full_path, params=query, content=raw, headers=hdrs)

    async def create_function(self, name: str, *, code: dict[str, str], handler: str = "index.handler",
                              runtime: str = "python3.10", timeout: int = 30, **extra: Any) -> httpx.Response:
        body = {"functionName": name, "runtime": runtime, "handler": handler, "timeout": timeout,
                "code": {"zipFile": zip_code(code)}, **extra}
        return await self.request("POST", "/functions", json=body)

    async def put_async_config(self, name: str, **config: Any) -> httpx.Response:
        return await self.request("PUT", f"/functions/{name}/async-invoke-config", json=config)

    async def invoke_async(self, name: str, payload: bytes = b"", *, task_id: str | None = None,
                           delay_s: int | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
        hdrs = {"x-fc-invocation-type": "Async", **(headers or {})}
        if task_id is not None:
            hdrs["x-fc-async-task-id"] = task_id
        if delay_s is not None:
            hdrs["x-fc-async-delay"] = str(delay_s)
        return await self.request("POST", f"/functions/{name}/invocations", body=payload, headers=hdrs)

    async def get_task(self, name: str, task_id: str) -> httpx.Response:
        return await self.request("GET", f"/functions/{name}/async-tasks/{task_id}")

    async def list_tasks(self, name: str, **query: str) -> httpx.Response:
        return await self.request("GET", f"/functions/{name}/async-tasks", query=query)

    async def stop_task(self, name: str, task_id: str) -> httpx.Response:
        return await self.request("PUT", f"/functions/{name}/async-tasks/{task_id}/stop")

    async def wait_for(self, name: str, task_id: str, statuses: set[str], *, deadline_s: float = 30,
                       interval_s: float = 0.05) -> dict[str, Any]:
        """Poll GetAsyncTask until the task's status is one of `statuses`, or fail at the deadline."""
        end = time.monotonic() + deadline_s
        last: dict[str, Any] = {}
        while time.monotonic() < end:
            response = await self.get_task(name, task_id)
            if response.status_code == 200:
                last = response.json()
                if last["status"] in statuses:
                    return last
            await asyncio.sleep(interval_s)
        raise AssertionError(f"task {task_id} did not reach {statuses} in {deadline_s}s; last seen {last}")
