from __future__ import annotations

import msgspec

from services.executor.sandbox import SandboxSettings
from shared.settings import CommonSettings, env_float, env_int


class ExecutorSettings(msgspec.Struct, frozen=True, kw_only=True):
    common: CommonSettings
    concurrency: int  # tasks this executor runs at once, over all functions
    account_concurrency: int  # tasks of all functions running at once over every executor (0: no cap)
    max_instances_per_function: int
    max_queued_per_function: int  # dispatches that wait for a busy function holding a fetch slot
    max_parked: int  # further waiting dispatches, over all functions, that hold no slot
    saturated_retry_s: float  # past both, a dispatch is handed back for this long
    idle_timeout_s: float
    ack_wait_s: float  # a dead executor's tasks are picked up again after this long
    retry_base_ms: int  # first retry after a handler error; doubles each time (FC: 0.5 s)
    retry_max_ms: int
    sandbox: SandboxSettings
    code_gc_grace_s: float  # unpacked code unused for this long is removed

    @classmethod
    def from_env(cls) -> ExecutorSettings:
        return cls(
            common=CommonSettings.from_env(metrics_port_var="TASKMODE_EXECUTOR_METRICS_PORT", metrics_port_default=9102),
            concurrency=env_int("TASKMODE_EXECUTOR_CONCURRENCY", 64),
            account_concurrency=max(0, env_int("TASKMODE_ACCOUNT_CONCURRENCY", 0)),
            max_instances_per_function=env_int("TASKMODE_EXECUTOR_MAX_INSTANCES", 16),
            max_queued_per_function=env_int("TASKMODE_EXECUTOR_MAX_QUEUED_PER_FUNCTION", 16),
            max_parked=env_int("TASKMODE_EXECUTOR_MAX_PARKED", 1024),
            saturated_retry_s=env_float("TASKMODE_EXECUTOR_SATURATED_RETRY_S", 1.0),
            idle_timeout_s=env_float("TASKMODE_EXECUTOR_IDLE_TIMEOUT_S", 120.0),
            ack_wait_s=env_float("TASKMODE_EXECUTOR_ACK_WAIT_S", 30.0),
            retry_base_ms=env_int("TASKMODE_RETRY_BASE_MS", 500),
            retry_max_ms=env_int("TASKMODE_RETRY_MAX_MS", 300_000),
            sandbox=SandboxSettings.from_env(),
            code_gc_grace_s=env_float("TASKMODE_EXECUTOR_CODE_GC_GRACE_S", 3600.0),
        )

    def backoff_ms(self, attempt: int) -> int:
        """Delay before retry number `attempt + 1` (binary exponential, capped)."""
        return int(min(self.retry_max_ms, self.retry_base_ms * (2**attempt)))
