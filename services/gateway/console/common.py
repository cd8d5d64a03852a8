"""What every console route shares: its state on the app, the route class that guards it, and
page rendering."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

from fastapi import Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from jinja2 import Environment

from services.gateway.console.monitoring import MetricsSampler
from services.gateway.console.session import (
    LOGIN_PATH,
    CrossSiteRequest,
    Session,
    SignInRequired,
    SignInThrottle,
    check_same_origin,
)
from services.gateway.console.settings import ConsoleSettings

CONSOLE_PREFIX: Final = "/console"
# Scripts only from the console's own files (no inline script, no eval); nothing may frame it.
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


@dataclass
class ConsoleState:
    settings: ConsoleSettings
    templates: Environment
    sampler: MetricsSampler
    throttle: SignInThrottle


def console_state(request: Request) -> ConsoleState:
    state: ConsoleState = request.app.state.console
    return state


def is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def sign_in_answer(request: Request) -> Response:
    """Send a visitor without a valid session to the sign-in page (htmx: by HX-Redirect)."""
    target = f"{LOGIN_PATH}?next={quote(request.url.path, safe='/')}"
    if is_htmx(request):
        return Response(status_code=401, headers={"HX-Redirect": target})
    if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
        return RedirectResponse(target, status_code=303)
    return Response("sign in required", status_code=401, media_type="text/plain")


class ConsoleRoute(APIRoute):
    """Every console route: unsafe methods must come from the console's own pages, and a missing
    session leads to the sign-in page instead of an API error body."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                check_same_origin(request)
                return await handle(request)
            except SignInRequired:
                return sign_in_answer(request)
            except CrossSiteRequest as err:
                return Response(err.message, status_code=403, media_type="text/plain")

        return guarded


def render(request: Request, template: str, *, status_code: int = 200, session: Session | None = None,
           headers: dict[str, str] | None = None, **context: Any) -> HTMLResponse:
    """A page or fragment; `session` shows who is signed in on full pages."""
    html = console_state(request).templates.get_template(template).render(session=session, **context)
    all_headers = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-store",
                   "Referrer-Policy": "same-origin", **(headers or {})}
    return HTMLResponse(html, status_code=status_code, headers=all_headers)


def fragment(request: Request, template: str, **context: Any) -> str:
    """A template rendered to a string (for streams and out-of-band swaps)."""
    return console_state(request).templates.get_template(template).render(**context)
