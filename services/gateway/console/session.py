"""Console sign-in: verify an access key once, then a signed, expiring session cookie.

The cookie is stateless: `<key id>.<expires>.<nonce>.<mac>`, where the MAC is HMAC-SHA256 under
a key derived from that access key's secret. It never contains the secret, it survives a
gateway restart and works across several gateways, and it stops working when the key is removed
or its secret changes. It is HttpOnly, SameSite=Strict, limited to /console and expires (Max-Age
and the signed expiry both); Secure when the request came over https or when configured.

Unsafe requests (POST, PUT, DELETE) must also carry an Origin (or Referer) of this very site:
SameSite=Strict already keeps the cookie off cross-site requests, this is the second lock.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from fastapi import Request, Response

from shared.errors import AccessDenied, TaskmodeError
from services.gateway.deps import settings_of

COOKIE_NAME: Final = "taskmode_console"
COOKIE_PATH: Final = "/console"
LOGIN_PATH: Final = "/console/login"
_KEY_CONTEXT: Final = b"taskmode console session v1"
_UNSAFE_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Failed sign-ins per client address before it has to wait (a brake on guessing secrets).
MAX_FAILURES: Final = 10
FAILURE_WINDOW_S: Final = 60.0


class SignInRequired(TaskmodeError):
    code = "SignInRequired"
    http_status = 401


class CrossSiteRequest(AccessDenied):
    code = "CrossSiteRequestRefused"


class TooManySignInFailures(TaskmodeError):
    code = "TooManyRequests"
    http_status = 429


@dataclass(frozen=True)
class Session:
    """Who is signed in: the access key id the console acts as ("" when auth is disabled)."""

    key_id: str
    expires_at: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, payload: str) -> str:
    session_key = hmac.new(secret.encode(), _KEY_CONTEXT, hashlib.sha256).digest()
    return _b64(hmac.new(session_key, payload.encode(), hashlib.sha256).digest())


def issue_token(key_id: str, secret: str, *, lifetime_s: int, now: float | None = None) -> str:
    """A session token for `key_id`, valid for `lifetime_s` seconds."""
    expires = int((now if now is not None else time.time()) + lifetime_s)
    payload = f"{_b64(key_id.encode())}.{expires}.{secrets.token_urlsafe(12)}"
    return f"{payload}.{_mac(secret, payload)}"


def read_token(token: str, access_keys: dict[str, str], *, now: float | None = None) -> Session | None:
    """The session a token stands for, or None if it is malformed, forged, expired or its key is gone."""
    payload, _, mac = token.rpartition(".")
    parts = payload.split(".")
    if len(parts) != 3 or not mac:
        return None
    try:
        key_id = _unb64(parts[0]).decode()
        expires = int(parts[1])
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    secret = access_keys.get(key_id)
    if secret is None or not hmac.compare_digest(mac, _mac(secret, payload)):
        return None
    if expires <= (now if now is not None else time.time()):
        return None
    return Session(key_id=key_id, expires_at=expires)


def check_credentials(access_keys: dict[str, str], key_id: str, secret: str) -> bool:
    """Whether `secret` is the secret of `key_id`, compared in constant time."""
    expected = access_keys.get(key_id)
    # Compare against something even for an unknown id, so timing does not tell valid ids apart.
    candidate = expected if expected is not None else secrets.token_urlsafe(24)
    return hmac.compare_digest(candidate.encode(), secret.encode()) and expected is not None


def current_session(request: Request) -> Session:
    """Route dependency: the signed-in session, or `SignInRequired`."""
    settings = settings_of(request)
    if settings.auth_disabled:
        return Session(key_id="", expires_at=0)
    token = request.cookies.get(COOKIE_NAME, "")
    session = read_token(token, settings.access_keys) if token else None
    if session is None:
        raise SignInRequired("sign in to use the console")
    return session


def is_https(request: Request) -> bool:
    return request.url.scheme == "https"


def set_session_cookie(response: Response, token: str, *, max_age_s: int, secure: bool) -> None:
    response.set_cookie(
        COOKIE_NAME, token, max_age=max_age_s, path=COOKIE_PATH, httponly=True, samesite="strict", secure=secure
    )


def clear_session_cookie(response: Response, *, secure: bool) -> None:
    response.delete_cookie(COOKIE_NAME, path=COOKIE_PATH, httponly=True, samesite="strict", secure=secure)


def check_same_origin(request: Request) -> None:
    """Refuse an unsafe request whose Origin (or, lacking one, Referer) is not this site."""
    if request.method not in _UNSAFE_METHODS:
        return
    claimed = request.headers.get("origin") or request.headers.get("referer") or ""
    parts = urlsplit(claimed)
    host = request.headers.get("host", "")
    if not claimed or parts.netloc != host or parts.scheme not in ("http", "https"):
        raise CrossSiteRequest("the console accepts changes only from its own pages")


class SignInThrottle:
    """Counts failed sign-ins per client address over a sliding window."""

    def __init__(self, *, max_failures: int = MAX_FAILURES, window_s: float = FAILURE_WINDOW_S) -> None:
        self._max = max_failures
        self._window_s = window_s
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, client: str, now: float) -> deque[float]:
        times = self._failures.setdefault(client, deque())
        while times and now - times[0] > self._window_s:
            times.popleft()
        return times

    def check(self, client: str, *, now: float | None = None) -> None:
        moment = now if now is not None else time.monotonic()
        if len(self._recent(client, moment)) >= self._max:
            raise TooManySignInFailures("too many failed sign-ins; wait a minute")

    def failed(self, client: str, *, now: float | None = None) -> None:
        moment = now if now is not None else time.monotonic()
        self._recent(client, moment).append(moment)
        if len(self._failures) > 10_000:  # bounded: forget addresses that have gone quiet
            for stale in [c for c, t in self._failures.items() if not t or moment - t[-1] > self._window_s]:
                del self._failures[stale]
