"""Gateway settings: the common ones plus where to listen and who may call.

Built once in `__main__` from the environment and passed down; nothing here runs at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Self

import msgspec

from shared.errors import InvalidArgument
from shared.settings import CommonSettings, env_bool, env_float, env_int, env_str

PORT_VAR = "TASKMODE_GATEWAY_PORT"
HOST_VAR = "TASKMODE_GATEWAY_HOST"
METRICS_PORT_VAR = "TASKMODE_GATEWAY_METRICS_PORT"
ACCESS_KEYS_VAR = "TASKMODE_ACCESS_KEYS"
ACCESS_KEYS_FILE_VAR = "TASKMODE_ACCESS_KEYS_FILE"  # the same, from a file only the gateway can read
AUTH_DISABLED_VAR = "TASKMODE_AUTH_DISABLED"
MAX_SKEW_VAR = "TASKMODE_GATEWAY_MAX_CLOCK_SKEW_S"
PUBLIC_URL_VAR = "TASKMODE_GATEWAY_PUBLIC_URL"
URL_SECRET_VAR = "TASKMODE_GATEWAY_URL_SECRET"
HEADER_TIMEOUT_VAR = "TASKMODE_GATEWAY_HEADER_TIMEOUT_S"
BODY_IDLE_TIMEOUT_VAR = "TASKMODE_GATEWAY_BODY_IDLE_TIMEOUT_S"
MAX_PER_CLIENT_VAR = "TASKMODE_GATEWAY_MAX_CONNECTIONS_PER_CLIENT"
MAX_CONNECTIONS_VAR = "TASKMODE_GATEWAY_MAX_CONNECTIONS"


def parse_access_keys(text: str) -> dict[str, str]:
    """`id:secret[,id:secret...]` as a mapping; raises `InvalidArgument` on a malformed entry."""
    keys: dict[str, str] = {}
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        key_id, sep, secret = entry.partition(":")
        if not sep or not key_id.strip() or not secret:
            # Never echo the entry: it may hold a secret.
            raise InvalidArgument(f"{ACCESS_KEYS_VAR} entries must look like id:secret")
        keys[key_id.strip()] = secret
    return keys


def _access_keys_text() -> str:
    path = env_str(ACCESS_KEYS_FILE_VAR, "")
    if not path:
        return env_str(ACCESS_KEYS_VAR, "")
    try:
        return Path(path).read_text().strip()
    except OSError as err:
        raise InvalidArgument(f"{ACCESS_KEYS_FILE_VAR} {path!r} cannot be read: {err}") from err


class GatewaySettings(msgspec.Struct, frozen=True, kw_only=True):
    common: CommonSettings
    host: str = "127.0.0.1"
    port: int = 9000
    access_keys: dict[str, str] = {}
    auth_disabled: bool = False
    max_clock_skew_s: int = 900
    # Signs GetFunctionCode's download URLs; "" derives one from the access keys (see function_code.py).
    url_secret: str = ""
    # Generous enough for a 50 MB code zip in base64 plus JSON; each route applies its own limit.
    max_request_body_bytes: int = 72 * 1024 * 1024
    # Where clients reach this gateway (HTTP trigger URLs); empty: the base URL of the request.
    public_url: str = ""
    header_timeout_s: float = 10.0  # a request's headers must arrive within this
    body_idle_timeout_s: float = 10.0  # a body may pause at most this long
    max_connections_per_client: int = 64  # 0: no cap (set it so behind a proxy)
    max_connections: int = 2048  # past this, requests are answered 503 at once
    code_gc_every_s: float = 600.0  # 0: never sweep unreferenced code archives
    code_gc_grace_s: float = 3600.0  # an unreferenced archive younger than this is kept

    @classmethod
    def from_env(cls) -> Self:
        """Read the common variables plus TASKMODE_GATEWAY_* and TASKMODE_ACCESS_KEYS/AUTH_DISABLED."""
        return cls(
            common=CommonSettings.from_env(metrics_port_var=METRICS_PORT_VAR, metrics_port_default=0),
            host=env_str(HOST_VAR, "127.0.0.1"),
            port=env_int(PORT_VAR, 9000),
            access_keys=parse_access_keys(_access_keys_text()),
            auth_disabled=env_bool(AUTH_DISABLED_VAR, False),
            max_clock_skew_s=env_int(MAX_SKEW_VAR, 900),
            public_url=env_str(PUBLIC_URL_VAR, "").rstrip("/"),
            url_secret=env_str(URL_SECRET_VAR, ""),
            header_timeout_s=env_float(HEADER_TIMEOUT_VAR, 10.0),
            body_idle_timeout_s=env_float(BODY_IDLE_TIMEOUT_VAR, 10.0),
            max_connections_per_client=env_int(MAX_PER_CLIENT_VAR, 64),
            max_connections=env_int(MAX_CONNECTIONS_VAR, 2048),
            code_gc_every_s=env_float("TASKMODE_CODE_GC_EVERY_S", 600.0),
            code_gc_grace_s=env_float("TASKMODE_CODE_GC_GRACE_S", 3600.0),
        )
