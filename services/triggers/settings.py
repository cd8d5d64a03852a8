from __future__ import annotations

import msgspec

from shared.settings import CommonSettings, env_float, env_int


class TriggersSettings(msgspec.Struct, frozen=True, kw_only=True):
    common: CommonSettings
    # nats triggers: messages are gathered this long (when fewer than a batch wait), then
    # appended as one atomic batch; this many batches may be in flight at once.
    gather_s: float = 0.001
    batch_tasks: int = 500
    batches_in_flight: int = 4
    # Timer triggers: ticks missed while no instance ran (a restart, a lease handover) are
    # still fired if they are at most this old.
    timer_catchup_s: float = 300.0

    @classmethod
    def from_env(cls) -> TriggersSettings:
        return cls(
            common=CommonSettings.from_env(metrics_port_var="TASKMODE_TRIGGERS_METRICS_PORT", metrics_port_default=9104),
            gather_s=env_float("TASKMODE_TRIGGERS_GATHER_S", 0.001),
            batch_tasks=env_int("TASKMODE_TRIGGERS_BATCH", 500),
            batches_in_flight=env_int("TASKMODE_TRIGGERS_BATCHES_IN_FLIGHT", 4),
            timer_catchup_s=env_float("TASKMODE_TIMER_CATCHUP_S", 300.0),
        )
