"""Where the CLI sends requests and with which key: flags, then the environment, then the config
file `taskmode configure` writes, then what `make run` sets up (http://127.0.0.1:9000 and the
development key in `.data/dev-access-key`)."""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Final

DEFAULT_ENDPOINT: Final = "http://127.0.0.1:9000"
ENDPOINT_VAR: Final = "TASKMODE_ENDPOINT"
KEY_ID_VAR: Final = "TASKMODE_ACCESS_KEY_ID"
KEY_SECRET_VAR: Final = "TASKMODE_ACCESS_KEY_SECRET"
CONFIG_VAR: Final = "TASKMODE_CONFIG"  # another config file than the default one
DATA_DIR_VAR: Final = "TASKMODE_DATA_DIR"
DEV_KEY_FILE: Final = "dev-access-key"


class ProfileError(Exception):
    """No usable endpoint or key; the message says what to set."""


@dataclass(frozen=True)
class Profile:
    endpoint: str
    access_key_id: str
    access_key_secret: str


def config_path(environ: dict[str, str] | None = None) -> Path:
    """`$TASKMODE_CONFIG`, else `$XDG_CONFIG_HOME/taskmode/config.toml` (default `~/.config`)."""
    env = os.environ if environ is None else environ
    if env.get(CONFIG_VAR):
        return Path(env[CONFIG_VAR])
    base = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / "taskmode" / "config.toml"


def read_config(path: Path) -> dict[str, str]:
    """The config file's string settings ({} when there is none)."""
    try:
        with path.open("rb") as handle:
            loaded = tomllib.load(handle)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as err:
        raise ProfileError(f"{path} is not valid TOML: {err}") from err
    return {k: v for k, v in loaded.items() if isinstance(v, str)}


def write_config(path: Path, settings: dict[str, str]) -> None:
    """Write the settings as TOML, readable by the owner only (it holds a secret)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # JSON string escapes are valid TOML basic-string escapes for everything json.dumps emits.
    text = "".join(f"{key} = {json.dumps(value)}\n" for key, value in sorted(settings.items()) if value)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    path.chmod(0o600)


def _dev_key(env: dict[str, str]) -> tuple[str, str] | None:
    key_file = Path(env.get(DATA_DIR_VAR) or ".data") / DEV_KEY_FILE
    if not key_file.is_file():
        return None
    key_id, sep, secret = key_file.read_text().strip().split(",")[0].partition(":")
    return (key_id, secret) if sep and key_id and secret else None


def resolve(
    *,
    endpoint: str | None = None,
    access_key_id: str | None = None,
    access_key_secret: str | None = None,
    environ: dict[str, str] | None = None,
) -> Profile:
    """The profile from flags (the arguments), the environment, the config file and `make run`'s defaults."""
    env = dict(os.environ if environ is None else environ)
    stored = read_config(config_path(env))
    chosen_endpoint = endpoint or env.get(ENDPOINT_VAR) or stored.get("endpoint") or DEFAULT_ENDPOINT
    key_id = access_key_id or env.get(KEY_ID_VAR) or stored.get("access_key_id") or ""
    secret = access_key_secret or env.get(KEY_SECRET_VAR) or stored.get("access_key_secret") or ""
    if not key_id and not secret:
        found = _dev_key(env)
        if found is not None:
            key_id, secret = found
    if not key_id or not secret:
        raise ProfileError(
            "no access key: pass --access-key-id and --access-key-secret, set "
            f"{KEY_ID_VAR} and {KEY_SECRET_VAR}, or run `taskmode configure`"
        )
    return Profile(endpoint=chosen_endpoint.rstrip("/"), access_key_id=key_id, access_key_secret=secret)
