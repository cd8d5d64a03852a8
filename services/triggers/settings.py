from __future__ import annotations

import msgspec

from shared.settings import CommonSettings, env_float, env_int


class TriggersSettings(msgspec.Struct, frozen=True, kw_only=True):
    common: CommonSettings
    # nats triggers: at most this many tasks' first appends await the stream's acknowledgement
    # at once (past it, messages wait in the subscription).
    appends_in_flight: int = 8192
    # Timer triggers: ticks missed while no instance ran (a restart, a lease handover) are
    # still fired if they are at most this old.
    timer_catchup_s: float = 300.0

    @classmethod
    def from_env(cls) -> TriggersSettings:
        return cls(
            common=CommonSettings.from_env(metrics_port_var="TASKMODE_TRIGGERS_METRICS_PORT", metrics_port_default=9104),
            appends_in_flight=env_int("TASKMODE_TRIGGERS_IN_FLIGHT", 8192),
            timer_catchup_s=env_float("TASKMODE_TIMER_CATCHUP_S", 300.0),
        )
