"""The guard in front of every API route: cheap refusals first, the body last.

In order, each step costing more than the one before, so a hostile request is refused before it
costs much: the bus must be up (every route needs it; without it the answer is a quick 503); the
signature is checked from the headers alone (the signature covers the claimed body hash, not the
body); the nonce must not have been seen (replay protection, `nonces.py`); then the body is read,
under the route's size cap, hashed as it streams in and compared with the signed hash. An
unsigned 70 MB upload therefore costs a header parse, not 70 MB of memory. Routes get the body
from `deps.body_of`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Mapping
from datetime import datetime, timezone
from typing import Final
from urllib.parse import quote

from fastapi import Request
from starlette.types import Scope

from services.gateway import params
from services.gateway.context import note_task_id
from services.gateway.deps import Resources, resources_of, settings_of
from services.gateway.settings import GatewaySettings
from services.gateway.submission import early_task_id
from shared import acs3, wire
from shared.errors import EntityTooLarge, ServiceUnavailable, SignatureNonceUsed, SignatureNotMatch

log = logging.getLogger(__name__)

SMALL_BODY_BYTES: Final = 64 * 1024  # configs, stops, reads: anything but code and payloads
NONCE_HEADER: Final = "x-acs-signature-nonce"


def body_limit(request: Request, settings: GatewaySettings) -> int:
    """The most this route accepts: code for function writes, a payload for invocations."""
    template = getattr(request.scope.get("route"), "path", "")
    if template.endswith("/invocations"):
        kind = (request.headers.get(wire.FC_INVOCATION_TYPE_HEADER) or "").lower()
        return params.MAX_ASYNC_PAYLOAD_BYTES if kind == "async" else params.MAX_SYNC_PAYLOAD_BYTES
    if template.endswith(("/functions", "/functions/{function_name}")) and request.method in ("POST", "PUT"):
        return settings.max_request_body_bytes
    return SMALL_BODY_BYTES


async def read_chunks(chunks: AsyncIterator[bytes], *, declared_length: str | None, limit: int,
                      expected_sha256: str | None = None) -> bytes:
    """The whole body from `chunks`, refusing more than `limit` bytes before reading them all
    (a declared Content-Length over it is refused unread), and (when given) one whose SHA-256 is
    not `expected_sha256`, hashed as it streams in."""
    declared = declared_length or ""
    if declared.isdigit() and int(declared) > limit:
        raise EntityTooLarge(f"request body exceeds maximum allowed size ({limit} bytes)")
    parts: list[bytes] = []
    size = 0
    digest = hashlib.sha256()
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise EntityTooLarge(f"request body exceeds maximum allowed size ({limit} bytes)")
        digest.update(chunk)
        parts.append(chunk)
    if expected_sha256 is not None:
        acs3.check_body_hash(expected_sha256, digest.hexdigest())
    return b"".join(parts)


async def read_body(request: Request, *, limit: int, expected_sha256: str | None = None) -> bytes:
    """`read_chunks` of a FastAPI request."""
    return await read_chunks(request.stream(), declared_length=request.headers.get("content-length"), limit=limit,
                             expected_sha256=expected_sha256)


def raw_path(scope: Scope) -> str:
    # The signature covers the path exactly as sent (percent-encoded); re-encode only if the
    # server did not keep it.
    raw = scope.get("raw_path")
    if isinstance(raw, bytes) and raw:
        return raw.decode("latin-1").split("?", 1)[0]
    return quote(scope.get("path", "/"), safe="/")


def require_bus(resources: Resources) -> None:
    """Every API route needs the bus: without it the answer is a quick 503, before any work."""
    if not resources.nc.is_connected:
        raise ServiceUnavailable("the event bus is unreachable; try again shortly")


def verify_headers(settings: GatewaySettings, scope: Scope, headers: Mapping[str, str]) -> acs3.VerifiedHeaders:
    """The signature, checked from the headers alone (no I/O). The caller then checks the nonce
    (`check_nonce`), reads the body and compares its hash with `content_sha256`."""
    verified = acs3.verify_signature(
        method=scope.get("method", ""),
        raw_path=raw_path(scope),
        raw_query=scope.get("query_string", b"").decode("latin-1"),
        headers=headers,
        secrets=settings.access_keys,
        now=datetime.now(timezone.utc),
        max_skew_s=settings.max_clock_skew_s,
    )
    if not verified.nonce or NONCE_HEADER not in verified.signed_headers:
        raise SignatureNotMatch(f"{NONCE_HEADER} must be present and signed (it makes each request unrepeatable)")
    return verified


async def check_nonce(resources: Resources, verified: acs3.VerifiedHeaders) -> None:
    """A replay (a nonce already seen) is refused; a bus that cannot record the nonce is a 503."""
    if not await resources.nonces.first_use(verified.access_key_id, verified.nonce):
        raise SignatureNonceUsed(f"the request with {NONCE_HEADER} {verified.nonce[:64]!r} was already received")


def is_async_submission(request: Request) -> bool:
    """Whether the request is InvokeFunction with x-fc-invocation-type Async."""
    template = getattr(request.scope.get("route"), "path", "")
    kind = (request.headers.get(wire.FC_INVOCATION_TYPE_HEADER) or "").strip().lower()
    return bool(template.endswith("/invocations") and kind == "async")


async def signed_body(request: Request, *, limit: int) -> bytes:
    """The body of a request that must be signed: signature, then (for an async submission) its
    task id settled, then the nonce, then the body under `limit`, hashed as it streams. Sets
    `request.state.access_key_id`."""
    verified = verify_headers(settings_of(request), request.scope, request.headers)
    request.state.access_key_id = verified.access_key_id
    if is_async_submission(request) and (task_id := early_task_id(request.headers)):
        note_task_id(request, task_id)  # the nonce is a bus round trip: its 503 carries the id too
    await check_nonce(resources_of(request), verified)
    return await read_body(request, limit=limit, expected_sha256=verified.content_sha256)


async def guard_request(request: Request) -> None:
    """Router dependency: bus up, signature, nonce, then the body under the route's cap."""
    settings = settings_of(request)
    require_bus(resources_of(request))
    limit = body_limit(request, settings)
    if settings.auth_disabled:
        request.state.body = await read_body(request, limit=limit)
        return
    request.state.body = await signed_body(request, limit=limit)
