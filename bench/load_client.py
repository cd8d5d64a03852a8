"""The benchmarks' load generator: signed FC requests over one aiohttp session.

aiohttp rather than the tests' httpx client (tests/fc_client.py): the load generator shares the
machine's two cores with the system under test and its CPU is counted against taskmode, so each
request should cost it as little as it can (about a third of httpx's CPU per request here).
"""

from __future__ import annotations

import json
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import aiohttp

from shared.acs3 import sign_request

API = "/2023-03-30"


class LoadClient:
    """Signed submissions, listings and gets, from at most `connections` connections."""

    def __init__(self, base_url: str, *, access_key_id: str, access_key_secret: str, connections: int = 32) -> None:
        self._base = base_url.rstrip("/")
        self._host = self._base.removeprefix("http://")
        self._key = (access_key_id, access_key_secret)
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections),
                                              skip_auto_headers=("User-Agent",))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self._session.close()

    async def _send(self, method: str, path: str, *, query: dict[str, str] | None = None, body: bytes = b"",
                    headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        full_path = API + quote(path, safe="/")
        signed = {"host": self._host, **(headers or {})}
        signed.update(sign_request(method=method, path=full_path, query=query or {}, headers=signed, body=body,
                                   access_key_id=self._key[0], access_key_secret=self._key[1]))
        async with self._session.request(method, self._base + full_path, params=query, data=body,
                                         headers=signed) as response:
            return response.status, await response.read()

    async def submit(self, function: str, task_id: str, payload: bytes = b"{}") -> None:
        """An asynchronous invocation with `task_id`; anything but 202 raises."""
        status, body = await self._send(
            "POST", f"/functions/{function}/invocations", body=payload,
            headers={"x-fc-invocation-type": "Async", "x-fc-async-task-id": task_id,
                     "content-type": "application/octet-stream"})
        if status != 202:
            raise RuntimeError(f"submit of {task_id} failed: {status} {body[:300]!r}")

    async def list_page(self, function: str, **query: str) -> dict[str, Any]:
        """One ListAsyncTasks page (`tasks`, `nextToken`)."""
        status, body = await self._send("GET", f"/functions/{function}/async-tasks", query=query)
        if status != 200:
            raise RuntimeError(f"listing {function} failed: {status} {body[:300]!r}")
        page: dict[str, Any] = json.loads(body)
        return page

    async def get_task(self, function: str, task_id: str) -> tuple[int, dict[str, Any]]:
        """GetAsyncTask: the status code and, for 200, the task."""
        status, body = await self._send("GET", f"/functions/{function}/async-tasks/{task_id}")
        return status, (json.loads(body) if status == 200 else {})
