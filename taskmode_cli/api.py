"""A signed client for the taskmode (FC 3.0) API, with the live watch stream.

Every request is signed with ACS3-HMAC-SHA256 (`shared.acs3.sign_request`, the SDK's scheme).
An answer with an error status becomes `ApiError` carrying FC's `Code` and `Message`, so the
command line can print those instead of a traceback.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote, urlsplit

import httpx
from httpx_sse import SSEError, connect_sse

from shared.acs3 import sign_request
from taskmode_cli.profile import Profile

API_PREFIX: Final = "/2023-03-30"
TERMINAL_STATUSES: Final = frozenset({"Succeeded", "Failed", "Stopped", "Expired", "Invalid"})
# How long `watch_task` keeps trying to reconnect after the stream broke (e.g. a gateway restart).
RECONNECT_FOR_S: Final = 60.0
_RECONNECT_PAUSES_S: Final = (0.2, 0.5, 1.0, 2.0)


class ApiError(Exception):
    """An FC error answer: HTTP status, `Code`, `Message` and the request id."""

    def __init__(self, *, status: int, code: str, message: str, request_id: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass(frozen=True)
class Transition:
    """One task transition from the watch stream; `seq` is its stream sequence (the SSE id)."""

    seq: int
    data: dict[str, Any]

    @property
    def status(self) -> str:
        return str(self.data.get("status", ""))


def _error_of(response: httpx.Response) -> ApiError:
    request_id = response.headers.get("x-fc-request-id", "")
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict) and "Code" in body:
        return ApiError(status=response.status_code, code=str(body["Code"]),
                        message=str(body.get("Message", "")), request_id=str(body.get("RequestId", request_id)))
    text = response.text.strip()[:300] or response.reason_phrase
    return ApiError(status=response.status_code, code=f"HTTP{response.status_code}", message=text, request_id=request_id)


def _qualified(qualifier: str | None) -> dict[str, str]:
    """The `?qualifier=` query of a call (none when not given: the API's LATEST)."""
    return {"qualifier": qualifier} if qualifier else {}


class TaskmodeApi:
    """The API calls the CLI makes; paths are below /2023-03-30 and percent-encoded here."""

    def __init__(self, profile: Profile, *, timeout_s: float = 60.0) -> None:
        self.profile = profile
        parts = urlsplit(profile.endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"endpoint must be http(s)://host[:port], got {profile.endpoint!r}")
        self._host = parts.netloc
        # trust_env=False: a proxy from the environment would see (and could replay) signed requests.
        self._http = httpx.Client(base_url=profile.endpoint, timeout=timeout_s, trust_env=False)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> TaskmodeApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _signed(self, method: str, path: str, *, query: dict[str, str], body: bytes,
                headers: dict[str, str]) -> tuple[str, dict[str, str]]:
        full_path = API_PREFIX + quote(path, safe="/")
        signed = {"host": self._host, **headers}
        signed.update(sign_request(
            method=method, path=full_path, query=query, headers=signed, body=body,
            access_key_id=self.profile.access_key_id, access_key_secret=self.profile.access_key_secret,
        ))
        return full_path, signed

    def request(self, method: str, path: str, *, query: dict[str, str] | None = None, json_body: Any = None,
                body: bytes | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
        """Send a signed request; raises `ApiError` for a status of 400 or more."""
        hdrs = dict(headers or {})
        if json_body is not None:
            raw = json.dumps(json_body).encode()
            hdrs["content-type"] = "application/json"
        else:
            raw = body or b""
            if body is not None:
                hdrs.setdefault("content-type", "application/octet-stream")
        params = {k: v for k, v in (query or {}).items() if v is not None}
        full_path, signed = self._signed(method, path, query=params, body=raw, headers=hdrs)
        response = self._http.request(method, full_path, params=params, content=raw, headers=signed)
        if response.status_code >= 400:
            raise _error_of(response)
        return response

    # --- functions and their async config ----------------------------------------------------

    def list_functions(self, *, prefix: str | None = None) -> list[dict[str, Any]]:
        """Every function (all pages)."""
        found: list[dict[str, Any]] = []
        token = ""
        while True:
            query = {"limit": "100", **({"prefix": prefix} if prefix else {}), **({"nextToken": token} if token else {})}
            page = self.request("GET", "/functions", query=query).json()
            found.extend(page.get("functions", []))
            token = page.get("nextToken") or ""
            if not token:
                return found

    def get_function(self, name: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/functions/{name}").json())

    def create_function(self, spec: dict[str, Any]) -> dict[str, Any]:
        return dict(self.request("POST", "/functions", json_body=spec).json())

    def update_function(self, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        return dict(self.request("PUT", f"/functions/{name}", json_body=changes).json())

    def delete_function(self, name: str) -> None:
        self.request("DELETE", f"/functions/{name}")

    def put_async_config(self, name: str, config: dict[str, Any]) -> dict[str, Any]:
        return dict(self.request("PUT", f"/functions/{name}/async-invoke-config", json_body=config).json())

    def get_async_config(self, name: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/functions/{name}/async-invoke-config").json())

    # --- triggers, versions and aliases ------------------------------------------------------

    def _list_all(self, path: str, key: str, query: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """Every item of a paged listing (`nextToken` followed to the end)."""
        found: list[dict[str, Any]] = []
        token = ""
        while True:
            page = self.request("GET", path, query={"limit": "100", **(query or {}),
                                                    **({"nextToken": token} if token else {})}).json()
            found.extend(page.get(key, []))
            token = page.get("nextToken") or ""
            if not token:
                return found

    def create_trigger(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return dict(self.request("POST", f"/functions/{name}/triggers", json_body=spec).json())

    def get_trigger(self, name: str, trigger: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/functions/{name}/triggers/{trigger}").json())

    def list_triggers(self, name: str) -> list[dict[str, Any]]:
        return self._list_all(f"/functions/{name}/triggers", "triggers")

    def update_trigger(self, name: str, trigger: str, changes: dict[str, Any]) -> dict[str, Any]:
        return dict(self.request("PUT", f"/functions/{name}/triggers/{trigger}", json_body=changes).json())

    def delete_trigger(self, name: str, trigger: str) -> None:
        self.request("DELETE", f"/functions/{name}/triggers/{trigger}")

    def publish_version(self, name: str, *, description: str | None) -> dict[str, Any]:
        body = {"description": description} if description is not None else {}
        return dict(self.request("POST", f"/functions/{name}/versions", json_body=body).json())

    def list_versions(self, name: str) -> list[dict[str, Any]]:
        return self._list_all(f"/functions/{name}/versions", "versions")

    def delete_version(self, name: str, version_id: str) -> None:
        self.request("DELETE", f"/functions/{name}/versions/{version_id}")

    def create_alias(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return dict(self.request("POST", f"/functions/{name}/aliases", json_body=spec).json())

    def get_alias(self, name: str, alias: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/functions/{name}/aliases/{alias}").json())

    def list_aliases(self, name: str) -> list[dict[str, Any]]:
        return self._list_all(f"/functions/{name}/aliases", "aliases")

    def update_alias(self, name: str, alias: str, changes: dict[str, Any]) -> dict[str, Any]:
        return dict(self.request("PUT", f"/functions/{name}/aliases/{alias}", json_body=changes).json())

    def delete_alias(self, name: str, alias: str) -> None:
        self.request("DELETE", f"/functions/{name}/aliases/{alias}")

    # --- invocations and tasks ---------------------------------------------------------------

    def invoke(self, name: str, payload: bytes, *, headers: dict[str, str],
               qualifier: str | None = None) -> httpx.Response:
        return self.request("POST", f"/functions/{name}/invocations", body=payload, headers=headers,
                            query=_qualified(qualifier))

    def get_task(self, name: str, task_id: str, *, qualifier: str | None = None) -> dict[str, Any]:
        return dict(self.request("GET", f"/functions/{name}/async-tasks/{task_id}", query=_qualified(qualifier)).json())

    def list_tasks(self, name: str, query: dict[str, str]) -> dict[str, Any]:
        return dict(self.request("GET", f"/functions/{name}/async-tasks", query=query).json())

    def stop_task(self, name: str, task_id: str, *, qualifier: str | None = None) -> None:
        self.request("PUT", f"/functions/{name}/async-tasks/{task_id}/stop", query=_qualified(qualifier))

    def watch_task(self, name: str, task_id: str, *, reconnect_for_s: float = RECONNECT_FOR_S) -> Iterator[Transition]:
        """The task's transitions as they happen, ending after the terminal one.

        A broken stream is resumed with `Last-Event-ID` (each attempt signed anew), for up to
        `reconnect_for_s` seconds without progress; so a gateway restart loses nothing.
        """
        path = f"/functions/{name}/async-tasks/{task_id}/events"
        last_seq = 0
        failing_since: float | None = None
        attempt = 0
        while True:
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
            if last_seq:
                headers["Last-Event-ID"] = str(last_seq)
            full_path, signed = self._signed("GET", path, query={}, body=b"", headers=headers)
            try:
                with connect_sse(self._http, "GET", full_path, headers=signed,
                                 timeout=httpx.Timeout(10.0, read=60.0)) as source:
                    if source.response.status_code >= 400:
                        source.response.read()
                        raise _error_of(source.response)
                    for message in source.iter_sse():
                        if message.event == "transition":
                            last_seq = int(message.id)
                            failing_since, attempt = None, 0
                            yield Transition(seq=last_seq, data=message.json())
                        elif message.event == "end":
                            return
            except ApiError as err:
                if err.status < 500:
                    raise
                broken: Exception = err
            except (httpx.TransportError, SSEError) as err:
                broken = err
            else:
                broken = ConnectionError("the stream ended before the task did")
            now = time.monotonic()
            failing_since = failing_since or now
            if now - failing_since > reconnect_for_s:
                raise ConnectionError(f"lost the task's event stream: {broken}") from broken
            # A pause between reconnects, growing, so a restarting gateway is not hammered.
            time.sleep(_RECONNECT_PAUSES_S[min(attempt, len(_RECONNECT_PAUSES_S) - 1)])
            attempt += 1
