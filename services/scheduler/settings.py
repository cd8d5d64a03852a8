from __future__ import annotations

import msgspec

from shared.settings import CommonSettings, env_float, env_int


class SchedulerSettings(msgspec.Struct, frozen=True, kw_only=True):
    common: CommonSettings
    ack_wait_s: float
    batch_size: int
    max_parked: int  # delayed tasks the consumer may hold un-acked at once

    @classmethod
    def from_env(cls) -> SchedulerSettings:
        return cls(
            common=CommonSettings.from_env(metrics_port_var="TASKMODE_SCHEDULER_METRICS_PORT", metrics_port_default=9101),
            ack_wait_s=env_float("TASKMODE_SCHEDULER_ACK_WAIT_S", 30.0),
            batch_size=env_int("TASKMODE_SCHEDULER_BATCH", 256),
            max_parked=env_int("TASKMODE_SCHEDULER_MAX_PARKED", 200_000),
        )
