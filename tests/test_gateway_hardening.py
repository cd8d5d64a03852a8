"""Hostile requests against a real gateway: each is refused, and refused before it costs much.

One system for the module, with short read timeouts and a small per-client connection cap so the
slow-client defences act within a test's time. Raw sockets where a well-behaved client library
would not misbehave the way an attacker does.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from shared.acs3 import sign_request
from shared.devstack import Stack
from tests.fc_client import API, FcClient
from tests.integration_fixtures import ACCESS_KEY_ID, ACCESS_KEY_SECRET, client_for, new_stack

pytestmark = pytest.mark.timeout(120)

PER_CLIENT = 12


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    started = new_stack(tmp_path_factory.mktemp("hardened"), extra_env={
        "TASKMODE_GATEWAY_HEADER_TIMEOUT_S": "2",
        "TASKMODE_GATEWAY_BODY_IDLE_TIMEOUT_S": "2",
        "TASKMODE_GATEWAY_MAX_CONNECTIONS_PER_CLIENT": str(PER_CLIENT),
    })
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
async def fc(stack: Stack) -> AsyncIterator[FcClient]:
    client = client_for(stack)
    try:
        yield client
    finally:
        await client.close()


def _connect(stack: Stack) -> socket.socket:
    return socket.create_connection(("127.0.0.1", stack.gateway_port), timeout=10)


def _response_head(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data


def _closed_by_server(sock: socket.socket, *, deadline_s: float) -> bool:
    sock.settimeout(deadline_s)
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def _answered(sock: socket.socket, *, deadline_s: float) -> bool:
    """Whether a response's head arrives on `sock` within the deadline."""
    sock.settimeout(deadline_s)
    received = b""
    try:
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                return False
            received += chunk
    except TimeoutError:
        return False
    return received.startswith(b"HTTP/1.1 ")


def _signed_headers(stack: Stack, method: str, path: str, body: bytes, extra: dict[str, str] | None = None) -> dict[str, str]:
    headers = {"host": f"127.0.0.1:{stack.gateway_port}", **(extra or {})}
    headers.update(sign_request(method=method, path=path, query={}, headers=headers, body=body,
                                access_key_id=ACCESS_KEY_ID, access_key_secret=ACCESS_KEY_SECRET))
    return headers


def _raw_request(method: str, path: str, headers: dict[str, str], *, content_length: int) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items()),
             f"content-length: {content_length}", "", ""]
    return "\r\n".join(lines).encode()


def test_an_unsigned_huge_upload_is_refused_before_its_body_is_read(stack: Stack) -> None:
    with _connect(stack) as sock:
        sock.sendall(_raw_request("POST", f"{API}/functions", {"host": "gw", "content-type": "application/json"},
                                  content_length=70 * 1024 * 1024))
        sock.sendall(b"{" + b" " * 1024)  # a sliver of the 70 MB it announced
        status, head = _response_head(sock)
    assert status == 403, head


def test_a_signed_body_over_the_routes_cap_is_refused_from_its_length(stack: Stack) -> None:
    path = f"{API}/functions/anything/async-invoke-config"
    headers = _signed_headers(stack, "PUT", path, b"")
    with _connect(stack) as sock:
        sock.sendall(_raw_request("PUT", path, headers, content_length=10 * 1024 * 1024))
        status, head = _response_head(sock)
    assert status == 400, head


async def test_a_body_that_does_not_match_its_signed_hash_is_refused(fc: FcClient, stack: Stack, fn_name: str) -> None:
    import httpx

    path = f"{API}/functions/{fn_name}/invocations"
    headers = _signed_headers(stack, "POST", path, b"signed body", {"x-fc-invocation-type": "Async"})
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{stack.gateway_port}") as http:
        response = await http.post(path, content=b"other body!", headers=headers)
    assert response.status_code == 403 and response.json()["Code"] == "SignatureNotMatch"


async def test_a_replayed_request_is_refused_even_with_headers_added(fc: FcClient, stack: Stack, fn_name: str) -> None:
    import httpx

    assert (await fc.create_function(fn_name, code={"index.py": "def handler(e, c):\n    return e\n"})).status_code == 200
    path = f"{API}/functions/{fn_name}/invocations"
    headers = _signed_headers(stack, "POST", path, b"once")  # a synchronous call, as captured
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{stack.gateway_port}", timeout=60) as http:
        first = await http.post(path, content=b"once", headers=headers)
        assert first.status_code == 200, first.text
        replayed = await http.post(path, content=b"once", headers=headers)
        turned_async = await http.post(path, content=b"once", headers={
            **headers, "x-fc-invocation-type": "Async", "x-fc-async-delay": "600"})
    assert replayed.status_code == 403 and replayed.json()["Code"] == "SignatureNonceUsed"
    assert turned_async.status_code == 403 and turned_async.json()["Code"] == "SignatureNonceUsed"
    listed = (await fc.list_tasks(fn_name)).json()
    assert listed["tasks"] == []


def test_slow_headers_and_slow_bodies_are_cut_off(stack: Stack) -> None:
    slow_headers = _connect(stack)
    slow_headers.sendall(b"GET /healthz HTTP/1.1\r\nhost: gw\r\n")  # and never the blank line
    silent = _connect(stack)  # says nothing at all
    slow_body = _connect(stack)
    slow_body.sendall(_raw_request("POST", f"{API}/functions", {"host": "gw"}, content_length=100) + b"{")
    try:
        for sock in (slow_headers, silent, slow_body):
            assert _closed_by_server(sock, deadline_s=30), "a slow connection was kept open"
    finally:
        for sock in (slow_headers, silent, slow_body):
            sock.close()


def test_one_client_cannot_hold_more_than_its_share_of_connections(stack: Stack) -> None:
    held: list[socket.socket] = []
    try:
        for _ in range(PER_CLIENT):
            held.append(_connect(stack))
            # An answer proves the server has counted the connection; keep-alive keeps it open.
            held[-1].sendall(b"GET /healthz HTTP/1.1\r\nhost: gw\r\n\r\n")
            assert _answered(held[-1], deadline_s=10), "a connection within the cap was not served"
        extra = _connect(stack)
        assert _closed_by_server(extra, deadline_s=10), "a connection past the cap was kept"
        extra.close()
    finally:
        for sock in held:
            sock.close()


async def test_invalid_utf8_in_a_json_body_is_a_400(fc: FcClient) -> None:
    response = await fc.request("POST", "/functions", body=b'{"functionName": "bad\xff\xfe"}',
                                headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["Code"] == "InvalidArgument"


def _bomb(*, inflated_mb: int) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("index.py", "def handler(e, c):\n    return e\n")
        with zf.open("padding.bin", "w", force_zip64=True) as member:
            zero = bytes(1024 * 1024)
            for _ in range(inflated_mb):
                member.write(zero)
    return base64.b64encode(buf.getvalue()).decode()


async def test_a_zip_bomb_is_refused_and_the_gateway_keeps_answering(fc: FcClient, fn_name: str) -> None:
    code = _bomb(inflated_mb=600)  # 600 MiB of zeros in well under 1 MB
    body = {"functionName": fn_name, "runtime": "python3.10", "handler": "index.handler", "code": {"zipFile": code}}
    created, health = await asyncio.gather(fc.request("POST", "/functions", json=body),
                                           fc._http.get("/healthz"))
    assert created.status_code == 400 and "unpacks to" in created.json()["Message"], created.text
    assert health.status_code == 200
    assert (await fc.request("GET", f"/functions/{fn_name}")).status_code == 404


def test_a_zip_that_lies_about_its_size_is_not_unpacked_past_the_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shared import codezip
    from shared.errors import InvalidArgument

    monkeypatch.setattr(codezip, "MAX_UNZIPPED_BYTES", 4 * 1024 * 1024)
    data = base64.b64decode(_bomb(inflated_mb=8))
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():  # what a forged central directory would claim
            info.file_size = min(info.file_size, 1024)
        with pytest.raises((InvalidArgument, zipfile.BadZipFile)):
            codezip.extract(archive, tmp_path, archive_bytes=len(data))
    written = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert written <= 4 * 1024 * 1024


async def test_a_request_signed_without_a_nonce_is_refused(stack: Stack, fn_name: str) -> None:
    """Without a signed nonce nothing would tell a replay from the original."""
    from datetime import datetime, timezone

    import httpx

    from shared import acs3

    path = f"{API}/functions/{fn_name}"
    headers = {"host": f"127.0.0.1:{stack.gateway_port}",
               "x-acs-date": datetime.now(timezone.utc).strftime(acs3.DATE_FORMAT),
               "x-acs-content-sha256": acs3.sha256_hex(b"")}
    signed = sorted(headers)
    canonical = acs3.canonical_request(method="GET", path=path, query=[], headers=acs3.group_headers(headers),
                                       signed_headers=signed, hashed_payload=headers["x-acs-content-sha256"])
    signature = acs3.compute_signature(ACCESS_KEY_SECRET, acs3.string_to_sign(canonical))
    headers["Authorization"] = (f"{acs3.ALGORITHM} Credential={ACCESS_KEY_ID},SignedHeaders={';'.join(signed)},"
                                f"Signature={signature}")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{stack.gateway_port}") as http:
        response = await http.get(path, headers=headers)
    assert response.status_code == 403
    assert response.json()["Code"] == "SignatureNotMatch" and "nonce" in response.json()["Message"]
