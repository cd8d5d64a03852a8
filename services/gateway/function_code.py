"""GetFunctionCode: a signed, expiring download URL for a function's zip, and the download itself.

FC answers GetFunctionCode with an OSS URL; here the gateway serves the zip itself at
`/code-downloads/<function>/<object key>?expires=<epoch s>&signature=<hex>`, outside the signed
API (a browser or curl must be able to fetch it as it is). The signature is an HMAC-SHA256 of
the path and the expiry under the gateway's URL secret: `TASKMODE_GATEWAY_URL_SECRET`, or else
one derived from the access keys, so gateways that share keys accept each other's URLs.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from functools import lru_cache
from typing import Final
from urllib.parse import quote

from fastapi import APIRouter, Request, Response

from services.gateway import params
from services.gateway.deps import ResourcesDep, SettingsDep
from services.gateway.errors import json_response
from services.gateway.settings import GatewaySettings
from shared.errors import AccessDenied
from shared.qualifiers import MAIN_VERSION_DRAW, resolve

router = APIRouter()  # under the signed API prefix
downloads = APIRouter()  # not signed: the URL carries its own signature

DOWNLOAD_PREFIX: Final = "/code-downloads"
URL_LIFETIME_S: Final = 600


@lru_cache(maxsize=8)
def _process_secret(_: str) -> bytes:
    # No keys and no secret (authentication off): URLs work until this gateway restarts.
    return secrets.token_bytes(32)


def url_secret(settings: GatewaySettings) -> bytes:
    """The key download URLs are signed with."""
    if settings.url_secret:
        return settings.url_secret.encode()
    if settings.access_keys:
        material = "\n".join(f"{k}:{v}" for k, v in sorted(settings.access_keys.items()))
        return hashlib.sha256(b"taskmode code download urls\n" + material.encode()).digest()
    return _process_secret("")


def _signature(secret: bytes, path: str, expires: int) -> str:
    return hmac.new(secret, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()


def signed_path(settings: GatewaySettings, *, function: str, code_key: str, now_s: float | None = None) -> str:
    """The path and query of a download URL that is valid for URL_LIFETIME_S."""
    path = f"{DOWNLOAD_PREFIX}/{quote(function, safe='')}/{quote(code_key, safe='')}"
    expires = int((time.time() if now_s is None else now_s) + URL_LIFETIME_S)
    return f"{path}?expires={expires}&signature={_signature(url_secret(settings), path, expires)}"


@router.get("/functions/{function_name}/code")
async def get_function_code(
    function_name: str, request: Request, resources: ResourcesDep, settings: SettingsDep, qualifier: str | None = None
) -> Response:
    params.check_function_name(function_name)
    resolved = await resolve(resources.catalog, function_name, params.check_qualifier(qualifier),
                             draw=lambda: MAIN_VERSION_DRAW)
    record = resolved.function
    base = str(request.base_url).rstrip("/")
    url = base + signed_path(settings, function=function_name, code_key=record.code_key)
    return json_response({"url": url, "checksum": record.code_checksum})


@downloads.get(DOWNLOAD_PREFIX + "/{function_name}/{code_key}")
async def download_code(
    function_name: str, code_key: str, request: Request, resources: ResourcesDep, settings: SettingsDep,
    expires: str = "", signature: str = "",
) -> Response:
    path = f"{DOWNLOAD_PREFIX}/{quote(function_name, safe='')}/{quote(code_key, safe='')}"
    # compare_digest takes str of ASCII only: a signature of any other characters is compared as bytes.
    if not (expires.isascii() and expires.isdigit()) or not hmac.compare_digest(
        _signature(url_secret(settings), path, int(expires)).encode(), signature.encode(errors="replace")
    ):
        raise AccessDenied("the download URL's signature is not valid")
    if int(expires) < time.time():
        raise AccessDenied("the download URL has expired; call GetFunctionCode again")
    archive = await resources.catalog.get_code(code_key)
    return Response(archive, media_type="application/zip",
                    headers={"content-disposition": f'attachment; filename="{function_name}.zip"'})
