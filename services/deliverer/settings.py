from __future__ import annotations

import msgspec

from shared.errors import InvalidArgument
from shared.settings import CommonSettings, env_float, env_int, env_str

SECRET_VAR = "TASKMODE_DELIVERY_SECRET"


class DelivererSettings(msgspec.Struct, frozen=True, kw_only=True):
    common: CommonSettings
    secret: str  # signs webhook records; receivers hold the same value
    timeout_s: float = 10.0  # one attempt at a webhook
    max_attempts: int = 16
    retry_base_s: float = 1.0  # doubles per attempt ...
    retry_max_s: float = 300.0  # ... up to this
    ack_wait_s: float = 60.0  # longer than an attempt can take

    def backoff_s(self, attempt: int) -> float:
        """How long after failed attempt number `attempt` (1-based) the next one is made."""
        return float(min(self.retry_max_s, self.retry_base_s * 2 ** max(0, attempt - 1)))

    @classmethod
    def from_env(cls) -> DelivererSettings:
        secret = env_str(SECRET_VAR, "")
        if not secret:
            raise InvalidArgument(f"{SECRET_VAR} is required: webhook records are signed with it")
        timeout_s = env_float("TASKMODE_DELIVERY_TIMEOUT_S", 10.0)
        return cls(
            common=CommonSettings.from_env(metrics_port_var="TASKMODE_DELIVERER_METRICS_PORT", metrics_port_default=9105),
            secret=secret,
            timeout_s=timeout_s,
            max_attempts=env_int("TASKMODE_DELIVERY_MAX_ATTEMPTS", 16),
            retry_base_s=env_float("TASKMODE_DELIVERY_RETRY_BASE_S", 1.0),
            retry_max_s=env_float("TASKMODE_DELIVERY_RETRY_MAX_S", 300.0),
            ack_wait_s=max(30.0, timeout_s * 3),
        )
