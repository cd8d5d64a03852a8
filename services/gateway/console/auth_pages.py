"""Sign-in, sign-out, the console's entry and its vendored static files."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Final

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import FileResponse, RedirectResponse

from services.gateway.deps import settings_of
from services.gateway.console.common import CONSOLE_PREFIX, ConsoleRoute, console_state, render
from services.gateway.console.session import (
    LOGIN_PATH,
    TooManySignInFailures,
    check_credentials,
    clear_session_cookie,
    is_https,
    issue_token,
    read_token,
    set_session_cookie,
    COOKIE_NAME,
)

log = logging.getLogger(__name__)

router = APIRouter(prefix=CONSOLE_PREFIX, route_class=ConsoleRoute)

STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
# Served by name from this fixed list only: nothing else under the package is reachable.
STATIC_FILES: Final = {
    "htmx.min.js": "text/javascript",
    "htmx-ext-sse.min.js": "text/javascript",
    "uplot.iife.min.js": "text/javascript",
    "uplot.min.css": "text/css",
    "console.css": "text/css",
    "console.js": "text/javascript",
}
HOME: Final = f"{CONSOLE_PREFIX}/functions"


def _safe_next(target: str | None) -> str:
    # Only a path inside the console: never an absolute URL an attacker could bounce users to.
    if target and target.startswith(f"{CONSOLE_PREFIX}/") and not target.startswith("//") and "\\" not in target:
        return target
    return HOME


@router.get("")
async def console_root() -> Response:
    return RedirectResponse(HOME, status_code=303)


@router.get("/static/{name}")
async def static_file(name: str) -> Response:
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        return Response("not found", status_code=404, media_type="text/plain")
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers={"Cache-Control": "public, max-age=3600"})


@router.get("/login")
async def login_page(request: Request, next: str | None = None) -> Response:
    settings = settings_of(request)
    token = request.cookies.get(COOKIE_NAME, "")
    if settings.auth_disabled or (token and read_token(token, settings.access_keys)):
        return RedirectResponse(_safe_next(next), status_code=303)
    return render(request, "login.html", next=_safe_next(next), error=None)


@router.post("/login")
async def login(
    request: Request,
    access_key_id: Annotated[str, Form(max_length=256)],
    access_key_secret: Annotated[str, Form(max_length=1024)],
    next: Annotated[str, Form(max_length=2048)] = HOME,
) -> Response:
    settings = settings_of(request)
    state = console_state(request)
    client = request.client.host if request.client else "unknown"
    try:
        state.throttle.check(client)
    except TooManySignInFailures as err:
        return render(request, "login.html", status_code=429, next=_safe_next(next), error=err.message)
    key_id = access_key_id.strip()
    if not check_credentials(settings.access_keys, key_id, access_key_secret):
        state.throttle.failed(client)
        log.warning("console sign-in refused", extra={"access_key_id": key_id[:64], "client": client})
        return render(request, "login.html", status_code=401, next=_safe_next(next),
                      error="That access key id and secret do not match a key of this gateway.")
    lifetime_s = int(state.settings.session_hours * 3600)
    token = issue_token(key_id, settings.access_keys[key_id], lifetime_s=lifetime_s)
    response = RedirectResponse(_safe_next(next), status_code=303)
    set_session_cookie(response, token, max_age_s=lifetime_s, secure=state.settings.secure_cookies or is_https(request))
    log.info("console sign-in", extra={"access_key_id": key_id, "client": client})
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    response = RedirectResponse(LOGIN_PATH, status_code=303)
    clear_session_cookie(response, secure=console_state(request).settings.secure_cookies or is_https(request))
    return response
