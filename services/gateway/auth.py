"""Authentication: the guard in front of every API route.

`guard_request` reads the body (capped), then checks its ACS3-HMAC-SHA256 signature against the
configured access keys unless auth is disabled. Routes get the body back from `deps.body_of`.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from urllib.parse import quote

from collections.abc import Mapping

from fastapi import Request
from starlette.types import Scope

from services.gateway.deps import settings_of
from services.gateway.settings import GatewaySettings
from shared import acs3
from shared.errors import EntityTooLarge

log = logging.getLogger(__name__)


async def read_body(request: Request, *, limit: int) -> bytes:
    """The whole body, refusing more than `limit` bytes before reading them all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise EntityTooLarge(f"request body exceeds maximum allowed size ({limit} bytes)")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise EntityTooLarge(f"request body exceeds maximum allowed size ({limit} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def raw_path(scope: Scope) -> str:
    # The signature covers the path exactly as sent (percent-encoded); re-encode only if the
    # server did not keep it.
    raw = scope.get("raw_path")
    if isinstance(raw, bytes) and raw:
        return raw.decode("latin-1").split("?", 1)[0]
    return quote(scope.get("path", "/"), safe="/")


def verify(settings: GatewaySettings, scope: Scope, headers: Mapping[str, str], body: bytes) -> str | None:
    """The caller's access key id once its signature checks out; None when auth is disabled."""
    if settings.auth_disabled:
        return None
    return acs3.verify_request(
        method=scope.get("method", ""),
        raw_path=raw_path(scope),
        raw_query=scope.get("query_string", b"").decode("latin-1"),
        headers=headers,
        body=body,
        secrets=settings.access_keys,
        now=datetime.now(timezone.utc),
        max_skew_s=settings.max_clock_skew_s,
    )


async def guard_request(request: Request) -> None:
    """Router dependency: read the body, then verify the caller's signature (unless disabled)."""
    settings = settings_of(request)
    body = await read_body(request, limit=settings.max_request_body_bytes)
    request.state.body = body
    verify_signature(request, body)


def verify_signature(request: Request, body: bytes) -> None:
    """Check the request's ACS3 signature against the access keys (unless auth is disabled)."""
    request.state.access_key_id = verify(settings_of(request), request.scope, request.headers, body)
