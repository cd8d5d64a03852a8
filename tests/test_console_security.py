"""Console security: no session, no console; the cookie's flags; forged, expired and cross-site
requests refused; the secret never shows in a page or a log."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from services.gateway.console.session import SignInThrottle, TooManySignInFailures, issue_token, read_token
from shared.devstack import Stack
from tests.fc_client import FcClient
from tests.integration_fixtures import ACCESS_KEY_ID, ACCESS_KEY_SECRET, HANDLERS

pytestmark = pytest.mark.timeout(60)

FUNCTION = "secured"


@pytest.fixture
async def browser_like(shared_stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """A cookie-keeping client that sends the Origin a browser would."""
    base = f"http://127.0.0.1:{shared_stack.gateway_port}"
    async with httpx.AsyncClient(base_url=base, headers={"origin": base}, follow_redirects=False) as http:
        yield http


async def sign_in(http: httpx.AsyncClient, *, secret: str = ACCESS_KEY_SECRET) -> httpx.Response:
    return await http.post("/console/login", data={"access_key_id": ACCESS_KEY_ID, "access_key_secret": secret})


async def ensure_function(fc: FcClient) -> None:
    response = await fc.create_function(FUNCTION, code={"index.py": HANDLERS})
    assert response.status_code in (200, 409)
    if (await fc.get_task(FUNCTION, "t1")).status_code == 404:
        assert (await fc.invoke_async(FUNCTION, b"x", task_id="t1")).status_code == 202
        await fc.wait_for(FUNCTION, "t1", {"Succeeded"})


CONSOLE_READS = [
    "/console/functions",
    f"/console/functions/{FUNCTION}",
    f"/console/functions/{FUNCTION}/tasks",
    f"/console/functions/{FUNCTION}/tasks-live",
    f"/console/functions/{FUNCTION}/tasks/t1",
    f"/console/functions/{FUNCTION}/tasks/t1/live",
    f"/console/functions/{FUNCTION}/tasks/t1/logs",
    f"/console/functions/{FUNCTION}/monitoring",
    f"/console/functions/{FUNCTION}/monitoring/data",
]
CONSOLE_WRITES = [
    ("POST", "/console/functions"),
    ("POST", f"/console/functions/{FUNCTION}/update"),
    ("POST", f"/console/functions/{FUNCTION}/async-config"),
    ("POST", f"/console/functions/{FUNCTION}/delete"),
    ("POST", f"/console/functions/{FUNCTION}/tasks"),
    ("PUT", f"/console/functions/{FUNCTION}/tasks/t1/stop"),
]


async def test_every_console_endpoint_needs_a_session(fc: FcClient, browser_like: httpx.AsyncClient) -> None:
    await ensure_function(fc)
    for path in CONSOLE_READS:
        response = await browser_like.get(path)
        assert response.status_code == 401, path
        page = await browser_like.get(path, headers={"accept": "text/html"})
        assert page.status_code == 303 and page.headers["location"].startswith("/console/login"), path
        htmx = await browser_like.get(path, headers={"hx-request": "true"})
        assert htmx.status_code == 401 and htmx.headers["hx-redirect"].startswith("/console/login"), path
    for method, path in CONSOLE_WRITES:
        response = await browser_like.request(method, path, data={"name": "x", "task_id_mode": "auto"})
        assert response.status_code == 401, (method, path)
    for forged in ("garbage", issue_token(ACCESS_KEY_ID, "not-the-secret", lifetime_s=3600),
                   issue_token(ACCESS_KEY_ID, ACCESS_KEY_SECRET, lifetime_s=-1),
                   issue_token("someone-else", ACCESS_KEY_SECRET, lifetime_s=3600)):
        response = await browser_like.get("/console/functions", headers={"cookie": f"taskmode_console={forged}"})
        assert response.status_code == 401
    # The sign-in page and the vendored files are public; nothing else under static is.
    assert (await browser_like.get("/console/login")).status_code == 200
    assert (await browser_like.get("/console/static/htmx.min.js")).status_code == 200
    assert (await browser_like.get("/console/static/..%2Fsession.py")).status_code == 404
    assert (await browser_like.get("/console/static/session.py")).status_code == 404


async def test_the_session_cookie_has_the_flags_and_no_secret(browser_like: httpx.AsyncClient) -> None:
    refused = await sign_in(browser_like, secret="wrong-secret")
    assert refused.status_code == 401 and "set-cookie" not in refused.headers
    response = await sign_in(browser_like)
    assert response.status_code == 303 and response.headers["location"] == "/console/functions"
    cookie = response.headers["set-cookie"]
    attributes = {part.strip().split("=", 1)[0].lower(): part.strip() for part in cookie.split(";")}
    assert "httponly" in attributes
    assert attributes["samesite"].lower() == "samesite=strict"
    assert attributes["path"] == "Path=/console"
    assert 0 < int(attributes["max-age"].split("=")[1]) <= 24 * 3600
    assert "secure" not in attributes  # plain http here; https requests get Secure
    token = browser_like.cookies["taskmode_console"]
    assert ACCESS_KEY_SECRET not in cookie and ACCESS_KEY_SECRET not in token
    assert read_token(token, {ACCESS_KEY_ID: ACCESS_KEY_SECRET}) is not None
    assert read_token(token[:-2] + "xx", {ACCESS_KEY_ID: ACCESS_KEY_SECRET}) is None
    assert read_token(token, {ACCESS_KEY_ID: "rotated-secret"}) is None
    assert (await browser_like.get("/console/functions")).status_code == 200


async def test_cross_site_changes_are_refused(fc: FcClient, shared_stack: Stack, browser_like: httpx.AsyncClient) -> None:
    await ensure_function(fc)
    assert (await sign_in(browser_like)).status_code == 303
    path = f"/console/functions/{FUNCTION}/tasks"
    form = {"task_id_mode": "custom", "task_id": "csrf-1", "payload_format": "text", "payload": "x"}
    for origin in ("http://evil.example", ""):
        response = await browser_like.post(path, data=form, headers={"origin": origin})
        assert response.status_code == 403
    assert (await fc.get_task(FUNCTION, "csrf-1")).status_code == 404  # nothing was submitted
    same_site = await browser_like.post(path, data=form)
    assert same_site.status_code == 200 and "csrf-1" in same_site.text
    # Sign-in itself is a change: a cross-site form cannot sign a visitor in either.
    assert (await browser_like.post("/console/login", headers={"origin": "http://evil.example"},
                                    data={"access_key_id": ACCESS_KEY_ID, "access_key_secret": ACCESS_KEY_SECRET})).status_code == 403


async def test_no_secret_in_pages_or_logs(fc: FcClient, shared_stack: Stack, browser_like: httpx.AsyncClient) -> None:
    await ensure_function(fc)
    wrong_secret = "wrong-secret-that-must-not-be-logged"
    assert (await sign_in(browser_like, secret=wrong_secret)).status_code == 401
    assert (await sign_in(browser_like)).status_code == 303
    for path in CONSOLE_READS:
        if path.endswith("live"):
            continue  # streams: covered by the browser tests
        response = await browser_like.get(path)
        assert response.status_code == 200, path
        assert ACCESS_KEY_SECRET not in response.text, path
        assert "content-security-policy" in response.headers or path.endswith("/data")
    logs = (shared_stack.data_dir / "logs" / "gateway.log").read_text()
    assert "console sign-in" in logs
    assert ACCESS_KEY_SECRET not in logs and wrong_secret not in logs


def test_repeated_failed_sign_ins_are_slowed_down() -> None:
    throttle = SignInThrottle(max_failures=3, window_s=60)
    for second in range(3):
        throttle.check("10.0.0.1", now=second)
        throttle.failed("10.0.0.1", now=second)
    with pytest.raises(TooManySignInFailures):
        throttle.check("10.0.0.1", now=10)
    throttle.check("10.0.0.2", now=10)  # other addresses are not affected
    throttle.check("10.0.0.1", now=70)  # and the window slides
