"""The console acts through the gateway's own FC API, in process.

Each console action is a real API request, signed as the signed-in access key and handed
straight to this app over ASGI (no socket). So the console runs exactly the validation, task
logic, metrics and logging an SDK call runs, and never re-implements any of it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final
from urllib.parse import quote

import httpx
from fastapi import Request

from shared import acs3, wire
from services.gateway.deps import settings_of
from services.gateway.console.session import Session

_INTERNAL_HOST: Final = "console.internal"


class ApiFailure(Exception):
    """The API refused: FC's code and message, and the HTTP status."""

    def __init__(self, *, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class ConsoleApi:
    def __init__(self, http: httpx.AsyncClient, *, key_id: str, secret: str | None) -> None:
        self._http = http
        self._key_id = key_id
        self._secret = secret

    async def call(self, method: str, path: str, *, query: dict[str, str] | None = None, json_body: Any = None,
                   body: bytes | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
        """One API request below /2023-03-30; an error status becomes `ApiFailure`."""
        hdrs = {"host": _INTERNAL_HOST, **(headers or {})}
        if json_body is not None:
            raw = json.dumps(json_body).encode()
            hdrs["content-type"] = "application/json"
        else:
            raw = body or b""
            if body is not None:
                hdrs.setdefault("content-type", "application/octet-stream")
        params = {k: v for k, v in (query or {}).items() if v}
        full_path = f"/{wire.API_VERSION}" + quote(path, safe="/")
        if self._secret is not None:
            hdrs.update(acs3.sign_request(method=method, path=full_path, query=params, headers=hdrs, body=raw,
                                          access_key_id=self._key_id, access_key_secret=self._secret))
        response = await self._http.request(method, full_path, params=params, content=raw, headers=hdrs)
        if response.status_code >= 400:
            try:
                error = response.json()
            except ValueError:
                error = {}
            raise ApiFailure(status=response.status_code, code=str(error.get("Code", "Error")),
                             message=str(error.get("Message", response.text[:300])))
        return response

    async def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return (await self.call(method, path, **kwargs)).json()


@asynccontextmanager
async def console_api(request: Request, session: Session) -> AsyncIterator[ConsoleApi]:
    """An API client for this request, acting as the session's access key."""
    settings = settings_of(request)
    secret = None if settings.auth_disabled else settings.access_keys.get(session.key_id)
    transport = httpx.ASGITransport(app=request.app, client=("127.0.0.1", 0))
    async with httpx.AsyncClient(transport=transport, base_url=f"http://{_INTERNAL_HOST}", timeout=60) as http:
        yield ConsoleApi(http, key_id=session.key_id, secret=secret)
