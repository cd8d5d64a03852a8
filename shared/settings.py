"""Configuration read from the environment, shared by every service.

Each service builds its settings once in `__main__` and passes them down; nothing reads the
environment at import time.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from shared.errors import InvalidArgument


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default) or default


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError as err:
        raise InvalidArgument(f"{name} must be an integer, got {raw!r}") from err


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw else default
    except ValueError as err:
        raise InvalidArgument(f"{name} must be a number, got {raw!r}") from err


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise InvalidArgument(f"{name} must be true or false, got {raw!r}")


class CommonSettings(msgspec.Struct, frozen=True, kw_only=True):
    """What every service needs: where the bus and the read model are, and who we are."""

    nats_url: str
    mongodb_url: str
    data_dir: Path
    region: str
    account_id: str
    metrics_port: int  # 0: no metrics endpoint
    metrics_host: str = "127.0.0.1"  # another address only where Prometheus scrapes from elsewhere
    # Tasks are split into this many partitions by a hash of their id; every service of one
    # deployment must agree, and it may change only on an empty stream.
    partitions: int = 4
    stream_replicas: int = 1  # 3 on a NATS cluster
    nats_credentials: tuple[str, str] | None = None  # user and password, where NATS asks for them
    # Partitioned services hold a partition by a lease this long; a dead instance's partitions
    # move to the others after it runs out.
    lease_s: float = 6.0

    @classmethod
    def from_env(cls, *, metrics_port_var: str, metrics_port_default: int) -> CommonSettings:
        """Read NATS_URL, MONGODB_URL, TASKMODE_DATA_DIR, TASKMODE_REGION, TASKMODE_ACCOUNT_ID,
        TASKMODE_METRICS_HOST and the service's metrics port variable."""
        return cls(
            nats_url=env_str("NATS_URL", "nats://127.0.0.1:4222"),
            mongodb_url=env_str("MONGODB_URL", "mongodb://127.0.0.1:27017"),
            data_dir=Path(env_str("TASKMODE_DATA_DIR", ".data")).resolve(),
            region=env_str("TASKMODE_REGION", "local"),
            account_id=env_str("TASKMODE_ACCOUNT_ID", "0000000000000000"),
            metrics_port=env_int(metrics_port_var, metrics_port_default),
            metrics_host=env_str("TASKMODE_METRICS_HOST", "127.0.0.1"),
            partitions=_positive("TASKMODE_PARTITIONS", env_int("TASKMODE_PARTITIONS", 4), most=64),
            stream_replicas=_positive("TASKMODE_STREAM_REPLICAS", env_int("TASKMODE_STREAM_REPLICAS", 1), most=5),
            nats_credentials=_credentials(),
            lease_s=env_float("TASKMODE_LEASE_S", 6.0),
        )


def _positive(name: str, value: int, *, most: int) -> int:
    if not 1 <= value <= most:
        raise InvalidArgument(f"{name} must be between 1 and {most}, got {value}")
    return value


def _credentials() -> tuple[str, str] | None:
    """NATS_USER with NATS_PASSWORD, or with NATS_PASSWORD_FILE (a file only the service can read,
    so that the password is not in its environment)."""
    user = os.environ.get("NATS_USER", "")
    if not user:
        return None
    password_file = os.environ.get("NATS_PASSWORD_FILE", "")
    if password_file:
        try:
            return user, Path(password_file).read_text().strip()
        except OSError as err:
            raise InvalidArgument(f"NATS_PASSWORD_FILE {password_file!r} cannot be read: {err}") from err
    return user, os.environ.get("NATS_PASSWORD", "")
